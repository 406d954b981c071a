"""ACSGRegistration: one-shot deep-learning registration of lumbar vertebrae in CT (ACSGRegNet) for 3D Slicer.

This file only orchestrates; the work is done elsewhere:

- the backend ``ACSGRegistrationLib`` (importable without Slicer): input rules, the registrar, training, the
  command line ``acsgreg`` that the panel runs in a separate process;
- the Slicer-bound helpers ``ACSGRegistrationSlicer``: nodes <-> SimpleITK (``conversion``), vertebra choices
  (``labels``), input checks and export (``inputs``), output nodes and display (``outputNodes``), the
  dependencies per section (``dependencies``), whether each run button can run (``readiness``), background runs
  (``backgroundRun``, ``runs``) and ending their process trees (``processTree``), the shipped weights' licence
  (``models``), sample data (``sampleData``), the self-test's scene and cases (``testScene``, ``selfTest``), a CT
  to X-ray registration's nodes (``xrayNodes``), the 2D mode (``planarNodes``).

``ACSGRegistrationLogic`` works without the GUI, in Slicer's process (``register``, ``registerPairs``,
``registerFiles``, ``fineTune``: scripts and the Python console) or in the background (``startRegistration``,
``startFineTune``: the panel, which polls them and stays responsive); CT to X-ray pose registration
(``registerXray``; ``startXrayRegistration`` for the panel's section). ``ACSGRegistrationWidget`` is the panel
(``Resources/UI/ACSGRegistration.ui``); ``ACSGRegistrationTest`` registers synthetic vertebrae made by the test,
through the logic and through the panel's widgets.
"""

import contextlib
import logging
import os
import pathlib
import sys
import time
import unittest
from typing import Annotated, Callable, Dict, List, Optional, Sequence, Union

import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
    vtkMRMLTransformNode,
)

# Neither the backend's errors nor the helpers import PyTorch: safe before the dependencies are checked.
from ACSGRegistrationLib.errors import ACSGError, Cancelled, InputError
from ACSGRegistrationLib.preprocessing import CROP_SIZE
from ACSGRegistrationLib.xray import POSE_SEARCH_METHODS
from ACSGRegistrationSlicer import batch, dependencies, labels, models, outputNodes, readiness, sampleData, selfTest, \
    settings, training, xrayNodes, xrayRegistration
from ACSGRegistrationSlicer.conversion import loadVolumeFile
from ACSGRegistrationSlicer import planarNodes
from ACSGRegistrationSlicer.inputs import PreparedInput, checkInputs, exportInput, pairArguments
from ACSGRegistrationSlicer.outputNodes import FOREGROUND_CHOICES, RegistrationOutput
from ACSGRegistrationSlicer.runs import FineTuneRun, RegistrationRun
from ACSGRegistrationSlicer.xrayRegistration import XrayRegistrationRun

DEFAULT_MODEL, DEFAULT_MODEL_PATH = models.DEFAULT_MODEL, models.DEFAULT_MODEL_PATH
DOCUMENTATION_URL = "https://github.com/acsgregistration/SlicerACSGRegistration#readme"
# Remembered between sessions (QSettings "ACSGRegistration/<name>"): the model and how to run it.
REMEMBERED = ("checkpointPath", "device", "refineSteps", "trainingIterations", "learningRate", "batchSize",
              "trainingOutputFolder")
# Locked while a run is in flight: what would change its inputs or outputs.
LOCKED_WHILE_RUNNING = ("fixedVolumeSelector", "fixedSegmentationSelector", "fixedLabelComboBox",
                        "movingVolumeSelector", "movingSegmentationSelector", "movingLabelComboBox", "modelRow",
                        "deviceComboBox", "refineStepsSpinBox", "applyButton", "outputsCollapsibleButton",
                        "trainingFolderPathLineEdit", "scenePairsRow", "iterationsSpinBox", "learningRateSpinBox",
                        "batchSizeSpinBox", "trainingOutputPathLineEdit", "resumeCheckBox", "startTrainingButton",
                        "xrayCtSelector", "xraySegmentationSelector", "xrayTargetLineEdit", "xrayFilePathLineEdit",
                        "xrayRegisterButton")
# Per kind of background run: its progress bar, status label and cancel button, and its name in messages.
RUN_WIDGETS = {"registration": ("progressBar", "statusLabel", "cancelButton"),
               "training": ("trainingProgressBar", "trainingStatusLabel", "stopTrainingButton"),
               "xray": ("xrayProgressBar", "xrayStatusLabel", "xrayCancelButton")}
RUN_TITLES = {"registration": "Registration", "training": "Fine-tuning", "xray": "X-ray registration"}
POLL_MS = 100
# The panel reads a run's results once its process has ended; reading them never takes this long.
FINISH_TIMEOUT_S = 60


_isUnset = models.isUnset


#
# ACSGRegistration
#


class ACSGRegistration(ScriptedLoadableModule):
    """Module description shown in Slicer (Help & Acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ACSG Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []  # PyTorch comes from the PyTorch extension (EXTENSION_DEPENDS), used lazily
        self.parent.contributors = ["ACSGRegistration developers (ACSGRegistration project)"]
        self.parent.helpText = _("""
