"""One-shot registration of vertebra crops with a trained network, results in physical space."""

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from . import geometry
from .checkpoint import build_model, load_checkpoint
from .config import refinement_loss_config
from .errors import Cancelled, InputError
from .geometry import model_grid, onto, same_grid
from .inference import check_precision, keep_freed_memory, prepare_for_inference, release_freed_memory
from .layers import affine_coordinates, identity_grid, sample
from .losses import RegistrationLoss, dice_of_sums, local_ncc
from .maps import field_jacobian
from .metrics import STAGES, folding, stage_metrics
from .networks import RegistrationNet
from .optimiser import Adam
from .outputs import DEFAULT_OUTPUTS, OUTPUTS
from .validation import check_finite_result, check_label, check_not_constant, check_volume

ImageLike = Union[sitk.Image, np.ndarray]


DEVICE_HELP = "auto, cpu, cuda (or gpu), cuda:N or mps"


def choose_device(device: str = "auto") -> torch.device:
    """The torch device for a user's choice (``DEVICE_HELP``), refused clearly where this machine lacks it."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device).strip().lower()
    try:
        chosen = torch.device("cuda" if text == "gpu" else text)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}: use {DEVICE_HELP}") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r}: PyTorch sees no CUDA GPU here (use 'auto' or 'cpu')")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"numbered from 0")
    elif chosen.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError(f"device {device!r}: this PyTorch has no Apple GPU (MPS) backend here")
    elif chosen.type != "cpu":
        raise InputError(f"unknown device {device!r}: use {DEVICE_HELP}")
    return chosen


def as_image(data: ImageLike, name: str, label: bool = False) -> sitk.Image:
    """A SimpleITK image; plain arrays are taken as (z, y, x) volumes on a 1 mm identity grid. Images (not
    ``label`` maps) must not be constant."""
    if isinstance(data, sitk.Image):
        if data.GetDimension() != 3:
            raise InputError(f"{name} must be a 3D image, got {data.GetDimension()}D")
        if data.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{name} must be a scalar image, got {data.GetNumberOfComponentsPerPixel()} components")
        values = check_volume(sitk.GetArrayViewFromImage(data), name)
        image = data
    else:
        values = check_volume(data, name)
        image = sitk.GetImageFromArray(values)
    if not label:
        check_not_constant(values, name)
    return image


@dataclass
class RegistrationResult:
    """Everything one registration produces; images live on the fixed grid, the inverse on the moving one."""

    fixed: sitk.Image
    moving: sitk.Image
    affine_voxel: np.ndarray  # (3, 4) network affine, centred voxel coordinates (array order)
    affine_lps: np.ndarray  # 4x4, fixed LPS point -> moving LPS point
    warped_affine: sitk.Image
    warped: sitk.Image
    forward_field: sitk.Image  # displacement (mm, LPS) on the fixed grid
    jacobian: sitk.Image  # det of the deformable part's Jacobian, on the fixed grid
    warped_label_affine: Optional[sitk.Image] = None
    warped_label: Optional[sitk.Image] = None
    metrics: Optional[Dict] = None
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)
    # The inverse costs as much again as the forward integration and most uses never need it (the
    # Slicer module, evaluation), so it is computed on first access of ``inverse_field``.
    inverse_source: Optional[Callable[[], sitk.Image]] = field(default=None, repr=False)
    _inverse_field: Optional[sitk.Image] = field(default=None, repr=False)
    inverse_deformable_source: Optional[Callable[[], sitk.Image]] = field(default=None, repr=False)
    _inverse_deformable: Optional[sitk.Image] = field(default=None, repr=False)
    # Derived from forward_field and affine_lps on first use (the module needs it twice, save() thrice).
    _deformable: Optional[sitk.Image] = field(default=None, repr=False)
    _exported_deformable: Optional[sitk.Image] = field(default=None, repr=False)

    @property
    def inverse_field(self) -> sitk.Image:
        """Displacement (mm, LPS) on the moving grid: the inverse of the forward transform."""
        if self._inverse_field is None:
            if self.inverse_source is None:
                raise ValueError("this result has no inverse")
            self._inverse_field, self.inverse_source = self.inverse_source(), None
        return self._inverse_field

    @property
    def inverse_deformable_field(self) -> sitk.Image:
        """The deformable part's inverse w (LPS mm) on the fixed grid: the inverse map is q -> r + w(r),
        r = A^-1 q (computed on first access, like ``inverse_field``)."""
        if self._inverse_deformable is None:
            if self.inverse_deformable_source is None:
                raise ValueError("this result has no inverse")
            self._inverse_deformable, self.inverse_deformable_source = self.inverse_deformable_source(), None
        return self._inverse_deformable

    def exported_deformable_field(self) -> sitk.Image:
        """The deformable part as exported: on the fixed crop's grid, extended by a band over which it falls
        to zero (``geometry.tapered_field``), so that beyond it every tool applies the affine alone, and rounded
        to ``geometry.FIELD_STEP`` (a micrometre): the very values the files hold (``write_files``)."""
        if self._exported_deformable is None:
            self._exported_deformable = geometry.tapered_field(self.deformable_field())
        return self._exported_deformable

    def exported_inverse_deformable_field(self) -> sitk.Image:
        """The inverse's deformable part as exported (fixed grid, tapered like the forward one)."""
        return geometry.tapered_field(self.inverse_deformable_field)

    def forward_transform(self) -> sitk.CompositeTransform:
        """The map for the whole fixed scan: p -> A(p + u(p)), the deformable part u inside the crop (and its
        band), the affine A everywhere (ITK resampling direction: fixed point -> moving point)."""
        return geometry.composite_transform(self.affine_lps, self.exported_deformable_field())

    def inverse_transform(self) -> sitk.CompositeTransform:
        """The inverse map for the whole moving scan (moving point -> fixed point)."""
        return geometry.inverse_composite_transform(self.affine_lps, self.exported_inverse_deformable_field())

    def warp_scan(self, moving_scan: sitk.Image, fixed_scan: sitk.Image, label: bool = False) -> sitk.Image:
        """The moving whole scan (or its label map: nearest neighbour, values kept) resampled onto the fixed
        scan's grid through ``forward_transform``: the full map around the vertebra, the affine elsewhere."""
        interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
        background = 0.0 if label else float(sitk.GetArrayViewFromImage(moving_scan).min())
        return sitk.Resample(moving_scan, fixed_scan, self.forward_transform(), interpolator, background,
                             moving_scan.GetPixelID())

    def deformable_field(self) -> sitk.Image:
        """The deformable stage alone, as a displacement field (LPS mm) on the fixed grid.

        The forward map is p -> A(p + u(p)), so u(p) = A^-1(p + field(p)) - p: the field whose Jacobian
        ``jacobian`` holds. Between two subjects' crops the affine part carries their whole offset in the
        scanner, which would swamp any display of the local deformation. Computed once.
        """
        if self._deformable is None:
            total = sitk.GetArrayFromImage(self.forward_field).astype(np.float64)  # (D, H, W, 3)
            points = geometry.voxel_points(self.forward_field)
            inverse = np.linalg.inv(np.asarray(self.affine_lps, dtype=np.float64))
            back = geometry.apply_homogeneous(inverse, points + total.reshape(-1, 3).T)
            self._deformable = geometry.image_like((back - points).T.reshape(*total.shape[:3], 3),
                                                   self.forward_field, is_vector=True)
        return self._deformable

    def save(self, out_dir: str, outputs: Sequence[str] = DEFAULT_OUTPUTS) -> Dict[str, str]:
        """Write ``outputs`` (names of ``OUTPUTS``) to the folder ``out_dir`` as a unit (``outputs.OutputFolder``:
        the folder ends up with this result's complete set, or keeps what it held) and return the files' final
        paths."""
        from .outputs import REGISTRATION, OutputFolder
        with OutputFolder(out_dir, option="output folder", kind=REGISTRATION) as folder:
            paths = self.write_files(folder.path, outputs)
        return folder.final_paths(paths)

    def write_files(self, out_dir: str, outputs: Sequence[str] = DEFAULT_OUTPUTS) -> Dict[str, str]:
        """Write ``outputs`` (names of ``OUTPUTS``; ``summary.json`` always) into ``out_dir`` file by file
        (``save`` makes the folder one unit) and return their paths. The inverse is computed only when asked
        for: it costs as much as the registration (``saved.load_result`` reads a folder back without it)."""
        unknown = sorted(set(outputs) - set(OUTPUTS))
        if unknown:
            raise ValueError(f"unknown outputs {', '.join(unknown)}: choose from {', '.join(OUTPUTS)}")
        check_finite_result({"displacement field": sitk.GetArrayViewFromImage(self.forward_field),
                             "Jacobian map": sitk.GetArrayViewFromImage(self.jacobian)}, "this registration")
        os.makedirs(out_dir, exist_ok=True)
        paths = {}

        def put(key, name, writer, obj):
            if obj is not None:
                paths[key] = os.path.join(out_dir, name)
                writer(obj, paths[key])

        wanted = set(outputs)
        for key, image in (("warped", self.warped), ("warped_affine", self.warped_affine),
                           ("warped_label", self.warped_label)):
            if key in wanted:
                put(key, f"{key}.nii.gz", geometry.write_image, image)
        if "jacobian" in wanted:  # float noise, like the fields: gzip would save a fifth in 10x the time
            put("jacobian", "jacobian.nii", geometry.write_image, self.jacobian)
        # The transforms: the whole map (affine + deformable, valid on the whole scans) and its parts.
        if "transform" in wanted:
            put("forward_transform", "forward_transform.h5", geometry.write_transform, self.forward_transform())
        if "fields" in wanted:
            put("affine_transform", "affine_transform.tfm", geometry.write_transform,
                geometry.affine_transform(self.affine_lps))
            put("deformable_field", "deformable_field.nii", geometry.write_field, self.exported_deformable_field())
        if "inverse" in wanted:
            backward = self.exported_inverse_deformable_field()
            put("inverse_transform", "inverse_transform.h5", geometry.write_transform,
                geometry.inverse_composite_transform(self.affine_lps, backward))
            put("inverse_deformable_field", "inverse_deformable_field.nii", geometry.write_field, backward)
        summary = {"affine_lps": self.affine_lps.tolist(), "seconds": self.seconds, "notes": self.notes,
                   "folding": folding(sitk.GetArrayViewFromImage(self.jacobian))}
        if self.metrics is not None:
            summary["metrics"] = self.metrics
            if "metrics" in wanted:
                put("metrics", "metrics.json", _write_json, self.metrics)
        put("summary", "summary.json", _write_json, summary)
        return paths


