"""Digitally reconstructed radiographs: a CT's attenuation integrated along each ray from the X-ray source to a
detector pixel (``camera``'s geometry), differentiable in the pose; two projectors.

``render`` marches along each ray: ``samples`` evenly spaced points across the volume's bounding sphere (so the
sampling moves smoothly with the pose, with no branch at the volume's faces), the attenuation interpolated
trilinearly and zero outside the volume, so the samples that no ray of a batch takes within a voxel of the grid are
skipped: the same sum, in two thirds of the time for a CT box. It is differentiable twice (ProST trains its
similarity on the pose gradient's direction, which differentiates a gradient): trilinear interpolation written
out with gathers, since PyTorch's grid_sample has no second derivative for 3D; where no second derivative is
wanted PyTorch's grid_sample gives the same values and first derivatives 2-4 times faster. The simulated X-rays
and ProST's feature projections use it.

``render_by_planes`` (Joseph's method) takes each ray where it crosses the planes of voxel centres across the
axis the rays run most nearly along, interpolating bilinearly within the plane (the line integral by the
trapezoid rule between consecutive planes, the step the ray's length between them), through PyTorch's 2D
grid_sample, which is vectorised on the CPU where its 3D one is not and reads one plane (kilobytes) at a time: on
the shared CTs at 3 mm, 6-16 times faster than ``render`` for a search's batch of ten 64² DRRs and 12-16 times
for one DRR's pose gradient, the images within 0.3 % of the largest pixel (``benchmarks/benchmark_drr.py``).
Differentiable once. The registration (``register.PoseSearch``) renders with it.

Either sum times the step is the line integral in mm × mm⁻¹ (dimensionless optical depth).
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..geometry import ijk_to_physical_matrix

# Linear attenuation of water at ~60 keV (mm⁻¹): HU -> mu = MU_WATER * (1 + HU / 1000), air and below at 0.
MU_WATER = 0.0206


@dataclass
class Volume:
    """Attenuation (mm⁻¹) on a voxel grid, and the grid's index -> LPS mm map."""

    mu: torch.Tensor  # (D, H, W): array order k, j, i
    index_to_lps: torch.Tensor  # 4x4, index (i, j, k, 1) -> LPS mm

    @classmethod
    def from_image(cls, image: sitk.Image, spacing: Optional[float] = None, hounsfield: bool = True,
                   device=None, dtype=torch.float32) -> "Volume":
        """A CT (Hounsfield units; ``hounsfield=False``: already attenuation in mm⁻¹), resampled to isotropic
        ``spacing`` mm first when given (coarser volumes render faster; the blur averages, not aliases)."""
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError("the CT must be a 3D scalar image")
        if spacing is not None:
            image = resample_isotropic(image, float(spacing))
        values = sitk.GetArrayFromImage(image).astype(np.float64)
        mu = np.clip(MU_WATER * (1.0 + values / 1000.0), 0.0, None) if hounsfield else np.clip(values, 0.0, None)
        return cls(torch.as_tensor(mu, dtype=dtype, device=device),
                   torch.as_tensor(ijk_to_physical_matrix(image), dtype=dtype, device=device))

    @property
    def shape_ijk(self):
        d, h, w = self.mu.shape
        return w, h, d

    def bounding_sphere(self):
        """(centre LPS mm, radius mm) of the sphere through the volume's corners (outer voxel faces)."""
        w, h, d = self.shape_ijk
        corners = torch.tensor([[i, j, k, 1.0] for i in (-0.5, w - 0.5) for j in (-0.5, h - 0.5)
                                for k in (-0.5, d - 0.5)], dtype=self.mu.dtype, device=self.mu.device)
        points = (corners @ self.index_to_lps.T)[:, :3]
        centre = points.mean(0)
        return centre, (points - centre).norm(dim=1).max()


