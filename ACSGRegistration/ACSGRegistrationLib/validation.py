"""Input checks that turn bad input into specific, readable errors before any computation."""

from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError, ResultError

# The smallest structure taken as a vertebra: the smallest (C1, C2) are several cm^3; a label below this is a
# stray voxel, a wrong value or a label map of another resolution.
MIN_VERTEBRA_MM3 = 1000.0
MIN_LABEL_VOXELS = 27  # a label of a bare array (no voxel size): at least a 3 x 3 x 3 block
# Intensity scales an image may be on (``intensity_scale``): CT in Hounsfield units, the crops' own [0, 1]
# scale, or any other scale stretched to [0, 1] between robust percentiles (not CT: the model may not suit it).
INTENSITY_SCALES = ("auto", "hu", "unit", "minmax")
# A CT in Hounsfield units has air or fat below this and bone above the opposite: a scan within it is not
# in HU (a CT stored without its rescale intercept, from 0 up, is the common case).
HU_EVIDENCE = 100.0


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


def check_not_constant(array: np.ndarray, name: str) -> None:
    lo, hi = float(np.min(array)), float(np.max(array))
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        raise InputError(f"{name} is constant (every voxel {lo:g}): there is nothing to register")


def check_label(array, name: str, spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """A binary float mask of a label volume that holds a vertebra-sized structure: at least
    ``MIN_VERTEBRA_MM3`` where the voxel size is known, else ``MIN_LABEL_VOXELS`` (a bare array's voxels
    may be any size)."""
    a = check_volume(array, name)
    count = int(np.count_nonzero(a > 0))
    if count == 0:
        raise InputError(f"{name} is empty: it has no labelled voxel")
    if spacing is not None:
        check_label_volume(count * float(np.prod(spacing)), count, name)
    elif count < MIN_LABEL_VOXELS:
        raise InputError(f"{name} covers {count} voxel(s): too few for a vertebra (at least {MIN_LABEL_VOXELS}); "
                         "is it the right label?")
    return (a > 0).astype(np.float32)


def check_label_volume(volume_mm3: float, voxels: int, name: str) -> None:
    if volume_mm3 < MIN_VERTEBRA_MM3:
        raise InputError(f"{name} covers {voxels} voxel(s), {volume_mm3:.0f} mm^3: too small for a vertebra (at "
                         f"least {MIN_VERTEBRA_MM3:.0f} mm^3); is it the right label, and the right label map?")


def intensity_scale(image: sitk.Image, name: str, scale: str = "auto") -> str:
    """The scale of an image's intensities ("hu", "unit" or "minmax"), checked; ``scale`` "auto" detects it.

    Detection: within [0, 1] (give or take 0.5) is the crops' own scale; values both below -100 and above 100
    are Hounsfield units; anything else (constant images aside, always refused) is refused too, because taking
    it for HU would silently clip it: the message says how to say what it is.
    """
    if scale not in INTENSITY_SCALES:
        raise InputError(f"unknown intensity scale {scale!r} for {name}; choose one of {', '.join(INTENSITY_SCALES)}")
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    lo, hi = stats.GetMinimum(), stats.GetMaximum()
    check_not_constant(np.array([lo, hi]), name)
    if scale != "auto":
        return scale
    if lo >= -0.5 and hi <= 1.5:
        return "unit"
    if lo < -HU_EVIDENCE and hi > HU_EVIDENCE:
        return "hu"
    raise InputError(f"{name} has intensities from {lo:g} to {hi:g}: neither Hounsfield units (a CT has air or fat "
                     f"below -{HU_EVIDENCE:g} and bone above {HU_EVIDENCE:g}) nor the [0, 1] scale of ready crops. "
                     "A CT stored without its rescale intercept must be fixed first; for another kind of image, "
                     "choose the intensity scale 'minmax' (at your own risk: the model learned CT)")


def check_label_grid(image: sitk.Image, labels: sitk.Image, name: str, owner: str = "") -> None:
    """A label map must lie on its image's grid, or at least inside its image's space.

    A segmentation saved from the same scan shares its grid. One with the same voxel count but another origin,
    voxel size or orientation was saved from another image or edited: the vertebra would be cropped from
    the wrong place, so it is refused rather than resampled.
    """
    where = f"{name} {owner}".strip()
    if labels.GetSize() == image.GetSize():
        spacing = np.asarray(image.GetSpacing())
        offset = np.linalg.norm(np.subtract(labels.GetOrigin(), image.GetOrigin()))
        problems = []
        if not np.allclose(labels.GetSpacing(), spacing, rtol=1e-3, atol=1e-4):
            problems.append(f"voxel size {_mm(labels.GetSpacing())} where its image has {_mm(spacing)}")
        if offset > 0.5 * float(spacing.min()):
            problems.append(f"origin {offset:.1f} mm away from its image's")
        if not np.allclose(labels.GetDirection(), image.GetDirection(), atol=1e-3):
            problems.append("another orientation than its image's")
        if problems:
            raise InputError(f"{where} has the same size as its image but {' and '.join(problems)}: it does "
                             "not lie on its image; was it saved from another scan or edited?")
        return
    # Another grid (a cropped or resampled segmentation): it must at least overlap the image.
    lo_i, hi_i = _bounds(image)
    lo_l, hi_l = _bounds(labels)
    if np.any(hi_l < lo_i) or np.any(lo_l > hi_i):
        raise InputError(f"{where} lies outside its image (its extent {_mm(lo_l)}..{_mm(hi_l)} mm, the image's "
                         f"{_mm(lo_i)}..{_mm(hi_i)} mm): it belongs to another scan")


def _bounds(image: sitk.Image):
    size = np.asarray(image.GetSize()) - 1
    corners = [image.TransformContinuousIndexToPhysicalPoint([float(c) for c in np.asarray(k) * size])
               for k in np.ndindex(2, 2, 2)]
    return np.min(corners, axis=0), np.max(corners, axis=0)


def _mm(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def check_pair(fixed: np.ndarray, moving: np.ndarray, what: str = "images"):
    if fixed.shape != moving.shape:
        raise InputError(f"fixed and moving {what} differ in shape: {fixed.shape} vs {moving.shape}")


def check_finite_result(arrays, what: str, hint: Optional[str] = None) -> None:
    """A result with a NaN or infinite value is an error (never written, never shown)."""
    for key, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ResultError(f"{what}: the {key} has {int((~np.isfinite(value)).sum())} NaN or infinite "
                              f"value(s){'; ' + hint if hint else ''}")

