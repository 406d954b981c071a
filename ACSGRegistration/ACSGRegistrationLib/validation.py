"""Input checks that turn bad input into specific, readable errors before any computation."""

import numpy as np

from .errors import InputError


def check_volume(array, name: str) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim != 3:
        raise InputError(f"{name} must be a 3D volume, got a {a.ndim}D array of shape {a.shape}")
    if min(a.shape) < 2:
        raise InputError(f"{name} has a degenerate shape {a.shape}: every axis needs at least 2 voxels")
    if not np.issubdtype(a.dtype, np.number) and a.dtype != bool:
        raise InputError(f"{name} has non-numeric voxels ({a.dtype})")
    a = a.astype(np.float32)
    bad = ~np.isfinite(a)
    if bad.any():
        raise InputError(f"{name} contains {int(bad.sum())} NaN or infinite voxel(s)")
    return a


def check_label(array, name: str) -> np.ndarray:
    a = check_volume(array, name)
    if not np.any(a > 0):
        raise InputError(f"{name} is empty: it has no labelled voxel")
    return (a > 0).astype(np.float32)


def check_pair(fixed: np.ndarray, moving: np.ndarray, what: str = "images"):
    if fixed.shape != moving.shape:
        raise InputError(f"fixed and moving {what} differ in shape: {fixed.shape} vs {moving.shape}")
