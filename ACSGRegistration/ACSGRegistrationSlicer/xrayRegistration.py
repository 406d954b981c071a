"""CT to X-ray pose registration from the scene, in the background: the CT and the target vertebra's mask are
exported from their nodes, the initial pose is made from the C-arm's angles (an AP view of the target, turned),
``acsgreg xray-register`` runs in its own process, and its output folder becomes nodes (``xrayNodes``) only once
it has succeeded. Nothing here imports PyTorch (Slicer's process does not need it for a background run)."""

import json
import os
import shutil
import tempfile
from typing import Dict, Optional

import numpy as np
import SimpleITK as sitk

from ACSGRegistrationLib.errors import InputError

from .backgroundRun import BackgroundRun
from .inputs import InputSide, exportInput
from .models import isUnset
from .runs import StagedRun


class XrayRegistrationRun(StagedRun):
    """One ``acsgreg xray-register`` process; ``finish()`` loads the pose, the placed X-ray and DRR and the
    markups. The X-ray is a file (DICOM keeps its geometry tags) or a one-slice volume node."""

    def __init__(self, ct: InputSide, xray, geometry: Dict, initialPose, method: str = "cmaes+gradient",
                 device: str = "auto", prostModel: Optional[str] = None, evaluations: int = 600,
                 detectorPixels: int = 96, name: str = "X-ray registration"):
        from ACSGRegistrationLib.xray.camera import pose_json
        from .conversion import volumeNodeToImage
        self.ct, self.name = ct, name
        self.work = tempfile.mkdtemp(prefix="acsg-xray-")
        self.out = os.path.join(self.work, "result")
        files = {f: os.path.join(self.work, f) for f in ("ct.nii", "seg.nii", "xray.nii", "geometry.json",
                                                          "init.json")}
        sitk.WriteImage(ct.source, files["ct.nii"])
        arguments = ["xray-register", "--ct", files["ct.nii"], "--geometry", files["geometry.json"],
                     "--init", files["init.json"], "--method", method, "--device", device, "--out", self.out,
                     "--evaluations", int(evaluations), "--detector-pixels", int(detectorPixels)]
        if ct.mask is not None:
            sitk.WriteImage(ct.mask, files["seg.nii"])
            arguments += ["--ct-seg", files["seg.nii"], "--label", "1"]
        if isinstance(xray, str):
            arguments += ["--xray", xray]
        else:
            sitk.WriteImage(volumeNodeToImage(xray, np.float32), files["xray.nii"])
            arguments += ["--xray", files["xray.nii"]]
        if prostModel:
            arguments += ["--prost-model", prostModel]
        with open(files["geometry.json"], "w") as fh:
            json.dump(geometry or {}, fh)
        with open(files["init.json"], "w") as fh:
            fh.write(pose_json(np.asarray(initialPose, dtype=float)))
        self.stage = BackgroundRun(arguments, "X-ray registration")

    def cancel(self) -> None:
        super().cancel()
        shutil.rmtree(self.work, ignore_errors=True)

    def finish(self):
        """The nodes of ``xrayNodes.loadXrayResult`` once the process has succeeded; raises Cancelled, or
        InputError with the backend's message. The temporary files are removed either way."""
        from .xrayNodes import loadXrayResult
        try:
            self.ended("X-ray registration")
            return loadXrayResult(self.out, {1: self.ct.name} if self.ct.name else None, name=self.name)
        finally:
            shutil.rmtree(self.work, ignore_errors=True)


def startXrayRegistration(ctVolume, xray, geometry: Dict, segmentation=None, label=None, initialPose=None,
                          sourceToTargetMm: float = 750.0, laoDeg: float = 0.0, cranialDeg: float = 0.0,
                          method: str = "cmaes+gradient", device: str = "auto", prostModel: Optional[str] = None,
                          evaluations: int = 600, detectorPixels: int = 96) -> XrayRegistrationRun:
    """``xray``: a file path or a one-slice volume node; ``geometry``: GEOMETRY.json's keys (what DICOM tags do
    not give). The initial pose: ``initialPose`` (4x4 ct_to_source, LPS), or an AP view of the target vertebra
    (its centroid, or the CT's centre) ``sourceToTargetMm`` from the source, turned by the C-arm's LAO and
    cranial angles. Returns the started run."""
    from ACSGRegistrationLib.xray.camera import look_at
    from ACSGRegistrationLib.xray.images import target_centre
    if ctVolume is None or xray is None:
        raise InputError("choose the CT volume and the X-ray")
    ct = exportInput(ctVolume, segmentation, label, "CT")
    if initialPose is None:
        centre = target_centre(ct.source, ct.mask, 1 if ct.mask is not None else None, "the segmentation")
        initialPose = look_at(centre, sourceToTargetMm, laoDeg, cranialDeg)
    return XrayRegistrationRun(ct, xray, geometry, initialPose, method, device, prostModel, evaluations,
                               detectorPixels).start()


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
    return {"segmentation": p.xraySegmentation, "label": p.xrayTarget or None, "sourceToTargetMm": p.sourceToTargetMm,
            "laoDeg": p.laoDeg, "cranialDeg": p.cranialDeg, "method": p.xrayMethod, "device": p.device}