def _write_json(data, path):
    geometry.write_text(json.dumps(data, indent=2), path)


# The network outputs a RegistrationResult is built from.
RESULT_KEYS = ("affine", "velocity", "displacement", "total_map", "warped_affine", "warped", "warped_label_affine",
               "warped_label")


def affine_step_scale(matrix: torch.Tensor) -> torch.Tensor:
    """Per-entry scale of an optimiser's steps on a (B, 3, 4) affine: its translations (voxels) move ~25x
    further than its unitless matrix entries for the same effect on the crop."""
    scale = torch.ones_like(matrix)
    scale[:, :, 3] = 25.0
    return scale


class _LabelDice:
    """Soft Dice of ``fixed_label`` (B, 1, D, H, W) and ``moving_label`` sampled at coordinates (B, 3, D, H, W),
    as ``losses.soft_dice``, sampling only where the sample can be non-zero.

    A trilinear sample of the moving label is exactly 0, with a zero gradient, wherever its 8 neighbours lie
    outside the label's bounding box: points mapped there are left out of the sampling (the fixed label's sum
    still counts them). The vertebra's box is about a fifth of the crop: the affine stage's 50 steps take a
    third of the time, with the same loss and gradients (up to the order of the sums)."""

    def __init__(self, fixed_label: torch.Tensor, moving_label: torch.Tensor):
        self.fixed_label, self.moving_label = fixed_label, moving_label
        self.fixed_sum = fixed_label.flatten(1).sum(1)
        occupied = (moving_label > 0).any(0).any(0)  # (D, H, W): in any pair of the batch
        low, high = [], []
        for axis in range(3):
            present = torch.nonzero(occupied.any(dim=tuple(a for a in range(3) if a != axis))).flatten()
            # Samples at x read voxels floor(x) and floor(x) + 1 (and the gradient both, even at an integer x).
            low.append(float(present.min()) - 1.5 if len(present) else 0.0)
            high.append(float(present.max()) + 1.5 if len(present) else 0.0)
        shape = (1, 3, 1, 1, 1)
        self.low = torch.tensor(low, dtype=fixed_label.dtype, device=fixed_label.device).view(shape)
        self.high = torch.tensor(high, dtype=fixed_label.dtype, device=fixed_label.device).view(shape)

    def __call__(self, coords: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            near = ((coords > self.low) & (coords < self.high)).all(1).any(0)  # (D, H, W), any pair of the batch
            if not near.any():
                near = torch.ones_like(near)  # nothing near the label: sample everywhere (all zeros)
        picked = coords[:, :, near]  # (B, 3, N)
        warped = sample(self.moving_label, picked[..., None, None])  # (B, 1, N, 1, 1)
        inter = (self.fixed_label[:, :, near] * warped.flatten(2)).flatten(1).sum(1)
        return dice_of_sums(inter, self.fixed_sum + warped.flatten(1).sum(1))


# Steps of the affine stage's optimisation on each pair (``Registrar.refine_affine``); 0: the network's alone.
AFFINE_STEPS = 50


class Registrar:
    """Load a network once, then register pairs of crops (or batches of them) on GPU or CPU.

    Inference runs on ``engine``, a copy of the network prepared by ``inference.prepare_for_inference``
    (batch norm folded, channels-last, ``precision`` "auto" = bf16 where the hardware has it natively,
    "fp32" or "bf16"); ``model`` stays the trained fp32 network. ``keep_memory`` keeps freed memory in
    the process while a batch runs (see ``inference.keep_freed_memory``) and returns it after each
    ``register_batch``, so that memory stays flat over thousands of registrations.

    ``refine_steps`` > 0 turns on test-time refinement (instance optimisation, ``refine_pair``): the
    network's affine and velocity field for each pair are optimised on that pair (``refine_pair``), trading
    about 0.3 s per step on a CPU for accuracy; ``refine_lr`` scales its step sizes. ``progress(step, total)``
    and ``should_stop()`` report on and cancel it.
    """

    def __init__(self, checkpoint: Optional[str] = None, model: Optional[RegistrationNet] = None,
                 device: str = "auto", precision: str = "auto", keep_memory: bool = True,
                 refine_steps: int = 0, refine_lr: float = 1.0, affine_steps: int = AFFINE_STEPS,
                 progress: Optional[Callable[[int, int], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None):
        if (checkpoint is None) == (model is None):
            raise ValueError("give either a checkpoint path or a model")
        if checkpoint is not None:
            payload = load_checkpoint(checkpoint)
            model = build_model(payload, checkpoint)
            self.checkpoint_info = {k: payload.get(k) for k in ("versions", "summary", "step")}
        else:
            self.checkpoint_info = {}
        self.device = choose_device(device)
        check_precision(precision, self.device)
        self.precision = precision
        self.model = model.to(self.device).eval()
        self.engine = prepare_for_inference(self.model, self.device, precision)
        self.keep_memory = bool(keep_memory)
        if keep_memory:
            keep_freed_memory()
        self.shape = tuple(model.config.input_shape)
        self.refine_steps, self.refine_lr = int(refine_steps), float(refine_lr)
        self.affine_steps = int(affine_steps)
        self.progress, self.should_stop = progress, should_stop

    @staticmethod
    def release_memory() -> None:
        """Return the memory freed by past registrations to the system (see ``keep_memory``)."""
        release_freed_memory()

    # -- inputs -----------------------------------------------------------------------------------
    def _prepare(self, fixed, moving, fixed_label, moving_label):
        """Inputs as images on the user's grids, and the same on the network's grids."""
        fixed = as_image(fixed, "fixed image")
        moving = as_image(moving, "moving image")
        labels = []
        for data, name, ref in ((fixed_label, "fixed label", fixed), (moving_label, "moving label", moving)):
            if data is None:
                labels.append(None)
                continue
            label = as_image(data, name, label=True)
            if not isinstance(data, sitk.Image):
                # A bare array shares its image's grid.
                if label.GetSize() != ref.GetSize():
                    raise InputError(f"{name} has shape {np.shape(data)}, its image {ref.GetSize()[::-1]}")
                label.CopyInformation(ref)
            elif label.GetSize() != ref.GetSize():
                label = onto(label, ref, label=True)  # a label map on another grid than its image
            # Bare arrays have no voxel size: their labels are held to a voxel count, images' to a volume.
            check_label(sitk.GetArrayViewFromImage(label), name,
                        label.GetSpacing() if isinstance(data, sitk.Image) else None)
            labels.append(label)
        spacing = self.model.config.input_spacing
        grids = [model_grid(im, self.shape, spacing) for im in (fixed, moving)]
        if all(same_grid(im, g) for im, g in zip((fixed, moving), grids)):
            net = (fixed, moving, labels[1])  # the crops are already on the network's grid: no resampling
        else:
            net = (onto(fixed, grids[0]), onto(moving, grids[1]),
                   None if labels[1] is None else onto(labels[1], grids[1], label=True))
        return Prepared(fixed, moving, labels[0], labels[1], *net)

    # -- inference --------------------------------------------------------------------------------
    def refine_affine(self, fixed: torch.Tensor, moving: torch.Tensor, fixed_label: Optional[torch.Tensor],
                      moving_label: Optional[torch.Tensor], matrix: torch.Tensor) -> torch.Tensor:
        """The affine stage's matrix, optimised on the pair before the deformable stage: soft Dice of the
        labels where both are given, else LNCC of the images. The affine network alone leaves the vertebrae
        ~0.1 Dice apart (its 12 numbers come from one pass over a coarse grid); a few steps of this cheap
        optimisation (one resampling per step, no integration) close most of that gap."""
        shape = fixed.shape[2:]
        d_matrix = torch.zeros_like(matrix, requires_grad=True)
        optimiser = Adam([d_matrix], lr=0.012)
        scale = affine_step_scale(matrix)
        use_labels = fixed_label is not None and moving_label is not None
        # Every second voxel per axis (8x fewer samples) for LNCC, and for Dice on large grids (1 mm models):
        # the affine's 12 numbers come out the same (images only, shared pairs: mean affine Dice 0.800 against
        # 0.801 on every voxel) at a fifth of the time. LNCC's 9-voxel window needs 9 samples per axis.
        lncc_fits = min(shape) >= 18
        stride = 2 if (not use_labels and lncc_fits) or math.prod(shape) > 300_000 else 1
        points = identity_grid(shape, fixed.device, matrix.dtype)[:, :, ::stride, ::stride, ::stride]
        target = (fixed_label if use_labels else fixed)[:, :, ::stride, ::stride, ::stride]
        if use_labels:
            label_dice = _LabelDice(target, moving_label)
        for _ in range(self.affine_steps):
            coords = affine_coordinates(matrix + d_matrix * scale, shape, shape, points)
            if use_labels:
                loss = -label_dice(coords)
            else:
                loss = -local_ncc(target, sample(moving, coords))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        return (matrix + d_matrix * scale).detach()

    def refine_pair(self, fixed: torch.Tensor, moving: torch.Tensor, fixed_label: Optional[torch.Tensor],
                    moving_label: Optional[torch.Tensor], matrix: torch.Tensor, velocity: torch.Tensor):
        """Test-time refinement (instance optimisation): the network's affine and velocity field for this
        pair, optimised on ``config.refinement_loss_config``: LNCC, the affine stage's Dice where both labels
        are given, and regularisers, the fixed label marking the vertebra for the variance of its log J
        (without them refinement buys overlap by crushing the vertebra's interior). The network is not
        changed; each step costs a pass of the geometry alone."""
        loss = RegistrationLoss(refinement_loss_config())
        d_matrix = torch.zeros_like(matrix, requires_grad=True)
        d_velocity = torch.zeros_like(velocity, requires_grad=True)
        # Steps in voxels of the model's grid for the velocity and the translation, unitless for the matrix.
        scale = self.refine_lr
        optimiser = Adam([{"params": [d_velocity], "lr": 0.02 * scale}, {"params": [d_matrix], "lr": 0.002 * scale}])
        translation_scale = affine_step_scale(matrix)
        labels = moving_label if fixed_label is not None else None
        for step in range(1, self.refine_steps + 1):
            if self.should_stop is not None and self.should_stop():
                raise Cancelled(f"refinement cancelled at step {step - 1} of {self.refine_steps}")
            out = self.model.outputs(fixed, moving, labels, matrix + d_matrix * translation_scale,
                                     velocity + d_velocity)
            terms = loss(fixed, out, fixed_label if labels is not None else None)
            optimiser.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimiser.step()
            if self.progress is not None:
                self.progress(step, self.refine_steps)
        return (matrix + d_matrix * translation_scale).detach(), (velocity + d_velocity).detach()

    def _run(self, f: np.ndarray, m: np.ndarray, ml: Optional[np.ndarray], fl: Optional[np.ndarray] = None):
        def go(device):
            def t(a):
                return None if a is None else torch.from_numpy(np.ascontiguousarray(a))[:, None].to(device)
            tf, tm, tfl, tml = t(f), t(m), t(fl), t(ml)
            with torch.inference_mode():
                matrix = self.engine.affine_stage(tf, tm)
            if self.affine_steps > 0:
                with torch.enable_grad():
                    matrix = self.refine_affine(tf, tm, tfl, tml, matrix.clone())
            with torch.inference_mode():
                out = self.engine.forward_from_affine(tf, tm, matrix, tml)
            if self.refine_steps > 0:
                outs = []
                for k in range(len(f)):  # each pair refined on its own
                    pf, pm, pfl, pml = (None if a is None else a[k:k + 1] for a in (tf, tm, tfl, tml))
                    matrix, velocity = (out[key][k:k + 1].clone() for key in ("affine", "velocity"))
                    with torch.enable_grad():
                        matrix, velocity = self.refine_pair(pf, pm, pfl, pml, matrix, velocity)
                    with torch.no_grad():
                        outs.append(self.model.outputs(pf, pm, pml, matrix, velocity))
                out = {key: torch.cat([o[key] for o in outs]) for key in outs[0]}
            # One transfer at the end, of what the results are built from.
            return {k: v.float().cpu().numpy() for k, v in out.items() if k in RESULT_KEYS}
        try:
            return go(self.device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            warnings.warn("GPU out of memory: registering on the CPU instead (slower)")
            self.device = torch.device("cpu")
            self.model = self.model.to(self.device)
            self.engine = prepare_for_inference(self.model, self.device, self.precision)
            return go(self.device)

    def _inverse_map(self, affine: np.ndarray, velocity: np.ndarray) -> np.ndarray:
        """The inverse's coordinate map (moving grid) from one pair's network outputs, in fp32."""
        with torch.inference_mode():
            inverse = self.engine.inverse_map(torch.from_numpy(affine)[None].to(self.device),
                                              torch.from_numpy(velocity)[None].to(self.device), self.shape)
        return inverse[0].cpu().numpy()

    def register(self, fixed: ImageLike, moving: ImageLike, fixed_label: Optional[ImageLike] = None,
                 moving_label: Optional[ImageLike] = None) -> RegistrationResult:
        return self.register_batch([(fixed, moving, fixed_label, moving_label)], batch_size=1)[0]

    def register_batch(self, pairs: Sequence[tuple], batch_size: int = 4) -> List[RegistrationResult]:
        """Register ``(fixed, moving[, fixed_label, moving_label])`` tuples, ``batch_size`` at a time."""
        prepared = [self._prepare(*(tuple(p) + (None,) * (4 - len(p)))) for p in pairs]
        results = []
        for start in range(0, len(prepared), batch_size):
            chunk = prepared[start:start + batch_size]
            t0 = time.perf_counter()
            with_labels = all(c.net_moving_label is not None for c in chunk)
            ml = np.stack([array(c.net_moving_label) for c in chunk]) if with_labels else None
            fl = None
            if (self.refine_steps > 0 or self.affine_steps > 0) and with_labels \
                    and all(c.fixed_label is not None for c in chunk):
                fl = np.stack([array(c.net_fixed_label()) for c in chunk])
            out = self._run(np.stack([array(c.net_fixed) for c in chunk]),
                            np.stack([array(c.net_moving) for c in chunk]), ml, fl)
            check_finite_result({k: out[k] for k in ("affine", "velocity", "total_map")}, "the network's answer",
                                "the model's weights may be damaged: load it again from a good copy")
            per_pair = (time.perf_counter() - t0) / len(chunk)
            for i, c in enumerate(chunk):
                results.append(self._result(c, {k: v[i] for k, v in out.items()}, per_pair))
        if self.keep_memory:
            # What the batch freed goes back to the system: kept across pairs, glibc's heap fragments and a
            # long-running process (a console batch, a server) grows by megabytes per registration.
            release_freed_memory()
        return results

    def _result(self, p: "Prepared", out, seconds) -> RegistrationResult:
        net_f, net_m = p.net_fixed, p.net_moving
        forward = geometry.coordinates_to_field(out["total_map"], net_f, net_m)
        affine_lps = geometry.physical_affine(out["affine"], net_f, net_m)
        if p.on_network_grid:
            # The network's own resampling, which the exported field reproduces exactly.
            warped = geometry.image_like(out["warped"][0], p.fixed)
            warped_affine = geometry.image_like(out["warped_affine"][0], p.fixed)
            labels = [None if p.moving_label is None
                      else geometry.image_like((out[k][0] > 0.5).astype(np.uint8), p.fixed)
                      for k in ("warped_label_affine", "warped_label")]
        else:
            # The network ran on its own grid: bring the fields to the user's grids, then resample the
            # user's full-resolution moving crop through them.
            forward = onto(forward, p.fixed)
            transforms = (geometry.affine_transform(affine_lps), geometry.displacement_transform(forward))
            warped_affine, warped = (onto(p.moving, p.fixed, t) for t in transforms)
            labels = [None if p.moving_label is None else onto(p.moving_label, p.fixed, t, label=True)
                      for t in transforms]
        # The Jacobian of the transform the user gets, at its resolution (the fixed crop's), deformable part:
        # the exported map A(p + u(p)) has det(A) det(I + grad u).
        jac = field_jacobian(forward) / float(np.linalg.det(affine_lps[:3, :3]))
        jacobian = geometry.image_like(jac.astype(np.float32), p.fixed)
        res = RegistrationResult(
            fixed=p.fixed, moving=p.moving, affine_voxel=out["affine"], affine_lps=affine_lps,
            warped_affine=warped_affine, warped=warped, forward_field=forward, jacobian=jacobian,
            inverse_source=self._inverse_source(p, out),
            inverse_deformable_source=self._inverse_deformable_source(p, out), warped_label_affine=labels[0],
            warped_label=labels[1],
            seconds=seconds)
        if p.fixed_label is not None and p.moving_label is not None:
            # "initial" compares the crops as they are, both centred on their vertebra (on the network's
            # grids when the user's crops differ in size).
            if p.moving_label.GetSize() == p.fixed.GetSize():
                initial = array(p.moving_label)
            else:
                moved = geometry.image_like(array(p.net_moving_label), p.net_fixed)  # centre onto centre
                initial = array(onto(moved, p.fixed, label=True))
            stages = dict(zip(STAGES, (initial, array(labels[0]), array(labels[1]))))
            res.metrics = stage_metrics(array(p.fixed_label), stages, p.fixed.GetSpacing())
            res.metrics["final"].update(folding(array(jacobian)))
        return res


    def _inverse_source(self, p: "Prepared", out) -> Callable[[], sitk.Image]:
        # Copies: the batch's output arrays are not kept alive by the result.
        affine, velocity = np.array(out["affine"]), np.array(out["velocity"])

        def inverse_field():
            inverse = geometry.coordinates_to_field(self._inverse_map(affine, velocity), p.net_moving, p.net_fixed)
            return inverse if p.on_network_grid else onto(inverse, p.moving)
        return inverse_field

    def _inverse_deformable_source(self, p: "Prepared", out) -> Callable[[], sitk.Image]:
        velocity = np.array(out["velocity"])

        def inverse_deformable_field():
            with torch.inference_mode():
                v = torch.from_numpy(velocity)[None].to(self.device)
                displacement = self.engine.deformable_displacement(v, self.shape, inverse=True).float()
                coords = identity_grid(self.shape, self.device, torch.float32) + displacement
            field = geometry.coordinates_to_field(coords[0].cpu().numpy(), p.net_fixed, p.net_fixed)
            return field if p.on_network_grid else onto(field, p.fixed)
        return inverse_deformable_field


@dataclass
class Prepared:
    fixed: sitk.Image
    moving: sitk.Image
    fixed_label: Optional[sitk.Image]
    moving_label: Optional[sitk.Image]
    net_fixed: sitk.Image
    net_moving: sitk.Image
    net_moving_label: Optional[sitk.Image]

    @property
    def on_network_grid(self) -> bool:
        return self.net_fixed is self.fixed

    def net_fixed_label(self) -> Optional[sitk.Image]:
        """The fixed label on the network's grid (refinement's Dice term)."""
        if self.fixed_label is None or self.on_network_grid:
            return self.fixed_label
        return onto(self.fixed_label, self.net_fixed, label=True)


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).astype(np.float32)
