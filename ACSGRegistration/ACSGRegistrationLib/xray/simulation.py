"""Simulated X-rays of a CT at a known pose, with the realism a learned similarity must survive and an
evaluation must be measured against (no real X-rays are available to this project): the vertebrae next to the
target moved slightly (a patient lying for surgery is not the patient of the CT), Beer-Lambert attenuation of a
finite photon count (Poisson noise), detector blur, a display gamma, collimation, and either polarity (bone
bright as radiographs are shown, or dark as fluoroscopy often is).

Moving a neighbouring vertebra needs no resampling: a DRR is linear in the attenuation, so the CT is split into
a background (each moved vertebra's excess over water taken out) and one small volume per moved vertebra (that
excess on its bounding box), each rendered at its own pose and summed.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..preprocessing import label_centroids
from .camera import look_at, pose_from_parameters
from .drr import MU_WATER, Volume, render, resample_isotropic

# Vertebrae whose centroid lies within this distance of the target's are its neighbours (adjacent levels are
# 25-40 mm apart, centre to centre).
NEIGHBOUR_DISTANCE_MM = 45.0


@dataclass
class Realism:
    """Ranges the simulation draws from (uniformly) for each X-ray."""

    photons: Sequence[float] = (2e3, 2e4)  # unattenuated photons per pixel
    blur_px: Sequence[float] = (0.3, 1.2)  # Gaussian sigma on the detector, in its pixels
    gamma: Sequence[float] = (0.7, 1.4)  # display curve on intensities scaled to [0, 1]
    collimation: float = 0.5  # probability that a random border of the field is collimated
    neighbour_deg: float = 2.0  # sigma of each neighbouring vertebra's rotation (per axis, degrees)
    neighbour_mm: float = 1.5  # sigma of its translation (per axis, mm)
    bone_bright: float = 0.5  # probability of the bone-bright display (else inverted: bone dark)

    @classmethod
    def none(cls) -> "Realism":
        """Noise-free line integrals, bone bright, nothing moved (tests and figures)."""
        return cls(photons=(0, 0), blur_px=(0, 0), gamma=(1, 1), collimation=0.0, neighbour_deg=0.0,
                   neighbour_mm=0.0, bone_bright=1.0)


def label_points(labels: sitk.Image, label: int, count: int = 500, seed: int = 0) -> np.ndarray:
    """Up to ``count`` voxel centres (LPS mm) of one label, drawn evenly: where target errors are measured."""
    voxels = np.argwhere(sitk.GetArrayViewFromImage(labels) == int(label))[:, ::-1]  # (i, j, k)
    if len(voxels) == 0:
        raise InputError(f"label {label} is not in the label map")
    chosen = voxels[np.random.default_rng(seed).permutation(len(voxels))[:count]]
    return np.array([labels.TransformIndexToPhysicalPoint([int(v) for v in index]) for index in chosen])


def random_parameters(rng: np.random.Generator, rotation_deg: float, translation_mm: float,
                      depth_mm: Optional[float] = None) -> np.ndarray:
    """A pose offset (rotation vector rad, translation mm; ``camera.pose_from_parameters``): normal, σ per
    axis; depth (source frame z) with its own σ when given."""
    rotation = rng.normal(0.0, np.deg2rad(rotation_deg), 3)
    translation = rng.normal(0.0, translation_mm, 3)
    if depth_mm is not None:
        translation[2] = rng.normal(0.0, depth_mm)
    return np.concatenate([rotation, translation])


def fixed_size_offset(rng: np.random.Generator, rotation_deg: float, translation_mm: float) -> np.ndarray:
    """A pose offset of a fixed size (``camera.pose_from_parameters``'s parameters): ``rotation_deg`` about a
    random axis and ``translation_mm`` in a random direction (the direction drawn first)."""
    direction, axis = (vector / np.linalg.norm(vector) for vector in (rng.normal(size=3), rng.normal(size=3)))
    return np.concatenate([np.deg2rad(rotation_deg) * axis, translation_mm * direction])


class XraySimulator:
    """One CT, its label map and target vertebra, ready to render realistic X-rays at any pose."""

    def __init__(self, ct: sitk.Image, labels: sitk.Image, target: int, spacing: Optional[float] = None,
                 moved_labels: Optional[Sequence[int]] = None, device=None):
        if spacing is not None and min(ct.GetSpacing()) < spacing:
            ct = resample_isotropic(ct, spacing)
        labels = sitk.Resample(labels, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
        centroids = label_centroids(labels)
        if int(target) not in centroids:
            raise InputError(f"label {target} is not in the label map (it holds {sorted(centroids)})")
        self.target = int(target)
        self.centre = np.asarray(centroids[self.target])
        if moved_labels is None:
            moved_labels = [lab for lab, c in centroids.items() if lab != self.target
                            and np.linalg.norm(np.asarray(c) - self.centre) < NEIGHBOUR_DISTANCE_MM]
        self.moved = {}
        volume = Volume.from_image(ct, device=device)
        background = volume.mu.clone()
        label_array = torch.as_tensor(sitk.GetArrayFromImage(labels).astype(np.int64), device=volume.mu.device)
        for lab in moved_labels:
            inside = label_array == int(lab)
            if not bool(inside.any()):
                continue
            excess = torch.where(inside, (volume.mu - MU_WATER).clamp(min=0.0), torch.zeros_like(volume.mu))
            background = background - excess
            self.moved[int(lab)] = (_bounding_box_volume(excess, inside, volume.index_to_lps),
                                    torch.as_tensor(centroids[lab], dtype=volume.mu.dtype))
        self.background = Volume(background, volume.index_to_lps)

    def line_integrals(self, carm, ct_to_source: np.ndarray, rng: np.random.Generator,
                       realism: Realism) -> torch.Tensor:
        """Optical depth on the detector with each neighbouring vertebra moved by a random small rigid motion
        about its own centroid (in the CT's frame)."""
        dtype = self.background.mu.dtype
        pose = torch.as_tensor(ct_to_source, dtype=dtype)
        with torch.no_grad():
            image = render(self.background, carm, pose)
            for volume, centre in self.moved.values():
                motion = random_parameters(rng, realism.neighbour_deg, realism.neighbour_mm)
                # The motion in the CT frame about the vertebra's centroid, then the pose.
                moved = pose @ pose_from_parameters(torch.as_tensor(motion, dtype=dtype),
                                                    torch.eye(4, dtype=dtype), centre)
                image = image + render(volume, carm, moved)
        return image

    def xray(self, carm, ct_to_source: np.ndarray, rng: np.random.Generator, realism: Realism) -> np.ndarray:
        """A realistic X-ray (rows, columns), float32 in [0, 1] as displayed."""
        return self.exposure(carm, ct_to_source, rng, realism)[0]

    def exposure(self, carm, ct_to_source: np.ndarray, rng: np.random.Generator, realism: Realism):
        """A realistic X-ray (as ``xray``; the same draws) and its exposed field (rows, columns, bool: false where
        a shutter blocked the beam), as a C-arm knows where its shutters stand."""
        return detector_response(self.line_integrals(carm, ct_to_source, rng, realism), rng, realism)


def _bounding_box_volume(values: torch.Tensor, inside: torch.Tensor, index_to_lps: torch.Tensor) -> Volume:
    """``values`` on the bounding box (one voxel of margin) of ``inside``: a small volume for one vertebra."""
    where = torch.nonzero(inside)
    low = (where.min(0).values - 1).clamp(min=0)
    high = torch.minimum(where.max(0).values + 2, torch.as_tensor(inside.shape, device=inside.device))
    (k0, j0, i0), (k1, j1, i1) = low.tolist(), high.tolist()
    shift = torch.eye(4, dtype=index_to_lps.dtype, device=index_to_lps.device)
    shift[:3, 3] = torch.as_tensor([i0, j0, k0], dtype=index_to_lps.dtype)
    return Volume(values[k0:k1, j0:j1, i0:i1].contiguous(), index_to_lps @ shift)


def detector_response(line_integrals: torch.Tensor, rng: np.random.Generator, realism: Realism):
    """Beer-Lambert with Poisson noise, detector blur, collimation, then the display (polarity and gamma): the
    image as displayed (float32 in [0, 1]) and its exposed field (bool, false behind the shutters)."""
    lo, hi = realism.photons
    photons = float(rng.uniform(lo, hi)) if hi > 0 else 0.0
    intensity = torch.exp(-line_integrals.double())  # fraction of photons that reach each pixel
    sigma = float(rng.uniform(*realism.blur_px))
    if sigma > 0.05:
        intensity = gaussian_blur(intensity, sigma)
    exposed = np.ones(tuple(intensity.shape), dtype=bool)
    if rng.uniform() < realism.collimation:
        intensity, exposed = collimate(intensity, rng)
    if photons > 0:
        counts = rng.poisson(np.clip(intensity.cpu().numpy() * photons, 0, None))
        intensity = torch.as_tensor(np.maximum(counts, 0.5) / photons)
    shown = -torch.log(intensity.clamp(min=1e-6))  # the optical depth: bone bright
    # Windowed as a viewer would, on the body (air, shutters and rays that miss the CT saturate): the 1st to
    # 99th percentile of the pixels whose rays cross at least a fifth of the thickest path.
    body = shown[line_integrals.to(shown.device) > 0.2 * line_integrals.max()]
    low, high = torch.quantile(body.flatten().float(), torch.tensor([0.01, 0.99])).double()
    shown = ((shown - low) / (high - low).clamp(min=1e-12)).clamp(0.0, 1.0) ** float(rng.uniform(*realism.gamma))
    if rng.uniform() >= realism.bone_bright:
        shown = 1.0 - shown  # bone dark, as fluoroscopy is often shown
    return shown.float().cpu().numpy(), exposed


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(np.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(image[None, None], (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, kernel.reshape(1, 1, 1, -1))
    return F.conv2d(out, kernel.reshape(1, 1, -1, 1))[0, 0]


def collimate(intensity: torch.Tensor, rng: np.random.Generator):
    """One to four borders of the field shuttered (5-20 % each): only scatter (2 %) reaches them. The intensity
    and the exposed field (bool, false behind the shutters)."""
    rows, columns = intensity.shape
    out = intensity.clone()
    exposed = np.ones((rows, columns), dtype=bool)
    for side in rng.permutation(4)[:int(rng.integers(1, 5))]:
        depth = rng.uniform(0.05, 0.2)
        if side == 0:
            shut = np.s_[:int(depth * rows)]
        elif side == 1:
            shut = np.s_[rows - int(depth * rows):]
        elif side == 2:
            shut = np.s_[:, :int(depth * columns)]
        else:
            shut = np.s_[:, columns - int(depth * columns):]
        out[shut] = 0.02
        exposed[shut] = False
    return out, exposed


def random_view(rng: np.random.Generator, centre_lps, view_deg: float = 10.0, distance_mm=(650.0, 850.0)) -> np.ndarray:
    """A true pose for a simulated X-ray: an AP view of the target turned by up to ``view_deg`` LAO and
    cranial, the source ``distance_mm`` from the target."""
    return look_at(centre_lps, rng.uniform(*distance_mm), lao_deg=rng.uniform(-view_deg, view_deg),
                   cranial_deg=rng.uniform(-view_deg, view_deg))
