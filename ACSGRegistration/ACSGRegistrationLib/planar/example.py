"""Example 2D images to register at once (``acsgreg example2d``), made from a CT and its vertebra labels.

The fixed image is a view of the CT centred on one vertebra (``data.spine_view``; by default a sagittal slice
through L3's centroid, 128 x 128 mm at 1 mm: the shipped model's grid). The moving image is, by default, the
same view under a known deformation (``evaluation.known_cases``: each vertebra moved rigidly by up to 5 degrees
and 3 mm, the soft tissue by a smooth field, another exposure: as between two radiographs in flexion and
extension, and what the 2D model was trained and evaluated on). That makes an honest first example: the true
map is known and written beside it, so the registration can be checked point by point and not only by its
overlap; and it is the case the method is for (the same anatomy moved; the shipped model measured 2.06 -> 0.44
mm end-point error on held-out views). With a second CT, the moving image is that CT's view of the same level
instead: a pair of two people, which has no true map and registers less well (README: Dice 0.71 -> 0.77 on
average), shown as it is.

The images are written as one-slice volumes where the views lie in their CTs (NIfTI: the pixel spacing and the
orientation kept, so the figure labels the sides and a viewer overlays them on the CT), and as PNG copies (the
image in 8 bits, the label values as they are), the route of a radiograph. The vertebra must be whole in the
scan: one cut by the scan's edge makes a misleading example.
"""

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .data import Spine, View, read_spine

EXAMPLE_KIND = "2D example"
IMAGES = ("fixed", "moving", "fixed_seg", "moving_seg")
TRUE_FIELD = "true_field"


@dataclass
class Example:
    """The pair as one-slice volumes (``IMAGES``), the true map where known (a 2D vector image in the frame
    register2d gives the fixed image), and what register2d needs to know: the centred vertebra's label values."""

    images: Dict[str, sitk.Image]
    fixed_label: int
    moving_label: int
    description: Dict
    true_field: Optional[sitk.Image] = None


def whole_vertebrae(spine: Spine) -> List[int]:
    """The label values of the vertebrae that no edge of the scan cuts (their extent inside the label map)."""
    from ..preprocessing import label_statistics
    stats = label_statistics(spine.labels)
    size = spine.labels.GetSize()
    whole = []
    for value in spine.names:
        if not stats.HasLabel(value):
            continue
        box = stats.GetBoundingBox(value)  # (x, y, z start, then x, y, z extent), in voxels
        if all(box[k] > 0 and box[k] + box[k + 3] < size[k] for k in range(3)):
            whole.append(value)
    return whole


def level_view(spine: Spine, level: str, kind: str) -> View:
    """The ``kind`` view of ``spine`` centred on vertebra ``level``, which must be whole in the scan."""
    value = spine.centres([level])[0]
    whole = whole_vertebrae(spine)
    if value not in whole:
        from ..vertebrae import SPINE, level_of
        levels = sorted((level_of(spine.names[v]) for v in whole), key=SPINE.index)
        raise InputError(f"{spine.option}-seg {spine.seg_path}: {spine.names[value]} is cut by the scan's edge (a "
                         f"poor example); the vertebrae it has whole: {', '.join(levels) or 'none'} (choose one "
                         "with --level)")
    return spine.views([value], [kind])[0]


