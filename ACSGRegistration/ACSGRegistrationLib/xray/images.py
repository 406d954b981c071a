"""X-ray images and their C-arm geometry: any 2D image SimpleITK reads (PNG, TIFF, NIfTI, MHA) or a DICOM
XA/RF/DX/CR file, whose geometry tags fill in what GEOMETRY.json omits (GEOMETRY.json wins where both give a
value: a calibration the user made is better than the nominal one in the header). Read through SimpleITK
(GDCM), no other dependency.

DICOM tags used: (0018,1110) Distance Source to Detector; (0018,1111) Distance Source to Patient;
(0018,1164) Imager Pixel Spacing (at the detector; else (0028,0030) Pixel Spacing), both "row\\column" spacing;
(0018,1510)/(0018,1511) Positioner Primary (LAO +, RAO −) and Secondary (cranial +, caudal −) angles;
the shutters: (0018,1600) Shutter Shape, RECTANGULAR with (0018,1602)/(0018,1604) left/right vertical edges
(columns) and (0018,1606)/(0018,1608) upper/lower horizontal edges (rows), CIRCULAR with (0018,1610) centre
(row\\column) and (0018,1612) radius, 1-based pixels, the field exposed between them; else the X-Ray Collimator
module's (0018,1700)-(0018,1712), alike. GEOMETRY.json's ``exposed_field_px`` ([first column, first row, last
column, last row], 0-based, inclusive) gives a rectangle instead.
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
# Shape, left, right, upper, lower, circle's centre, radius: the Display Shutter module's, then the Collimator's.
SHUTTER_TAGS = (("0018|1600", "0018|1602", "0018|1604", "0018|1606", "0018|1608", "0018|1610", "0018|1612"),
                ("0018|1700", "0018|1702", "0018|1704", "0018|1706", "0018|1708", "0018|1710", "0018|1712"))


@dataclass
class XRay:
    """One X-ray: its pixels (rows, columns, float) and what its file says of the acquisition."""

    pixels: np.ndarray
    path: str
    geometry: Dict = field(default_factory=dict)  # GEOMETRY.json's keys the file gives
    source_to_patient_mm: Optional[float] = None
    primary_angle_deg: Optional[float] = None
    secondary_angle_deg: Optional[float] = None
    exposed: Optional[np.ndarray] = None  # (rows, columns) bool: where the shutters let the beam through

    @property
    def size(self):
        return self.pixels.shape[1], self.pixels.shape[0]


def _numbers(text: str):
    return [float(v) for v in str(text).replace("\\", " ").split() if v.strip()]


# The smallest X-ray worth registering: the pose search samples it onto its own detector grid (96 pixels).
MIN_XRAY_PIXELS = 16


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
    from ..io import check_nifti_finite
    from ..validation import check_image_values
    check_nifti_finite(path, "X-ray image")  # ITK's NIfTI reader would turn them into 0
    check_image_values(image, f"X-ray image {path}", "pixel")
    if min(image.GetSize()) < MIN_XRAY_PIXELS:
        raise InputError(f"X-ray image {path} is {image.GetSize()[0]} x {image.GetSize()[1]} pixels: too small to "
                         f"register (at least {MIN_XRAY_PIXELS} along each side)")
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
                number("secondary_angle_deg"), _shutters(reader, pixels.shape, path))


def _shutters(reader: sitk.ImageFileReader, shape, path: str) -> Optional[np.ndarray]:
    """The exposed field the DICOM header's shutters (or collimator) leave, None where it names none."""
    for shape_tag, left, right, upper, lower, centre, radius in SHUTTER_TAGS:
        if not reader.HasMetaDataKey(shape_tag):
            continue
        shapes = reader.GetMetaData(shape_tag).upper().replace("\\", " ").split()
        values = {tag: _numbers(reader.GetMetaData(tag)) for tag in (left, right, upper, lower, centre, radius)
                  if reader.HasMetaDataKey(tag) and reader.GetMetaData(tag).strip()}
        exposed = np.ones(shape, dtype=bool)
        rows, columns = np.mgrid[1:shape[0] + 1, 1:shape[1] + 1]  # DICOM counts pixels from 1
        if "RECTANGULAR" in shapes and all(tag in values for tag in (left, right, upper, lower)):
            exposed &= (columns >= values[left][0]) & (columns <= values[right][0])
            exposed &= (rows >= values[upper][0]) & (rows <= values[lower][0])
        if "CIRCULAR" in shapes and centre in values and radius in values and len(values[centre]) >= 2:
            (row, column), r = values[centre][:2], values[radius][0]
            exposed &= (rows - row) ** 2 + (columns - column) ** 2 <= r ** 2
        if not exposed.any():
            raise InputError(f"{path}: its shutters ({', '.join(shapes)}) leave no pixel exposed")
        return None if exposed.all() else exposed
    return None


