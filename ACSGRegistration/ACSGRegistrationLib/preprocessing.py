"""Vertebra crops as in the paper: 1 mm grid, image multiplied by the vertebra's label, fixed-size crop (the
label smoothed by half of its voxel before it is thresholded into the mask: ``smoothed_mask``).

Reorientation, resampling and cropping happen in one SimpleITK resampling onto the crop's grid (identity
direction in LPS, 1 mm, centred on the vertebra), so the image is interpolated once and the crop keeps a
full physical geometry: every voxel of every result maps back into the original scan's space.
"""

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import PreprocessingError
from .validation import check_label_volume

# The paper's crop, 128 x 128 x 64 voxels in SimpleITK (x, y, z) order.
CROP_SIZE = (128, 128, 64)
HU_RANGE = (-1000.0, 2000.0)
# Smoothing of a label before it becomes a crop's mask, in voxels of the label map (see smoothed_mask).
MASK_SIGMA_VOXELS = 0.5


@dataclass
class VertebraCrop:
    image: sitk.Image  # float32, normalised to [0, 1], zero outside the vertebra
    label: sitk.Image  # uint8 binary mask of the vertebra
    name: str = ""
    warnings: List[str] = field(default_factory=list)
    span: Optional[Tuple[int, int, int]] = None  # the vertebra's extent in the image's voxels (its bounding box)