Deep-learning registration of lumbar vertebrae in CT (ACSGRegNet: an affine network, then a diffeomorphic
network with self- and cross-attention; with both segmentations the affine is then fitted to the two vertebra
masks on the pair). Choose the fixed and moving CT and, for whole scans, their segmentations and the vertebra
(segment name, level such as L1, or label value); the vertebra is cropped as in the paper (128 x 128 x 64 mm).
Outputs: the warped volume, a transform node (the affine and the deformable displacement composed: the full map
around the vertebra, the affine on the rest of the scan; apply, harden, invert or save it like any Slicer
transform), the Jacobian determinant map (blue: compression, red: expansion, green: folding) and the warped
segmentation; Dice and surface distances when both segmentations are given. Two single-slice volumes (2D images)
are registered by the 2D network. The Fine-tune section continues training the model on your own pairs. The CT
to X-ray section finds the CT's pose in front of one or two X-rays: by default CMA-ES, then gradient ascent, on
the gradient correlation between the X-ray and DRRs of the CT (Method: also ProST's learned similarity first).
Registration, fine-tuning and X-ray registration run in a separate process: Slicer stays responsive, the Log
section shows their output and Cancel stops them. The shipped registration model's weights are CC BY-NC-SA 4.0
(non-commercial); you are asked once before their first use.
""") + _('<p>Documentation, console examples and limits: <a href="{url}">{url}</a></p>').format(url=DOCUMENTATION_URL)
        sampleData.registerWhenStarted()  # the TotalSegmentator example CT and its labels in Sample Data
        self.parent.acknowledgementText = _("""
Method: Gao and Zheng, ACSGRegNet: a deep learning-based framework for unsupervised joint affine and
diffeomorphic registration of lumbar spine CT via cross- and self-attention fusion (2022).
Code: BSD 3-Clause. Shipped model weights: trained in part on label maps under CC BY-NC-SA, so they are for
non-commercial use (see LICENSE-weights.md of the extension).
""")


#
# ACSGRegistrationParameterNode
#


@parameterNodeWrapper
class ACSGRegistrationParameterNode:
    """The panel's state, saved with the scene.

    Inputs: fixedVolume, movingVolume, their segmentations (segmentation or labelmap nodes, optional) and
    the vertebra to use in each (segment name, level such as "L1", or label value).
    Model: checkpointPath (the shipped model by its file name, so that a saved scene does not hold this
    installation's path), device, refineSteps.
    Outputs: None means "create new"; after each Apply the panel stores the nodes it filled, so the next Apply
    reuses them.
    Display: which volume goes to the foreground, its opacity, the grid, the warped segmentation, the legend.
    Fine-tune: training data folder, iterations, learning rate, batch size, output folder, resume.
    CT to X-ray: the CT, its segmentation and target vertebra, the X-ray file, the geometry DICOM does not give
    (0: from the tags), the initial pose's C-arm angles and distance, the method, the DRR's fade.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    # Optional: Slicer's wrapper writes every default when it is built, and None only fits an Optional union.
    fixedSegmentation: Optional[Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]
    movingSegmentation: Optional[Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]
    fixedLabel: str = ""
    movingLabel: str = ""
    checkpointPath: pathlib.Path = pathlib.Path(DEFAULT_MODEL)
    device: Annotated[str, Choice(["auto", "cpu", "gpu"])] = "auto"
    refineSteps: Annotated[int, WithinRange(0, 1000)] = 0

    outputWarpedVolume: vtkMRMLScalarVolumeNode
    outputTransform: vtkMRMLTransformNode
    outputJacobian: vtkMRMLScalarVolumeNode
    outputWarpedSegmentation: Optional[Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]
    outputMetricsTable: vtkMRMLTableNode

    foreground: Annotated[str, Choice(list(FOREGROUND_CHOICES))] = "warped volume"
    foregroundOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    showGrid: bool = True
    showWarpedSegmentation: bool = True
    showColorLegend: bool = True

    trainingFolder: pathlib.Path = pathlib.Path()
    trainingIterations: Annotated[int, WithinRange(1, 100000)] = 200
    # Decimals and step are set in the .ui: as annotations here Slicer's wrapper logs them as unused.
    learningRate: Annotated[float, WithinRange(1e-7, 1e-2)] = 1e-5
    batchSize: Annotated[int, WithinRange(1, 64)] = 2
    trainingOutputFolder: pathlib.Path = pathlib.Path.home() / "ACSGRegistration" / "finetune"
    resumeTraining: bool = True

    xrayCt: vtkMRMLScalarVolumeNode
    xraySegmentation: Optional[Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]
    xrayTarget: str = ""
    xrayFile: pathlib.Path = pathlib.Path()
    sourceToDetectorMm: Annotated[float, WithinRange(0.0, 2000.0)] = 0.0
    xrayPixelSpacingMm: Annotated[float, WithinRange(0.0, 5.0)] = 0.0
    laoDeg: Annotated[float, WithinRange(-90.0, 90.0)] = 0.0
    cranialDeg: Annotated[float, WithinRange(-45.0, 45.0)] = 0.0
    sourceToTargetMm: Annotated[float, WithinRange(100.0, 1500.0)] = 750.0
    xraySecondFile: pathlib.Path = pathlib.Path()  # a second view (a lateral beside the AP); unset: one view
    secondLaoDeg: Annotated[float, WithinRange(-180.0, 180.0)] = 90.0
    xrayMethod: Annotated[str, Choice(list(POSE_SEARCH_METHODS))] = POSE_SEARCH_METHODS[0]
    xrayFade: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


#
# ACSGRegistrationWidget
#


class ACSGRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: Register, Outputs, Display, CT to X-ray, Fine-tune and Log sections. Runs go to the
    background and are polled by a timer, so Slicer stays responsive; the inputs are locked while one is in flight.

    No slot here is connected to a signal of a widget bound to the parameter node: Qt calls slots in connection
    order, and a slot that wrote any parameter before the wrapper's own slot had stored the user's pick would make
    the wrapper rewrite every widget from the node, which still holds the old value: the pick would snap back. The
    panel follows the parameter node's changes instead (``_onParameterNodeModified``)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.run = None  # the registration, fine-tuning or X-ray registration in flight
        self._runKind = "registration"
        self.lastXrayOutput = None
        self.lastOutput = None
        self.lastFineTune = None
        self._shownDisplay = None
        self._shownModel = None
        self.scenePairs = []  # training pairs taken from the scene (dicts of nodes and labels)
        self._labelChoicesOf = {}  # side -> (segmentation node ID, its choices) shown in the vertebra box

    # -- setup ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        import qt
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ACSGRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ACSGRegistrationLogic()
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self._pollRun)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        for name in ("cancelButton", "stopTrainingButton", "xrayCancelButton"):
            getattr(self.ui, name).connect("clicked(bool)", self.onCancel)
        for side in ("fixed", "moving"):  # not bound to the parameter node: this slot is the only writer
            getattr(self.ui, f"{side}LabelComboBox").connect(
                "currentTextChanged(QString)", lambda text, side=side: self._onLabelTextChanged(side, text))
        self.ui.useDefaultModelButton.connect("clicked(bool)", self.onUseDefaultModel)
        self.ui.addScenePairButton.connect("clicked(bool)", self.onAddScenePair)
        self.ui.clearScenePairsButton.connect("clicked(bool)", self.onClearScenePairs)
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartTraining)
        self.ui.xrayRegisterButton.connect("clicked(bool)", self.onXrayRegister)
        self.ui.clearLogButton.connect("clicked(bool)", self.ui.logTextEdit.clear)
        for name in ("progressBar", "xrayProgressBar", "trainingProgressBar"):
            getattr(self.ui, name).visible = False
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.onCancel()
        self.timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onReload(self) -> None:
        """Reload the helpers and the backend too (Slicer reloads only this file)."""
        for name in [n for n in sys.modules if n.split(".")[0] in ("ACSGRegistrationSlicer", "ACSGRegistrationLib")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        self.onCancel()
        self.setParameterNode(None)
        self.lastOutput = self.lastXrayOutput = None
        self.onClearScenePairs()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        node = self.logic.getParameterNode()
        if not node.parameterNode.GetAttribute("ACSGRegistration.settingsLoaded"):
            settings.load(node, REMEMBERED)  # a new scene: the user's last model and run settings
            node.parameterNode.SetAttribute("ACSGRegistration.settingsLoaded", "1")
        self.setParameterNode(node)
        if not self._parameterNode.fixedVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and first.GetClassName() == "vtkMRMLScalarVolumeNode":
                self._parameterNode.fixedVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        self._labelChoicesOf, self._shownModel = {}, None
        if self._parameterNode:
            # Widgets carrying the "SlicerParameterName" property in the .ui are connected to the parameters.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """Everything that follows the parameters: the vertebra lists, the model's description, the display,
        whether each run button can run (and why not), the remembered settings."""
        p = self._parameterNode
        if p is None:
            return
        self._syncLabelChoices()
        for side in ("fixed", "moving"):
            combo = getattr(self.ui, f"{side}LabelComboBox")
            value = getattr(p, f"{side}Label")
            if combo.currentText != value:
                wasBlocked = combo.blockSignals(True)
                combo.setEditText(value)
                combo.blockSignals(wasBlocked)
        if self._shownModel != str(p.checkpointPath):
            self._shownModel = str(p.checkpointPath)
            self.ui.modelStatusLabel.text = self.logic.describeModel(p.checkpointPath)
        self._updateDisplay()
        if self.lastXrayOutput is not None:
            xrayNodes.setXrayFade(self.lastXrayOutput, p.xrayFade)
        self._checkCanApply()
        settings.save(p, REMEMBERED)

    def _checkCanApply(self) -> None:
        """Each run button enabled only when its inputs make a valid run; its tooltip says what is missing."""
        p, running = self._parameterNode, self.run is not None
        for button, reason, ready in (
                (self.ui.applyButton, readiness.registrationBlocker(p, running),
                 _("Register the moving vertebra to the fixed one")),
                (self.ui.xrayRegisterButton, readiness.xrayBlocker(p, running),
                 _("Register the CT to the X-ray (the pose)")),
                (self.ui.startTrainingButton, readiness.fineTuneBlocker(p, running, self.scenePairs),
                 _("Fine-tune the model on the training data and the pairs from the scene"))):
            button.enabled = not reason
            button.toolTip = reason or ready
        for side in ("fixed", "moving"):  # a vertebra to choose only where there is a segmentation
            getattr(self.ui, f"{side}LabelComboBox").enabled = \
                not running and p is not None and getattr(p, f"{side}Segmentation") is not None

    def onUseDefaultModel(self) -> None:
        self._parameterNode.checkpointPath = pathlib.Path(DEFAULT_MODEL)

    # -- vertebra label choice (the lists follow the segmentations; computed once per change of a node) ---
    def _syncLabelChoices(self) -> None:
        """A side's list is filled again when its segmentation (or what it holds) changed; an empty side takes the
        other side's level when that changes (L1 typed on one side picks vertebrae_L1 on the other)."""
        p = self._parameterNode
        for side in ("fixed", "moving"):
            node = getattr(p, f"{side}Segmentation")
            other = getattr(p, ("moving" if side == "fixed" else "fixed") + "Label")
            choices = self.logic.labelChoices(node) if node is not None else []
            shown = (node.GetID() if node is not None else None, tuple(choices), other)
            previous = self._labelChoicesOf.get(side)
            if previous == shown:
                continue
            self._labelChoicesOf[side] = shown
            current = getattr(p, f"{side}Label")
            if previous is not None and previous[:2] == shown[:2]:  # only the other side's vertebra changed
                value = (labels.sameLevelChoice(other, choices) or "") if not current else current
            else:
                value = self._labelFor(side, node, current, choices)
                combo = getattr(self.ui, f"{side}LabelComboBox")
                wasBlocked = combo.blockSignals(True)
                combo.clear()
                for choice in choices:
                    combo.addItem(choice)
                combo.setEditText(value)
                combo.blockSignals(wasBlocked)
            if value != current:
                setattr(p, f"{side}Label", value)

    def _labelFor(self, side: str, node, current: str, choices: List[str]) -> str:
        """The vertebra to show for a newly chosen segmentation: the current one where it is there, the only one,
        the other side's level (L1 -> vertebrae_L1), the typed text where it resolves, else none."""
        if node is None:
            return ""
        if current in choices:
            return current
        if len(choices) == 1:
            return choices[0]
        other = getattr(self._parameterNode, ("moving" if side == "fixed" else "fixed") + "Label")
        same = labels.sameLevelChoice(other, choices) or labels.sameLevelChoice(current, choices)
        if same:
            return same
        return current if current and not readiness.vertebraProblem(node, current, side) else ""

    def _onLabelTextChanged(self, side: str, text: str) -> None:
        if self._parameterNode is not None and getattr(self._parameterNode, f"{side}Label") != text:
            setattr(self._parameterNode, f"{side}Label", text)

    # -- runs in the background -------------------------------------------------------------------------
    def _runWidgets(self, kind: str):
        """(progress bar, status label, cancel button) of a kind of run."""
        return tuple(getattr(self.ui, name) for name in RUN_WIDGETS[kind])

    def _log(self, line: str) -> None:
        """A line of a run's output: in the Log section and in Slicer's log."""
        self.ui.logTextEdit.append(line)
        logging.info(f"ACSGRegistration: {line}")

    @contextlib.contextmanager
    def _reported(self, failed: str, label):
        """Errors shown in a message box (Slicer's tryWithErrorDisplay) and on the status line. The backend's own
        errors (bad input, a missing package, a cancel) end there; anything else is a bug and goes on to the
        Python console."""
        try:
            with slicer.util.tryWithErrorDisplay(failed, waitCursor=True):
                yield
        except ACSGError as exc:
            label.text = f"{failed} {exc}"
            self._log(f"{failed} {exc}")

    def _startRun(self, run, kind: str) -> None:
        self.run, self._runKind = run, kind
        for name in LOCKED_WHILE_RUNNING:
            getattr(self.ui, name).enabled = False
        bar, label, cancel = self._runWidgets(kind)
        cancel.enabled = True
        bar.maximum, bar.value, bar.visible = 100, 0, True
        label.text = _("Starting...")
        self._log(f"--- {RUN_TITLES[kind]}: started ---")
        run.start()
        self.timer.start()
        self._checkCanApply()

    def _pollRun(self) -> None:
        run = self.run
        if run is None:
            self.timer.stop()
            return
        for line in run.poll():
            self._log(line)
        bar, label, _cancel = self._runWidgets(self._runKind)
        label.text = run.message
        bar.value = int(100 * run.fraction)
        if run.finished:
            self._endRun(run)

    def _endRun(self, run) -> None:
        self.timer.stop()
        self.run = None
        for name in LOCKED_WHILE_RUNNING:
            getattr(self.ui, name).enabled = True
        for kind in RUN_WIDGETS:
            bar, _label, cancel = self._runWidgets(kind)
            cancel.enabled, bar.visible = False, False
        _bar, label, _cancel = self._runWidgets(self._runKind)
        done = {"registration": self._registrationDone, "training": self._fineTuneDone, "xray": self._xrayDone}
        try:
            with self._reported(_("{title} failed:").format(title=RUN_TITLES[self._runKind]), label):
                try:
                    # The process has ended (or was cancelled): nothing is left to wait for but its files.
                    done[self._runKind](run.finish(timeout=FINISH_TIMEOUT_S))
                except Cancelled as exc:
                    label.text = str(exc)
                    self._log(str(exc))
        finally:
            self._checkCanApply()

    def onCancel(self) -> None:
        if self.run is not None:
            self.run.cancel()
            self._endRun(self.run)

    def onApplyButton(self) -> None:
        p = self._parameterNode
        label = self.ui.statusLabel
        with self._reported(_("Registration failed:"), label):
            planar = readiness.isPlanarPair(p)
            if not self.logic.ensureDependencies(askConfirmation=True, section="planar" if planar else "registration"):
                label.text = _("Missing packages were not installed: nothing done.")
                return
            if planar:
                self._registerPlanar(p)
                return
            if not models.ensureWeightsLicenceAccepted(p.checkpointPath):
                label.text = _("The shipped model's licence was not accepted: nothing done. Choose another model "
                               "under Model to register without it.")
                return
            self._startRun(self.logic.startRegistrationOf(p), "registration")

    def _registerPlanar(self, p) -> None:
        """The 2D mode, in Slicer's process (under a second; Slicer keeps painting meanwhile)."""
        self.ui.statusLabel.text = _("Registering in 2D...")
        self._log(f"--- 2D registration of '{p.movingVolume.GetName()}' to '{p.fixedVolume.GetName()}' ---")
        out = self.logic.registerPlanar(p.fixedVolume, p.movingVolume, p.fixedSegmentation, p.movingSegmentation,
                                        p.fixedLabel or None, movingLabel=p.movingLabel or None)
        slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=out.warpedVolume,
                                         foregroundOpacity=0.5)
        self.ui.statusLabel.text = planarNodes.summaryText(out)
        for line in out.notes + [self.ui.statusLabel.text]:
            self._log(line)

    def _registrationDone(self, output: RegistrationOutput) -> None:
        self.logic.storeOutputs(self._parameterNode, output)
        self.lastOutput = output
        self._shownDisplay = None
        self._updateDisplay(centre=True)
        self.ui.metricsTableView.setMRMLTableNode(output.metricsTable)
        self.ui.metricsTableView.visible = output.metricsTable is not None
        self.ui.statusLabel.text = outputNodes.summaryText(output)
        self._log(self.ui.statusLabel.text)

    def _updateDisplay(self, centre: bool = False) -> None:
        """Apply the Display section's settings to the last registration's nodes: after a registration all of
        them, then only those that changed (each toggle changes what it names)."""
        out, p = self.lastOutput, self._parameterNode
        if out is None or p is None:
            return
        if any(node is None or node.GetScene() is None for node in (out.fixedVolume, out.warpedVolume)):
            self.lastOutput = None  # deleted by the user
            return
        shown = outputNodes.DisplaySettings(p.foreground, p.foregroundOpacity, p.showGrid,
                                            p.showWarpedSegmentation, p.showColorLegend)
        outputNodes.applyDisplay(out, shown, self._shownDisplay, centre)
        self._shownDisplay = shown

    # -- fine-tune -------------------------------------------------------------------------------------
    def onAddScenePair(self) -> None:
        p = self._parameterNode
        if not p.fixedVolume or not p.movingVolume:
            slicer.util.warningDisplay(_("Select a fixed and a moving volume in the Register section first."))
            return
        pair = {"fixed": p.fixedVolume, "moving": p.movingVolume, "fixedSegmentation": p.fixedSegmentation,
                "movingSegmentation": p.movingSegmentation, "fixedLabel": p.fixedLabel or None,
                "movingLabel": p.movingLabel or None}
        self.scenePairs.append(pair)
        label = f"{p.movingVolume.GetName()} {p.movingLabel} -> {p.fixedVolume.GetName()} {p.fixedLabel}".strip()
        self.ui.scenePairsListWidget.addItem(label)
        self._checkCanApply()

    def onClearScenePairs(self) -> None:
        self.scenePairs = []
        self.ui.scenePairsListWidget.clear()
        self._checkCanApply()

    def onStartTraining(self) -> None:
        p = self._parameterNode
        label = self.ui.trainingStatusLabel
        with self._reported(_("Fine-tuning failed:"), label):
            if not self.logic.ensureDependencies(askConfirmation=True, section="finetune"):
                label.text = _("Missing packages were not installed: nothing done.")
                return
            if not models.ensureWeightsLicenceAccepted(p.checkpointPath):
                label.text = _("The shipped model's licence was not accepted: nothing done.")
                return
            run = self.logic.startFineTune(
                str(p.trainingOutputFolder), trainingFolder=None if _isUnset(p.trainingFolder) else p.trainingFolder,
                scenePairs=self.scenePairs or None, checkpoint=p.checkpointPath, iterations=p.trainingIterations,
                learningRate=p.learningRate, batchSize=p.batchSize, resume=p.resumeTraining, device=p.device)
            self._showChart(self.logic.lossChart)
            self._startRun(run, "training")

    def onXrayRegister(self) -> None:
        p = self._parameterNode
        label = self.ui.xrayStatusLabel
        with self._reported(_("X-ray registration failed:"), label):
            if not self.logic.ensureDependencies(askConfirmation=True, section="xray"):
                label.text = _("Missing packages were not installed: nothing done.")
                return
            self._startRun(self.logic.startXrayRegistrationOf(p), "xray")

    def _xrayDone(self, output) -> None:
        self.lastXrayOutput = output
        xrayNodes.showXrayOverlay(output, self._parameterNode.xrayFade)
        m = output.metrics
        self.ui.xrayStatusLabel.text = _("Done in {seconds:.0f} s, {views} view(s): gradient NCC {before:.2f} -> "
                                         "{after:.2f} ({method}, {polarity})").format(
            seconds=m["seconds"], views=m["views"], before=m["initial_similarity"],
            after=m["final_similarity"], method=m["method"], polarity=m["polarity"])
        self._log(self.ui.xrayStatusLabel.text)

    def _fineTuneDone(self, summary: Dict) -> None:
        self.lastFineTune = summary
        # The new model becomes the registration model (and stays in the path's history).
        self._parameterNode.checkpointPath = pathlib.Path(summary["checkpoint"])
        self.ui.modelPathLineEdit.addCurrentPathToHistory()
        self.ui.trainingStatusLabel.text = _("{status} at step {steps}; model {path} is selected for "
                                             "registration").format(status=summary["status"],
                                                                    steps=summary["steps"], path=summary["checkpoint"])
        self._log(self.ui.trainingStatusLabel.text)

    def _showChart(self, chartNode) -> None:
        try:
            slicer.modules.plots.logic().ShowChartInLayout(chartNode)
        except AttributeError:
            pass


