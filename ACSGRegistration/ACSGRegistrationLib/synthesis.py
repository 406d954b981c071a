"""Label-driven synthetic training pairs (in the spirit of SynthMorph).

Real lumbar CT with labels is scarce, real vertebra label maps are not. From a vertebra mask crop we make
a CT-like masked vertebra image — a bright cortical shell around a darker cancellous interior, smooth
texture, noise, blur, gain and bias — after a random affine and smooth deformation of the mask. Pairs of
such images from different subjects' masks teach the network real inter-subject shape variation; the
deformed mask stays exactly aligned with its image because the image is drawn from it.

Intensities match ``preprocessing.normalise_ct`` of real crops: HU [-1000, 2000] -> [0, 1], so cancellous
bone (~100-300 HU) lands near 0.37-0.43 and cortical bone (~400-1500 HU) near 0.45-0.8; outside is 0.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import InputError
from .layers import affine_coordinates, identity_grid, sample


@dataclass
class SynthesisConfig:
    rotation_degrees: float = 8.0
    scaling: float = 0.08
    translation_mm: float = 4.0
    deformation_mm: float = 3.0  # std of the smooth random displacement
    deformation_grid: int = 5  # control points per axis of the smooth field
    shell_mm: Sequence[float] = (0.5, 2.5)
    cancellous: Sequence[float] = (0.35, 0.42)
    cortical: Sequence[float] = (0.40, 0.52)
    texture: float = 0.03
    noise: Sequence[float] = (0.0, 0.015)
    blur_sigma: Sequence[float] = (0.3, 1.2)  # mm
    gain: Sequence[float] = (0.92, 1.08)
    bias: float = 0.05


def _uniform(g, lo, hi):
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _smooth_noise(shape, grid, g, amplitude, channels=1):
    coarse = torch.randn(1, channels, grid, grid, grid, generator=g) * amplitude
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)


def _gaussian_blur(volume, sigma):
    if sigma <= 0.05:
        return volume
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=volume.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
        volume = F.conv3d(F.pad(volume, pad, mode="replicate"), kernel.view(shape))
    return volume


def random_deformation(shape, g, cfg: SynthesisConfig, spacing: float = 1.0) -> torch.Tensor:
    """Coordinate map (1, 3, D, H, W) of a random affine composed with a smooth random displacement."""
    angles = [math.radians(_uniform(g, -cfg.rotation_degrees, cfg.rotation_degrees)) for _ in range(3)]
    rot = torch.eye(3)
    for axis, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = torch.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    scale = torch.diag(torch.tensor([1 + _uniform(g, -cfg.scaling, cfg.scaling) for _ in range(3)]))
    shift = torch.tensor([_uniform(g, -cfg.translation_mm, cfg.translation_mm) / spacing for _ in range(3)])
    matrix = torch.cat([rot @ scale, shift[:, None]], dim=1)[None]
    smooth = _smooth_noise(shape, cfg.deformation_grid, g, cfg.deformation_mm / spacing, channels=3)
    return affine_coordinates(matrix, shape, shape, identity_grid(shape) + smooth)


def synthesise_image(mask: torch.Tensor, g: torch.Generator, cfg: SynthesisConfig,
                     spacing: float = 1.0) -> torch.Tensor:
    """CT-like masked vertebra image (1, 1, D, H, W) drawn from a binary mask (1, 1, D, H, W)."""
    shape = mask.shape[2:]
    thickness = _uniform(g, *cfg.shell_mm) / spacing
    k = 2 * int(round(thickness)) + 1
    # Erosion = 1 - dilation of the background (max pooling); the band between is the cortical shell.
    interior = 1 - F.max_pool3d(1 - mask, k, stride=1, padding=k // 2)
    cancellous = _uniform(g, *cfg.cancellous)
    cortical = max(cancellous + 0.02, _uniform(g, *cfg.cortical))
    image = cancellous * interior + cortical * (mask - interior)
    image = image + _smooth_noise(shape, 12, g, cfg.texture) * mask
    image = _gaussian_blur(image, _uniform(g, *cfg.blur_sigma) / spacing)
    image = image + torch.randn(image.shape, generator=g) * _uniform(g, *cfg.noise)
    bias = 1 + _smooth_noise(shape, 3, g, cfg.bias)
    image = image * bias * _uniform(g, *cfg.gain)
    return (image * mask).clamp(0, 1)


def synthesise(label: np.ndarray, seed: int, cfg: Optional[SynthesisConfig] = None, spacing: float = 1.0):
    """One synthetic (image, mask) pair of arrays (D, H, W) from a mask crop of isotropic ``spacing``
    (mm), reproducible from ``seed``."""
    cfg = cfg or SynthesisConfig()
    g = torch.Generator().manual_seed(int(seed))
    mask = torch.as_tensor(np.asarray(label, dtype=np.float32))[None, None]
    coords = random_deformation(mask.shape[2:], g, cfg, spacing)
    deformed = (sample(mask, coords) > 0.5).float()
    image = synthesise_image(deformed, g, cfg, spacing)
    return image[0, 0].numpy(), deformed[0, 0].numpy()


class SyntheticPairDataset(Dataset):
    """``length`` synthetic (fixed, moving) pairs from mask crops of different subjects.

    Item ``i`` is a pure function of (seed, i), so a resumed training run sees the same data.
    """

    def __init__(self, labels: List[np.ndarray], subjects: List[str], levels: List[str], length: int,
                 seed: int = 0, mixed_levels: bool = True, cfg: Optional[SynthesisConfig] = None,
                 spacing: float = 1.0):
        if len(labels) != len(subjects) or len(labels) != len(levels):
            raise ValueError("labels, subjects and levels must have the same length")
        self.labels = [np.asarray(a, dtype=np.float32) for a in labels]
        self.subjects, self.levels = list(subjects), list(levels)
        self.pairs = [(i, j) for i in range(len(labels)) for j in range(len(labels))
                      if subjects[i] != subjects[j] and (mixed_levels or levels[i] == levels[j])]
        if not self.pairs:
            raise InputError("synthetic pairs need mask crops of at least two subjects")
        self.length, self.seed, self.cfg, self.spacing = length, seed, cfg or SynthesisConfig(), spacing

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        base = (self.seed * 1_000_003 + index) * 2
        i, j = self.pairs[int(torch.randint(len(self.pairs), (), generator=torch.Generator().manual_seed(base)))]
        fixed, fixed_label = synthesise(self.labels[i], base + 1, self.cfg, self.spacing)
        moving, moving_label = synthesise(self.labels[j], base + 2, self.cfg, self.spacing)
        t = lambda a: torch.from_numpy(a)[None]  # noqa: E731
        return {"fixed": t(fixed), "moving": t(moving), "fixed_label": t(fixed_label), "moving_label": t(moving_label)}


@dataclass
class KnownDeformationConfig:
    """Random maps of realistic size for known-deformation pairs (a vertebra and a warp of itself)."""
    rotation_degrees: float = 8.0
    scaling: float = 0.07
    translation_mm: float = 4.0
    deformation_mm: float = 2.0  # std of the smooth field at its control points (max ~2.5x that)
    deformation_grid: int = 5
    noise: Sequence[float] = (0.0, 0.02)
    gain: Sequence[float] = (0.9, 1.1)
    gamma: Sequence[float] = (0.85, 1.15)

    def synthesis(self) -> SynthesisConfig:
        return SynthesisConfig(rotation_degrees=self.rotation_degrees, scaling=self.scaling,
                               translation_mm=self.translation_mm, deformation_mm=self.deformation_mm,
                               deformation_grid=self.deformation_grid)


def _restyle(image: torch.Tensor, mask: torch.Tensor, g: torch.Generator, cfg: KnownDeformationConfig):
    """The same anatomy imaged again: gain, gamma and noise of its own, zero outside the mask."""
    out = image.clamp(0, 1) ** _uniform(g, *cfg.gamma) * _uniform(g, *cfg.gain)
    out = out + torch.randn(out.shape, generator=g) * _uniform(g, *cfg.noise)
    return (out * mask).clamp(0, 1)


def known_deformation_pair(image: np.ndarray, label: np.ndarray, seed: int,
                           cfg: Optional[KnownDeformationConfig] = None, spacing: float = 1.0):
    """(fixed, fixed_label, moving, moving_label, true_inverse) from one crop and a seeded random map.

    The moving image is the fixed one resampled through a random affine + smooth map psi (moving voxel ->
    fixed voxel position, ``true_inverse`` (3, D, H, W)), then imaged again (own gain, gamma and noise), so
    the truth of every interior point is known. Arrays (D, H, W) of a crop of isotropic ``spacing`` mm.
    """
    cfg = cfg or KnownDeformationConfig()
    g = torch.Generator().manual_seed(int(seed))
    img = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
    lab = torch.as_tensor(np.asarray(label, dtype=np.float32))[None, None]
    psi = random_deformation(img.shape[2:], g, cfg.synthesis(), spacing)
    moving_label = (sample(lab, psi) > 0.5).float()
    moving = _restyle(sample(img, psi), moving_label, g, cfg)
    fixed = _restyle(img, lab, g, cfg)
    return fixed[0, 0].numpy(), lab[0, 0].numpy(), moving[0, 0].numpy(), moving_label[0, 0].numpy(), psi[0].numpy()


class KnownDeformationDataset(Dataset):
    """``length`` known-deformation pairs from real crops (image, label) and/or mask crops (a CT-like image
    is drawn from the mask first, as in ``synthesise``). Item ``i`` is a pure function of (seed, i)."""

    def __init__(self, crops: List[tuple], masks: List[np.ndarray], length: int, seed: int = 0,
                 cfg: Optional[KnownDeformationConfig] = None, spacing: float = 1.0, real_fraction: float = 0.5):
        if not crops and not masks:
            raise InputError("known-deformation pairs need image crops or mask crops")
        self.crops = [(np.asarray(i, dtype=np.float32), np.asarray(m, dtype=np.float32)) for i, m in crops]
        self.masks = [np.asarray(m, dtype=np.float32) for m in masks]
        self.length, self.seed, self.cfg, self.spacing = length, seed, cfg or KnownDeformationConfig(), spacing
        self.real_fraction = real_fraction if self.crops and self.masks else (1.0 if self.crops else 0.0)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        base = (self.seed * 1_000_003 + index) * 4 + 7
        g = torch.Generator().manual_seed(base)
        if float(torch.rand((), generator=g)) < self.real_fraction:
            image, label = self.crops[int(torch.randint(len(self.crops), (), generator=g))]
            # A mild random warp first, so that every use of a real crop is a new fixed image.
            image, label = _warped_crop(image, label, base + 1, self.spacing)
        else:
            mask = self.masks[int(torch.randint(len(self.masks), (), generator=g))]
            image, label = synthesise(mask, base + 1, spacing=self.spacing)
        f, fl, m, ml, psi = known_deformation_pair(image, label, base + 2, self.cfg, self.spacing)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        return {"fixed": t(f)[None], "moving": t(m)[None], "fixed_label": t(fl)[None], "moving_label": t(ml)[None],
                "true_inverse": t(psi), "known": torch.tensor(1.0)}


def _warped_crop(image: np.ndarray, label: np.ndarray, seed: int, spacing: float):
    g = torch.Generator().manual_seed(int(seed))
    cfg = SynthesisConfig(rotation_degrees=5.0, scaling=0.05, translation_mm=2.0, deformation_mm=1.5)
    coords = random_deformation(image.shape, g, cfg, spacing)
    img = sample(torch.as_tensor(image)[None, None], coords)
    lab = (sample(torch.as_tensor(label)[None, None], coords) > 0.5).float()
    return (img * lab)[0, 0].numpy(), lab[0, 0].numpy()


class MixedPairDataset(Dataset):
    """Inter-subject pairs (no known map) and known-deformation pairs in one stream, with the same keys
    (``known`` says which; inter-subject items carry a zero ``true_inverse``), so they share batches.
    Item ``i`` draws its source from (seed, i)."""

    def __init__(self, inter_subject: Dataset, known: Dataset, known_fraction: float = 0.5, seed: int = 0):
        if not 0.0 <= known_fraction <= 1.0:
            raise InputError(f"known_fraction must be within [0, 1], got {known_fraction}")
        self.inter, self.known, self.fraction, self.seed = inter_subject, known, known_fraction, seed

    def __len__(self):
        return max(len(self.inter), len(self.known))

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(self.seed * 7_919 + index)
        if float(torch.rand((), generator=g)) < self.fraction:
            return self.known[index % len(self.known)]
        item = dict(self.inter[index % len(self.inter)])
        item["true_inverse"] = torch.zeros((3,) + tuple(item["fixed"].shape[1:]))
        item["known"] = torch.tensor(0.0)
        return item