def exposed_field(xray: XRay, geometry: Optional[Dict] = None, where: str = "GEOMETRY.json"
                  ) -> Optional[np.ndarray]:
    """Where the beam reached this X-ray's detector (rows, columns, bool): GEOMETRY.json's ``exposed_field_px``
    ([first column, first row, last column, last row], 0-based, inclusive), else the file's shutter tags; None:
    all of it."""
    box = (geometry or {}).get("exposed_field_px")
    if box is None:
        return xray.exposed
    columns, rows = xray.size
    try:
        c0, r0, c1, r1 = (int(v) for v in box)
    except (TypeError, ValueError):
        raise InputError(f"{where}: exposed_field_px must be [first column, first row, last column, last row], "
                         f"got {box!r}") from None
    if not (0 <= c0 <= c1 < columns and 0 <= r0 <= r1 < rows):
        raise InputError(f"{where}: exposed_field_px {box} does not lie within {xray.path}'s {columns} x {rows} "
                         "pixels")
    exposed = np.zeros((rows, columns), dtype=bool)
    exposed[r0:r1 + 1, c0:c1 + 1] = True
    return exposed


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
    carm = CArm.from_dict(merged, where=f"{xray.path} + {where}")
    check_plausible_carm(carm, f"{xray.path} + {where}")
    return carm


# A C-arm or radiography unit: its source 0.5-2 m from the detector, detector pixels of 0.05-1 mm (binned or
# downsampled ones up to a few mm). Outside these bounds lies a unit error (cm, m, pixels), not a machine.
SOURCE_TO_DETECTOR_MM = (200.0, 3000.0)
PIXEL_SPACING_MM = (0.01, 10.0)


def check_plausible_carm(carm: CArm, where: str) -> None:
    sdd, (sx, sy) = carm.source_to_detector_mm, carm.pixel_spacing_mm
    if not SOURCE_TO_DETECTOR_MM[0] <= sdd <= SOURCE_TO_DETECTOR_MM[1]:
        raise InputError(f"{where}: the source is {sdd:g} mm from the detector; an X-ray unit's is "
                         f"{SOURCE_TO_DETECTOR_MM[0]:g}-{SOURCE_TO_DETECTOR_MM[1]:g} mm (is it in mm?)")
    if not all(PIXEL_SPACING_MM[0] <= s <= PIXEL_SPACING_MM[1] for s in (sx, sy)):
        raise InputError(f"{where}: detector pixels of {sx:g} x {sy:g} mm; an X-ray detector's are "
                         f"{PIXEL_SPACING_MM[0]:g}-{PIXEL_SPACING_MM[1]:g} mm (is it in mm?)")


def read_ct(ct_path: str, seg_path: Optional[str] = None) -> Tuple[sitk.Image, Optional[sitk.Image]]:
    """The CT and its label map (None without ``seg_path``), each read whole and checked (finite values; labels
    whole numbers on the CT's grid): every command that reads a CT for the X-ray wing reads it here."""
    from ..io import read_image
    from ..validation import check_image_values, check_label_grid, check_label_values
    ct = read_image(ct_path, "CT")
    check_image_values(ct, f"the CT {ct_path}")
    if seg_path is None:
        return ct, None
    labels = read_image(seg_path, "CT label map")
    check_label_values(labels, f"the CT label map {seg_path}")
    check_label_grid(ct, labels, "the CT label map", seg_path)
    return ct, labels


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
