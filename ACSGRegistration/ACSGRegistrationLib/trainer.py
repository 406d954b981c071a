"""Training and fine-tuning: resumable, cancellable, mixed precision on GPU, DDP under torchrun.

The schedule is a pure function of (seed, step): the batch of step s is drawn from the permutation of
epoch s // steps_per_epoch, and random-number states are checkpointed, so a run resumed from its last
checkpoint continues exactly where it stopped.
"""

import math
import os
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from .checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint, versions
from .config import ModelConfig, TrainConfig, to_dict
from .errors import InputError, ResultError
from .geometry import write_csv
from .losses import RegistrationLoss
from .networks import RegistrationNet
from .outputs import FolderLock, check_run_folder, remove_orphaned_files
from .registrar import choose_device

LAST = "last.pt"
FINAL = "model.pt"
HISTORY = "history.csv"

ProgressCallback = Callable[[int, int, Dict[str, float]], None]


class StepBatchSampler(Sampler):
    """Batches for steps ``start`` .. ``stop - 1`` of a seeded, epoch-wise shuffled schedule."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1):
        self.size, self.batch, self.seed = size, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self.steps_per_epoch = max(1, math.ceil(size / (batch_size * world)))

    def batch_for_step(self, step: int) -> List[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        first = (k * self.world + self.rank) * self.batch
        return [int(perm[(first + i) % self.size]) for i in range(self.batch)]

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.batch_for_step(step)

    def __len__(self):
        return max(0, self.stop - self.start)


def distributed_context():
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when not distributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def check_same_run(payload: Dict, last_path: str, train_config: TrainConfig, init_checkpoint: Optional[str]) -> None:
    """Resuming continues the run in its folder as it was started: a different starting checkpoint, learning
    rate or batch size would be silently ignored, so it is refused (the number of steps may grow: that extends
    the run)."""
    recorded = payload.get("train_config") or {}
    started_from = (payload.get("summary") or {}).get("init_checkpoint")
    changed = []
    if init_checkpoint and started_from and os.path.realpath(init_checkpoint) != os.path.realpath(started_from):
        changed.append(f"the checkpoint {init_checkpoint} (it started from {started_from})")
    for key, option in (("learning_rate", "--lr"), ("batch_size", "--batch-size")):
        if key in recorded and recorded[key] != getattr(train_config, key):
            changed.append(f"{option} {getattr(train_config, key)} (it has {recorded[key]})")
    if changed:
        raise InputError(f"{os.path.dirname(last_path)} holds a run at step {payload.get('step', 0)}; resuming it "
                         f"would ignore {' and '.join(changed)}: pass --restart (in Slicer: untick Resume) to start a "
                         "new run there, or choose another folder")


class Trainer:
    """Train from scratch, fine-tune from a checkpoint, or resume the run in ``out_dir``."""

    def __init__(self, model_config: Optional[ModelConfig], train_config: TrainConfig, dataset: Dataset,
                 out_dir: str, init_checkpoint: Optional[str] = None, device: str = "auto", resume: bool = True,
                 progress: Optional[ProgressCallback] = None, should_stop: Optional[Callable[[], bool]] = None,
                 log: Callable[[str], None] = print):
        self.cfg = train_config
        self.dataset = dataset
        self.out_dir = out_dir
        self.progress = progress
        self.should_stop = should_stop or (lambda: False)
        self.rank, self.world, local_rank = distributed_context()
        self.log = log if self.rank == 0 else (lambda *_: None)
        self.device = choose_device(device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        check_run_folder(out_dir, (LAST, FINAL, HISTORY), option="the run folder")
        os.makedirs(out_dir, exist_ok=True)
        self.last_path = os.path.join(out_dir, LAST)

        self.step = 0
        self.history: List[Dict[str, float]] = []
        self.elapsed = 0.0
        resume_payload = None
        if resume and os.path.isfile(self.last_path):
            resume_payload = load_checkpoint(self.last_path)
            model = build_model(resume_payload, self.last_path)
            if model_config is not None and to_dict(model_config) != to_dict(resume_payload["model_config_obj"]):
                raise CheckpointError(f"{self.last_path} holds a run with another model configuration; "
                                      "choose a new output folder or pass resume=False")
            check_same_run(resume_payload, self.last_path, train_config, init_checkpoint)
            self.log(f"resuming from {self.last_path} at step {resume_payload.get('step', 0)}")
        elif init_checkpoint:
            payload = load_checkpoint(init_checkpoint)
            model = build_model(payload, init_checkpoint)
            self.log(f"fine-tuning from {init_checkpoint}")
        else:
            if model_config is None:
                raise ValueError("a model configuration is needed to train from scratch")
            torch.manual_seed(train_config.seed)
            model = RegistrationNet(model_config)
        self.model_config = model.config
        self.init_checkpoint = init_checkpoint
        self.model = model.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=train_config.learning_rate)
        if resume_payload is not None:
            self._restore(resume_payload)
        self.net = self.model
        if self.world > 1:
            if self.device.type == "cuda":
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.loss = RegistrationLoss(train_config.loss)
        self.autocast = self.device.type == "cuda" and train_config.mixed_precision

    def _restore(self, payload):
        self.optimizer.load_state_dict(payload["optimizer"])
        self.step = int(payload.get("step", 0))
        self.history = list(payload.get("history", []))
        self.elapsed = float(payload.get("elapsed_seconds", 0.0))
        rng = payload.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def summary(self, status: str) -> Dict:
        last = self.history[-1] if self.history else {}
        return {"status": status, "steps": self.step, "max_steps": self.cfg.max_steps,
                "elapsed_seconds": round(self.elapsed, 1), "final_loss": last.get("total"),
                "device": str(self.device), "world_size": self.world, "pairs": len(self.dataset),
                "init_checkpoint": self.init_checkpoint, "versions": versions(),
                # the model to register with now: the final one, or the last checkpoint of a stopped run
                "checkpoint": os.path.join(self.out_dir, FINAL if status == "finished" else LAST)}

    def save(self, status: str = "running"):
        if self.rank == 0:
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            save_checkpoint(self.last_path, self.model, self.model_config, train_config=to_dict(self.cfg),
                            optimizer=self.optimizer.state_dict(), step=self.step, history=self.history,
                            elapsed_seconds=self.elapsed, rng=rng, summary=self.summary(status))
            self._write_history()
        if self.world > 1:
            dist.barrier()

    def _write_history(self):
        if not self.history:
            return
        write_csv(self.history, os.path.join(self.out_dir, HISTORY))

    def _batches(self):
        sampler = StepBatchSampler(len(self.dataset), self.cfg.batch_size, self.cfg.seed, self.step,
                                   self.cfg.max_steps, self.rank, self.world)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.cfg.num_workers,
                          pin_memory=self.device.type == "cuda")

    def train_step(self, batch) -> Dict[str, float]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        use_labels = self.cfg.use_labels and "moving_label" in batch
        self.net.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.net(batch["fixed"], batch["moving"], batch["moving_label"] if use_labels else None)
            terms = self.loss(batch["fixed"], out, batch["fixed_label"] if use_labels else None,
                              batch.get("true_inverse"), batch.get("known"), self.model_config.input_spacing)
        if not torch.isfinite(terms["total"].detach()):
            # Never step on (or save) a diverged loss: the last checkpoint stays the last good state.
            bad = ", ".join(k for k, v in terms.items() if not torch.isfinite(v.detach()))
            raise ResultError(f"training diverged at step {self.step + 1}: non-finite loss ({bad}); nothing was "
                              f"saved from this step on ({self.last_path}, where it exists, holds the last good state; "
                              "a lower learning rate may help)")
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        self.optimizer.step()
        return {k: float(v.detach()) for k, v in terms.items()}

    def train(self) -> Dict:
        """Run until ``max_steps``, a cancel request or Ctrl+C; the state is saved in every case. One run per
        folder at a time (a lock beside it); half-written files of a killed run are removed first."""
        if self.rank != 0:
            return self._train()
        with FolderLock(self.out_dir, "the run folder"):
            remove_orphaned_files(self.out_dir)
            return self._train()

    def _train(self) -> Dict:
        status = "finished"
        self.log(f"training {self.model_config.method} on {len(self.dataset)} pairs, device {self.device}, "
                 f"steps {self.step}..{self.cfg.max_steps}")
        t_last = time.perf_counter()
        try:
            for batch in self._batches():
                if self.should_stop():
                    status = "cancelled"
                    break
                terms = self.train_step(batch)
                self.step += 1
                now = time.perf_counter()
                self.elapsed += now - t_last
                t_last = now
                terms["step"] = self.step
                self.history.append(terms)
                if self.progress is not None and self.rank == 0:
                    self.progress(self.step, self.cfg.max_steps, terms)
                if self.step % self.cfg.checkpoint_every == 0 and self.step < self.cfg.max_steps:
                    self.save()
        except KeyboardInterrupt:
            status = "interrupted"
        self.save(status)
        if status == "finished" and self.rank == 0:
            save_checkpoint(os.path.join(self.out_dir, FINAL), self.model, self.model_config,
                            train_config=to_dict(self.cfg), step=self.step, summary=self.summary(status))
        if status == "finished":
            self.log(f"finished at step {self.step}: the model to register with is "
                     f"{os.path.join(self.out_dir, FINAL)} (--checkpoint)")
        else:
            self.log(f"{status} at step {self.step}: {self.last_path} saved; the same command resumes from it")
        return self.summary(status)