def _like(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    return image


def make_example(ct: str, ct_seg: str, level: str, kind: str,
                 moving_ct: Optional[str] = None, moving_seg: Optional[str] = None, seed: int = 0) -> Example:
    """The example of the module's docstring: the ``kind`` view (``data.VIEWS``) centred on vertebra ``level``,
    and a known deformation of it (``seed`` draws it), or, given ``moving_ct`` and ``moving_seg``, the other CT's
    view of the same level."""
    fixed = level_view(read_spine(ct, ct_seg, "--ct"), level, kind)
    images = {"fixed": fixed.placed(fixed.image), "fixed_seg": fixed.placed(fixed.labels)}
    description = {"view": kind, "level": level.upper(), "fixed": {"ct": ct, "labels": ct_seg},
                   "terms": "made from the CTs named here: their licences and attributions apply"}
    if moving_ct:
        moving = level_view(read_spine(moving_ct, moving_seg, "--moving-ct"), level, kind)
        images.update(moving=moving.placed(moving.image), moving_seg=moving.placed(moving.labels))
        description.update(moving={"ct": moving_ct, "labels": moving_seg,
                                   "what": f"the same view of another CT's {level.upper()}"})
        return Example(images, fixed.label, moving.label, description)
    from .evaluation import known_cases
    from .network import as_volume_field
    from .register import as_planar, physical_field
    from ..networks.model import invert_displacement
    case = known_cases([fixed], [seed])[0]
    images.update(moving=fixed.placed(_like(case["moving"][0, 0].numpy(), fixed.image)),
                  moving_seg=fixed.placed(_like(case["moving_labels"][0, 0].numpy().astype(np.int16),
                                                fixed.labels)))
    # The truth is the backward field (moving point q -> fixed point q + b(q)); register2d's map goes the other
    # way (fixed point p -> moving point p + u(p)): its inverse, in the 2D frame register2d reads fixed.nii.gz in.
    forward = invert_displacement(as_volume_field(case["backward"][None]))[0, 1:, 0].numpy().astype(np.float64)
    true_field = physical_field(forward, as_planar(images["fixed"], "the fixed image"))
    description.update(moving={"what": "the same view under a known deformation (evaluate2d's: each vertebra "
                                       "moved rigidly, the soft tissue smoothly, another exposure)", "seed": seed},
                       true_field="the true map as register2d's field.nii: fixed point p -> moving point p + u(p), "
                                  "u in mm in the fixed image's 2D frame")
    return Example(images, fixed.label, fixed.label, description, true_field)


def _png(image: sitk.Image, label_map: bool) -> sitk.Image:
    """A one-slice volume's pixels as a PNG takes them (its array's order: the view's, head up): the image in 8
    bits (it is in [0, 1]), label values as they are (16 bits where one exceeds 255)."""
    array = sitk.GetArrayFromImage(image)[0]
    if label_map:
        return sitk.GetImageFromArray(array.astype(np.uint8 if array.max() <= 255 else np.uint16))
    return sitk.GetImageFromArray(np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8))


def write_example(example: Example, folder: str) -> Dict[str, str]:
    """The NIfTI files, their PNG copies, true_field.nii where known and example.json, into ``folder``."""
    from ..geometry import write_field, write_image, write_text
    paths = {}
    for name in IMAGES:
        paths[name] = os.path.join(folder, f"{name}.nii.gz")
        write_image(example.images[name], paths[name])
    for name in IMAGES:
        paths[f"{name}_png"] = os.path.join(folder, f"{name}.png")
        write_image(_png(example.images[name], name.endswith("_seg")), paths[f"{name}_png"])
    if example.true_field is not None:
        paths[TRUE_FIELD] = os.path.join(folder, f"{TRUE_FIELD}.nii")  # plain, as register2d's field.nii
        write_field(example.true_field, paths[TRUE_FIELD])
    paths["description"] = os.path.join(folder, "example.json")
    write_text(json.dumps(dict(example.description, fixed_label=example.fixed_label,
                               moving_label=example.moving_label), indent=2), paths["description"])
    return paths


def register_command(example: Example, folder: str, out: str, extension: str = "nii.gz") -> str:
    """The register2d command line for the example written in ``folder`` (as the user named it)."""
    from ..cli_options import copyable_command
    files = {name: os.path.join(folder, f"{name}.{extension}") for name in IMAGES}
    arguments = ["acsgreg", "register2d", "--fixed", files["fixed"], "--moving", files["moving"],
                 "--fixed-seg", files["fixed_seg"], "--moving-seg", files["moving_seg"]]
    arguments += (["--label", str(example.fixed_label)] if example.fixed_label == example.moving_label else
                  ["--fixed-label", str(example.fixed_label), "--moving-label", str(example.moving_label)])
    # The true map is in the frame of the slice as register2d reads the NIfTI file; a PNG has another frame.
    if example.true_field is not None and extension == "nii.gz":
        arguments += ["--true-field", os.path.join(folder, TRUE_FIELD + ".nii")]
    return copyable_command(arguments + ["--outputs", "default,figure", "--out", out], width=1000)