def normalise_ct(array: np.ndarray) -> np.ndarray:
    """Clip Hounsfield units to HU_RANGE and scale to [0, 1]."""
    lo, hi = HU_RANGE
    return ((np.clip(array, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def crop_grid(center, size=CROP_SIZE, spacing=1.0) -> sitk.Image:
    """An empty reference image of the crop: identity direction (LPS), centred on ``center`` (mm)."""
    reference = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    reference.SetSpacing([float(spacing)] * 3)
    reference.SetOrigin(tuple(float(c) - (n - 1) / 2.0 * spacing for c, n in zip(center, size)))
    return reference


def stretch_to_unit(image: sitk.Image, percentiles=(0.5, 99.5)) -> sitk.Image:
    """Intensities of a non-CT image (2D or 3D) mapped to [0, 1] between two percentiles (float32, clipped)."""
    values = sitk.GetArrayViewFromImage(image)
    lo, hi = (float(v) for v in np.percentile(values[(slice(None, None, 2),) * values.ndim], percentiles))
    hi = hi if hi > lo else float(values.max())
    out = sitk.GetImageFromArray(np.clip((values.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0.0, 1.0))
    out.CopyInformation(image)
    return out


def label_ids(labels: sitk.Image) -> List[int]:
    return [int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v != 0]


def label_statistics(labels: sitk.Image) -> sitk.LabelShapeStatisticsImageFilter:
    """Shape statistics of every non-zero label (one pass over the volume; perimeters are not needed)."""
    if labels.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        labels = sitk.Cast(labels, sitk.sitkInt32)  # label maps saved as float: the statistics need integers
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputePerimeterOff()
    stats.Execute(labels)
    return stats


def label_centroids(labels: sitk.Image) -> Dict[int, Tuple[float, float, float]]:
    """Physical centroid (LPS, mm) of every non-zero label: +z is superior whatever the file's orientation."""
    stats = label_statistics(labels)
    return {int(lab): tuple(stats.GetCentroid(lab)) for lab in stats.GetLabels()}


def crop_size(spacing: float = 1.0) -> tuple:
    """Voxels per axis of a crop that covers the paper's 128 x 128 x 64 mm at ``spacing`` mm."""
    return tuple(max(1, int(round(n / float(spacing)))) for n in CROP_SIZE)


def smoothed_mask(binary: sitk.Image, bbox: Sequence[int], sigma_voxels: float = MASK_SIGMA_VOXELS) -> sitk.Image:
    """A binary label (uint8) as a float image, Gaussian-smoothed by ``sigma_voxels`` of its largest voxel size
    around its bounding box ``bbox`` (x0, y0, z0, sx, sy, sz): the outline a crop's mask thresholds at 0.5.

    Why: a label map is a staircase at its own voxel size (3 mm for many clinical CTs), and a second scan's
    label is a different staircase of the same bone; the crop multiplies the image by its mask, so the
    network sees that staircase as the vertebra's edge and matches it. Smoothing by half a voxel before
    thresholding removes the steps' corners (the outline of a label on a 1 mm grid barely moves). Measured on
    the shared CTs' known deformations through whole scans: mean TRE 1.006 -> 0.972 mm (``evaluate-maps
    --kinds known-scan --seeds 2``; 0.968 mm with 0.75 voxel: the choice is not critical). Isotropic, at the
    coarsest axis's scale (a 0.7 x 0.7 x 2.5 mm label's outline is known to 2.5 mm, in every direction it
    turns): half of each axis's own voxel instead gave 0.978 mm and a lower Dice between the two shared CTs.
    """
    sigma = sigma_voxels * max(binary.GetSpacing())
    margin = [int(math.ceil(3 * sigma / s)) + 1 for s in binary.GetSpacing()]
    lo = [max(0, int(b) - m) for b, m in zip(bbox[:3], margin)]
    hi = [min(n, int(b) + int(e) + m) for b, e, m, n in zip(bbox[:3], bbox[3:], margin, binary.GetSize())]
    region = sitk.Cast(sitk.RegionOfInterest(binary, [h - l for l, h in zip(lo, hi)], lo), sitk.sitkFloat32)
    if sigma <= 0:
        return region
    # Where the label reaches the scan's edge, zeros beyond it (outside the scan: no label, as the crop's
    # resampling takes it), so that the filter's own edge handling, which is not the same at both ends of an
    # axis, never reaches the label: the mask is then the same whichever way the scan's axes run.
    below = [max(0, m - int(b)) for m, b in zip(margin, bbox[:3])]
    above = [max(0, int(b) + int(e) + m - n) for b, e, m, n in zip(bbox[:3], bbox[3:], margin, binary.GetSize())]
    region = sitk.ConstantPad(region, below, above, 0.0)
    return sitk.SmoothingRecursiveGaussian(region, [sigma] * 3)


# The share of a vertebra outside its crop from which the crop's notes say so.
CUT_NOTE_FRACTION = 0.02


def crop_vertebra(image: sitk.Image, labels: sitk.Image, label_id: int, size: Sequence[int] = CROP_SIZE,
                  spacing: float = 1.0, name: str = "", mask: bool = True, hounsfield: bool = True) -> VertebraCrop:
    """Crop one vertebra (label ``label_id`` of ``labels``) from a CT scan in Hounsfield units (or, with
    ``hounsfield`` False, from an image already scaled to [0, 1], whose values are kept)."""
    where = f"{name}: " if name else ""
    if image.GetDimension() != 3 or labels.GetDimension() != 3:
        raise PreprocessingError(f"{where}expected 3D image and label map, got {image.GetDimension()}D "
                                 f"and {labels.GetDimension()}D")
    if image.GetSize() != labels.GetSize() or not np.allclose(image.GetOrigin(), labels.GetOrigin(), atol=1e-3) \
            or not np.allclose(image.GetDirection(), labels.GetDirection(), atol=1e-4):
        # A label map on another grid is still usable: bring it onto the image's grid first.
        labels = sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    binary = labels == int(label_id)  # uint8
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(binary)
    if not stats.HasLabel(1):
        raise PreprocessingError(f"{where}label {label_id} is not in the label map "
                                 f"(labels present: {label_ids(labels) or 'none'})")
    check_label_volume(stats.GetPhysicalSize(1), stats.GetNumberOfPixels(1), f"{where}label {label_id}")
    notes = []
    bbox = stats.GetBoundingBox(1)  # (x0, y0, z0, sx, sy, sz)
    lo, ext = np.asarray(bbox[:3]), np.asarray(bbox[3:])
    if np.any(lo == 0) or np.any(lo + ext >= np.asarray(binary.GetSize())):
        notes.append(f"{where}vertebra label {label_id} touches the edge of the scan: it may be cut off")
    reference = crop_grid(stats.GetCentroid(1), size, spacing)
    crop_mask = sitk.Resample(smoothed_mask(binary, bbox), reference, sitk.Transform(), sitk.sitkLinear, 0.0,
                              sitk.sitkFloat32)
    mask_array = (sitk.GetArrayFromImage(crop_mask) >= 0.5).astype(np.uint8)
    if mask_array.sum() == 0:
        raise PreprocessingError(f"{where}label {label_id} vanishes when resampled to {spacing} mm")
    border = np.concatenate([mask_array[[0, -1]].ravel(), mask_array[:, [0, -1]].ravel(),
                             mask_array[:, :, [0, -1]].ravel()])
    if border.any():
        # Said only where a noticeable part is cut: the tips of a lumbar vertebra's processes often reach the
        # paper's crop's edge, which changes nothing a user would see.
        cut = 1.0 - float(mask_array.sum()) * spacing ** 3 / stats.GetPhysicalSize(1)
        if cut >= CUT_NOTE_FRACTION:
            notes.append(f"{where}{100 * cut:.0f} % of vertebra label {label_id} lies outside the "
                         f"{' x '.join(f'{n * spacing:g}' for n in size)} mm crop: that part is not registered")
    outside = HU_RANGE[0] if hounsfield else 0.0
    ct = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, outside, sitk.sitkFloat32)
    values = sitk.GetArrayFromImage(ct)  # float32
    if hounsfield:
        values = normalise_ct(values)
    if mask:
        values = values * mask_array
    out_image = sitk.GetImageFromArray(values)
    out_image.CopyInformation(reference)
    out_label = sitk.GetImageFromArray(mask_array)
    out_label.CopyInformation(reference)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return VertebraCrop(out_image, out_label, name, notes, tuple(int(n) for n in ext))


def to_network_grid(image: sitk.Image, shape_zyx: Sequence[int], spacing: float, label: bool = False) -> np.ndarray:
    """A crop of any size and spacing as a float32 (z, y, x) array on a network's grid: its size and voxel size,
    centred where the crop is centred (``geometry.model_grid``); labels resampled to a binary mask."""
    from .geometry import model_grid, onto, same_grid
    grid = model_grid(image, shape_zyx, spacing)
    if not same_grid(image, grid):
        image = onto(image if label else sitk.Cast(image, sitk.sitkFloat32), grid, label=label)
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    return np.ascontiguousarray((values > 0.5).astype(np.float32) if label else values)
