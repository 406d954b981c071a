"""A worked example of ``xray-register`` (the command line's ``xray-example``): no real X-ray comes with a CT, so
one is simulated from it as ``xray-evaluate`` simulates its cases (``simulation``: the vertebrae next to the target
moved slightly, Poisson noise, detector blur, a display gamma, perhaps shutters, either polarity), at a known pose
(an AP view of the target turned by a few degrees). Written as a user would bring them: the X-ray as a 16-bit PNG,
``GEOMETRY.json`` (the detector, and the shutters' field as a DICOM header gives it), ``POSE.json`` (the initial
pose: the truth moved by a C-arm's typical start, a few degrees and 10-20 mm) and ``TRUE_POSE.json`` (the truth, for
``xray-register --true-pose``). With two views a lateral X-ray beside the AP one (the C-arm turned 90 degrees about
the patient's head-foot axis, the patient unmoved): ``xray_2.png``, ``GEOMETRY_2.json``, ``POSE_2.json`` (the
initial pose moved by the C-arm's known motion between the shots)."""

import functools
import json
import os
from typing import Callable, Dict, List

import numpy as np
import SimpleITK as sitk

from ..geometry import write_image, write_text
from ..outputs import beside
from . import view_suffix
from .camera import CArm, lateral_motion, moved_pose, pose_json
from .images import read_ct, target_label
from .register import mean_target_error
from .simulation import Realism, XraySimulator, fixed_size_offset, label_points, random_view

EXAMPLE_KIND = "X-ray example"
# The simulated detector: 205 mm across (an image intensifier's field, enough for three lumbar levels) at 1,020 mm
# from the source, as xray-evaluate's; ``detector_pixels`` a side.
DETECTOR_MM = 204.8
SOURCE_TO_DETECTOR_MM = 1020.0
# A 16-bit PNG holds the simulated X-ray (values in [0, 1] as displayed) to 1 / 65535: far below its noise.
PNG_LEVELS = 65535


def example_files(views: int) -> List[Dict[str, str]]:
    """Each view's file names by kind: the first view's as named here, the second's with ``_2`` (``xray_2.png``,
    ``GEOMETRY_2.json``, ``POSE_2.json``); one ``TRUE_POSE.json`` (the first view's: the views move together)."""
    names = []
    for view in range(1, views + 1):
        suffix = view_suffix(view)
        names.append({"xray": f"xray{suffix}.png", "geometry": f"GEOMETRY{suffix}.json", "init": f"POSE{suffix}.json"})
    names[0]["truth"] = "TRUE_POSE.json"
    return names


def exposed_field_box(exposed: np.ndarray) -> List[int]:
    """The shutters' field as GEOMETRY.json's ``exposed_field_px`` ([first column, first row, last column, last
    row]): the simulated shutters close straight borders, so their field is that rectangle."""
    rows, columns = np.nonzero(exposed)
    return [int(columns.min()), int(rows.min()), int(columns.max()), int(rows.max())]


def write_example(ct_path: str, seg_path: str, label: int, out_dir: str, views: int = 1, offset_deg: float = 5.0,
                  offset_mm: float = 15.0, detector_pixels: int = 256, seed: int = 0,
                  log: Callable[[str], None] = functools.partial(print, flush=True)) -> Dict:
    """Simulate and write the example (the module's docstring); returns {"paths": {kind: path} of the first view
    and ``kind_2`` of the second, "initial_mtre_mm": how far the initial pose is off over the target,
    "xray_register": the arguments of the command that registers it (for ``shlex.join``)}. The random draws (the
    view, the offset's directions, the X-ray's noise and shutters) follow ``seed``."""
    from ..outputs import OutputFolder
    if views not in (1, 2):
        raise ValueError(f"views must be 1 or 2, not {views}")
    folder = OutputFolder(out_dir, inputs=(ct_path, seg_path), kind=EXAMPLE_KIND)
    ct, labels = read_ct(ct_path, seg_path)
    label, _ = target_label(labels, label, seg_path)
    log(f"simulating {'an AP X-ray' if views == 1 else 'an AP and a lateral X-ray'} of {ct_path} "
        f"around label {label}")
    simulator = XraySimulator(ct, labels, label)  # the CT's own resolution, as xray-evaluate's X-rays
    rng = np.random.default_rng(seed)
    truth = random_view(rng, simulator.centre)
    start = moved_pose(truth, fixed_size_offset(rng, offset_deg, offset_mm), simulator.centre)
    detector = CArm(SOURCE_TO_DETECTOR_MM, (DETECTOR_MM / detector_pixels,) * 2, (detector_pixels,) * 2)
    motions = [np.eye(4), lateral_motion(truth, simulator.centre)][:views]
    names = example_files(views)
    with folder:
        paths = {}
        for number, (motion, named) in enumerate(zip(motions, names), 1):
            shown, exposed = simulator.exposure(detector, motion @ truth, rng, Realism())
            files = {kind: os.path.join(folder.path, name) for kind, name in named.items()}
            image = sitk.GetImageFromArray(np.round(shown * PNG_LEVELS).astype(np.uint16))
            image.SetSpacing(detector.pixel_spacing_mm)
            write_image(image, files["xray"])
            geometry = dict(detector.to_dict(), exposed_field_px=exposed_field_box(exposed))
            write_text(json.dumps(geometry, indent=2), files["geometry"])
            write_text(pose_json(motion @ start), files["init"])
            if "truth" in files:
                write_text(pose_json(truth), files["truth"])
            ending = view_suffix(number)
            paths.update({kind + ending: path for kind, path in files.items()})
    # The paths as the user gave the folder (relative stays relative): the command to copy reads well.
    paths = {kind: os.path.join(out_dir, os.path.basename(path)) for kind, path in paths.items()}
    points = label_points(labels, label, count=500, seed=seed)
    command = ["acsgreg", "xray-register", "--ct", ct_path, "--ct-seg", seg_path, "--label", str(label)]
    for number in range(1, views + 1):
        ending = view_suffix(number)
        command += ["--xray", paths["xray" + ending], "--geometry", paths["geometry" + ending],
                    "--init", paths["init" + ending]]
    command += ["--true-pose", paths["truth"], "--out", beside(out_dir, "registered")]
    return {"paths": paths, "initial_mtre_mm": mean_target_error(start, truth, points), "xray_register": command}