#
# ACSGRegistrationLogic
#


class ACSGRegistrationLogic(ScriptedLoadableModuleLogic):
    """Registration, batch registration and fine-tuning on MRML nodes; usable without the GUI.

    Console example (in Slicer's process; ``startRegistration`` runs the same in the background)::

        logic = slicer.util.getModuleLogic("ACSGRegistration")
        out = logic.register(fixedVolume, movingVolume, fixedSeg, movingSeg, "L1", "L1")
        out.metrics["final"]["dice"], out.transform, out.warpedVolume
    """

    # The crop's grid (the paper's: 128 x 128 x 64 mm at 1 mm, SimpleITK x, y, z order).
    cropSize = CROP_SIZE
    cropSpacing = 1.0

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._registrars = {}
        self.lossTable = None
        self.lossChart = None

    def getParameterNode(self):
        return ACSGRegistrationParameterNode(super().getParameterNode())

    ensureDependencies = staticmethod(dependencies.ensureDependencies)

    # -- model ------------------------------------------------------------------------------------------
    resolveCheckpoint = staticmethod(models.resolveCheckpoint)
    describeModel = staticmethod(models.describeModel)

    def registrar(self, checkpoint=None, device: str = "auto", refineSteps: int = 0):
        """A Registrar for this checkpoint and device, loaded once and reused (the file's time is checked)."""
        from ACSGRegistrationLib.registrar import Registrar
        path = self.resolveCheckpoint(checkpoint)
        key = (os.path.realpath(path), os.path.getmtime(path), device)
        registrar = self._registrars.get(key)
        if registrar is None:
            self._registrars = {}  # one model in memory at a time
            # keep_memory=False: glibc's allocator settings are Slicer's, not to be changed for the process.
            registrar = Registrar(path, device=device, keep_memory=False)
            self._registrars[key] = registrar
        registrar.refine_steps = int(refineSteps)
        return registrar

    # -- inputs -----------------------------------------------------------------------------------------
    labelChoices = staticmethod(labels.labelChoices)

    def prepareInput(self, volume, segmentation=None, label=None, what: str = "fixed") -> PreparedInput:
        """The crop of the chosen vertebra (or the whole volume as a ready crop when there is no segmentation),
        by the backend's input rules (``ACSGRegistrationLib.inputs.prepare_input``)."""
        from ACSGRegistrationLib.inputs import prepare_input
        side = exportInput(volume, segmentation, label, what)
        if side.mask is None:
            return PreparedInput.of(volume, prepare_input(side.source, what=what))
        return PreparedInput.of(volume, prepare_input(side.source, side.mask, 1, what, {1: side.name},
                                                      f"'{segmentation.GetName()}'", "segmentation", self.cropSize,
                                                      self.cropSpacing))

    @staticmethod
    def _outputs(warpedVolume, transform, jacobian, warpedSegmentation, metricsTable):
        """(the given output nodes by their names in messages, the same by createOutputNodes' arguments)."""
        given = dict(warpedVolume=warpedVolume, transform=transform, jacobian=jacobian,
                     warpedSegmentation=warpedSegmentation, metricsTable=metricsTable)
        named = dict(zip(("warped volume", "transform", "Jacobian", "warped segmentation", "metrics table"),
                         given.values()))
        return named, given

    # -- registration -------------------------------------------------------------------------------------
    def register(self, fixedVolume, movingVolume, fixedSegmentation=None, movingSegmentation=None,
                 fixedLabel=None, movingLabel=None, checkpoint=None, device: str = "auto", refineSteps: int = 0,
                 warpedVolume=None, transform=None, jacobian=None, warpedSegmentation=None, metricsTable=None,
                 show: bool = True, progress: Optional[Callable[[float, str], None]] = None,
                 shouldStop: Optional[Callable[[], bool]] = None, name: Optional[str] = None) -> RegistrationOutput:
        """Register the moving vertebra to the fixed one in Slicer's process and create (or fill the given)
        output nodes.

        Whole scans need both segmentations (segmentation or labelmap nodes) and the vertebra in each
        (segment name, level such as "L1", or label value; may be omitted when there is only one). Without
        segmentations the volumes are taken as ready vertebra crops. Inputs are never modified.
        """
        t0 = time.perf_counter()
        report = progress or (lambda fraction, message: None)
        named, given = self._outputs(warpedVolume, transform, jacobian, warpedSegmentation, metricsTable)
        checkInputs(fixedVolume, movingVolume, fixedSegmentation, movingSegmentation, named)
        report(0.02, _("Cropping the vertebrae..."))
        fixed = self.prepareInput(fixedVolume, fixedSegmentation, fixedLabel, "fixed")
        moving = self.prepareInput(movingVolume, movingSegmentation, movingLabel, "moving")
        report(0.1, _("Loading the model..."))
        registrar = self.registrar(checkpoint, device, refineSteps)

        def refineProgress(step, total):
            report(0.1 + 0.7 * step / max(total, 1), _("Refining on this pair: step {step}/{total}").format(
                step=step, total=total))
        registrar.progress = refineProgress if refineSteps else None
        registrar.should_stop = shouldStop
        if shouldStop is not None and shouldStop():
            raise Cancelled("cancelled before the registration started")
        report(0.15, _("Registering on {device}...").format(device=registrar.device))
        result = registrar.register(fixed.image, moving.image, fixed.label, moving.label)
        report(0.85, _("Creating the output nodes..."))
        output = outputNodes.createOutputNodes(result, fixed, moving, name=name, **given)
        output.notes = fixed.notes + moving.notes + list(result.notes)
        del result
        registrar.release_memory()  # what the registration freed goes back to the system, not kept in Slicer
        output.seconds = time.perf_counter() - t0
        if show:
            self.showResults(output)
        report(1.0, outputNodes.summaryText(output))
        return output

    def startRegistration(self, fixedVolume, movingVolume, fixedSegmentation=None, movingSegmentation=None,
                          fixedLabel=None, movingLabel=None, checkpoint=None, device: str = "auto",
                          refineSteps: int = 0, warpedVolume=None, transform=None, jacobian=None,
                          warpedSegmentation=None, metricsTable=None, name: Optional[str] = None) -> RegistrationRun:
        """``register`` in the background: checks and exports the inputs now, runs ``acsgreg register`` in a
        separate process and returns the started run; ``run.poll()`` (never blocks), ``run.cancel()``, and
        ``run.finish()`` makes the output nodes, once, when the process has succeeded."""
        named, given = self._outputs(warpedVolume, transform, jacobian, warpedSegmentation, metricsTable)
        checkInputs(fixedVolume, movingVolume, fixedSegmentation, movingSegmentation, named)
        fixed = exportInput(fixedVolume, fixedSegmentation, fixedLabel, "fixed")
        moving = exportInput(movingVolume, movingSegmentation, movingLabel, "moving")
        return RegistrationRun(fixed, moving, self.resolveCheckpoint(checkpoint), device, refineSteps, given,
                               name).start()

    def registerPlanar(self, fixedVolume, movingVolume, fixedSegmentation=None, movingSegmentation=None, label=None,
                       model=None, name=None, refineSteps=None, movingLabel=None) -> "planarNodes.PlanarOutput":
        """The 2D mode (``planarNodes``): two single-slice volumes registered by the 2D network, in this process.
        ``label``: the fixed side's structure as the panel lists it (segment name, level, "20: vertebrae_L1" or a
        value) and the moving side's too unless ``movingLabel`` is given."""
        return planarNodes.registerPlanarNodes(fixedVolume, movingVolume, fixedSegmentation, movingSegmentation,
                                               label, label if movingLabel is None else movingLabel, model, name,
                                               refineSteps)

    def startRegistrationOf(self, p) -> RegistrationRun:
        """``startRegistration`` of what a parameter node (the panel's) says, into its output nodes."""
        return self.startRegistration(
            p.fixedVolume, p.movingVolume, p.fixedSegmentation, p.movingSegmentation, p.fixedLabel or None,
            p.movingLabel or None, checkpoint=p.checkpointPath, device=p.device, refineSteps=p.refineSteps,
            warpedVolume=p.outputWarpedVolume, transform=p.outputTransform, jacobian=p.outputJacobian,
            warpedSegmentation=p.outputWarpedSegmentation, metricsTable=p.outputMetricsTable)

    @staticmethod
    def storeOutputs(p, output: RegistrationOutput) -> None:
        """The filled nodes become the parameter node's outputs: the next Apply reuses them, adds none."""
        with slicer.util.NodeModify(p.parameterNode):
            p.outputWarpedVolume, p.outputTransform, p.outputJacobian = (output.warpedVolume, output.transform,
                                                                          output.jacobian)
            p.outputWarpedSegmentation, p.outputMetricsTable = output.warpedSegmentation, output.metricsTable

    @staticmethod
    def showResults(output: RegistrationOutput, **display):
        """Fixed volume in the background, the warped volume (or ``foreground="Jacobian map"``) in front, the
        grid and the warped segmentation on top, views centred (``outputNodes.showResults``' options)."""
        outputNodes.showResults(output, **display)

    # -- CT to X-ray -------------------------------------------------------------------------------------
    def startXrayRegistration(self, ctVolume, xray, geometry: Dict, **options) -> XrayRegistrationRun:
        """CT to X-ray pose registration in the background (``xrayRegistration.startXrayRegistration``: the
        inputs, the initial pose from the C-arm's angles, the options); ``run.finish()`` gives the nodes."""
        return xrayRegistration.startXrayRegistration(ctVolume, xray, geometry, **options)

    def startXrayRegistrationOf(self, p) -> XrayRegistrationRun:
        """``startXrayRegistration`` of what a parameter node (the panel's) says."""
        return xrayRegistration.startXrayRegistration(p.xrayCt, xrayRegistration.xrayFileOf(p),
                                                      xrayRegistration.geometryOf(p), **xrayRegistration.optionsOf(p))

    def registerXray(self, ctVolume, xray, geometry: Dict, opacity: float = 0.5, **options):
        """``startXrayRegistration``, waited for (scripts, the Python console); the X-ray under the DRR in the
        red slice view. Returns the nodes (``xrayNodes.XrayOutput``)."""
        output = self.startXrayRegistration(ctVolume, xray, geometry, **options).finish()
        xrayNodes.showXrayOverlay(output, opacity)
        return output

    # -- batch ------------------------------------------------------------------------------------------
    def registerPairs(self, pairs: Sequence, checkpoint=None, device: str = "auto", refineSteps: int = 0,
                      show: bool = False, progress: Optional[Callable[[int, int], None]] = None,
                      shouldStop: Optional[Callable[[], bool]] = None) -> List[RegistrationOutput]:
        """Register many pairs of volume nodes with one loaded model; every pair gets new output nodes.

        A pair is ``(fixed, moving[, fixedSegmentation, movingSegmentation, fixedLabel, movingLabel])`` or a
        dict with those keys (and optionally ``name``).
        """
        outputs = []
        for k, pair in enumerate(pairs):
            if shouldStop is not None and shouldStop():
                raise Cancelled(f"batch cancelled after {k} of {len(pairs)} pairs")
            a = pairArguments(pair)
            outputs.append(self.register(a["fixed"], a["moving"], a.get("fixedSegmentation"),
                                         a.get("movingSegmentation"), a.get("fixedLabel"), a.get("movingLabel"),
                                         checkpoint=checkpoint, device=device, refineSteps=refineSteps,
                                         show=show and k == len(pairs) - 1, shouldStop=shouldStop,
                                         name=a.get("name")))
            if progress is not None:
                progress(k + 1, len(pairs))
        return outputs

    @staticmethod
    def loadVolumeFile(path: str, labelmap: bool = False, name: Optional[str] = None):
        """A volume node from an image file (read with SimpleITK; LPS -> RAS) in the current scene."""
        return loadVolumeFile(path, labelmap, name)

    def registerFiles(self, pairs: Sequence, outputFolder: Optional[str] = None, checkpoint=None,
                      device: str = "auto", refineSteps: int = 0, keepNodes: bool = True, stopOnError: bool = True,
                      progress: Optional[Callable[[int, int], None]] = None, outputs=None) -> List[Dict]:
        """Register pairs of files (``batch.registerFiles``: its docstring says what a pair is and what each
        row holds); with ``outputFolder`` each pair's ``outputs`` (default: the command line's) go to
        ``outputFolder/<name>``, with a metrics.csv."""
        chosen = {} if outputs is None else {"outputs": tuple(outputs)}
        return batch.registerFiles(self.register, pairs, outputFolder, keepNodes, stopOnError, progress, **chosen,
                                   checkpoint=checkpoint, device=device, refineSteps=refineSteps)

    # -- fine-tuning ------------------------------------------------------------------------------------
    def _sceneCrops(self, scenePairs, outputFolder):
        pairs = [pairArguments(pair) for pair in scenePairs or []]
        return training.sceneCrops(pairs, os.path.join(outputFolder, "scene_crops"), self.prepareInput)

    def _lossChart(self, outputFolder):
        self.lossTable, self.lossChart = training.newLossChart(os.path.basename(os.path.normpath(outputFolder))
                                                               or "fine-tune")
        return self.lossTable

    def _runFolder(self, outputFolder) -> str:
        if _isUnset(outputFolder):
            raise InputError("choose an output folder for the fine-tuned model")
        folder = os.path.expanduser(str(outputFolder))
        os.makedirs(folder, exist_ok=True)
        return folder

    def fineTune(self, outputFolder: str, trainingFolder=None, scenePairs=None, checkpoint=None,
                 iterations: int = 200, learningRate: float = 1e-5, batchSize: int = 2, resume: bool = True,
                 device: str = "auto", useLabels: bool = True,
                 progress: Optional[Callable[[int, int, Dict[str, float]], None]] = None,
                 shouldStop: Optional[Callable[[], bool]] = None, lossChart: bool = True) -> Dict:
        """Continue training ``checkpoint`` (the shipped model by default) in Slicer's process on a folder of
        data and/or pairs of the scene; ``iterations`` is the run's total number of steps (with ``resume`` an
        interrupted run in ``outputFolder`` continues where it stopped). Returns the trainer's summary, whose
        ``checkpoint`` is the model to register with now. ``startFineTune`` runs the same in the background."""
        from ACSGRegistrationLib.checkpoint import load_checkpoint
        from ACSGRegistrationLib.config import TrainConfig
        from ACSGRegistrationLib.datasets import PairDataset, make_pairs
        from ACSGRegistrationLib.readers import crop_records
        from ACSGRegistrationLib.trainer import LAST, Trainer
        outputFolder = self._runFolder(outputFolder)
        init = self.resolveCheckpoint(checkpoint)
        lastPath = os.path.join(outputFolder, LAST)
        modelConfig = load_checkpoint(lastPath if (resume and os.path.isfile(lastPath)) else init)["model_config_obj"]
        records = crop_records(os.path.expanduser(str(trainingFolder)), outputFolder) if trainingFolder else []
        records = [r for r in records if r.image] + self._sceneCrops(scenePairs, outputFolder)
        pairs = make_pairs(records) or make_pairs(records, mode="all")
        if not pairs:
            raise InputError("no training pairs: choose a training data folder or add pairs from the scene")
        dataset = PairDataset(records, pairs, grid=(modelConfig.input_shape, modelConfig.input_spacing))
        cfg = TrainConfig(learning_rate=float(learningRate), batch_size=max(1, min(int(batchSize), len(dataset))),
                          max_steps=int(iterations), checkpoint_every=max(1, min(25, int(iterations) // 4 or 1)),
                          use_labels=bool(useLabels), num_workers=0)
        table = self._lossChart(outputFolder) if lossChart else None

        def onStep(step, total, terms):
            if table is not None:
                training.appendLoss(table, step, terms.get("total", float("nan")))
            if progress is not None:
                progress(step, total, terms)

        trainer = Trainer(None, cfg, dataset, outputFolder, init_checkpoint=init, device=device, resume=resume,
                          progress=onStep, should_stop=shouldStop, log=logging.info)
        for row in trainer.history if table is not None else []:  # a resumed run shows its whole curve
            training.appendLoss(table, row.get("step", 0), row.get("total", float("nan")))
        return trainer.train()

    def startFineTune(self, outputFolder: str, trainingFolder=None, scenePairs=None, checkpoint=None,
                      iterations: int = 200, learningRate: float = 1e-5, batchSize: int = 2, resume: bool = True,
                      device: str = "auto", lossChart: bool = True) -> FineTuneRun:
        """``fineTune`` in the background (``acsgreg prepare`` where the folder is not cropped yet, then
        ``acsgreg finetune``): returns the started run; its loss goes to the chart as it comes."""
        outputFolder = self._runFolder(outputFolder)
        sceneRecords = self._sceneCrops(scenePairs, outputFolder)
        table = self._lossChart(outputFolder) if lossChart else None
        onLoss = (lambda step, loss: training.appendLoss(table, step, loss)) if table is not None else None
        return FineTuneRun(outputFolder, self.resolveCheckpoint(checkpoint), iterations, learningRate, batchSize,
                           resume, device, dataFolder=None if _isUnset(trainingFolder) else
                           os.path.expanduser(str(trainingFolder)), sceneRecords=sceneRecords, onLoss=onLoss).start()


#
# ACSGRegistrationTest
#


class ACSGRegistrationTest(ScriptedLoadableModuleTest, selfTest.SelfTestCases):
    """Self-test on synthetic vertebrae made here (nothing is downloaded): the logic in Slicer's process and in
    the background (with a cancel), then the panel driven through its widgets (``selfTest.SelfTestCases``). Each
    test is skipped, with its reason, where PyTorch is not installed (extension build dashboards, whose runner loads
    the ``test_*`` methods one by one) and the panel's where there is no GUI."""

    def setUp(self):
        if not dependencies.torchAvailable():
            self.skipTest(selfTest.NO_TORCH)
        slicer.mrmlScene.Clear()

    @staticmethod
    def newLogic():
        return ACSGRegistrationLogic()

    def runTest(self):
        """The Reload and Test button: every test in turn."""
        if not dependencies.torchAvailable():
            self.delayDisplay(selfTest.NO_TORCH)
            return
        for name in selfTest.SelfTestCases.TESTS:
            self.setUp()
            try:
                getattr(self, name)()
            except unittest.SkipTest as skipped:
                self.delayDisplay(f"{name} skipped: {skipped}")
