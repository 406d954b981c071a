"""CT to X-ray pose registration from the scene, in the background: the CT and the target vertebra's mask are
exported from their nodes, the initial pose is made from the C-arm's angles (an AP view of the target, turned),
``acsgreg xray-register`` runs in its own process, and its output folder becomes nodes (``xrayNodes``) only once
it has succeeded. Nothing here imports PyTorch (Slicer's process does not need it for a background run)."""

import json
import os
import shutil
import tempfile
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ACSGRegistrationLib.errors import InputError

from .backgroundRun import BackgroundRun
from .inputs import InputSide, exportInput
from .models import isUnset
from .runs import StagedRun


class XrayRegistrationRun(StagedRun):
    """One ``acsgreg xray-register`` process; ``finish()`` loads the pose, the placed X-ray and DRR and the
    markups. The X-ray is a file (DICOM keeps its geometry tags) or a one-slice volume node. ``otherViews``:
    (X-ray, geometry, initial pose) of more X-rays of the patient, registered with the first (one CT pose)."""

    def __init__(self, ct: InputSide, xray, geometry: Dict, initialPose, method: str = "cmaes+gradient",
                 device: str = "auto", prostModel: Optional[str] = None, evaluations: int = 400,
                 detectorPixels: int = 96, name: str = "X-ray registration", otherViews: Sequence[Tuple] = (),
                 depthPriorMm: Optional[float] = None):
        from ACSGRegistrationLib.xray.camera import pose_json
        from .conversion import volumeNodeToImage
        self.ct, self.name, self.views = ct, name, 1 + len(otherViews)
        self.work = tempfile.mkdtemp(prefix="acsg-xray-")
        self.out = os.path.join(self.work, "result")
        ctFile, segFile = os.path.join(self.work, "ct.nii"), os.path.join(self.work, "seg.nii")
        sitk.WriteImage(ct.source, ctFile)
        arguments = ["xray-register", "--ct", ctFile, "--method", method, "--device", device, "--out", self.out,
                     "--evaluations", int(evaluations), "--detector-pixels", int(detectorPixels)]
        if ct.mask is not None:
            sitk.WriteImage(ct.mask, segFile)
            arguments += ["--ct-seg", segFile, "--label", "1"]
        for number, (image, viewGeometry, pose) in enumerate([(xray, geometry, initialPose)] + list(otherViews), 1):
            files = {f: os.path.join(self.work, f"{f}{number}.{e}") for f, e in (("xray", "nii"), ("geometry", "json"),
                                                                                  ("init", "json"))}
            if not isinstance(image, str):
                sitk.WriteImage(volumeNodeToImage(image, np.float32), files["xray"])
            with open(files["geometry"], "w") as fh:
                json.dump(viewGeometry or {}, fh)
            with open(files["init"], "w") as fh:
                fh.write(pose_json(np.asarray(pose, dtype=float)))
            arguments += ["--xray", image if isinstance(image, str) else files["xray"], "--geometry",
                          files["geometry"], "--init", files["init"]]
        if prostModel:
            arguments += ["--prost-model", prostModel]
        if depthPriorMm is not None:
            arguments += ["--depth-prior-mm", float(depthPriorMm)]
        self.stage = BackgroundRun(arguments, "X-ray registration")

    def cancel(self) -> None:
        super().cancel()
        shutil.rmtree(self.work, ignore_errors=True)

    def finish(self, timeout: Optional[float] = None):
        """The nodes of ``xrayNodes.loadXrayResult`` once the process has succeeded; raises Cancelled, or
        InputError with the backend's message. The temporary files are removed either way."""
        from .xrayNodes import loadXrayResult
        try:
            self.ended("X-ray registration", timeout)
            names = {1: self.ct.name} if self.ct.name else None
            output = loadXrayResult(self.out, names, name=self.name)
            output.otherViews = [loadXrayResult(self.out, names, name=f"{self.name} view {number}", view=number)
                                 for number in range(2, self.views + 1)]
            return output
        finally:
            shutil.rmtree(self.work, ignore_errors=True)


