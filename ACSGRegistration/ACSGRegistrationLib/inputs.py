"""The input rules shared by every front door (command line, Slicer module, scripts): what a registration's
inputs are and how they become the crops the registrar takes.

- **Whole scan** (an image with a label map or segmentation): the chosen vertebra (a level, a name or a label
  value: ``vertebrae.resolve_vertebra``; may be omitted where there is one label) is cropped as in the paper:
  128 x 128 x 64 mm at 1 mm around its centroid, the image masked by the vertebra
  (``preprocessing.crop_vertebra``).
- **Ready crop** (an image alone): used as it is.
- **Intensities** (``validation.intensity_scale``): images in Hounsfield units are clipped to [-1000, 2000] HU
  and scaled to [0, 1] like the training crops; images already on that scale are kept; anything else is
  refused unless the caller says it is another kind of image ("minmax": stretched between percentiles).
- **Label maps** must lie on their image (``validation.check_label_grid``) and the vertebra must be
  vertebra-sized (``validation.MIN_VERTEBRA_MM3``); label 0 is the background, never a vertebra.
- Resampling to the network's own grid (size and voxel size of the model) happens in the registrar, for
  any crop spacing; training data goes through ``preprocessing.to_network_grid``.
"""

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError, PreprocessingError
from .io import read_image
from .preprocessing import CROP_SIZE, HU_RANGE, crop_vertebra, label_centroids, normalise_ct, stretch_to_unit
from .validation import check_label_grid, check_label_values, check_resolution, intensity_scale
from .vertebrae import resolve_vertebra

HU_NOTE = "{what}: intensities taken as Hounsfield units and scaled like the training crops"
SCALED_NOTE = "{what}: intensities within [0, 1], taken as already scaled like the training crops"
MINMAX_NOTE = "{what}: intensities stretched to [0, 1] between their 0.5th and 99.5th percentiles (not CT)"
# Below this median inside the vertebra (HU) the label probably lies off its bone (a cancellous-only
# osteoporotic vertebra is ~100 HU, with its cortex above): a note, not an error.
BONE_MEDIAN_HU = 80.0
# How much larger than the paper's crop (per axis, sorted) an image given without labels may be.
CROP_TOLERANCE = 1.5


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
                  size: Sequence[int] = CROP_SIZE, spacing: float = 1.0, intensity: str = "auto") -> PreparedInput:
    """The registrar's crop of one side (see the module docstring for the rules).

    ``labels``: a label map on or inside the image's grid (multi-label, or the vertebra's binary mask);
    ``vertebra``: the user's choice in it; ``names``: every label value of the map -> its name ("" where
    unknown: segment names, a colour table, a convention), or None to list the values from the map; ``owner``
    and ``noun`` name the label map in error messages ("'seg'", "labelmap"); ``size`` and ``spacing``: the
    crop's grid (the paper's); ``intensity``: the image's scale (``validation.INTENSITY_SCALES``; "auto"
    detects Hounsfield units or [0, 1] and refuses anything else).
    """
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise InputError(f"the {what} image is not a 3D volume (size {image.GetSize()})")
    scale = intensity_scale(image, f"the {what} image", intensity)
    if scale == "minmax":
        image = stretch_to_unit(image)
    notes = {"hu": [HU_NOTE], "unit": [SCALED_NOTE], "minmax": [MINMAX_NOTE]}[scale]
    notes = [n.format(what=what) for n in notes]
    if labels is None:
        check_is_crop(image, what)
        check_resolution(image, f"the {what} image")
        values = sitk.GetArrayFromImage(image)
        crop = sitk.GetImageFromArray(normalise_ct(values) if scale == "hu" else values.astype(np.float32))
        crop.CopyInformation(image)
        return PreparedInput(image, crop, None, "", notes)
    check_label_values(labels, f"the {what} {noun} {owner}".strip())
    check_label_grid(image, labels, f"the {what} {noun}", owner)
    choices = names if names is not None else {value: "" for value in sorted(label_centroids(labels))}
    value, name = resolve_vertebra(choices, vertebra, what, noun, owner)
    check_resolution(image, f"the {what} image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            crop = crop_vertebra(image, labels, int(value), size, spacing, name=f"{what} {name}",
                                 hounsfield=scale == "hu")
        except PreprocessingError as exc:
            raise PreprocessingError(f"{exc} (does the {what} {noun} belong to its image?)") from exc
    notes += [str(w.message).replace(f"label {value} ", f"'{name}' ") for w in caught]
    # After the crop, whose own check names a label too small to be a vertebra at all.
    coarse = check_resolution(image, f"the {what} image", crop.span, f"vertebra '{name}'")
    notes += [coarse] if coarse else []
    if scale == "hu":
        inside = sitk.GetArrayViewFromImage(crop.image)[sitk.GetArrayViewFromImage(crop.label) > 0]
        median = float(np.median(inside)) * (HU_RANGE[1] - HU_RANGE[0]) + HU_RANGE[0]
        if median < BONE_MEDIAN_HU:
            notes.append(f"the {what} vertebra '{name}' has a median of {median:.0f} HU, low for bone: does the "
                         f"{noun} belong to its image?")
    return PreparedInput(image, crop.image, crop.label, name, notes)


def check_is_crop(image: sitk.Image, what: str) -> None:
    """An image given without a label map must be a vertebra crop: a whole scan would be registered as if it
    were one (its middle squeezed onto the crop's grid), a meaningless result."""
    extent = sorted(n * s for n, s in zip(image.GetSize(), image.GetSpacing()))
    if any(e > CROP_TOLERANCE * c for e, c in zip(extent, sorted(CROP_SIZE))):
        size = " x ".join(f"{n * s:.0f}" for n, s in zip(image.GetSize(), image.GetSpacing()))
        raise InputError(f"the {what} image covers {size} mm: a whole scan, not a vertebra crop "
                         f"({' x '.join(map(str, CROP_SIZE))} mm); give its label map and the vertebra to crop")


def read_input(image_path: str, labels_path: Optional[str] = None, vertebra=None, what: str = "fixed",
               intensity: str = "auto", reader: Callable[[str, str], sitk.Image] = read_image) -> PreparedInput:
    """``prepare_input`` of image files: names of the label map's values from ``readers.label_map_names``;
    ``reader(path, what)`` reads the files (``io.read_image``, or a batch's cache of it)."""
    from .readers import label_map_names
    image = reader(image_path, f"{what} image")
    if labels_path is None:
        if vertebra not in (None, ""):
            raise InputError(f"a {what} vertebra ({vertebra}) was chosen but no {what} label map was given")
        return prepare_input(image, what=what, intensity=intensity)
    labels = reader(labels_path, f"{what} label map")
    return prepare_input(image, labels, vertebra, what, label_map_names(labels_path, labels),
                         owner=labels_path, intensity=intensity)
