"""A registration read back from the folder ``RegistrationResult.save`` (or ``acsgreg register --out``) wrote:
what a separate process hands back, e.g. the Slicer module's background runs. Needs neither PyTorch nor the
model: the transform is rebuilt from the saved affine and deformable field, exactly as the files define it."""

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk

from . import geometry
from .errors import InputError
from .io import read_image

# What a saved registration is read back from: the outputs (RegistrationResult.write_files) to ask for, and
# the files of them that must be there (warped_label.nii.gz and metrics only where both labels were given).
READABLE_OUTPUTS = ("jacobian", "fields", "warped_label", "metrics")
NEEDED = ("summary.json", "jacobian.nii", "deformable_field.nii")


@dataclass
class SavedResult:
    """The parts of a ``RegistrationResult`` that describe the map, with the same methods for them."""

    affine_lps: np.ndarray  # 4x4, fixed LPS point -> moving LPS point
    jacobian: sitk.Image  # on the fixed crop's grid
    exported_field: sitk.Image  # the deformable part, tapered to zero in a band around the crop
    warped_label: Optional[sitk.Image] = None
    metrics: Optional[Dict] = None
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)

    @property
    def fixed(self) -> sitk.Image:
        """The fixed crop's grid (the Jacobian map's), the reference outputs are resampled onto."""
        return self.jacobian

    def exported_deformable_field(self) -> sitk.Image:
        return self.exported_field

    def deformable_field(self) -> sitk.Image:
        """The deformable part as saved (tapered beyond the crop; inside it, the network's)."""
        return self.exported_field

    def forward_transform(self) -> sitk.CompositeTransform:
        return geometry.composite_transform(self.affine_lps, self.exported_field)


def load_result(folder: str) -> SavedResult:
    """Read a saved registration; InputError naming the folder and the file when one is missing or damaged."""
    missing = [name for name in NEEDED if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise InputError(f"{folder} is not a saved registration: {', '.join(missing)} missing")
    try:
        with open(os.path.join(folder, "summary.json")) as fh:
            summary = json.load(fh)
        affine = np.asarray(summary["affine_lps"], dtype=np.float64)
    except (ValueError, KeyError) as exc:
        raise InputError(f"{os.path.join(folder, 'summary.json')} is damaged: {exc}") from None
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(f"{os.path.join(folder, 'summary.json')}: affine_lps is not a finite 4x4 matrix")
    label_path = os.path.join(folder, "warped_label.nii.gz")
    field_image = sitk.ReadImage(os.path.join(folder, "deformable_field.nii"), sitk.sitkVectorFloat64)
    return SavedResult(affine, read_image(os.path.join(folder, "jacobian.nii"), "Jacobian map"), field_image,
                       read_image(label_path, "warped label") if os.path.isfile(label_path) else None,
                       summary.get("metrics"), float(summary.get("seconds", 0.0)), list(summary.get("notes", [])))
