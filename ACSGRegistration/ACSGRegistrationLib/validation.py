"""Input checks that turn bad input into specific, readable errors before any computation."""

from typing import List, Optional, Sequence

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
# Nearly every voxel of a CT in Hounsfield units (its padding outside the field of view aside: the minimum, at
# -1024 or below) lies between air and dense bone; metal and noise add a few outside. A scan with fewer inside
# was scaled (x10, x1000) or is another kind of image. The [0, 1] scale likewise, give or take its margin.
HU_PLAUSIBLE = (-1200.0, 4000.0)
UNIT_PLAUSIBLE = (-0.5, 1.5)
PLAUSIBLE_FRACTION = 0.9
PLAUSIBILITY_STRIDE = 8
# A vertebra (3-5 cm across) needs voxels of at most this size, and at least MIN_VERTEBRA_SPAN voxels across along
# each axis, to be registered; fewer than COARSE_VERTEBRA_SPAN is allowed with a note (a 5 mm-slice scan).
MAX_SPACING_MM = 6.0
MIN_VERTEBRA_SPAN = 4
COARSE_VERTEBRA_SPAN = 8


def check_volume(array, name: str) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim != 3:
        raise InputError(f"{name} must be a 3D volume, got a {a.ndim}D array of shape {a.shape}")
    if min(a.shape) < 2:
        raise InputError(f"{name} has a degenerate shape {a.shape}: every axis needs at least 2 voxels")
    if not np.issubdtype(a.dtype, np.number) and a.dtype != bool:
        raise InputError(f"{name} has non-numeric voxels ({a.dtype})")
    a = a.astype(np.float32)
    check_finite(a, name)
    return a


def check_finite(values, name: str, what: str = "voxel") -> None:
    """NaN or infinite values are refused, saying how many (all of them: the file holds no number at all)."""
    a = np.asarray(values)
    if a.dtype.kind not in "fc":
        return
    bad = int(np.count_nonzero(~np.isfinite(a)))
    if bad == a.size:
        raise InputError(f"{name} holds no number: every one of its {a.size} {what}s is NaN or infinite")
    if bad:
        raise InputError(f"{name} has {bad} NaN or infinite {what}(s) ({100.0 * bad / a.size:.2g} % of them): "
                         "replace them (or crop them away) first")


def check_label_values(labels: sitk.Image, name: str) -> None:
    """A label map holds whole numbers; one of floats with fractions is a probability map or a resampled
    (interpolated) label map, whose labels would be read wrong."""
    if labels.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return
    values = sitk.GetArrayFromImage(labels)
    check_finite(values, name)
    fractional = values[values != np.round(values)]
    if fractional.size:
        examples = ", ".join(f"{v:.3g}" for v in np.unique(fractional)[:3])
        raise InputError(f"{name} is not a label map: {fractional.size} of its voxels hold fractions (such as "
                         f"{examples}), where labels are whole numbers; a probability map or soft mask must be "
                         "thresholded first, a label map resampled with nearest-neighbour interpolation")


def check_resolution(image: sitk.Image, name: str, span: Optional[Sequence[int]] = None,
                     structure: str = "") -> Optional[str]:
    """Voxels too coarse for a vertebra are refused; ``span``: the vertebra's extent in voxels along each axis.
    Returns a note where the result may still be useful but is less precise (a 5 mm-slice scan)."""
    spacing = np.asarray(image.GetSpacing(), float)
    voxels = " x ".join(f"{v:.3g}" for v in spacing)
    spans = "" if span is None else f" and {structure} spans {' x '.join(map(str, span))} of them"
    if spacing.max() > MAX_SPACING_MM or (span is not None and min(span) < MIN_VERTEBRA_SPAN):
        raise InputError(f"{name} has voxels of {voxels} mm{spans}: too coarse to register a vertebra (voxels of "
                         f"at most {MAX_SPACING_MM:g} mm, the vertebra at least {MIN_VERTEBRA_SPAN} voxels across "
                         "along each axis)")
    if span is not None and min(span) < COARSE_VERTEBRA_SPAN:
        return (f"{name}: {structure} spans only {' x '.join(map(str, span))} voxels of {voxels} mm: the "
                "registration is coarse")
    return None


def check_image_values(image: sitk.Image, name: str, what: str = "voxel") -> None:
    """An image to register: numbers everywhere, and not one value everywhere."""
    values = sitk.GetArrayViewFromImage(image)
    check_finite(values, name, what)
    check_not_constant(np.array([values.min(), values.max()], dtype=np.float64), name, what)


def check_same_grid(labels: sitk.Image, image: sitk.Image, name: str) -> None:
    """A label map that must lie exactly on its image's grid (2D images and their label maps): same size, voxel
    size, origin (within half a voxel) and orientation."""
    problems = [] if labels.GetSize() == image.GetSize() else [
        f"{' x '.join(map(str, labels.GetSize()))} pixels where its image has {' x '.join(map(str, image.GetSize()))}"]
    problems += _grid_differences(labels, image)
    if problems:
        raise InputError(f"{name} does not lie on its image: {'; '.join(problems)} (was it saved from another image, "
                         "or moved?)")


