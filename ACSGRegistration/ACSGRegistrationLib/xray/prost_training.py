"""Training ProST's similarity by the direction of its pose gradient (the paper's "double backward" loss).

Each step draws one training CT, a true pose (an AP view of the target vertebra, turned), a realistic X-ray
there (``simulation``) and starting poses around it; the network's distance is differentiated with respect to the
pose (keeping the graph), and that gradient is compared with the true direction: the gradient of the squared
distance to the truth in the pose's parameters (rotation about the target vertebra's centre, translation; see
``gradient_directions``). The loss is 1 - cos between the two, differentiated once
more to reach the network's weights. Both gradients are taken in the pose search's scaled parameters
(``register.PARAMETER_SCALE``), the space the registration descends in.

Runs resume from ``last.pt`` in their folder; checkpoints are written atomically; held-out poses (and held-out
CTs where given) are scored every ``validate_every`` steps by the mean cosine. With several processes
(``torchrun``) each draws its own cases and the weights' gradients are averaged over them
(``torch.distributed``; PyTorch's DDP wrapper cannot be used here, it does not support the second derivative).
"""

import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import Cancelled, InputError, ResultError
from ..geometry import write_csv
from .camera import moved_pose, pose_from_parameters
from .prost import ProSTConfig, ProSTNet, load_prost, network_volume, save_prost
from .register import PARAMETER_SCALE, prepare_xray
from .simulation import Realism, XraySimulator, random_parameters, random_view

LAST, FINAL, HISTORY = "last.pt", "model.pt", "history.csv"


@dataclass
class ProSTTrainConfig:
    steps: int = 3000
    batch_size: int = 4  # poses (and X-rays) of one CT per step
    learning_rate: float = 1e-3
    rotation_deg: float = 10.0  # σ of the starting poses' offsets from the truth, per axis
    translation_mm: float = 15.0  # in-plane σ
    depth_mm: float = 30.0  # σ along the principal ray
    view_deg: float = 10.0  # true poses: AP turned by up to this (LAO and cranial)
    simulation_spacing_mm: float = 2.0  # the CT grid the X-rays are simulated from (finer than the network's)
    validation_poses: int = 16
    validate_every: int = 100
    save_every: int = 50
    seed: int = 0


class Subject:
    """One CT with its label map and target vertebra, prepared for training."""

    def __init__(self, name: str, ct: sitk.Image, labels: sitk.Image, label: int, config: ProSTConfig,
                 simulation_spacing: float):
        self.name = name
        self.simulator = XraySimulator(ct, labels, label, spacing=simulation_spacing)
        self.centre = self.simulator.centre
        self.volume = network_volume(ct, self.centre, config)

    @classmethod
    def from_files(cls, ct_path: str, seg_path: str, label: int, config: ProSTConfig, simulation_spacing: float):
        from ..io import read_image
        return cls(os.path.basename(os.path.dirname(os.path.abspath(ct_path))) or ct_path,
                   read_image(ct_path, "CT"), read_image(seg_path, "CT label map"), int(label), config,
                   simulation_spacing)


def draw_cases(subject: Subject, carm, rng: np.random.Generator, count: int, config: ProSTTrainConfig,
               realism: Realism):
    """``count`` (truth, start, X-ray) of one subject: X-rays on the network's detector."""
    truths, starts, xrays = [], [], []
    for _ in range(count):
        truth = random_view(rng, subject.centre, config.view_deg)
        offset = random_parameters(rng, config.rotation_deg, config.translation_mm, config.depth_mm)
        start = moved_pose(truth, offset, subject.centre)
        xrays.append(prepare_xray(subject.simulator.xray(carm, truth, rng, realism), carm.size))
        truths.append(truth)
        starts.append(start)
    return (torch.as_tensor(np.stack(truths), dtype=torch.float32),
            torch.as_tensor(np.stack(starts), dtype=torch.float32), torch.stack(xrays))


