"""Turning a trained network into a fast inference engine, without changing what it computes.

Each step is measured in the README's performance section (before/after, and the Dice on the real pairs):
- batch normalisation folded into the preceding convolution (one pass over each feature map less);
- convolution weights in the channels-last layout, which oneDNN (CPU) and cuDNN (GPU) run fastest, so
  every feature map stays channels-last from the first convolution on;
- optionally bf16 for the convolutional and transformer stages, where the hardware computes it natively
  (CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX); the geometry stays fp32 (see ``RegistrationNet``);
- on Linux, freed memory kept in the process for the next tensors (``keep_freed_memory``).
"""

import contextlib
import copy
import ctypes
import sys

import torch
import torch.nn as nn

from .config import PRECISIONS
from .errors import InputError
from .layers import Conv3d, ConvBlock
from .networks import RegistrationNet


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 convolutions and matrix products natively (not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        # The instructions themselves: oneDNN also "supports" bf16 on plain AVX-512 by emulating it, which
        # is no faster than fp32. (Private helpers of torch.cpu; absent from older PyTorch: then fp32.)
        checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(check is not None and check() for check in checks)
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for ``precision`` ("auto": bf16 where native, fp32 elsewhere)."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16(device) else torch.float32


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision this machine cannot compute at speed: bf16 is emulated where it is not native
    (many times slower than fp32 on a CPU without AVX512-BF16 or AMX)."""
    resolve_precision(precision, device)
    if precision == "bf16" and not native_bf16(device):
        raise InputError(f"precision 'bf16' was asked for, but this {device.type.upper()} does not compute bf16 "
                         "natively (AVX512-BF16 or AMX on a CPU): emulated, it is many times slower than fp32; "
                         "use precision 'auto' or 'fp32'")


def fold_batch_norm(block: ConvBlock) -> None:
    """Fold an eval-mode ConvBlock's batch norm into its convolution (in place)."""
    norm = block.norm
    if not isinstance(norm, nn.BatchNorm3d):
        return
    conv = block.conv
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    folded = Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, bias=True).to(conv.weight.device)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
        folded.bias.copy_((bias - norm.running_mean) * scale + norm.bias)
    block.conv, block.norm = folded, nn.Identity()


def prepare_for_inference(model: RegistrationNet, device: torch.device, precision: str = "auto",
                          channels_last: bool = True) -> RegistrationNet:
    """An inference-only copy of ``model`` on ``device``; the original is left untouched."""
    dtype = resolve_precision(precision, device)  # an unknown precision fails before any copying
    engine = copy.deepcopy(model).to(device).eval()
    for module in engine.modules():
        if isinstance(module, ConvBlock):
            fold_batch_norm(module)
    if channels_last:
        engine = engine.to(memory_format=torch.channels_last_3d)
    engine.compute_dtype = dtype
    for p in engine.parameters():
        p.requires_grad_(False)
    return engine


def describe(engine: RegistrationNet) -> str:
    return "bf16" if engine.compute_dtype == torch.bfloat16 else "fp32"


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt, libc.malloc_trim  # noqa: B018 -- both must exist (glibc, not musl)
                _libc = libc
    return _libc


def keep_freed_memory() -> bool:
    """Let glibc's malloc serve tensors of up to 1 GB from its heap and keep what is freed for reuse.

    By default glibc maps every block above 32 MB afresh and unmaps it when freed, so each full-resolution
    feature map (32-128 MB for the paper-size network) is page-faulted in again on every use: a fifth of
    the paper-size network's CPU time. Freed memory then stays in the process until ``release_freed_memory``
    (the Slicer module calls it after each registration). Process-wide; Linux with glibc only (elsewhere
    nothing changes and False is returned).
    """
    libc = _glibc()
    if not libc:
        return False
    return libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1


def release_freed_memory() -> None:
    """Give the memory freed since ``keep_freed_memory`` back to the system (glibc's malloc_trim)."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)
