"""X-ray images and their C-arm geometry: any 2D image SimpleITK reads (PNG, TIFF, NIfTI, MHA) or a DICOM
XA/RF/DX/CR file, whose geometry tags fill in what GEOMETRY.json omits (GEOMETRY.json wins where both give a
value: a calibration the user made is better than the nominal one in the header). Read through SimpleITK
(GDCM), no other dependency.

DICOM tags used: (0018,1110) Distance Source to Detector; (0018,1111) Distance Source to Patient;
(0018,1164) Imager Pixel Spacing (at the detector; else (0028,0030) Pixel Spacing), both "row\\column" spacing;
(0018,1510)/(0018,1511) Positioner Primary (LAO +, RAO −) and Secondary (cranial +, caudal −) angles.
Pixels come as displayed (GDCM turns MONOCHROME1, where high values are dark, into MONOCHROME2); which way bone
goes (bright or dark) is left to the registration, which handles both.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .camera import CArm

TAGS = {"source_to_detector_mm": "0018|1110", "source_to_patient_mm": "0018|1111",
        "imager_pixel_spacing": "0018|1164", "pixel_spacing": "0028|0030", "primary_angle_deg": "0018|1510",
        "secondary_angle_deg": "0018|1511"}


@dataclass
class XRay:
    """One X-ray: its pixels (rows, columns, float) and what its file says of the acquisition."""

    pixels: np.ndarray
    path: str
    geometry: Dict = field(default_factory=dict)  # GEOMETRY.json's keys the file gives
    source_to_patient_mm: Optional[float] = None
    primary_angle_deg: Optional[float] = None
    secondary_angle_deg: Optional[float] = None

    @property
    def size(self):
        return self.pixels.shape[1], self.pixels.shape[0]


def _numbers(text: str):
    return [float(v) for v in str(text).replace("\\", " ").split() if v.strip()]


def read_xray(path: str) -> XRay:
    """The X-ray at ``path``; errors name the file (missing, unreadable, not 2D, colour)."""
    if not os.path.isfile(path):
        raise InputError(f"X-ray image not found: {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise InputError(f"cannot read X-ray image {path}: {lines[-1] if lines else 'unknown format'}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"X-ray image {path} has {image.GetNumberOfComponentsPerPixel()} values per pixel "
                         "(a colour image): a grey-level radiograph is needed")
    size = image.GetSize()
    if image.GetDimension() == 3 and size[2] == 1:
        image = image[:, :, 0]  # a single frame stored as a volume (DICOM, NIfTI)
    elif image.GetDimension() == 3:
        raise InputError(f"X-ray image {path} holds {size[2]} frames: pass one frame")
    pixels = sitk.GetArrayFromImage(image).astype(np.float32)
    meta = {key: reader.GetMetaData(tag).strip() for key, tag in TAGS.items() if reader.HasMetaDataKey(tag)}
    geometry = {}
    if "source_to_detector_mm" in meta:
        geometry["source_to_detector_mm"] = _numbers(meta["source_to_detector_mm"])[0]
    spacing = meta.get("imager_pixel_spacing") or meta.get("pixel_spacing")
    if spacing:
        row_spacing, column_spacing = _numbers(spacing)[:2]
        geometry["pixel_spacing_mm"] = [column_spacing, row_spacing]
    geometry["size"] = [pixels.shape[1], pixels.shape[0]]

    def number(key):
        return _numbers(meta[key])[0] if meta.get(key) else None
    return XRay(pixels, path, geometry, number("source_to_patient_mm"), number("primary_angle_deg"),
                number("secondary_angle_deg"))


def read_geometry(path: Optional[str]) -> Dict:
    """GEOMETRY.json as a dict ({} without a path); errors name the file."""
    if not path:
        return {}
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise InputError(f"geometry file not found: {path}") from None
    except ValueError as exc:
        raise InputError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected an object with source_to_detector_mm, pixel_spacing_mm, size")
    return data


def carm_of(xray: XRay, geometry: Optional[Dict] = None, where: str = "GEOMETRY.json") -> CArm:
    """The C-arm of this X-ray: ``geometry`` (GEOMETRY.json's dict), completed by the file's tags. The detector
    size is the image's; a GEOMETRY.json that says otherwise is refused."""
    merged = dict(xray.geometry)
    merged.update(geometry or {})
    if geometry and "size" in geometry and list(geometry["size"]) != list(xray.geometry["size"]):
        raise InputError(f"{where} gives a {geometry['size'][0]} x {geometry['size'][1]} detector but "
                         f"{xray.path} has {xray.size[0]} x {xray.size[1]} pixels")
    missing = [k for k in ("source_to_detector_mm", "pixel_spacing_mm") if k not in merged]
    if missing:
        raise InputError(f"{xray.path} does not give {' and '.join(missing)} (no DICOM geometry tags): put "
                         f"{'them' if len(missing) > 1 else 'it'} in {where}")
    return CArm.from_dict(merged, where=f"{xray.path} + {where}")


def target_label(labels: sitk.Image, label, where: str) -> Tuple[int, np.ndarray]:
    """The target's label value and centroid (LPS mm): ``label``, or the label map's only label."""
    from ..preprocessing import label_centroids
    centroids = label_centroids(labels)
    if label is None:
        if len(centroids) != 1:
            raise InputError(f"{where} holds labels {sorted(centroids)}: choose the target with --label")
        label = next(iter(centroids))
    if int(label) not in centroids:
        raise InputError(f"label {label} is not in {where} (it holds {sorted(centroids)})")
    return int(label), np.asarray(centroids[int(label)])


def target_centre(ct: sitk.Image, labels: Optional[sitk.Image], label, where: str) -> np.ndarray:
    """The pivot (LPS mm): the chosen label's centroid, or the CT's centre without a label map."""
    if labels is None:
        return np.asarray(ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in ct.GetSize()]))
    return target_label(labels, label, where)[1]