def parameters_between(start: np.ndarray, truth: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """The parameters p with ``pose_from_parameters(p, start, centre) == truth``: the rotation vector of
    truth_R · start_Rᵀ, and the displacement of the centre (source frame)."""
    from scipy.spatial.transform import Rotation
    rotation = Rotation.from_matrix(truth[:3, :3] @ start[:3, :3].T).as_rotvec()
    translation = (truth[:3, :3] @ centre + truth[:3, 3]) - (start[:3, :3] @ centre + start[:3, 3])
    return np.concatenate([rotation, translation])


def gradient_directions(net: ProSTNet, subject: Subject, carm, truths, starts, xrays, create_graph: bool):
    """The learned distance's pose gradient and the true direction, both (B, 6) in scaled parameters. The true
    direction is the gradient of the squared distance to the truth in those parameters (a geodesic-like
    distance on poses with the rotation about the vertebra's centre): -p*/scale at the start, where p* takes
    the start to the truth. (The gradient of the squared mTRE would be dominated by depth, the direction a
    single view sees least, and would undervalue rotation.)"""
    scale = torch.as_tensor(PARAMETER_SCALE, dtype=torch.float32)
    centre = torch.as_tensor(subject.centre, dtype=torch.float32)
    theta = torch.zeros(len(starts), 6, requires_grad=True)
    poses = torch.stack([pose_from_parameters(theta[b] * scale, starts[b], centre) for b in range(len(starts))])
    features = net.volume_features(subject.volume.mu)
    distance = net.distance(net.project(subject.volume, features, carm, poses, second_order=create_graph), xrays)
    learned = torch.autograd.grad(distance.sum(), theta, create_graph=create_graph)[0]
    towards = [parameters_between(s.double().numpy(), t.double().numpy(), subject.centre)
               for s, t in zip(starts, truths)]
    true = -torch.as_tensor(np.stack(towards) / PARAMETER_SCALE, dtype=torch.float32)
    return learned, true


def cosine(learned: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(learned, true.detach(), dim=1, eps=1e-12)


class ProSTTrainer:
    def __init__(self, subjects: Sequence[Subject], out_dir: str, config: ProSTTrainConfig,
                 net_config: Optional[ProSTConfig] = None, validation_subjects: Sequence[Subject] = (),
                 resume: bool = True, realism: Optional[Realism] = None, log: Callable[[str], None] = print):
        if not subjects:
            raise InputError("xray-train needs at least one CT with its label map and target vertebra")
        self.subjects, self.config, self.out_dir, self.log = list(subjects), config, out_dir, log
        self.validation_subjects = list(validation_subjects) or self.subjects
        self.realism = realism or Realism()
        from ..outputs import check_run_folder
        check_run_folder(out_dir, (LAST, FINAL, HISTORY), option="the run folder")
        os.makedirs(out_dir, exist_ok=True)
        self.last_path = os.path.join(out_dir, LAST)
        self.step, self.history, self.elapsed = 0, [], 0.0
        if resume and os.path.isfile(self.last_path):
            payload = load_prost(self.last_path)
            self.net = payload["net"]
            self.step, self.history = int(payload["step"]), list(payload["history"])
            self.elapsed = float(payload.get("elapsed_seconds", 0.0))
            log(f"resuming from {self.last_path} at step {self.step}")
        else:
            torch.manual_seed(config.seed)
            self.net, payload = ProSTNet(net_config), None
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.learning_rate)
        if payload is not None:
            self.optimizer.load_state_dict(payload["optimizer"])
        c = self.net.config
        # The network's detector: a C-arm like the evaluation's, at the network's resolution.
        from .camera import CArm
        self.carm = CArm(1020.0, (204.8 / c.detector_pixels,) * 2, (c.detector_pixels,) * 2)
        self.world, self.rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.world, self.rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        self._validation = None

    def validation_cases(self):
        """Held-out poses and X-rays, the same at every validation (their own seed)."""
        if self._validation is None:
            rng = np.random.default_rng(10 ** 6 + self.config.seed)
            per = max(1, self.config.validation_poses // len(self.validation_subjects))
            self._validation = [(s, draw_cases(s, self.carm, rng, per, self.config, self.realism))
                                for s in self.validation_subjects]
        return self._validation

    def validate(self) -> float:
        """Mean cosine between the learned pose gradient and the true direction on the held-out poses."""
        values = []
        self.net.eval()
        for subject, (truths, starts, xrays) in self.validation_cases():
            learned, true = gradient_directions(self.net, subject, self.carm, truths, starts, xrays, False)
            values.append(cosine(learned, true).detach())
        return float(torch.cat(values).mean())

    def train_step(self) -> float:
        rng = np.random.default_rng([self.config.seed, self.step, self.rank])
        subject = self.subjects[int(rng.integers(len(self.subjects)))]
        truths, starts, xrays = draw_cases(subject, self.carm, rng, self.config.batch_size, self.config,
                                           self.realism)
        self.net.train()
        learned, true = gradient_directions(self.net, subject, self.carm, truths, starts, xrays, True)
        loss = (1.0 - cosine(learned, true)).mean()
        if not torch.isfinite(loss):
            raise ResultError(f"ProST training diverged at step {self.step + 1} (non-finite loss); {self.last_path} "
                              "holds the last good state")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            for parameter in self.net.parameters():
                if parameter.grad is not None:
                    torch.distributed.all_reduce(parameter.grad)
                    parameter.grad /= self.world
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 10.0)
        self.optimizer.step()
        return loss.item()

    def save(self, path: str, status: str):
        if self.rank == 0:
            save_prost(path, self.net, optimizer=self.optimizer.state_dict(), step=self.step,
                       history=self.history, elapsed_seconds=self.elapsed, train_config=asdict(self.config),
                       status=status, subjects=[s.name for s in self.subjects])
            write_csv(self.history, os.path.join(self.out_dir, HISTORY)) if self.history else None

    def train(self, should_stop: Optional[Callable[[], bool]] = None,
              progress: Optional[Callable[[int, int, Dict], None]] = None) -> Dict:
        """Until ``steps``, a cancel request or Ctrl+C; the state is saved in every case."""
        status, losses, t0 = "finished", [], time.perf_counter()
        if not self.history:
            self.history.append({"step": 0, "loss": None, "validation_cosine": round(self.validate(), 4)})
            self.log(f"step 0: held-out cosine {self.history[-1]['validation_cosine']:.3f}")
        try:
            while self.step < self.config.steps:
                if should_stop is not None and should_stop():
                    raise Cancelled("ProST training stopped")
                losses.append(self.train_step())
                self.step += 1
                if self.step % self.config.validate_every == 0 or self.step == self.config.steps:
                    row = {"step": self.step, "loss": round(float(np.mean(losses)), 4),
                           "validation_cosine": round(self.validate(), 4)}
                    self.history.append(row)
                    losses = []
                    self.log(f"step {self.step}/{self.config.steps}: loss {row['loss']:.3f}, held-out cosine "
                             f"{row['validation_cosine']:.3f}")
                if progress is not None:
                    progress(self.step, self.config.steps, self.history[-1])
                if self.step % self.config.save_every == 0:
                    self.elapsed += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save(self.last_path, "running")
        except (Cancelled, KeyboardInterrupt):
            status = "stopped"
        self.elapsed += time.perf_counter() - t0
        self.save(self.last_path, status)
        final = os.path.join(self.out_dir, FINAL)
        if status == "finished":
            self.save(final, status)
        return {"status": status, "steps": self.step, "history": self.history,
                "checkpoint": final if status == "finished" else self.last_path,
                "elapsed_seconds": round(self.elapsed, 1)}


def check_ct_targets(cts: List[str], segs: List[str], labels: List[int], option: str = "--ct") -> None:
    if not (len(cts) == len(segs) == len(labels)):
        raise InputError(f"{option}, its label map and its label are given together: {len(cts)} CTs, "
                         f"{len(segs)} label maps, {len(labels)} labels")


def subjects_from_arguments(cts: List[str], segs: List[str], labels: List[int], config: ProSTConfig,
                            simulation_spacing: float, option: str = "--ct") -> List[Subject]:
    check_ct_targets(cts, segs, labels, option)
    return [Subject.from_files(c, s, int(n), config, simulation_spacing) for c, s, n in zip(cts, segs, labels)]