def _grid_differences(labels: sitk.Image, image: sitk.Image) -> List[str]:
    """How a label map's grid differs from its image's: voxel size, origin (beyond half a voxel), orientation."""
    spacing = np.asarray(image.GetSpacing())
    problems = []
    if not np.allclose(labels.GetSpacing(), spacing, rtol=1e-3, atol=1e-4):
        problems.append(f"voxel size {_mm(labels.GetSpacing())} where its image has {_mm(spacing)}")
    offset = float(np.linalg.norm(np.subtract(labels.GetOrigin(), image.GetOrigin())))
    if offset > 0.5 * float(spacing.min()):
        problems.append(f"origin {offset:.1f} mm away from its image's")
    if not np.allclose(labels.GetDirection(), image.GetDirection(), atol=1e-3):
        problems.append("another orientation than its image's")
    return problems


def check_not_constant(array: np.ndarray, name: str, what: str = "voxel") -> None:
    lo, hi = float(np.min(array)), float(np.max(array))
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        raise InputError(f"{name} is constant (every {what} {lo:g}): there is nothing to register")


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
    it for HU would silently clip it: the message says how to say what it is. A scale given ("hu", "unit") or
    detected must fit the data: nearly all voxels within its plausible range (``HU_PLAUSIBLE``,
    ``UNIT_PLAUSIBLE``), so that a CT in HU said to be [0, 1], or a scaled one, is refused rather than
    registered into nonsense. NaN or infinite voxels are refused first.
    """
    if scale not in INTENSITY_SCALES:
        raise InputError(f"unknown intensity scale {scale!r} for {name}; choose one of {', '.join(INTENSITY_SCALES)}")
    values = sitk.GetArrayViewFromImage(image)
    check_finite(values, name)
    lo, hi = float(values.min()), float(values.max())
    check_not_constant(np.array([lo, hi]), name)
    if scale == "minmax":
        return scale
    if scale == "auto":
        if lo >= UNIT_PLAUSIBLE[0] and hi <= UNIT_PLAUSIBLE[1]:
            return "unit"
        if not (lo < -HU_EVIDENCE and hi > HU_EVIDENCE):
            raise InputError(
                f"{name} has intensities from {lo:g} to {hi:g}: neither Hounsfield units (a CT has air or fat "
                f"below -{HU_EVIDENCE:g} and bone above {HU_EVIDENCE:g}) nor the [0, 1] scale of ready crops. A CT "
                "stored without its rescale intercept must be fixed first; for another kind of image, choose the "
                "intensity scale 'minmax' (at your own risk: the model learned CT)")
        scale = "hu"
    low, high = HU_PLAUSIBLE if scale == "hu" else UNIT_PLAUSIBLE
    # CT padding outside the field of view (the minimum, at -1024 HU or below) is not anatomy. The fraction is
    # that of a regular sample of the voxels (one in PLAUSIBILITY_STRIDE: a scan's millions give it to < 0.1 %).
    sample = values.ravel()[::PLAUSIBILITY_STRIDE] if values.size > 100 * PLAUSIBILITY_STRIDE else values.ravel()
    kept = sample[sample != lo] if scale == "hu" and lo <= -1024 else sample
    inside = float(np.count_nonzero((kept >= low) & (kept <= high))) / max(kept.size, 1)
    if inside < PLAUSIBLE_FRACTION:
        if scale == "hu":
            raise InputError(
                f"{name} has intensities from {lo:g} to {hi:g}, {100 * (1 - inside):.0f} % of its voxels outside "
                f"{low:g}..{high:g}: not Hounsfield units (in a CT nearly every voxel lies between air, -1000, "
                "and dense bone); was it scaled? Fix the scale first, or choose the intensity scale 'minmax' for "
                "another kind of image")
        raise InputError(
            f"{name} was given as intensities in [0, 1] ('unit') but holds values from {lo:g} to {hi:g} "
            f"({100 * (1 - inside):.0f} % of its voxels outside {low:g}..{high:g})"
            + ("; these look like Hounsfield units: choose 'hu' or 'auto'" if lo < -HU_EVIDENCE and hi > HU_EVIDENCE
               else "; choose 'auto' or 'minmax'"))
    return scale


def check_label_grid(image: sitk.Image, labels: sitk.Image, name: str, owner: str = "") -> None:
    """A label map must lie on its image's grid, or at least inside its image's space.

    A segmentation saved from the same scan shares its grid. One with the same voxel count but another origin,
    voxel size or orientation was saved from another image or edited: the vertebra would be cropped from
    the wrong place, so it is refused rather than resampled.
    """
    where = f"{name} {owner}".strip()
    if labels.GetSize() == image.GetSize():
        problems = _grid_differences(labels, image)
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