def resample_isotropic(image: sitk.Image, spacing: float) -> sitk.Image:
    """The image on an isotropic grid of ``spacing`` mm covering the same extent (linear, averaged first when
    coarser so that thin bone is not skipped)."""
    old = np.asarray(image.GetSpacing())
    factor = spacing / old
    if np.all(factor > 1.5):
        sigma = [0.5 * (f - 1.0) * s for f, s in zip(factor, old)]
        image = sitk.SmoothingRecursiveGaussian(image, sigma)
    size = [max(1, int(round(n * s / spacing))) for n, s in zip(image.GetSize(), old)]
    # Same outer extent: the first voxel's outer face stays where it was.
    start = image.TransformContinuousIndexToPhysicalPoint([-0.5] * 3)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    origin = np.asarray(start) + direction @ np.full(3, spacing / 2.0)
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), [spacing] * 3,
                         image.GetDirection(), float(sitk.GetArrayViewFromImage(image).min()), sitk.sitkFloat32)


def trilinear(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Values of ``volume`` (D, H, W), or of each channel of (C, D, H, W), at continuous indices ``points``
    (..., 3 as i, j, k); zero outside. Written with gathers so that it has derivatives of any order in the
    points and the volume."""
    channels = volume.dim() == 4
    grid = volume if channels else volume[None]
    _, d, h, w = grid.shape
    flat = grid.reshape(grid.shape[0], -1)
    base = torch.floor(points.detach())
    frac = points - base
    base = base.long()
    out = torch.zeros((grid.shape[0],) + points.shape[:-1], dtype=volume.dtype, device=volume.device)
    for di in (0, 1):
        for dj in (0, 1):
            for dk in (0, 1):
                i, j, k = base[..., 0] + di, base[..., 1] + dj, base[..., 2] + dk
                inside = (i >= 0) & (i < w) & (j >= 0) & (j < h) & (k >= 0) & (k < d)
                index = (k.clamp(0, d - 1) * h + j.clamp(0, h - 1)) * w + i.clamp(0, w - 1)
                weight = ((frac[..., 0] if di else 1 - frac[..., 0]) * (frac[..., 1] if dj else 1 - frac[..., 1])
                          * (frac[..., 2] if dk else 1 - frac[..., 2]))
                weight = torch.where(inside, weight, torch.zeros_like(weight))
                out = out + weight * flat[:, index]
    return out if channels else out[0]


def render(volume: Volume, carm, ct_to_source: torch.Tensor, samples: Optional[int] = None,
           channels: Optional[torch.Tensor] = None, second_order: bool = False) -> torch.Tensor:
    """Line integrals of attenuation (optical depth) on the detector: (rows, columns), or (B, rows, columns)
    for a batch of poses (B, 4, 4). ``samples`` per ray: by default one per voxel across the bounding sphere.
    ``channels`` (C, D, H, W) on the volume's grid (ProST's 3D features) are integrated instead of the
    attenuation: (C, rows, columns) or (B, C, rows, columns). ``second_order``: the image is to be
    differentiated twice (a gradient of a gradient, as ProST's training takes)."""
    centre, radius = volume.bounding_sphere()
    voxel = volume.index_to_lps[:3, :3].norm(dim=0).min()
    if samples is None:
        samples = int(torch.ceil(2 * radius / voxel).item())
    batched = ct_to_source.dim() == 3
    source, source_index, direction_index = rays_in_index(volume, carm, ct_to_source)
    dtype, device = volume.mu.dtype, volume.mu.device
    # Sample across the bounding sphere: t from |c - s| - r to |c - s| + r along each ray.
    distance = (centre - source).norm(dim=-1)  # (B,)
    step = 2 * radius / samples
    t = (distance - radius)[:, None] + step * (torch.arange(samples, dtype=dtype, device=device) + 0.5)  # (B, N)
    # Only the samples that some ray of the batch takes inside the volume: the others add exactly zero.
    t = t[:, samples_inside(source_index, direction_index, t, step, volume.shape_ijk)]
    field = volume.mu if channels is None else channels
    if second_order and torch.is_grad_enabled() and (field.requires_grad or ct_to_source.requires_grad):
        values = trilinear(field, points_along(source_index, direction_index, t))
    else:  # PyTorch's own sampler: the same values and first derivatives, several times faster
        # Its coordinates run from -1 to 1 between the first and the last voxel centre: a linear map of the
        # indices, applied to each ray's start and direction rather than to every sample.
        d, h, w = field.shape[-3:]
        scale = 2 / torch.tensor([w - 1, h - 1, d - 1], dtype=dtype, device=device).clamp(min=1)
        values = sample_grid(field, points_along(source_index * scale - 1, direction_index * scale, t))
    image = values.sum(-1) * step  # (B, rows, columns) or (C, B, rows, columns)
    if channels is not None:
        image = image.transpose(0, 1)
    return image if batched else image[0]


def rays_in_index(volume: Volume, carm, ct_to_source: torch.Tensor):
    """The rays of poses (4x4 or B x 4x4) in the volume's frame: the source in LPS mm (B, 3) and in voxel indices
    (B, 3), and each pixel's unit direction in indices per mm (B, rows, columns, 3)."""
    pose = ct_to_source if ct_to_source.dim() == 3 else ct_to_source[None]
    dtype, device = volume.mu.dtype, volume.mu.device
    pose = pose.to(dtype=dtype, device=device)
    rotation, translation = pose[:, :3, :3], pose[:, :3, 3]
    # Rays in the CT frame: from the source s = -R^T t along R^T d (d: unit direction to each pixel).
    source = -(rotation.transpose(1, 2) @ translation[..., None])[..., 0]  # (B, 3)
    pixels = carm.detector_points(device=device, dtype=dtype)  # (rows, columns, 3)
    directions = pixels / pixels.norm(dim=-1, keepdim=True)
    directions = torch.einsum("bji,rcj->brci", rotation, directions)  # R^T d, (B, rows, columns, 3)
    to_index = torch.linalg.inv(volume.index_to_lps)
    return source, source @ to_index[:3, :3].T + to_index[:3, 3], directions @ to_index[:3, :3].T


def render_by_planes(volume: Volume, carm, ct_to_source: torch.Tensor) -> torch.Tensor:
    """Line integrals of attenuation on the detector, as ``render``'s ((rows, columns), or (B, rows, columns)
    for a batch of poses), by Joseph's method: each ray sampled where it crosses each plane of voxel centres
    across the grid axis that the batch's rays run most nearly along, bilinearly within the plane (zero outside
    the volume), each sample weighted by the ray's length between two planes; nothing behind the source counts.
    Differentiable once in the pose. A ray's samples lie 1 / cos(its angle to the axis) voxels apart (up to 1.4
    at 45 degrees, as in Joseph's method). One axis serves the whole batch (one gather per plane): in a batch
    whose poses straddle 45 degrees between two axes, some are sampled more than a voxel apart within the planes."""
    batched = ct_to_source.dim() == 3
    _, source, direction = rays_in_index(volume, carm, ct_to_source)
    dtype, device = volume.mu.dtype, volume.mu.device
    axis = int(direction.detach().abs().reshape(-1, 3).mean(0).argmax())  # 0, 1, 2: i, j, k
    across = [a for a in range(3) if a != axis]  # the planes' x and y: grid_sample's width and height
    dimension = {0: 2, 1: 1, 2: 0}  # index axis -> the array's dimension (k, j, i)
    planes = volume.mu.permute(dimension[axis], dimension[across[1]], dimension[across[0]])[:, None]
    count = planes.shape[0]
    along = direction[..., axis]  # (B, rows, columns): indices per mm across the planes
    slope = direction[..., across] / along[..., None]  # in-plane index change per plane
    # grid_sample's coordinates run from -1 to 1 between the first and the last voxel centre.
    scale = 2 / torch.tensor([planes.shape[3] - 1, planes.shape[2] - 1], dtype=dtype, device=device).clamp(min=1)
    at_zero = (source[:, None, None, across] - source[:, None, None, axis, None] * slope) * scale - 1
    plane = torch.arange(count, dtype=dtype, device=device)
    grid = torch.addcmul(at_zero.reshape(1, -1, 2), plane[:, None, None], (slope * scale).reshape(1, -1, 2))
    values = torch.nn.functional.grid_sample(planes, grid[:, :, None, :], mode="bilinear", padding_mode="zeros",
                                             align_corners=True).reshape((count,) + along.shape)
    level = source[:, axis, None, None]  # the source's place across the planes
    if bool(((along > 0) & (level >= 0) | (along < 0) & (level <= count - 1)).any()):  # planes behind a source
        ahead = (plane[:, None, None, None] - level[None]) / along[None] > 0
        values = torch.where(ahead, values, torch.zeros_like(values))
    image = values.sum(0) / along.abs()
    return image if batched else image[0]


def samples_inside(source_index: torch.Tensor, direction_index: torch.Tensor, t: torch.Tensor, step,
                   shape_ijk) -> slice:
    """The range of sample numbers (columns of ``t``, (B, N) mm from the source) at which any of the batch's rays
    (from ``source_index`` (B, 3) along ``direction_index`` (B, rows, columns, 3), index units per mm) is within
    one voxel of the grid, where interpolation can be non-zero. The samples stay where they were (no new
    discretisation, no branch in the derivatives), so the sum is the same: the whole range costs 30-40 % more on
    a CT box inside its bounding sphere."""
    with torch.no_grad():
        low = torch.full((3,), -1.0, dtype=t.dtype, device=t.device)
        high = torch.as_tensor([float(n) for n in shape_ijk], dtype=t.dtype, device=t.device)
        direction = direction_index.reshape(direction_index.shape[0], -1, 3)
        # Rays parallel to a face: a tiny slope keeps the slab test's signs (inside: +-inf, outside: a miss).
        direction = torch.where(direction.abs() < 1e-9, torch.full_like(direction, 1e-9), direction)
        start = source_index[:, None, :]
        to_low, to_high = (low - start) / direction, (high - start) / direction
        entry = torch.minimum(to_low, to_high).amax(-1)  # (B, rays)
        leave = torch.maximum(to_low, to_high).amin(-1)
        hit = entry < leave
        if not bool(hit.any()):
            return slice(0, 0)
        first = torch.where(hit, entry, torch.full_like(entry, float("inf"))).amin(-1)  # (B,)
        last = torch.where(hit, leave, torch.full_like(leave, -float("inf"))).amax(-1)
        # t[:, k] = t[:, 0] + step * k
        k0 = torch.floor((first - t[:, 0]) / step) - 1
        k1 = torch.ceil((last - t[:, 0]) / step) + 2
        samples = t.shape[1]
        return slice(int(k0.min().clamp(0, samples)), int(k1.max().clamp(0, samples)))


def points_along(start: torch.Tensor, direction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """start + t * direction for each ray and sample: (B, rows, columns, N, 3) from ``start`` (B, 3),
    ``direction`` (B, rows, columns, 3) and ``t`` (B, N), in one pass over the result."""
    return torch.addcmul(start[:, None, None, None, :], t[:, None, None, :, None], direction[:, :, :, None, :])


def sample_grid(volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``trilinear``'s values (zero outside) through ``grid_sample``, at ``grid`` (..., 3) in its coordinates
    (-1 and 1 at the first and last voxel centres, x along i). Differentiable once in the points and the volume
    (PyTorch has no second derivative of it in 3D)."""
    grid_values = volume if volume.dim() == 4 else volume[None]
    values = torch.nn.functional.grid_sample(grid_values[None], grid.reshape(1, -1, 1, 1, 3), mode="bilinear",
                                             padding_mode="zeros", align_corners=True)
    values = values.reshape((grid_values.shape[0],) + grid.shape[:-1])
    return values if volume.dim() == 4 else values[0]
