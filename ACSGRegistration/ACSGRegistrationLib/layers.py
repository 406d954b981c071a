"""Small building blocks shared by the networks: convolution block, resampling, integration.

Conventions used throughout the backend:
- volumes are tensors (B, C, D, H, W) in array order (z, y, x), as SimpleITK's GetArrayFromImage gives;
- a *coordinate map* (B, 3, D, H, W) holds, for every output voxel, the voxel position (z, y, x) in the
  image being sampled; a *displacement* is a coordinate map minus the identity;
- resampling uses align_corners=True so that voxel index i sits exactly at normalised position
  -1 + 2 i / (n - 1), which is what makes the physical-space export exact.
"""

import contextlib
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _cpu_autocast_dtype():
    """The CPU autocast dtype while CPU autocast is on, else None (PyTorch >= 2.4's API, or the older one)."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


_ONEDNN_BF16 = None


def onednn_bf16_available() -> bool:
    """Whether oneDNN's bf16 convolution runs on this CPU (it needs AVX512-BW/VL/DQ or AVX-NE-CONVERT;
    on CPUs without them it raises). Found by trying once, which also covers PyTorch builds that differ."""
    global _ONEDNN_BF16
    if _ONEDNN_BF16 is None:
        try:
            x = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bfloat16)
            torch.mkldnn_convolution(x, torch.zeros(1, 1, 1, 1, 1, dtype=torch.bfloat16), None, (0, 0, 0),
                                     (1, 1, 1), (1, 1, 1), 1)
            _ONEDNN_BF16 = True
        except (RuntimeError, AttributeError):
            _ONEDNN_BF16 = False
    return _ONEDNN_BF16


class Conv3d(nn.Conv3d):
    """nn.Conv3d that always takes oneDNN's kernel on the CPU, in fp32 or (under autocast) bf16.

    PyTorch picks its naive "slow_conv3d" for small inputs of batch 1 (a heuristic tuned for 2D), which
    is ~10x slower here than oneDNN's convolution: exactly the one-pair registration case. Calling
    oneDNN directly bypasses CPU autocast, so its dtype is applied here. oneDNN keeps the channels-last
    layout of its input or weight, which ``inference.prepare_for_inference`` uses. Where oneDNN has no
    bf16 kernel for this CPU (no AVX-512), bf16 goes through PyTorch's own convolution instead.
    """

    def forward(self, x):
        if x.device.type == "cpu" and self.padding_mode == "zeros" and isinstance(self.padding, tuple) \
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled \
                and not _compiling():  # torch.compile picks its own convolution
            weight, bias = self.weight, self.bias
            dtype = _cpu_autocast_dtype()
            if dtype is not None:
                x, weight = x.to(dtype), weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
            if x.dtype == weight.dtype and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16
                                                                        and onednn_bf16_available())):
                return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation,
                                                self.groups)
        return super().forward(x)


class ConvBlock(nn.Module):
    """3x3x3 convolution, batch normalisation, LeakyReLU (the paper's ConvBlock)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: bool = True):
        super().__init__()
        self.conv = Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=not norm)
        self.norm = nn.BatchNorm3d(out_channels) if norm else nn.Identity()
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


