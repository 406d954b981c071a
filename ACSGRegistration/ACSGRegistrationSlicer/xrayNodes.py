"""A CT to X-ray registration (the backend's ``xray-register`` output folder) in the scene: the pose as a linear
transform node (CT -> the X-ray source's frame), the X-ray and the final DRR as volumes standing where the
detector stood in the CT's space (so the 3D view shows the CT, the source and the X-ray as the C-arm saw them),
the source and the detector's outline as markups, and every label's centroid projected onto the X-ray as a named
control point (the vertebral level, read off the X-ray). The slice view shows the X-ray under the DRR with a fade.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import vtk

import slicer
from ACSGRegistrationLib.geometry import LPS_TO_RAS
from ACSGRegistrationLib.xray import view_outputs

from .conversion import loadVolumeFile


@dataclass
class XrayOutput:
    poseTransform: object
    xrayVolume: object
    drrVolume: object
    centroids: object  # markups fiducials: label centroids projected onto the detector
    source: object  # markups fiducial: the X-ray source
    detector: object  # markups closed curve: the detector's outline
    metrics: Dict
    otherViews: List["XrayOutput"] = field(default_factory=list)  # the nodes of the second view, ...


def loadXrayResult(folder: str, labelNames: Optional[Dict[int, str]] = None, name: str = "X-ray registration",
                   scene=None, view: int = 1) -> XrayOutput:
    """Nodes for the output folder of ``acsgreg xray-register`` (or ``logic.registerXray``): of its first X-ray,
    or of the ``view``-th where it registered several (``pose_2.json``, ...)."""
    from ACSGRegistrationLib.errors import InputError
    from ACSGRegistrationLib.xray.camera import pose_to_slicer, read_pose
    scene = scene or slicer.mrmlScene
    files = {kind: os.path.join(folder, name) for kind, name in view_outputs(view).items() if kind != "overlay"}
    files["metrics"] = os.path.join(folder, "metrics.json")
    missing = [os.path.basename(f) for f in files.values() if not os.path.isfile(f)]
    if missing:
        raise InputError(f"{folder} is not an X-ray registration's output folder (missing {', '.join(missing)})")
    pose = read_pose(files["pose"])
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", scene.GenerateUniqueName(f"{name} pose"))
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(pose_to_slicer(pose)))
    xray = loadVolumeFile(files["xray"], name=f"{name} X-ray", scene=scene)
    drr = loadVolumeFile(files["drr"], name=f"{name} DRR", scene=scene)
    with open(files["projections"]) as fh:
        placed = json.load(fh)
    with open(files["metrics"]) as fh:
        metrics = json.load(fh)
    centroids = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{name} centroids on X-ray")
    for label, where in placed["centroids"].items():
        title = (labelNames or {}).get(int(label), f"label {label}")
        centroids.AddControlPoint(vtk.vtkVector3d(*_ras(where["on_detector_lps"])), title)
    source = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{name} X-ray source")
    source.AddControlPoint(vtk.vtkVector3d(*_ras(placed["source_lps"])), "source")
    detector = scene.AddNewNodeByClass("vtkMRMLMarkupsClosedCurveNode", f"{name} detector")
    for corner in placed["detector_corners_lps"]:
        detector.AddControlPoint(vtk.vtkVector3d(*_ras(corner)))
    for node in (source, detector, centroids):
        node.SetLocked(True)
    detector.SetCurveTypeToLinear()
    return XrayOutput(transform, xray, drr, centroids, source, detector, metrics)


def showXrayOverlay(output: XrayOutput, opacity: float = 0.5, view: str = "Red") -> None:
    """The X-ray under the DRR (``opacity``: the fade) in one slice view, turned to the detector's plane."""
    sliceNode = slicer.mrmlScene.GetNodeByID(f"vtkMRMLSliceNode{view}")
    composite = slicer.mrmlScene.GetNodeByID(f"vtkMRMLSliceCompositeNode{view}")
    if composite is not None:
        composite.SetBackgroundVolumeID(output.xrayVolume.GetID())
        composite.SetForegroundVolumeID(output.drrVolume.GetID())
        composite.SetForegroundOpacity(float(opacity))
    if sliceNode is not None:
        sliceNode.RotateToVolumePlane(output.xrayVolume)


def setXrayFade(output: XrayOutput, opacity: float, view: str = "Red") -> None:
    """The DRR's opacity over the X-ray, where the view still shows them."""
    composite = slicer.mrmlScene.GetNodeByID(f"vtkMRMLSliceCompositeNode{view}")
    if composite is not None and output.drrVolume is not None \
            and composite.GetForegroundVolumeID() == output.drrVolume.GetID():
        composite.SetForegroundOpacity(float(opacity))


def _ras(lps) -> np.ndarray:
    return np.asarray(lps, dtype=float) * np.diag(LPS_TO_RAS)[:3]
