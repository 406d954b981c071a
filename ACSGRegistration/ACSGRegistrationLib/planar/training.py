"""Training the 2D network without labels (Shan et al. 2017): photometric loss plus edge-aware smoothness.

Pairs are drawn at every step from views of the training CTs (``data.views_of``, extracted once): one view
and another exposure of it (the identity), known deformations of one view (``data.known_deformation``:
per-vertebra rigid motion and smooth soft-tissue motion, another exposure) and pairs of two views of the same
kind at neighbouring levels or of two subjects. The loss uses the images alone (L2, the paper's, or LNCC) and
the field's edge-aware smoothness; the vertebrae's labels enter only with ``dice`` > 0 (optional). Resumable
from ``last.pt``; atomic checkpoints; ``history.csv`` holds the loss terms and, every ``validate_every``
steps, the end-point error inside the vertebrae on fixed known-deformation cases of the held-out views (and
the identity's).
"""

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import write_csv
from ..losses import edge_aware_smoothness, local_ncc, soft_dice
from .data import (View, endpoint_error, identity_error, image_tensor, intensity_realism, known_deformation,
                   vertebra_masks)
from .model_file import load_planar, save_planar
from .network import PlanarConfig, PlanarNet

SIMILARITIES = ("l2", "lncc")
SCHEDULES = ("constant", "cosine")


@dataclass
class PlanarTrainConfig:
    steps: int = 2000
    batch_size: int = 8
    learning_rate: float = 1e-3
    # LNCC by default: the pairs differ in exposure (gamma, contrast, noise), which the paper's L2 would take
    # for misalignment; "l2" keeps the paper's loss.
    similarity: str = "lncc"
    smoothness: Optional[float] = None  # its weight (pixel displacements); None: 1 with LNCC, 0.02 with L2
    edge_alpha: float = 10.0  # 0: plain diffusion
    smoothness_order: int = 1
    dice: float = 0.0  # optional label term
    known_fraction: float = 0.7
    # Pairs of one view and another exposure of it, undeformed: without them the network learned to deform
    # whatever it is given (an image registered to itself moved 0.42 mm on average, 2.8 mm at the 99th pct).
    identity_fraction: float = 0.1
    # Each kind of view (sagittal, coronal, axial, lateral, ap) drawn equally often: otherwise the slices'
    # five offsets per level leave the projections (radiograph-like, the users' main 2D images) 2 pairs in 17.
    balance_kinds: bool = False
    # "cosine": the learning rate decays to 1 % of its value over ``steps`` (a fine-tune's usual ending).
    schedule: str = "constant"
    validate_every: int = 100
    checkpoint_every: int = 100
    seed: int = 0


