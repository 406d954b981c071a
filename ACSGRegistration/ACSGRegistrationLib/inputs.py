"""The input rules shared by every front door (command line, Slicer module, scripts): what a registration's
inputs are and how they become the crops the registrar takes.

- **Whole scan** (an image with a label map or segmentation): the chosen vertebra (a level, a name or a label
  value: ``vertebrae.resolve_vertebra``; may be omitted where there is one label) is cropped as in the paper:
  128 x 128 x 64 mm at 1 mm around its centroid, the image masked by the vertebra
  (``preprocessing.crop_vertebra``).
- **Ready crop** (an image alone): used as it is.
- **Intensities**: images in Hounsfield units (any value below -0.5 or above 1.5) are clipped to
  [-1000, 2000] HU and scaled to [0, 1] like the training crops; images already on that scale are kept.
- Resampling to the network's own grid (size and voxel size of the model) happens in the registrar, for
  any crop spacing; training data goes through ``preprocessing.to_network_grid``.
"""

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError, PreprocessingError
from .io import read_image
from .preprocessing import CROP_SIZE, crop_vertebra, label_centroids, looks_like_hounsfield, normalise_ct
from .vertebrae import resolve_vertebra

HU_NOTE = "{what}: intensities taken as Hounsfield units and scaled like the training crops"
SCALED_NOTE = "{what}: intensities within [0, 1], taken as already scaled like the training crops"


@dataclass
class PreparedInput:
    """One side of a pair as the registrar gets it."""

    source: sitk.Image  # the input image as given (whole scan or crop, original intensities)
    image: sitk.Image  # the crop given to the registrar (float32, [0, 1])
    label: Optional[sitk.Image] = None  # binary uint8 mask of the vertebra on the crop, or None
    name: str = ""  # the vertebra's readable name ("L1", a segment name), "" for a ready crop
    notes: List[str] = field(default_factory=list)


def prepare_input(image: sitk.Image, labels: Optional[sitk.Image] = None, vertebra=None, what: str = "fixed",
                  names: Optional[Dict[int, str]] = None, owner: str = "", noun: str = "label map",
                  size: Sequence[int] = CROP_SIZE, spacing: float = 1.0) -> PreparedInput:
    """The registrar's crop of one side (see the module docstring for the rules).

    ``labels``: a label map on any grid (multi-label, or the vertebra's binary mask); ``vertebra``: the user's
    choice in it; ``names``: every label value of the map -> its name ("" where unknown: segment names, a
    colour table, a convention), or None to list the values from the map; ``owner`` and ``noun`` name the label
    map in error messages ("'seg'", "labelmap"); ``size`` and ``spacing``: the crop's grid (the paper's).
    """
    if min(image.GetSize()) < 2 or image.GetDimension() != 3:
        raise InputError(f"the {what} image is not a 3D volume (size {image.GetSize()})")
    hounsfield = looks_like_hounsfield(image)
    if labels is None:
        notes = [HU_NOTE.format(what=what)] if hounsfield else []
        values = sitk.GetArrayFromImage(image)
        crop = sitk.GetImageFromArray(normalise_ct(values) if hounsfield else values.astype(np.float32))
        crop.CopyInformation(image)
        return PreparedInput(image, crop, None, "", notes)
    notes = [] if hounsfield else [SCALED_NOTE.format(what=what)]
    choices = names if names is not None else {value: "" for value in sorted(label_centroids(labels))}
    value, name = resolve_vertebra(choices, vertebra, what, noun, owner)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            crop = crop_vertebra(image, labels, int(value), size, spacing, name=f"{what} {name}",
                                 hounsfield=hounsfield)
        except PreprocessingError as exc:
            raise PreprocessingError(f"{exc} (does the {what} {noun} belong to its image?)") from exc
    notes += [str(w.message).replace(f"label {value} ", f"'{name}' ") for w in caught]
    return PreparedInput(image, crop.image, crop.label, name, notes)


def read_input(image_path: str, labels_path: Optional[str] = None, vertebra=None, what: str = "fixed") -> PreparedInput:
    """``prepare_input`` of image files: names of the label map's values from ``readers.label_map_names``."""
    from .readers import label_map_names
    image = read_image(image_path, f"{what} image")
    if labels_path is None:
        if vertebra not in (None, ""):
            raise InputError(f"a {what} vertebra ({vertebra}) was chosen but no {what} label map was given")
        return prepare_input(image, what=what)
    labels = read_image(labels_path, f"{what} label map")
    return prepare_input(image, labels, vertebra, what, label_map_names(labels_path, labels),
                         owner=labels_path)