def startXrayRegistration(ctVolume, xray, geometry: Dict, segmentation=None, label=None, initialPose=None,
                          sourceToTargetMm: float = 750.0, laoDeg: float = 0.0, cranialDeg: float = 0.0,
                          method: str = "cmaes+gradient", device: str = "auto", prostModel: Optional[str] = None,
                          evaluations: int = 400, detectorPixels: int = 96,
                          otherViews: Sequence[Dict] = (), depthPriorMm: Optional[float] = None
                          ) -> XrayRegistrationRun:
    """``xray``: a file path or a one-slice volume node; ``geometry``: GEOMETRY.json's keys (what DICOM tags do
    not give). The initial pose: ``initialPose`` (4x4 ct_to_source, LPS), or an AP view of the target vertebra
    (its centroid, or the CT's centre) ``sourceToTargetMm`` from the source, turned by the C-arm's LAO and
    cranial angles. ``otherViews``: more X-rays of the patient (a lateral beside the AP), each a dict with
    ``xray``, ``geometry`` (default the first's) and ``initialPose`` or ``laoDeg``/``cranialDeg`` (and
    ``sourceToTargetMm``) as above; the patient is taken to stay still between the shots. Returns the started
    run; its ``finish()`` gives the first view's nodes, the others' in ``.otherViews``. ``depthPriorMm``: one
    view's depth prior width (``xray-register --depth-prior-mm``; default 60 mm)."""
    from ACSGRegistrationLib.xray.camera import look_at
    from ACSGRegistrationLib.xray.images import target_centre
    if ctVolume is None or xray is None:
        raise InputError("choose the CT volume and the X-ray")
    ct = exportInput(ctVolume, segmentation, label, "CT")
    centre = []

    def pose(given, distance, lao, cranial):
        if given is not None:
            return given
        if not centre:
            centre.append(target_centre(ct.source, ct.mask, 1 if ct.mask is not None else None, "the segmentation"))
        return look_at(centre[0], distance, lao, cranial)
    others = []
    for number, view in enumerate(otherViews, 2):
        if view.get("xray") is None:
            raise InputError(f"X-ray view {number}: no X-ray given")
        others.append((view["xray"], view.get("geometry", geometry),
                       pose(view.get("initialPose"), view.get("sourceToTargetMm", sourceToTargetMm),
                            view.get("laoDeg", 0.0), view.get("cranialDeg", 0.0))))
    return XrayRegistrationRun(ct, xray, geometry, pose(initialPose, sourceToTargetMm, laoDeg, cranialDeg), method,
                               device, prostModel, evaluations, detectorPixels, otherViews=others,
                               depthPriorMm=depthPriorMm).start()


def xrayFileOf(p) -> str:
    """The panel's X-ray file, checked."""
    if isUnset(p.xrayFile) or not os.path.isfile(str(p.xrayFile)):
        raise InputError("choose the X-ray image file")
    return str(p.xrayFile)


def geometryOf(p) -> Dict:
    """GEOMETRY.json's keys from the panel: only what was entered (0 leaves it to the DICOM tags)."""
    geometry = {}
    if p.sourceToDetectorMm > 0:
        geometry["source_to_detector_mm"] = p.sourceToDetectorMm
    if p.xrayPixelSpacingMm > 0:
        geometry["pixel_spacing_mm"] = [p.xrayPixelSpacingMm] * 2
    return geometry


def optionsOf(p) -> Dict:
    """``startXrayRegistration``'s options from the panel: a second X-ray, where one is chosen, is another view
    of the same patient, with the first's tilt and its own LAO/RAO angle (and, as ``startXrayRegistration``
    gives every other view, the first's geometry and distance)."""
    options = {"segmentation": p.xraySegmentation, "label": p.xrayTarget or None,
               "sourceToTargetMm": p.sourceToTargetMm, "laoDeg": p.laoDeg, "cranialDeg": p.cranialDeg,
               "method": p.xrayMethod, "device": p.device}
    if not isUnset(p.xraySecondFile):
        if not os.path.isfile(str(p.xraySecondFile)):
            raise InputError(f"second X-ray {p.xraySecondFile}: no such file (clear the field for one view)")
        options["otherViews"] = [{"xray": str(p.xraySecondFile), "laoDeg": p.secondLaoDeg, "cranialDeg": p.cranialDeg}]
    return options
