"""CT to X-ray registration from Slicer (the module's logic and ACSGRegistrationSlicer.xrayNodes) on slicer-core's
MRML and Slicer's own Python layer: the registration runs in the background through the command line, its pose
becomes a linear transform node equal to pose.json's, the X-ray and the DRR stand where the detector stood in the
CT's space, the source, the detector and the projected centroid are markups, and a cancel adds no node."""

import pathlib
import time

import numpy as np
import pytest
import torch

import SimpleITK as sitk  # noqa: E402

from conftest import data_path, slicer_module  # noqa: E402

slicer, M = slicer_module()
import slicer_environment  # noqa: E402
from ACSGRegistrationLib.errors import Cancelled, InputError  # noqa: E402
from ACSGRegistrationLib.xray.camera import CArm, look_at, pose_from_parameters  # noqa: E402
from ACSGRegistrationLib.xray.simulation import Realism, XraySimulator  # noqa: E402
from ACSGRegistrationSlicer import conversion, xrayRegistration  # noqa: E402


def node_ids():
    return {slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())}


@pytest.fixture()
def xray_case(tmp_path):
    slicer_environment.new_scene()
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    ct = sitk.ReadImage(data_path("ct", "totalsegmentator-example", "ct.nii.gz"))
    seg = sitk.ReadImage(data_path("ct", "totalsegmentator-example", "seg.nii.gz"))
    ctNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    conversion.updateVolumeNodeFromImage(ctNode, ct)
    labelNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "vertebrae")
    conversion.updateVolumeNodeFromImage(labelNode, seg)
    simulator = XraySimulator(ct, seg, 31, spacing=3.0)
    carm = CArm(1020.0, (3.2, 3.2), (64, 64))
    truth = look_at(simulator.centre, 750.0, lao_deg=4.0, cranial_deg=-3.0)
    path = str(tmp_path / "xray.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(simulator.xray(carm, truth, np.random.default_rng(0), Realism.none())),
                    path)
    start = pose_from_parameters(torch.tensor([0.02, -0.02, 0.01, 3.0, -2.0, 4.0], dtype=torch.float64),
                                 torch.as_tensor(truth), torch.as_tensor(simulator.centre)).numpy()
    return {"ct": ctNode, "labels": labelNode, "xray": path, "carm": carm, "truth": truth, "start": start,
            "centre": simulator.centre}


def test_xray_registration_in_the_background_makes_placed_nodes(xray_case):
    logic = M.ACSGRegistrationLogic()
    c = xray_case
    before = slicer.util.arrayFromVolume(c["ct"]).copy()
    output = logic.registerXray(c["ct"], c["xray"], c["carm"].to_dict(), segmentation=c["labels"], label=31,
                                initialPose=c["start"], method="cmaes", evaluations=80, detectorPixels=32,
                                depthPriorMm=30)
    assert np.array_equal(slicer.util.arrayFromVolume(c["ct"]), before)  # the input is untouched
    matrix = slicer.util.arrayFromTransformMatrix(output.poseTransform)
    assert output.metrics["method"] == "cmaes" and output.metrics["evaluations"] >= 80
    assert "depth prior (0.02 at 30 mm" in output.metrics["similarity"]  # the option reaches the command
    pose = np.asarray(matrix) @ np.diag([-1.0, -1.0, 1.0, 1.0])  # Slicer's matrix (RAS) back to ct_to_source
    # The X-ray's first pixel stands at the detector's first pixel, seen from the registered pose (RAS).
    (cx, cy), (sx, sy) = c["carm"].principal_point_px, c["carm"].pixel_spacing_mm
    first = np.linalg.inv(pose) @ np.array([-cx * sx, -cy * sy, c["carm"].source_to_detector_mm, 1.0])
    ijkToRas = conversion.ijkToRasOfNode(output.xrayVolume)
    assert np.allclose(ijkToRas[:3, 3], first[:3] * [-1, -1, 1], atol=1e-3)
    assert slicer.util.arrayFromVolume(output.xrayVolume).shape == (1, 64, 64)
    assert slicer.util.arrayFromVolume(output.drrVolume).shape == (1, 32, 32)
    # The source and the centroid's shadow are on one ray through the centroid.
    source = np.zeros(3)
    output.source.GetNthControlPointPosition(0, source)
    assert np.allclose(np.asarray(matrix) @ np.append(source, 1.0), [0, 0, 0, 1], atol=1e-6)  # the pose's origin
    shadow = np.zeros(3)
    assert output.centroids.GetNumberOfControlPoints() == 1
    output.centroids.GetNthControlPointPosition(0, shadow)
    centre_ras = np.asarray(c["centre"]) * [-1, -1, 1]
    along = (centre_ras - source) / np.linalg.norm(centre_ras - source)
    assert np.allclose((shadow - source) / np.linalg.norm(shadow - source), along, atol=1e-6)
    assert output.detector.GetNumberOfControlPoints() == 4
    composite = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceCompositeNodeRed")
    if composite is not None:
        assert composite.GetForegroundVolumeID() == output.drrVolume.GetID()


def test_xray_registration_is_cancelled_and_adds_no_node(xray_case):
    logic = M.ACSGRegistrationLogic()
    c = xray_case
    existing = node_ids()
    run = logic.startXrayRegistration(c["ct"], c["xray"], c["carm"].to_dict(), segmentation=c["labels"], label=31,
                                      initialPose=c["start"], method="cmaes", evaluations=5000)
    process = run.stage.process
    assert run.start().stage.process is process  # the panel starts what the logic started: still one process
    time.sleep(1.0)
    asked = time.monotonic()
    run.cancel()
    assert time.monotonic() - asked < 1.5
    with pytest.raises(Cancelled):
        run.finish()
    assert node_ids() == existing