def full_precision(device: torch.device):
    """A context with autocast off (only CPU and CUDA have autocast; e.g. the meta device has none)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def flow_head(in_channels: int) -> nn.Conv3d:
    """Final 3-channel convolution, initialised near zero so that training starts at the identity."""
    conv = Conv3d(in_channels, 3, 3, padding=1)
    nn.init.normal_(conv.weight, 0.0, 1e-5)
    nn.init.zeros_(conv.bias)
    return conv


def device_vector(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """A small constant vector on ``like``'s device and dtype, filled from Python numbers.

    torch.tensor(values, device="cuda") copies from pageable host memory, which waits for the GPU to
    finish all queued work: a stall in the middle of the pipeline. Scalar fills are queued like kernels.
    """
    out = torch.empty(len(values), device=like.device, dtype=like.dtype)
    for i, v in enumerate(values):
        out[i] = v
    return out


def identity_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 3, D, H, W) map of each voxel's own (z, y, x) index."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)


def sample(image: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear",
           padding_mode: str = "zeros") -> torch.Tensor:
    """Sample ``image`` (B, C, d, h, w) at voxel positions ``coords`` (B, 3, D, H, W)."""
    sizes = image.shape[2:]
    normalised = [coords[:, i] * (2.0 / max(n - 1, 1)) - 1.0 for i, n in enumerate(sizes)]
    grid = torch.stack(normalised[::-1], dim=-1)  # grid_sample wants (x, y, z) last
    if grid.dtype != image.dtype:
        grid = grid.to(image.dtype)
    return grid_sample(image, grid, mode, padding_mode)


# Off only to measure the difference (benchmarks/benchmark_speedups.py).
SAMPLE_ON_EVERY_CORE = True


def grid_sample(image: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """F.grid_sample (align_corners=True); on the CPU a single volume is sampled in one slab per thread.

    PyTorch's CPU kernel parallelises over the batch only, so one pair ran on one core. Here the output
    grid is cut along depth into equal slabs, batched against the same (expanded, not copied) image, and
    put back together: the same values, sampled on every core. Only without gradients: backward would
    need one full-size image gradient per slab.
    """
    slabs = min(torch.get_num_threads(), grid.shape[1]) if SAMPLE_ON_EVERY_CORE else 1
    if image.device.type != "cpu" or grid.shape[0] != 1 or slabs < 2 or (
            torch.is_grad_enabled() and (image.requires_grad or grid.requires_grad)):
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    depth = grid.shape[1]
    per_slab = -(-depth // slabs)
    if per_slab * slabs > depth:  # pad with copies of the last plane, dropped afterwards
        grid = torch.cat([grid, grid[:, -1:].expand(-1, per_slab * slabs - depth, -1, -1, -1)], dim=1)
    batched = grid.reshape(slabs, per_slab, *grid.shape[2:])
    out = F.grid_sample(image.expand(slabs, *image.shape[1:]), batched, mode=mode, padding_mode=padding_mode,
                        align_corners=True)
    out = out.transpose(0, 1).reshape(1, image.shape[1], slabs * per_slab, *out.shape[3:])
    return out[:, :, :depth]


def warp(image: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "zeros") -> torch.Tensor:
    """Spatial transformer: image(x + displacement(x)) on the displacement's grid."""
    grid = identity_grid(displacement.shape[2:], displacement.device, displacement.dtype)
    return sample(image, grid + displacement, mode, padding_mode)


def integrate_velocity(velocity: torch.Tensor, steps: int) -> torch.Tensor:
    """Scaling and squaring: displacement of exp(velocity) for a stationary velocity field (voxels).

    With steps == 0 the input is returned as a plain displacement field.
    """
    if steps <= 0:
        return velocity
    displacement = velocity / (2 ** steps)
    for _ in range(steps):
        # phi_{2t} = phi_t o phi_t; border padding keeps the field defined at the volume's faces.
        displacement = displacement + warp(displacement, displacement, padding_mode="border")
    return displacement


def resize_field(field: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Trilinear resize of a displacement/velocity field, rescaling its voxel-unit vectors."""
    old = field.shape[2:]
    if tuple(old) == tuple(shape):
        return field
    resized = F.interpolate(field, size=tuple(shape), mode="trilinear", align_corners=True)
    scale = device_vector([(n - 1) / max(o - 1, 1) for n, o in zip(shape, old)], field)
    return resized * scale.view(1, 3, 1, 1, 1)


def affine_coordinates(matrix: torch.Tensor, fixed_shape: Sequence[int], moving_shape: Sequence[int],
                       points: torch.Tensor = None) -> torch.Tensor:
    """Apply a (B, 3, 4) voxel-space affine about the volumes' centres.

    y = A (x - c_fixed) + c_moving + t, with x, y voxel positions (z, y, x). ``points`` (B, 3, D, H, W)
    defaults to the fixed grid's identity, giving the coordinate map of the affine warp.
    """
    if points is None:
        points = identity_grid(fixed_shape, matrix.device, matrix.dtype)
    c_fixed = device_vector([(n - 1) / 2 for n in fixed_shape], matrix)
    c_moving = device_vector([(n - 1) / 2 for n in moving_shape], matrix)
    centred = points - c_fixed.view(1, 3, 1, 1, 1)
    linear = torch.einsum("bij,bjdhw->bidhw", matrix[:, :, :3], centred.expand(matrix.shape[0], -1, -1, -1, -1))
    return linear + (matrix[:, :, 3] + c_moving).view(-1, 3, 1, 1, 1)


def invert_affine(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of a (B, 3, 4) affine of the form of ``affine_coordinates`` (fixed and moving swapped)."""
    linear_inv = torch.linalg.inv_ex(matrix[:, :, :3]).inverse  # inv_ex: no device-to-host error check
    translation = -torch.einsum("bij,bj->bi", linear_inv, matrix[:, :, 3])
    return torch.cat([linear_inv, translation.unsqueeze(-1)], dim=2)