def similarity_loss(kind: str, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    if kind == "l2":
        return F.mse_loss(warped, fixed)
    if kind == "lncc":
        return -local_ncc(fixed.unsqueeze(2), warped.unsqueeze(2), window=9)
    raise ValueError(f"unknown similarity {kind!r}: choose from {', '.join(SIMILARITIES)}")


def smoothness_weight(cfg: PlanarTrainConfig) -> float:
    """The smoothness weight: VoxelMorph's for each similarity (1 for NCC, 0.01-0.02 for MSE on [0, 1])."""
    if cfg.smoothness is not None:
        return float(cfg.smoothness)
    return 1.0 if cfg.similarity == "lncc" else 0.02


def planar_loss(cfg: PlanarTrainConfig, fixed, out, fixed_label=None) -> Dict[str, torch.Tensor]:
    terms = {"similarity": similarity_loss(cfg.similarity, fixed, out["warped"]),
             "smoothness": edge_aware_smoothness(out["displacement"], fixed, cfg.edge_alpha, cfg.smoothness_order)}
    total = terms["similarity"] + smoothness_weight(cfg) * terms["smoothness"]
    if cfg.dice > 0 and fixed_label is not None and "warped_label" in out:
        terms["dice"] = -soft_dice(fixed_label, out["warped_label"])
        total = total + cfg.dice * terms["dice"]
    terms["total"] = total
    return terms


class PairSampler:
    """Training pairs (fixed, moving, fixed mask, moving mask) drawn from views."""

    def __init__(self, views: Sequence[View], known_fraction: float, seed: int, identity_fraction: float = 0.0,
                 balance_kinds: bool = False):
        if not views:
            raise ValueError("no views to train on")
        self.views, self.known_fraction, self.identity_fraction = list(views), known_fraction, identity_fraction
        self.rng = np.random.default_rng(seed)
        # Balanced: each kind equally likely, then each of that kind's views (None: every view equally likely).
        kinds = [v.kind for v in self.views]
        self.weights = None
        if balance_kinds:
            self.weights = np.array([1.0 / kinds.count(k) for k in kinds]) / len(set(kinds))
        self.partners = {}
        for i, v in enumerate(self.views):
            self.partners[i] = [j for j, w in enumerate(self.views) if j != i and w.kind == v.kind
                                and (w.subject != v.subject or abs(w.label - v.label) == 1)]

    def pick(self) -> int:
        """The index of the next pair's fixed view."""
        if self.weights is None:
            return int(self.rng.integers(len(self.views)))
        return int(self.rng.choice(len(self.views), p=self.weights))

    def draw(self):
        """(fixed, moving, fixed mask, moving mask): the masks are the vertebra each view is centred on."""
        i = self.pick()
        view = self.views[i]
        fixed, labels = image_tensor(view.image), image_tensor(view.labels)
        draw = self.rng.random()
        if draw < self.identity_fraction:
            return fixed, intensity_realism(fixed, self.rng), (labels == view.label).float(), \
                (labels == view.label).float()
        if draw < self.identity_fraction + self.known_fraction or not self.partners[i]:
            truth = known_deformation(fixed, labels, self.rng)
            moving, moving_mask = truth.moving, (truth.moving_labels == view.label).float()
        else:
            other = self.views[int(self.rng.choice(self.partners[i]))]
            moving = intensity_realism(image_tensor(other.image), self.rng)
            moving_mask = (image_tensor(other.labels) == other.label).float()
        return fixed, moving, (labels == view.label).float(), moving_mask

    def batch(self, size: int):
        items = [self.draw() for _ in range(size)]
        return [torch.cat(parts) for parts in zip(*items)]


def validation_cases(views: Sequence[View], seed: int = 1234, count: int = 16) -> List[Dict]:
    """Fixed known-deformation cases of ``views`` (the same at every validation)."""
    rng = np.random.default_rng(seed)
    cases = []
    for k in range(min(count, len(views))):
        view = views[int(rng.integers(len(views)))] if len(views) > count else views[k]
        fixed, labels = image_tensor(view.image), image_tensor(view.labels)
        truth = known_deformation(fixed, labels, rng)
        cases.append({"fixed": fixed, "moving": truth.moving, "backward": truth.backward,
                      "mask": vertebra_masks(labels)})
    return cases


def validate(net: PlanarNet, cases: Sequence[Dict], spacing: float = 1.0) -> Dict[str, float]:
    network, identity = [], []
    with torch.no_grad():
        for case in cases:
            displacement = net.field(case["fixed"], case["moving"])
            network.append(endpoint_error(displacement, case["backward"], case["mask"], spacing)["mean"])
            identity.append(identity_error(case["backward"], case["mask"], spacing)["mean"])
    return {"val_epe_mm": float(np.nanmean(network)), "val_identity_epe_mm": float(np.nanmean(identity))}


class PlanarTrainer:
    """Train (or resume) a 2D network in ``out``: ``last.pt`` (resumed from), ``model.pt``, ``history.csv``.
    ``init``: a 2D model file to start from (fine-tuning: its weights and layout; a fresh optimiser)."""

    def __init__(self, views: Sequence[View], out: str, cfg: PlanarTrainConfig = None,
                 net_config: PlanarConfig = None, validation_views: Sequence[View] = (), resume: bool = True,
                 progress: Optional[Callable[[int, int, Dict], None]] = None, init: Optional[str] = None):
        self.cfg = cfg or PlanarTrainConfig()
        if self.cfg.similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {self.cfg.similarity!r}: choose from {', '.join(SIMILARITIES)}")
        if self.cfg.schedule not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.cfg.schedule!r}: choose from "
                             f"{', '.join(SCHEDULES)}")
        self.out = out
        from ..outputs import check_run_folder
        check_run_folder(out, ("last.pt", "model.pt", "history.csv"))
        os.makedirs(out, exist_ok=True)
        self.last_path, self.model_path = os.path.join(out, "last.pt"), os.path.join(out, "model.pt")
        self.sampler = PairSampler(views, self.cfg.known_fraction, self.cfg.seed, self.cfg.identity_fraction,
                                   self.cfg.balance_kinds)
        self.cases = validation_cases(validation_views or views)
        self.progress = progress
        self.step, self.history = 0, []
        torch.manual_seed(self.cfg.seed)
        if resume and os.path.isfile(self.last_path):
            payload = load_planar(self.last_path, "the run's last checkpoint")
            self.net = payload["net"].train()
            self.step, self.history = int(payload["step"]), list(payload.get("history", []))
            self.optimiser = torch.optim.Adam(self.net.parameters(), lr=self.cfg.learning_rate)
            self.optimiser.load_state_dict(payload["optimiser"])
            self.sampler.rng = np.random.default_rng(self.cfg.seed + self.step)
        else:
            self.net = (load_planar(init, "the 2D model to start from")["net"] if init else
                        PlanarNet(net_config or PlanarConfig())).train()
            self.optimiser = torch.optim.Adam(self.net.parameters(), lr=self.cfg.learning_rate)

    def learning_rate(self) -> float:
        """The rate of the coming step (``self.step`` steps done)."""
        if self.cfg.schedule == "cosine":
            return self.cfg.learning_rate * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * self.step / self.cfg.steps)))
        return self.cfg.learning_rate

    def save(self, path: str, status: str) -> None:
        save_planar(path, self.net, step=self.step, history=self.history, status=status,
                    optimiser=self.optimiser.state_dict(), train_config=asdict(self.cfg))

    def _write_history(self) -> None:
        write_csv(self.history, os.path.join(self.out, "history.csv"))

    def train(self, should_stop: Optional[Callable[[], bool]] = None) -> Dict:
        status, started = "finished", time.perf_counter()
        if self.step == 0:
            self.history.append({"step": 0, **validate(self.net.eval(), self.cases)})
            self.net.train()
        while self.step < self.cfg.steps:
            if should_stop is not None and should_stop():
                status = "stopped"
                break
            fixed, moving, fixed_label, moving_label = self.sampler.batch(self.cfg.batch_size)
            out = self.net(fixed, moving, moving_label if self.cfg.dice > 0 else None)
            terms = planar_loss(self.cfg, fixed, out, fixed_label)
            self.optimiser.zero_grad(set_to_none=True)
            terms["total"].backward()
            for group in self.optimiser.param_groups:
                group["lr"] = self.learning_rate()
            self.optimiser.step()
            self.step += 1
            row = {"step": self.step, **{k: v.item() for k, v in terms.items()}}
            if self.step % self.cfg.validate_every == 0 or self.step == self.cfg.steps:
                row.update(validate(self.net.eval(), self.cases))
                self.net.train()
            self.history.append(row)
            if self.progress is not None:
                self.progress(self.step, self.cfg.steps, row)
            if self.step % self.cfg.checkpoint_every == 0:
                self.save(self.last_path, "running")
                self._write_history()
        self.save(self.last_path, status)
        if status == "finished":
            self.save(self.model_path, status)
        self._write_history()
        validated = [r for r in self.history if "val_epe_mm" in r]
        return {"status": status, "step": self.step, "seconds": time.perf_counter() - started,
                "first": validated[0] if validated else None, "last": validated[-1] if validated else None}