def test_initial_pose_from_the_c_arm_angles_looks_at_the_target(xray_case, monkeypatch):
    logic = M.ACSGRegistrationLogic()
    c = xray_case
    seen = {}

    class Recorder:
        def __init__(self, ct, xray, geometry, initialPose, *args, **options):
            seen["pose"] = np.asarray(initialPose)
            seen["others"] = options.get("otherViews", ())

        def start(self):
            return self

    monkeypatch.setattr(xrayRegistration, "XrayRegistrationRun", Recorder)
    logic.startXrayRegistration(c["ct"], c["xray"], c["carm"].to_dict(), segmentation=c["labels"], label=31,
                                sourceToTargetMm=700.0, laoDeg=20.0)
    pose = seen["pose"]
    centre_in_source = pose[:3, :3] @ np.asarray(c["centre"]) + pose[:3, 3]
    # The target (its centroid, from the exported mask on the CT's grid) on the principal ray, 700 mm away.
    assert np.allclose(centre_in_source[:2], 0.0, atol=1.5) and abs(centre_in_source[2] - 700.0) < 1.5
    # A second view from its own C-arm angles: the same target on its principal ray, turned 90 deg.
    logic.startXrayRegistration(c["ct"], c["xray"], c["carm"].to_dict(), segmentation=c["labels"], label=31,
                                sourceToTargetMm=700.0, laoDeg=20.0,
                                otherViews=[{"xray": c["xray"], "laoDeg": 110.0}])
    (_, geometry, lateral), = seen["others"]
    assert geometry == c["carm"].to_dict()
    assert np.allclose(lateral, look_at(np.asarray(c["centre"]), 700.0, 110.0), atol=3.0)


def test_the_panels_second_x_ray_is_a_second_view_from_its_own_angle(xray_case, monkeypatch, tmp_path):
    """The panel's "Second X-ray" and its LAO/RAO become the run's second view (the first's geometry, tilt and
    distance); without it, one view; a second file that is not there is refused before any work."""
    logic = M.ACSGRegistrationLogic()
    c = xray_case
    seen = {}

    class Recorder:
        def __init__(self, ct, xray, geometry, initialPose, *args, **options):
            seen["others"] = options.get("otherViews", ())

        def start(self):
            return self

    monkeypatch.setattr(xrayRegistration, "XrayRegistrationRun", Recorder)
    p = logic.getParameterNode()
    p.xrayCt, p.xraySegmentation, p.xrayTarget, p.xrayFile = c["ct"], c["labels"], "31", pathlib.Path(c["xray"])
    p.sourceToDetectorMm, p.xrayPixelSpacingMm, p.laoDeg, p.sourceToTargetMm = 1020.0, 3.2, 0.0, 700.0
    logic.startXrayRegistrationOf(p)
    assert not seen["others"]
    p.xraySecondFile, p.secondLaoDeg = pathlib.Path(c["xray"]), 90.0
    logic.startXrayRegistrationOf(p)
    (xray, geometry, lateral), = seen["others"]
    assert xray == c["xray"] and geometry == {"source_to_detector_mm": 1020.0, "pixel_spacing_mm": [3.2, 3.2]}
    assert np.allclose(lateral, look_at(np.asarray(c["centre"]), 700.0, 90.0), atol=3.0)
    p.xraySecondFile = tmp_path / "lateral.dcm"
    with pytest.raises(InputError, match="second X-ray .*lateral.dcm: no such file"):
        logic.startXrayRegistrationOf(p)


def test_two_x_rays_are_registered_together_from_slicer(xray_case, tmp_path):
    """An AP and a lateral X-ray (``otherViews``): one background run; the second view's nodes come back in
    ``otherViews``, its pose the first's moved by the C-arm's motion between the shots."""
    logic = M.ACSGRegistrationLogic()
    c = xray_case
    ct = sitk.ReadImage(data_path("ct", "totalsegmentator-example", "ct.nii.gz"))
    seg = sitk.ReadImage(data_path("ct", "totalsegmentator-example", "seg.nii.gz"))
    lateral = look_at(c["centre"], 750.0, lao_deg=94.0, cranial_deg=-3.0)
    motion = lateral @ np.linalg.inv(c["truth"])
    image = XraySimulator(ct, seg, 31, spacing=3.0).xray(c["carm"], lateral, np.random.default_rng(1), Realism.none())
    path = str(tmp_path / "lateral.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(image), path)
    output = logic.registerXray(c["ct"], c["xray"], c["carm"].to_dict(), segmentation=c["labels"], label=31,
                                initialPose=c["start"], method="gradient", detectorPixels=32,
                                otherViews=[{"xray": path, "initialPose": motion @ c["start"]}])
    assert output.metrics["views"] == 2 and len(output.otherViews) == 1
    second = output.otherViews[0]
    poses = [np.asarray(slicer.util.arrayFromTransformMatrix(o.poseTransform)) @ np.diag([-1.0, -1.0, 1.0, 1.0])
             for o in (output, second)]
    assert np.allclose(poses[1], motion @ poses[0], atol=1e-3)
    assert slicer.util.arrayFromVolume(second.drrVolume).shape == (1, 32, 32)
    assert "view 2" in second.xrayVolume.GetName()
