"""Vertebra crops as in the paper: 1 mm grid, image multiplied by the vertebra's label, fixed-size crop.

Reorientation, resampling and cropping happen in one SimpleITK resampling onto the crop's grid (identity
direction in LPS, 1 mm, centred on the vertebra), so the image is interpolated once and the crop keeps a
full physical geometry: every voxel of every result maps back into the original scan's space.
"""

import warnings
from dataclasses import dataclass, field
from typing import List, Sequence

import numpy as np
import SimpleITK as sitk

# The paper's crop, 128 x 128 x 64 voxels in SimpleITK (x, y, z) order.
CROP_SIZE = (128, 128, 64)
HU_RANGE = (-1000.0, 2000.0)


class PreprocessingError(ValueError):
    pass


@dataclass
class VertebraCrop:
    image: sitk.Image  # float32, normalised to [0, 1], zero outside the vertebra
    label: sitk.Image  # uint8 binary mask of the vertebra
    name: str = ""
    warnings: List[str] = field(default_factory=list)


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


def label_ids(labels: sitk.Image) -> List[int]:
    return [int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v != 0]


def crop_vertebra(image: sitk.Image, labels: sitk.Image, label_id: int, size: Sequence[int] = CROP_SIZE,
                  spacing: float = 1.0, name: str = "", mask: bool = True) -> VertebraCrop:
    """Crop one vertebra (label ``label_id`` of ``labels``) from a CT scan in Hounsfield units."""
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
    notes = []
    bbox = stats.GetBoundingBox(1)  # (x0, y0, z0, sx, sy, sz)
    lo, ext = np.asarray(bbox[:3]), np.asarray(bbox[3:])
    if np.any(lo == 0) or np.any(lo + ext >= np.asarray(binary.GetSize())):
        notes.append(f"{where}vertebra label {label_id} touches the edge of the scan: it may be cut off")
    reference = crop_grid(stats.GetCentroid(1), size, spacing)
    # Interpolated in floating point and written as float32 (no float copy of the whole scan first).
    crop_mask = sitk.Resample(binary, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    mask_array = (sitk.GetArrayFromImage(crop_mask) >= 0.5).astype(np.uint8)
    if mask_array.sum() == 0:
        raise PreprocessingError(f"{where}label {label_id} vanishes when resampled to {spacing} mm")
    border = np.concatenate([mask_array[[0, -1]].ravel(), mask_array[:, [0, -1]].ravel(),
                             mask_array[:, :, [0, -1]].ravel()])
    if border.any():
        notes.append(f"{where}vertebra label {label_id} is larger than the {tuple(size)} crop: its edges are cut")
    ct = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, HU_RANGE[0], sitk.sitkFloat32)
    values = normalise_ct(sitk.GetArrayFromImage(ct))
    if mask:
        values = values * mask_array
    out_image = sitk.GetImageFromArray(values)
    out_image.CopyInformation(reference)
    out_label = sitk.GetImageFromArray(mask_array)
    out_label.CopyInformation(reference)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return VertebraCrop(out_image, out_label, name, notes)
