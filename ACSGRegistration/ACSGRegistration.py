"""ACSGRegistration: one-shot deep-learning registration of lumbar vertebrae in CT (ACSGRegNet) for 3D Slicer.

The module is a thin layer over the backend in ``ACSGRegistrationLib`` (importable without Slicer):

- ``ACSGRegistrationLogic`` turns MRML nodes into SimpleITK images and back (through the nodes' IJK-to-RAS
  matrices; SimpleITK works in LPS, Slicer in RAS), crops the vertebra from whole scans and their
  segmentations by the backend's input rules (``ACSGRegistrationLib.inputs``), runs
  ``ACSGRegistrationLib.registrar.Registrar`` and creates the output nodes: the warped volume, a transform node
  holding the affine and the deformable field composed (valid on the whole scan), the deformable part alone for
  the grid display, the Jacobian determinant map and the warped segmentation, plus a metrics table. It also
  registers lists of pairs (nodes or files) and fine-tunes a model with ``ACSGRegistrationLib.trainer.Trainer``.
  Everything in the logic works without the GUI.
- ``ACSGRegistrationWidget`` is the panel (``Resources/UI/ACSGRegistration.ui``).
- ``ACSGRegistrationTest`` registers synthetic vertebrae made by the test itself (nothing is downloaded),
  through the logic and then through the panel.
"""

import logging
import os
import pathlib
import tempfile
import time
from dataclasses import dataclass, field
from typing import Annotated, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Decimals, SingleStep, WithinRange, parameterNodeWrapper
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

# The backend's errors import nothing (no numpy, no PyTorch): safe before the dependencies are checked.
from ACSGRegistrationLib.errors import Cancelled, DependencyError, InputError
from ACSGRegistrationLib.inputs import PreparedInput as BackendInput  # numpy and SimpleITK: shipped with Slicer
from ACSGRegistrationLib.preprocessing import CROP_SIZE
from ACSGRegistrationLib.resources import DEFAULT_MODEL

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL_PATH = os.path.join(MODULE_DIR, "Resources", "Models", DEFAULT_MODEL)

# Packages the backend needs besides PyTorch (import name -> pip requirement). Slicer ships numpy and
# SimpleITK; scipy is installed on demand. matplotlib is only used for the backend's figures.
REQUIRED_PACKAGES = {"numpy": "numpy", "SimpleITK": "SimpleITK", "scipy": "scipy"}

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
JACOBIAN_COLOR_TAG = "ACSGRegistrationJacobianColors"
DEFORMATION_REFERENCE = "ACSGRegistrationDeformablePart"  # transform node -> its deformable-part node
FOREGROUND_CHOICES = ("warped volume", "Jacobian map", "none")


def _hasGui() -> bool:
    app = getattr(slicer, "app", None)
    return app is not None and hasattr(app, "processEvents")


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
        self.parent.contributors = ["ACSGRegistration developers"]
        self.parent.helpText = _("""
One-shot deep-learning registration of lumbar vertebrae in CT (ACSGRegNet: affine network, then a
diffeomorphic network with self- and cross-attention). Choose the fixed and moving CT and, for whole scans,
their segmentations and the vertebra (segment name, level such as L1, or label value); the vertebra is
cropped as in the paper (128 x 128 x 64 mm). Outputs: the warped volume, a transform node (the affine and the
deformable displacement composed: the full map around the vertebra, the affine on the rest of the scan;
apply, harden, invert or save it like any Slicer transform), the Jacobian determinant map (blue: compression,
red: expansion, green: folding) and the warped segmentation; Dice and surface distances when both
segmentations are given. The Fine-tune section continues training the model on your own pairs.
The same logic runs from the Python console: see the README of the extension.
""")
        self.parent.acknowledgementText = _("""
Method: Gao and Zheng, ACSGRegNet: a deep learning-based framework for unsupervised joint affine and
diffeomorphic registration of lumbar spine CT via cross- and self-attention fusion (2022).
""")


#
# ACSGRegistrationParameterNode
#


@parameterNodeWrapper
class ACSGRegistrationParameterNode:
    """The panel's state, saved with the scene.

    Inputs: fixedVolume, movingVolume, their segmentations (segmentation or labelmap nodes, optional) and
    the vertebra to use in each (segment name, level such as "L1", or label value).
    Model: checkpointPath (the shipped model by default), device, refineSteps.
    Outputs: each None means "create new".
    Display: which volume goes to the foreground, its opacity, the grid, the warped segmentation, the legend.
    Fine-tune: training data folder, iterations, learning rate, batch size, output folder, resume.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]
    movingSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]
    fixedLabel: str = ""
    movingLabel: str = ""
    checkpointPath: pathlib.Path = pathlib.Path(DEFAULT_MODEL_PATH)
    device: Annotated[str, Choice(["auto", "cpu", "gpu"])] = "auto"
    refineSteps: Annotated[int, WithinRange(0, 1000)] = 0

    outputWarpedVolume: vtkMRMLScalarVolumeNode
    outputTransform: vtkMRMLTransformNode
    outputJacobian: vtkMRMLScalarVolumeNode
    outputWarpedSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]
    outputMetricsTable: vtkMRMLTableNode

    foreground: Annotated[str, Choice(list(FOREGROUND_CHOICES))] = "warped volume"
    foregroundOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    showGrid: bool = True
    showWarpedSegmentation: bool = True
    showColorLegend: bool = True

    trainingFolder: pathlib.Path = pathlib.Path()
    trainingIterations: Annotated[int, WithinRange(1, 100000)] = 200
    learningRate: Annotated[float, WithinRange(1e-7, 1e-2), Decimals(7), SingleStep(1e-5)] = 1e-5
    batchSize: Annotated[int, WithinRange(1, 64)] = 2
    trainingOutputFolder: pathlib.Path = pathlib.Path.home() / "ACSGRegistration" / "finetune"
    resumeTraining: bool = True


#
# Geometry: MRML nodes <-> SimpleITK images
#


def _isUnset(path) -> bool:
    return path is None or str(path).strip() in ("", ".")


def ijkToRasOfNode(volumeNode, world: bool = True) -> np.ndarray:
    """The volume's IJK-to-RAS matrix (4x4), including linear parent transforms when ``world``."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    m = slicer.util.arrayFromVTKMatrix(matrix)
    parent = volumeNode.GetParentTransformNode()
    if world and parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(f"'{volumeNode.GetName()}' is under the non-linear transform '{parent.GetName()}': "
                             "harden the transform first (Data module: right-click, Harden transform)")
        toWorld = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(toWorld)
        m = slicer.util.arrayFromVTKMatrix(toWorld) @ m
    return m


def imageGeometryFromIJKToRAS(ijkToRas: np.ndarray):
    """(spacing, direction 3x3, origin) in SimpleITK's LPS convention from an IJK-to-RAS matrix."""
    lps = LPS_TO_RAS @ np.asarray(ijkToRas, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise InputError("the volume has a degenerate IJK-to-RAS matrix (zero spacing)")
    direction = lps[:3, :3] / spacing
    return spacing, direction, lps[:3, 3].copy()


def ijkToRasFromImage(image) -> np.ndarray:
    """IJK-to-RAS matrix (4x4) of a SimpleITK image (whose geometry is LPS)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def volumeNodeToImage(volumeNode, dtype=None):
    """A SimpleITK image (LPS geometry) with a copy of the volume's voxels; the node is not modified."""
    import SimpleITK as sitk
    if volumeNode is None or volumeNode.GetImageData() is None:
        name = volumeNode.GetName() if volumeNode is not None else "volume"
        raise InputError(f"'{name}' has no image data")
    if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
        raise InputError(f"'{volumeNode.GetName()}' has {volumeNode.GetImageData().GetNumberOfScalarComponents()} "
                         "components per voxel; a scalar volume is needed")
    array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
    if dtype is not None:
        array = array.astype(dtype)
    spacing, direction, origin = imageGeometryFromIJKToRAS(ijkToRasOfNode(volumeNode))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in direction.ravel()])
    image.SetOrigin([float(o) for o in origin])
    return image


def updateVolumeNodeFromImage(volumeNode, image):
    """Put a SimpleITK image's voxels and geometry into a volume node (world geometry, no parent transform)."""
    import SimpleITK as sitk
    array = sitk.GetArrayFromImage(image)
    if volumeNode.GetParentTransformNode() is not None:
        volumeNode.SetAndObserveTransformNodeID(None)
    slicer.util.updateVolumeFromArray(volumeNode, array)
    volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRasFromImage(image)))
    return volumeNode


def gridTransformFromField(displacementField):
    """A ``vtkOrientedGridTransform`` (RAS) from an ITK displacement field (mm, LPS vectors and geometry).

    Used as the transform *from parent* of a grid transform node: a fixed-space point p goes to the moving-space
    point p + u(p), ITK's resampling convention, so that the moving volume placed under the node is displayed
    (and resampled) in the fixed volume's space.
    """
    import SimpleITK as sitk
    from vtk.util import numpy_support
    u = sitk.GetArrayFromImage(displacementField).astype(np.float64)  # (k, j, i, 3), LPS
    if u.ndim != 4 or u.shape[-1] != 3:
        raise ValueError(f"expected a 3D displacement field with 3 components, got an array of shape {u.shape}")
    u[..., 0] *= -1.0  # L -> R
    u[..., 1] *= -1.0  # P -> A
    ijkToRas = ijkToRasFromImage(displacementField)
    spacing = np.linalg.norm(ijkToRas[:3, :3], axis=0)
    direction = np.eye(4)
    direction[:3, :3] = ijkToRas[:3, :3] / spacing
    grid = vtk.vtkImageData()
    grid.SetOrigin(*ijkToRas[:3, 3])
    grid.SetSpacing(*spacing)
    grid.SetDimensions(*displacementField.GetSize())
    vectors = numpy_support.numpy_to_vtk(np.ascontiguousarray(u.reshape(-1, 3)), deep=True,
                                         array_type=vtk.VTK_DOUBLE)
    vectors.SetName("displacement")
    grid.GetPointData().SetScalars(vectors)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetGridDirectionMatrix(slicer.util.vtkMatrixFromArray(direction))
    transform.SetDisplacementGridData(grid)
    transform.SetInterpolationModeToLinear()
    return transform


def compositeTransformFromResult(result):
    """The registration's whole map as one VTK transform (RAS; transform from parent, fixed -> moving): the
    deformable part first (a grid on the fixed crop, falling to zero in a band beyond it), then the affine.
    The same map as the backend's ``forward_transform.h5`` everywhere: the full map inside the crop, the affine
    outside it (a displacement grid alone would be continued by Slicer beyond its edge)."""
    linear = vtk.vtkTransform()
    linear.SetMatrix(slicer.util.vtkMatrixFromArray(LPS_TO_RAS @ np.asarray(result.affine_lps) @ LPS_TO_RAS))
    composite = vtk.vtkGeneralTransform()  # pre-multiplying: the transform concatenated last is applied first
    composite.Concatenate(linear)
    composite.Concatenate(gridTransformFromField(result.exported_deformable_field()))
    return composite


#
# Results
#


@dataclass
class PreparedInput(BackendInput):
    """One side of a pair: the backend's prepared input and the volume node it came from."""

    volume: object = None

    @classmethod
    def of(cls, volume, prepared: BackendInput) -> "PreparedInput":
        return cls(**vars(prepared), volume=volume)


@dataclass
class RegistrationOutput:
    """What one registration produced: the output nodes, the metrics, and the backend's own result."""

    fixedVolume: object
    movingVolume: object
    warpedVolume: object
    transform: object
    jacobian: object
    warpedSegmentation: object = None
    metricsTable: object = None
    metrics: Optional[Dict] = None
    folding: Optional[Dict] = None
    result: object = None  # ACSGRegistrationLib.registrar.RegistrationResult
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)
    deformation: object = None  # grid transform node of the deformable part alone (drawn as the grid)

    def nodes(self) -> Dict[str, object]:
        return {k: v for k, v in (("warpedVolume", self.warpedVolume), ("transform", self.transform),
                                  ("deformation", self.deformation), ("jacobian", self.jacobian),
                                  ("warpedSegmentation", self.warpedSegmentation),
                                  ("metricsTable", self.metricsTable)) if v is not None}


@dataclass
class FineTuneOutput:
    summary: Dict
    checkpoint: str  # the model to register with now (model.pt when finished, last.pt otherwise)
    lossTable: object = None
    lossChart: object = None


#
# ACSGRegistrationWidget
#


class ACSGRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: Register, Outputs, Display and Fine-tune sections."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._busy = False
        self._cancelRequested = False
        self._stopTrainingRequested = False
        self.lastOutput = None
        self.lastFineTune = None
        self._shownDisplay = None
        self.scenePairs = []  # training pairs taken from the scene (dicts of nodes and labels)

    # -- setup ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ACSGRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = ACSGRegistrationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Register
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.fixedSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                  lambda node: self._fillLabelChoices("fixed"))
        self.ui.movingSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                   lambda node: self._fillLabelChoices("moving"))
        self.ui.fixedLabelComboBox.connect("currentTextChanged(QString)",
                                           lambda text: self._onLabelTextChanged("fixed", text))
        self.ui.movingLabelComboBox.connect("currentTextChanged(QString)",
                                            lambda text: self._onLabelTextChanged("moving", text))
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self._updateModelStatus)
        self.ui.useDefaultModelButton.connect("clicked(bool)", self.onUseDefaultModel)

        # Display: the widgets write the parameter node, whose Modified event updates the views
        # (_onParameterNodeModified), so the views always follow the parameters.

        # Fine-tune
        self.ui.addScenePairButton.connect("clicked(bool)", self.onAddScenePair)
        self.ui.clearScenePairsButton.connect("clicked(bool)", self.onClearScenePairs)
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartTraining)
        self.ui.stopTrainingButton.connect("clicked(bool)", self.onStopTraining)

        self.ui.progressBar.visible = False
        self.ui.trainingProgressBar.visible = False
        self.ui.cancelButton.enabled = False
        self.ui.stopTrainingButton.enabled = False
        self.initializeParameterNode()
        self._updateModelStatus()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.lastOutput = None
        self.scenePairs = []
        self.ui.scenePairsListWidget.clear()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and first.GetClassName() == "vtkMRMLScalarVolumeNode":
                self._parameterNode.fixedVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets carrying the "SlicerParameterName" property in the .ui are connected to the parameters.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._fillLabelChoices("fixed")
            self._fillLabelChoices("moving")
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        for side in ("fixed", "moving"):
            combo = getattr(self.ui, f"{side}LabelComboBox")
            value = getattr(p, f"{side}Label")
            if combo.currentText != value:
                wasBlocked = combo.blockSignals(True)
                combo.setEditText(value)
                combo.blockSignals(wasBlocked)
        if self._displaySettings() != self._shownDisplay:
            self.onDisplayChanged(centre=False)
        self._checkCanApply()

    def _displaySettings(self):
        p = self._parameterNode
        return (p.foreground, p.foregroundOpacity, p.showGrid, p.showWarpedSegmentation, p.showColorLegend)

    def _checkCanApply(self) -> None:
        p = self._parameterNode
        reason = ""
        if self._busy:
            reason = _("Running...")
        elif not p or not p.fixedVolume or not p.movingVolume:
            reason = _("Select the fixed and the moving volume")
        elif not os.path.isfile(self._checkpointPath()):
            reason = _("No model: choose a checkpoint file (.pt) under Model")
        self.ui.applyButton.enabled = not reason
        self.ui.applyButton.toolTip = reason or _("Register the moving vertebra to the fixed one")
        self.ui.startTrainingButton.enabled = not self._busy

    def _checkpointPath(self) -> str:
        path = self._parameterNode.checkpointPath if self._parameterNode else None
        return DEFAULT_MODEL_PATH if _isUnset(path) else str(path)

    def _updateModelStatus(self, *_) -> None:
        path = self.ui.modelPathLineEdit.currentPath
        self.ui.modelStatusLabel.text = self.logic.describeModel(path)
        self._checkCanApply()

    def onUseDefaultModel(self) -> None:
        self._parameterNode.checkpointPath = pathlib.Path(DEFAULT_MODEL_PATH)

    # -- vertebra label choice -------------------------------------------------------------------------
    def _fillLabelChoices(self, side: str) -> None:
        if self._parameterNode is None:
            return
        combo = getattr(self.ui, f"{side}LabelComboBox")
        node = getattr(self.ui, f"{side}SegmentationSelector").currentNode()
        current = getattr(self._parameterNode, f"{side}Label")
        choices = self.logic.labelChoices(node) if node else []
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for choice in choices:
            combo.addItem(choice)
        combo.blockSignals(wasBlocked)
        combo.enabled = node is not None
        if node is None:
            value = ""
        elif current and self.logic.matchesChoice(current, choices):
            value = current
        elif len(choices) == 1:
            value = choices[0]
        else:
            # Same level as the other side when it has one (e.g. L1 -> vertebrae_L1).
            other = getattr(self._parameterNode, ("moving" if side == "fixed" else "fixed") + "Label")
            value = self.logic.sameLevelChoice(other, choices) or current
        combo.setEditText(value)
        setattr(self._parameterNode, f"{side}Label", value)

    def _onLabelTextChanged(self, side: str, text: str) -> None:
        if self._parameterNode is not None and getattr(self._parameterNode, f"{side}Label") != text:
            setattr(self._parameterNode, f"{side}Label", text)

    # -- register --------------------------------------------------------------------------------------
    def _setBusy(self, busy: bool, training: bool = False) -> None:
        self._busy = busy
        self.ui.cancelButton.enabled = busy and not training
        self.ui.stopTrainingButton.enabled = busy and training
        self.ui.progressBar.visible = busy and not training
        self.ui.trainingProgressBar.visible = busy and training or self.ui.trainingProgressBar.visible
        self._checkCanApply()

    def _processEvents(self) -> None:
        slicer.app.processEvents()

    def onCancelButton(self) -> None:
        self._cancelRequested = True
        self.ui.statusLabel.text = _("Cancelling...")

    def onApplyButton(self) -> None:
        p = self._parameterNode
        self._cancelRequested = False

        def progress(fraction, message):
            self.ui.progressBar.value = int(round(100 * fraction))
            self.ui.statusLabel.text = message
            self._processEvents()

        def shouldStop():
            self._processEvents()
            return self._cancelRequested

        self._setBusy(True)
        try:
            with slicer.util.tryWithErrorDisplay(_("Registration failed."), waitCursor=True):
                if not self.logic.ensureDependencies(askConfirmation=True):
                    self.ui.statusLabel.text = _("Missing packages were not installed: nothing done.")
                    return
                try:
                    output = self.logic.register(
                        p.fixedVolume, p.movingVolume, p.fixedSegmentation, p.movingSegmentation,
                        p.fixedLabel or None, p.movingLabel or None, checkpoint=self._checkpointPath(),
                        device=p.device, refineSteps=p.refineSteps, warpedVolume=p.outputWarpedVolume,
                        transform=p.outputTransform, jacobian=p.outputJacobian,
                        warpedSegmentation=p.outputWarpedSegmentation, metricsTable=p.outputMetricsTable,
                        show=False, progress=progress, shouldStop=shouldStop)
                except Cancelled as exc:
                    self.ui.statusLabel.text = _("Cancelled: ") + str(exc)
                    return
                self.lastOutput = output
                self.onDisplayChanged(centre=True)
                self.ui.metricsTableView.setMRMLTableNode(output.metricsTable)
                self.ui.metricsTableView.visible = output.metricsTable is not None
                summary = self.logic.summaryText(output)
                self.ui.statusLabel.text = summary
                logging.info(summary)
        finally:
            self._setBusy(False)

    def onDisplayChanged(self, centre: bool = False) -> None:
        """Show the last registration's outputs as the Display section says (centre: on the vertebra)."""
        if self.lastOutput is None or self._parameterNode is None:
            return
        if any(node is None or node.GetScene() is None for node in (self.lastOutput.fixedVolume,
                                                                     self.lastOutput.warpedVolume)):
            self.lastOutput = None  # deleted by the user
            return
        p = self._parameterNode
        self._shownDisplay = self._displaySettings()
        self.logic.showResults(self.lastOutput, foreground=p.foreground, opacity=p.foregroundOpacity,
                               showGrid=p.showGrid, showWarpedSegmentation=p.showWarpedSegmentation,
                               showColorLegend=p.showColorLegend, centre=centre)

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

    def onClearScenePairs(self) -> None:
        self.scenePairs = []
        self.ui.scenePairsListWidget.clear()

    def onStopTraining(self) -> None:
        self._stopTrainingRequested = True
        self.ui.trainingStatusLabel.text = _("Stopping after this step (the run is saved and can be resumed)...")

    def onStartTraining(self) -> None:
        p = self._parameterNode
        self._stopTrainingRequested = False
        folder = None if _isUnset(p.trainingFolder) else str(p.trainingFolder)
        if folder is None and not self.scenePairs:
            slicer.util.errorDisplay(_("Choose a training data folder, or add pairs from the scene."))
            return
        self.ui.trainingProgressBar.maximum = p.trainingIterations
        self.ui.trainingProgressBar.value = 0
        self.ui.trainingProgressBar.visible = True
        shown = {"chart": False}

        def progress(step, total, terms):
            self.ui.trainingProgressBar.maximum = total
            self.ui.trainingProgressBar.value = step
            self.ui.trainingStatusLabel.text = _("step {step}/{total}: loss {loss:.4f}").format(
                step=step, total=total, loss=terms.get("total", float("nan")))
            if not shown["chart"] and self.logic.lossChart is not None:
                self._showChart(self.logic.lossChart)
                shown["chart"] = True
            self._processEvents()

        def shouldStop():
            self._processEvents()
            return self._stopTrainingRequested

        self._setBusy(True, training=True)
        try:
            with slicer.util.tryWithErrorDisplay(_("Fine-tuning failed."), waitCursor=False):
                if not self.logic.ensureDependencies(askConfirmation=True):
                    return
                self.ui.trainingStatusLabel.text = _("Preparing the training pairs...")
                self._processEvents()
                out = self.logic.fineTune(
                    str(p.trainingOutputFolder), trainingFolder=folder, scenePairs=self.scenePairs or None,
                    checkpoint=self._checkpointPath(), iterations=p.trainingIterations,
                    learningRate=p.learningRate, batchSize=p.batchSize, resume=p.resumeTraining, device=p.device,
                    progress=progress, shouldStop=shouldStop)
                self.lastFineTune = out
                # The new model becomes the registration model (and stays in the path's history).
                p.checkpointPath = pathlib.Path(out.checkpoint)
                self.ui.modelPathLineEdit.addCurrentPathToHistory()
                self.ui.trainingStatusLabel.text = _("{status} at step {steps}; model {path} is selected for "
                                                     "registration").format(status=out.summary["status"],
                                                                            steps=out.summary["steps"],
                                                                            path=out.checkpoint)
        finally:
            self._setBusy(False, training=True)

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

    Console example::

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

    # -- dependencies -------------------------------------------------------------------------------------
    @staticmethod
    def missingPackages() -> List[str]:
        """pip requirements of the backend's packages that cannot be imported (PyTorch excluded)."""
        import importlib.util
        return [req for name, req in REQUIRED_PACKAGES.items() if importlib.util.find_spec(name) is None]

    @staticmethod
    def torchAvailable() -> bool:
        import importlib.util
        return importlib.util.find_spec("torch") is not None

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Make PyTorch (through the PyTorch extension) and the other packages importable.

        Returns False when the user declines an installation; raises DependencyError with instructions when
        a package cannot be installed from here.
        """
        if not self.torchAvailable():
            try:
                import PyTorchUtils  # provided by the PyTorch extension
            except ImportError:
                raise DependencyError(
                    "PyTorch is needed. Install the 'PyTorch' extension with the Extensions Manager, restart "
                    "Slicer, then run again (it installs the PyTorch build that suits your GPU driver).") from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                torch = torchLogic.installTorch(askConfirmation=askConfirmation)
                if torch is None:
                    return False
        missing = self.missingPackages()
        if missing:
            message = ("ACSG Registration needs these Python packages: " + ", ".join(missing)
                       + ". Install them now with pip? (This may take a few minutes.)")
            if askConfirmation and _hasGui() and not slicer.util.confirmOkCancelDisplay(message):
                return False
            if not hasattr(slicer.util, "pip_install"):
                raise DependencyError("missing Python packages: " + ", ".join(missing))
            slicer.util.pip_install(" ".join(missing))
            still = self.missingPackages()
            if still:
                raise DependencyError("could not install: " + ", ".join(still) + "; see the Python console")
        return True

    # -- model ------------------------------------------------------------------------------------------
    @staticmethod
    def resolveCheckpoint(checkpoint=None) -> str:
        """The checkpoint file to use; the shipped model when none is given. Raises when there is none."""
        path = DEFAULT_MODEL_PATH if _isUnset(checkpoint) else os.path.expanduser(str(checkpoint))
        if not os.path.isfile(path):
            if path == DEFAULT_MODEL_PATH:
                raise InputError(f"the shipped model is not installed ({DEFAULT_MODEL_PATH}): choose a "
                                 "checkpoint file (.pt) under Model")
            raise InputError(f"checkpoint not found: {path}")
        return path

    @staticmethod
    def describeModel(checkpoint=None) -> str:
        """One line for the panel about the chosen model (no file is loaded)."""
        isDefault = _isUnset(checkpoint) or os.path.abspath(str(checkpoint)) == os.path.abspath(DEFAULT_MODEL_PATH)
        path = DEFAULT_MODEL_PATH if isDefault else str(checkpoint)
        if not os.path.isfile(path):
            if isDefault:
                return _("The shipped model is not installed: choose a checkpoint file (.pt).")
            return _("File not found: choose a checkpoint file (.pt).")
        size = os.path.getsize(path) / 1e6
        what = _("shipped model") if isDefault else os.path.basename(path)
        return f"{what} ({size:.1f} MB)"

    def registrar(self, checkpoint=None, device: str = "auto", refineSteps: int = 0):
        """A Registrar for this checkpoint and device, loaded once and reused (the file's time is checked)."""
        from ACSGRegistrationLib.registrar import Registrar
        path = self.resolveCheckpoint(checkpoint)
        key = (os.path.realpath(path), os.path.getmtime(path), device)
        registrar = self._registrars.get(key)
        if registrar is None:
            self._registrars = {}  # one model in memory at a time
            registrar = Registrar(path, device=device)
            self._registrars[key] = registrar
        registrar.refine_steps = int(refineSteps)
        return registrar

    # -- labels -----------------------------------------------------------------------------------------
    @staticmethod
    def _labelmapNames(labelmapNode) -> Dict[int, str]:
        """Label value -> name: from the labelmap's colour table, else the level names of the label convention
        that fits its centroids (the backend's rule for label map files, so that "L1" means the same here)."""
        display = labelmapNode.GetDisplayNode()
        color = display.GetColorNode() if display is not None else None
        if color is not None and color.GetSingletonTag():
            color = None  # a built-in default table (generic anatomy names): its names do not describe these labels
        values = np.unique(slicer.util.arrayFromVolume(labelmapNode))
        names = {}
        for v in values:
            if v == 0:
                continue
            name = color.GetColorName(int(v)) if color is not None and int(v) < color.GetNumberOfColors() else ""
            names[int(v)] = "" if name in (None, "(none)", "invalid") else name
        if len(names) > 1 and not any(names.values()):
            from ACSGRegistrationLib.preprocessing import label_centroids
            from ACSGRegistrationLib.vertebrae import convention_names
            levels = convention_names(label_centroids(volumeNodeToImage(labelmapNode)))
            names = {v: levels.get(v, "") for v in names}
        return names

    def labelChoices(self, segmentationNode) -> List[str]:
        """Texts offered in the panel's vertebra list: segment names, or 'value: name' for labelmaps."""
        if segmentationNode is None:
            return []
        if segmentationNode.IsA("vtkMRMLSegmentationNode"):
            seg = segmentationNode.GetSegmentation()
            return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
        if segmentationNode.GetImageData() is None:
            return []
        return [f"{v}: {n}" if n else str(v) for v, n in self._labelmapNames(segmentationNode).items()]

    def matchesChoice(self, text, choices) -> bool:
        return str(text) in choices

    def sameLevelChoice(self, text, choices) -> Optional[str]:
        from ACSGRegistrationLib.vertebrae import level_of
        level = level_of(text)
        if level is None:
            return None
        hits = [c for c in choices if level_of(c) == level]
        return hits[0] if len(hits) == 1 else None

    def resolveLabel(self, segmentationNode, label, what: str):
        """(segment ID or label value, readable name) of the vertebra ``label`` in a segmentation or labelmap:
        a segment ID or name, a level ("L1" matches "vertebrae_L1"), a label value, or None when there is a
        single segment or label (the backend's ``vertebrae.resolve_vertebra``)."""
        from ACSGRegistrationLib.vertebrae import resolve_vertebra
        owner = f"'{segmentationNode.GetName()}'"
        if segmentationNode.IsA("vtkMRMLSegmentationNode"):
            seg = segmentationNode.GetSegmentation()
            ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
            choices = {sid: seg.GetSegment(sid).GetName() for sid in ids}
            return resolve_vertebra(choices, label, what, "segmentation", owner, kind="segment")
        return resolve_vertebra(self._labelmapNames(segmentationNode), label, what, "labelmap", owner)

    def labelImage(self, segmentationNode, label, referenceVolume, what: str):
        """(binary SimpleITK mask of the chosen vertebra, its name); the segmentation node is left as it is."""
        import SimpleITK as sitk
        key, name = self.resolveLabel(segmentationNode, label, what)
        if segmentationNode.IsA("vtkMRMLSegmentationNode"):
            scene = segmentationNode.GetScene()
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__ACSGRegistration_temp__")
            try:
                ids = vtk.vtkStringArray()
                ids.InsertNextValue(key)
                ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentationNode, ids, labelmap, referenceVolume)
                if not ok or labelmap.GetImageData() is None:
                    raise InputError(f"could not export segment '{name}' of '{segmentationNode.GetName()}'")
                image = volumeNodeToImage(labelmap)
            finally:
                self._removeNode(labelmap)
            value = 1
        else:
            image = volumeNodeToImage(segmentationNode)
            value = int(key)
        binary = sitk.Cast(image == value, sitk.sitkUInt8)
        if not np.any(sitk.GetArrayViewFromImage(binary)):
            raise InputError(f"the {what} vertebra '{name}' is empty")
        return binary, name

    @staticmethod
    def _removeNode(node):
        if node is None or node.GetScene() is None:
            return
        scene = node.GetScene()
        if node.IsA("vtkMRMLDisplayableNode"):
            for i in range(node.GetNumberOfDisplayNodes()):
                display = node.GetNthDisplayNode(i)
                if display is not None:
                    scene.RemoveNode(display)
        storage = node.GetStorageNode() if node.IsA("vtkMRMLStorableNode") else None
        if storage is not None:
            scene.RemoveNode(storage)
        scene.RemoveNode(node)

    # -- inputs -----------------------------------------------------------------------------------------
    def checkInputs(self, fixedVolume, movingVolume, fixedSegmentation=None, movingSegmentation=None,
                    outputs: Optional[Dict] = None):
        """Raise InputError with a readable message for missing, wrong or conflicting inputs."""
        for node, what in ((fixedVolume, "fixed volume"), (movingVolume, "moving volume")):
            if node is None:
                raise InputError(f"no {what}: select one")
            if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise InputError(f"the {what} '{node.GetName()}' must be a scalar volume (not {node.GetClassName()})")
            if node.GetImageData() is None:
                raise InputError(f"the {what} '{node.GetName()}' has no image data")
        for node, what in ((fixedSegmentation, "fixed segmentation"), (movingSegmentation, "moving segmentation")):
            if node is not None and not (node.IsA("vtkMRMLSegmentationNode") or node.IsA("vtkMRMLLabelMapVolumeNode")):
                raise InputError(f"the {what} '{node.GetName()}' must be a segmentation or a labelmap volume")
        if (fixedSegmentation is None) != (movingSegmentation is None):
            given = "fixed" if fixedSegmentation is not None else "moving"
            raise InputError(f"only the {given} volume has a segmentation: give one for both (whole scans, the "
                             "vertebra is cropped) or for neither (the volumes are ready vertebra crops)")
        self.checkOutputs([fixedVolume, movingVolume, fixedSegmentation, movingSegmentation], outputs or {})

    @staticmethod
    def checkOutputs(inputs: Sequence, outputs: Dict) -> None:
        """Outputs must be distinct nodes, none an input and none a transform that an input sits under (filling
        it would move that input)."""
        inputs = [n for n in inputs if n is not None]
        names = {n.GetID(): n.GetName() for n in inputs}
        parents = {}
        for node in inputs:
            parent = node.GetParentTransformNode() if hasattr(node, "GetParentTransformNode") else None
            while parent is not None and parent.GetID() not in parents:
                parents[parent.GetID()] = node.GetName()
                parent = parent.GetParentTransformNode()
        given = {}
        for key, node in outputs.items():
            if node is None:
                continue
            if node.GetID() in names:
                raise InputError(f"the {key} output is the input '{names[node.GetID()]}': inputs are never "
                                 "overwritten; choose another node or 'Create new'")
            if node.GetID() in given:
                raise InputError(f"the node '{node.GetName()}' is chosen both as the {given[node.GetID()]} and the "
                                 f"{key} output: one would overwrite the other; choose another node or 'Create new'")
            given[node.GetID()] = key
            if node.GetID() in parents:
                raise InputError(f"the {key} output '{node.GetName()}' is a transform that the input "
                                 f"'{parents[node.GetID()]}' is under: filling it would move that input; choose "
                                 "another node or 'Create new'")

    def prepareInput(self, volume, segmentation=None, label=None, what: str = "fixed") -> PreparedInput:
        """The crop of the chosen vertebra (or the whole volume as a ready crop when there is no segmentation),
        by the backend's input rules (``ACSGRegistrationLib.inputs.prepare_input``)."""
        from ACSGRegistrationLib.inputs import prepare_input
        source = volumeNodeToImage(volume, np.float32)
        if min(source.GetSize()) < 2:
            raise InputError(f"the {what} volume '{volume.GetName()}' is not 3D (size {source.GetSize()})")
        if segmentation is None:
            return PreparedInput.of(volume, prepare_input(source, what=what))
        mask, name = self.labelImage(segmentation, label, volume, what)
        prepared = prepare_input(source, mask, 1, what, {1: name}, f"'{segmentation.GetName()}'", "segmentation",
                                 self.cropSize, self.cropSpacing)
        return PreparedInput.of(volume, prepared)

    # -- registration -------------------------------------------------------------------------------------
    def register(self, fixedVolume, movingVolume, fixedSegmentation=None, movingSegmentation=None,
                 fixedLabel=None, movingLabel=None, checkpoint=None, device: str = "auto", refineSteps: int = 0,
                 warpedVolume=None, transform=None, jacobian=None, warpedSegmentation=None, metricsTable=None,
                 show: bool = True, progress: Optional[Callable[[float, str], None]] = None,
                 shouldStop: Optional[Callable[[], bool]] = None, name: Optional[str] = None) -> RegistrationOutput:
        """Register the moving vertebra to the fixed one and create (or fill the given) output nodes.

        Whole scans need both segmentations (segmentation or labelmap nodes) and the vertebra in each
        (segment name, level such as "L1", or label value; may be omitted when there is only one). Without
        segmentations the volumes are taken as ready vertebra crops. Inputs are never modified.
        """
        t0 = time.perf_counter()
        report = progress or (lambda fraction, message: None)
        outputs = {"warped volume": warpedVolume, "transform": transform, "Jacobian": jacobian,
                   "warped segmentation": warpedSegmentation, "metrics table": metricsTable}
        self.checkInputs(fixedVolume, movingVolume, fixedSegmentation, movingSegmentation, outputs)
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
        from ACSGRegistrationLib.inference import describe
        report(0.15 if not refineSteps else 0.1, _("Registering on {device} ({precision})...").format(
            device=registrar.device, precision=describe(registrar.engine)))
        result = registrar.register(fixed.image, moving.image, fixed.label, moving.label)
        report(0.85, _("Creating the output nodes..."))
        output = self.createOutputNodes(result, fixed, moving, warpedVolume, transform, jacobian,
                                        warpedSegmentation, metricsTable, name)
        output.notes = fixed.notes + moving.notes + list(result.notes)
        del result
        registrar.release_memory()  # what the registration freed goes back to the system, not kept in Slicer
        output.seconds = time.perf_counter() - t0
        if show:
            self.showResults(output)
        report(1.0, self.summaryText(output))
        return output

    def createOutputNodes(self, result, fixed: PreparedInput, moving: PreparedInput, warpedVolume=None,
                          transform=None, jacobian=None, warpedSegmentation=None, metricsTable=None,
                          name: Optional[str] = None, deformation=None) -> RegistrationOutput:
        import SimpleITK as sitk
        from ACSGRegistrationLib.metrics import folding
        scene = fixed.volume.GetScene() or slicer.mrmlScene
        base = name or f"{moving.volume.GetName()}{' ' + moving.name if moving.name else ''} to " \
                       f"{fixed.volume.GetName()}{' ' + fixed.name if fixed.name else ''}"

        def newNode(className, suffix):
            return scene.AddNewNodeByClass(className, scene.GenerateUniqueName(f"{base} {suffix}"))

        # Warped volume: the moving volume's own intensities resampled through the transform onto the fixed
        # crop's grid (exactly what Slicer shows when the moving volume is placed under the transform node).
        reference = result.fixed
        background = float(sitk.GetArrayViewFromImage(moving.source).min())
        warped = sitk.Resample(moving.source, reference, result.forward_transform(), sitk.sitkLinear, background,
                               sitk.sitkFloat32)
        warpedVolume = warpedVolume or newNode("vtkMRMLScalarVolumeNode", "warped")
        updateVolumeNodeFromImage(warpedVolume, warped)
        warpedVolume.CreateDefaultDisplayNodes()
        movingDisplay = moving.volume.GetDisplayNode()
        if movingDisplay is not None and warpedVolume.GetDisplayNode() is not None:
            wl = warpedVolume.GetDisplayNode()
            wl.SetAndObserveColorNodeID(movingDisplay.GetColorNodeID())
            wl.AutoWindowLevelOff()
            wl.SetWindowLevel(movingDisplay.GetWindow(), movingDisplay.GetLevel())

        # Transform: the affine and the deformable part composed (fixed -> moving, RAS), valid on the whole scan.
        transform = transform or newNode("vtkMRMLTransformNode", "transform")
        transform.SetAndObserveTransformFromParent(compositeTransformFromResult(result))
        transform.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole(), moving.volume.GetID())
        transform.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole(), fixed.volume.GetID())
        # Grid display prepared, but off: the whole transform carries the (often large) offset between the
        # two scans, which a grid drawn in the fixed space cannot show; the deformation node below is drawn.
        self._gridDisplay(transform, warpedVolume, visible=False)

        # The deformable part alone (fixed space, displacements of a few mm), for the deformation grid in the
        # slice views: the same part of the transform that the Jacobian map describes.
        deformation = deformation or transform.GetNodeReference(DEFORMATION_REFERENCE) \
            or newNode("vtkMRMLGridTransformNode", "deformation")
        deformation.SetAndObserveTransformFromParent(gridTransformFromField(result.deformable_field()))
        transform.SetNodeReferenceID(DEFORMATION_REFERENCE, deformation.GetID())
        self._gridDisplay(deformation, warpedVolume, visible=True)

        # Jacobian determinant of the deformable part, coloured around 1.
        jacobian = jacobian or newNode("vtkMRMLScalarVolumeNode", "Jacobian")
        updateVolumeNodeFromImage(jacobian, sitk.Cast(result.jacobian, sitk.sitkFloat32))
        self.setJacobianDisplay(jacobian)

        # Warped segmentation.
        if result.warped_label is not None:
            segName = f"{moving.name or 'vertebra'} (warped)"
            warpedSegmentation = self._labelOutput(result.warped_label, warpedSegmentation, newNode,
                                                   moving.volume, segName)
        else:
            warpedSegmentation = None

        folds = folding(sitk.GetArrayViewFromImage(result.jacobian))
        if result.metrics is not None:
            metricsTable = metricsTable or newNode("vtkMRMLTableNode", "metrics")
            self.fillMetricsTable(metricsTable, result.metrics)
        else:
            metricsTable = None
        return RegistrationOutput(fixed.volume, moving.volume, warpedVolume, transform, jacobian, warpedSegmentation,
                                  metricsTable, result.metrics, folds, result, deformation=deformation)

    @staticmethod
    def _gridDisplay(transformNode, regionNode, visible):
        transformNode.CreateDefaultDisplayNodes()
        display = transformNode.GetDisplayNode()
        display.SetVisualizationMode(slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
        display.SetAndObserveRegionNode(regionNode)
        display.SetGridSpacingMm(8.0)
        display.SetGridScalePercent(100.0)
        display.SetVisibility2D(True)
        display.SetVisibility3D(False)
        display.SetVisibility(bool(visible))
        return display

    def _labelOutput(self, labelImage, node, newNode, movingVolume, segmentName):
        import SimpleITK as sitk
        binary = sitk.Cast(labelImage > 0, sitk.sitkUInt8)
        wantSegmentation = node is None or node.IsA("vtkMRMLSegmentationNode")
        labelmap = node if (node is not None and node.IsA("vtkMRMLLabelMapVolumeNode")) else None
        temporary = labelmap is None
        if labelmap is None:
            scene = movingVolume.GetScene() or slicer.mrmlScene
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__ACSGRegistration_temp__")
        updateVolumeNodeFromImage(labelmap, binary)
        labelmap.CreateDefaultDisplayNodes()
        if not wantSegmentation:
            return labelmap
        try:
            segmentation = node or newNode("vtkMRMLSegmentationNode", "warped segmentation")
            segmentation.GetSegmentation().RemoveAllSegments()
            segmentation.CreateDefaultDisplayNodes()
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
            if not ok:
                raise RuntimeError("could not create the warped segmentation")
            seg = segmentation.GetSegmentation()
            if seg.GetNumberOfSegments() > 0:
                segment = seg.GetNthSegment(0)
                segment.SetName(segmentName)
                segment.SetColor(0.1, 0.8, 0.9)
            # Outline only, so that the warped volume stays visible under it.
            segmentation.GetDisplayNode().SetVisibility2DFill(False)
            segmentation.GetDisplayNode().SetSliceIntersectionThickness(2)
            return segmentation
        finally:
            if temporary:
                self._removeNode(labelmap)

    @staticmethod
    def fillMetricsTable(tableNode, metrics: Dict[str, Dict[str, float]]):
        """Rows: stages (initial, affine, final); columns: Dice, precision, recall, ASSD (mm), folding."""
        columns = [("dice", "Dice"), ("precision", "precision"), ("recall", "recall"), ("assd_mm", "ASSD (mm)"),
                   ("nonpositive_jacobian_percent", "% |J|<=0")]
        table = tableNode.GetTable()
        wasModifying = tableNode.StartModify()
        tableNode.RemoveAllColumns()
        stage = vtk.vtkStringArray()
        stage.SetName("stage")
        arrays = [stage]
        for key, title in columns:
            a = vtk.vtkDoubleArray()
            a.SetName(title)
            arrays.append(a)
        for stageName, row in metrics.items():
            stage.InsertNextValue(stageName)
            for (key, _title), a in zip(columns, arrays[1:]):
                value = row.get(key)
                a.InsertNextValue(float("nan") if value is None else float(value))
        for a in arrays:
            table.AddColumn(a)
        tableNode.SetUseColumnTitleAsColumnHeader(True)
        tableNode.Modified()
        tableNode.EndModify(wasModifying)
        return tableNode

    # -- display ----------------------------------------------------------------------------------------
    def jacobianColorNode(self, scene=None):
        """A diverging colour table for the Jacobian map, window [0, 2]: blue below 1 (compression), white at
        1, red above (expansion); the first entry (|J| <= 0, folding) is bright green. One per scene."""
        scene = scene or slicer.mrmlScene
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
            node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
            if node.GetAttribute(JACOBIAN_COLOR_TAG) == "1" and node.GetNumberOfColors() == 256:
                return node
        node = slicer.vtkMRMLColorTableNode()
        node.SetName(scene.GenerateUniqueName("ACSG Jacobian (diverging at 1)"))
        node.SetTypeToUser()
        n = 256
        node.SetNumberOfColors(n)
        node.GetLookupTable().SetTableRange(0.0, 2.0)
        blue, white, red = np.array([0.05, 0.25, 0.85]), np.array([1.0, 1.0, 1.0]), np.array([0.85, 0.05, 0.05])
        for i in range(n):
            value = (i + 0.5) * 2.0 / n
            if i == 0:
                rgb, name = (0.0, 1.0, 0.0), "folding (|J| <= 0)"
            else:
                t = min(abs(value - 1.0), 1.0)
                rgb = tuple(white + t * ((blue if value < 1.0 else red) - white))
                name = f"{value:.3f}"
            node.SetColor(i, name, *rgb, 1.0)
        node.SetAttribute(JACOBIAN_COLOR_TAG, "1")
        scene.AddNode(node)
        return node

    def setJacobianDisplay(self, jacobianNode):
        jacobianNode.CreateDefaultDisplayNodes()
        display = jacobianNode.GetDisplayNode()
        display.SetAndObserveColorNodeID(self.jacobianColorNode(jacobianNode.GetScene()).GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 2.0)
        display.SetInterpolate(False)
        legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(jacobianNode)
        if legend is None:
            legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(jacobianNode)
        if legend is not None:
            legend.SetTitleText("det J")
            legend.SetLabelFormat("%.1f")
            legend.SetUseColorNamesForLabels(False)
            legend.SetVisibility(False)  # shown with the map
        return display

    def showResults(self, output: RegistrationOutput, foreground: str = "warped volume", opacity: float = 0.5,
                    showGrid: bool = True, showWarpedSegmentation: bool = True, showColorLegend: bool = True,
                    centre: bool = True):
        """Fixed volume in the background, the warped volume or the Jacobian map in the foreground, the
        deformation grid and the warped segmentation on top; slice views centred on the vertebra."""
        if foreground not in FOREGROUND_CHOICES:
            raise ValueError(f"foreground must be one of {', '.join(FOREGROUND_CHOICES)}")
        scene = output.fixedVolume.GetScene()
        front = {"warped volume": output.warpedVolume, "Jacobian map": output.jacobian}.get(foreground)
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            composite.SetBackgroundVolumeID(output.fixedVolume.GetID())
            composite.SetForegroundVolumeID(front.GetID() if front is not None else None)
            composite.SetForegroundOpacity(float(opacity))
        gridNode = output.deformation if output.deformation is not None else output.transform
        if gridNode is not None and gridNode.GetDisplayNode() is not None:
            gridNode.GetDisplayNode().SetVisibility(bool(showGrid))
        if output.warpedSegmentation is not None:
            if output.warpedSegmentation.IsA("vtkMRMLSegmentationNode"):
                output.warpedSegmentation.CreateDefaultDisplayNodes()
                output.warpedSegmentation.GetDisplayNode().SetVisibility(bool(showWarpedSegmentation))
            else:
                for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
                    composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                    composite.SetLabelVolumeID(output.warpedSegmentation.GetID() if showWarpedSegmentation else None)
        legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(output.jacobian) if output.jacobian else None
        if legend is not None:
            legend.SetVisibility(bool(showColorLegend and front is output.jacobian and front is not None))
        if not centre:
            return
        # Centre the slice views on the crop.
        bounds = [0.0] * 6
        output.warpedVolume.GetRASBounds(bounds)
        middle = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
            scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").JumpSliceByCentering(*middle)

    @staticmethod
    def summaryText(output: RegistrationOutput) -> str:
        parts = [f"Registered in {output.seconds:.1f} s"]
        if output.metrics:
            init, final = output.metrics.get("initial", {}), output.metrics.get("final", {})
            parts.append(f"Dice {init.get('dice', float('nan')):.3f} -> {final.get('dice', float('nan')):.3f}")
            if final.get("assd_mm") is not None:
                parts.append(f"ASSD {final['assd_mm']:.2f} mm")
        if output.folding:
            parts.append(f"{output.folding['nonpositive_jacobian_percent']:.3f}% voxels with |J| <= 0")
        text = "; ".join(parts)
        if output.notes:
            text += "\n" + "\n".join(output.notes)
        return text

    # -- batch ------------------------------------------------------------------------------------------
    @staticmethod
    def _pairArgs(pair) -> Dict:
        keys = ("fixed", "moving", "fixedSegmentation", "movingSegmentation", "fixedLabel", "movingLabel")
        if isinstance(pair, dict):
            unknown = set(pair) - set(keys) - {"name"}
            if unknown:
                raise ValueError(f"unknown pair key(s) {', '.join(sorted(unknown))}; use {', '.join(keys)}")
            return dict(pair)
        values = tuple(pair)
        if not 2 <= len(values) <= 6:
            raise ValueError("a pair is (fixed, moving[, fixedSegmentation, movingSegmentation, fixedLabel, "
                             "movingLabel]) or a dict with those keys")
        return dict(zip(keys, values))

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
            a = self._pairArgs(pair)
            outputs.append(self.register(a["fixed"], a["moving"], a.get("fixedSegmentation"),
                                         a.get("movingSegmentation"), a.get("fixedLabel"), a.get("movingLabel"),
                                         checkpoint=checkpoint, device=device, refineSteps=refineSteps,
                                         show=show and k == len(pairs) - 1, shouldStop=shouldStop,
                                         name=a.get("name")))
            if progress is not None:
                progress(k + 1, len(pairs))
        return outputs

    def loadVolumeFile(self, path: str, labelmap: bool = False, name: Optional[str] = None):
        """A volume node from an image file (read with SimpleITK; LPS -> RAS) in the current scene."""
        from ACSGRegistrationLib.io import read_image
        image = read_image(path, "label map" if labelmap else "image")
        className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
        base = name or os.path.basename(path).split(".")[0]
        node = slicer.mrmlScene.AddNewNodeByClass(className, slicer.mrmlScene.GenerateUniqueName(base))
        updateVolumeNodeFromImage(node, image)
        node.CreateDefaultDisplayNodes()
        return node

    def registerFiles(self, pairs: Sequence, outputFolder: Optional[str] = None, checkpoint=None,
                      device: str = "auto", refineSteps: int = 0, keepNodes: bool = True, stopOnError: bool = True,
                      progress: Optional[Callable[[int, int], None]] = None) -> List[Dict]:
        """Register pairs of files. Each pair is a dict with ``fixed``, ``moving`` (image paths) and optionally
        ``fixedSegmentation``, ``movingSegmentation`` (label map paths), ``fixedLabel``, ``movingLabel``,
        ``name``. With ``outputFolder`` every pair's outputs (warped image and label, transforms, Jacobian,
        metrics) are written to ``outputFolder/<name>`` and a ``metrics.csv`` summarises the batch.

        Returns one dict per pair: ``name``, ``metrics``, ``folding``, ``seconds``, ``paths`` (files written),
        ``output`` (the RegistrationOutput; its nodes are removed from the scene when ``keepNodes`` is False)
        and ``error`` (None, or the message of a pair that failed when ``stopOnError`` is False).
        """
        rows = []
        for k, pair in enumerate(pairs):
            a = self._pairArgs(pair)
            name = a.get("name") or f"{k:03d}_" + os.path.basename(str(a["moving"])).split(".")[0] + "_to_" \
                + os.path.basename(str(a["fixed"])).split(".")[0]
            loaded, output = {}, None
            try:
                loaded["fixed"] = self.loadVolumeFile(a["fixed"])
                loaded["moving"] = self.loadVolumeFile(a["moving"])
                for key in ("fixedSegmentation", "movingSegmentation"):
                    if a.get(key):
                        loaded[key] = self.loadVolumeFile(a[key], labelmap=True)
                output = self.register(loaded["fixed"], loaded["moving"], loaded.get("fixedSegmentation"),
                                       loaded.get("movingSegmentation"), a.get("fixedLabel"), a.get("movingLabel"),
                                       checkpoint=checkpoint, device=device, refineSteps=refineSteps, show=False,
                                       name=name)
                paths = output.result.save(os.path.join(outputFolder, name)) if outputFolder else {}
                rows.append({"name": name, "metrics": output.metrics, "folding": output.folding,
                             "seconds": output.seconds, "paths": paths, "output": output, "error": None})
            except Exception as exc:
                if stopOnError:
                    raise
                logging.error(f"ACSGRegistration: pair {name} failed: {exc}")
                rows.append({"name": name, "metrics": None, "folding": None, "seconds": 0.0, "paths": {},
                             "output": None, "error": str(exc)})
            finally:
                if not keepNodes:
                    for node in list(loaded.values()) + (list(output.nodes().values()) if output else []):
                        self._removeNode(node)
            if progress is not None:
                progress(k + 1, len(pairs))
        if outputFolder:
            self._writeBatchTable(rows, os.path.join(outputFolder, "metrics.csv"))
        return rows

    @staticmethod
    def _writeBatchTable(rows, path):
        """The batch's metrics.csv, in the schema of every metrics table (``metrics.table_row``)."""
        from ACSGRegistrationLib.geometry import write_csv
        from ACSGRegistrationLib.metrics import table_row
        table = [table_row(r["metrics"], r["folding"], name=r["name"], seconds=round(r["seconds"], 3),
                           error=r.get("error") or "") for r in rows]
        write_csv(table, path)  # atomic, like every other output

    # -- fine-tuning ------------------------------------------------------------------------------------
    def trainingDataset(self, modelConfig, trainingFolder=None, scenePairs=None, workFolder=None):
        """Training pairs on the model's grid from a folder (a crops folder with crops.csv, a manifest CSV, or a
        VerSe / TotalSegmentator / AbdomenAtlas folder, cropped into ``workFolder``) and/or pairs of the scene
        (cropped by the registration's input rules and written to ``workFolder/scene_crops``)."""
        from ACSGRegistrationLib.datasets import CropRecord, PairDataset, make_pairs, write_crop, write_index
        from ACSGRegistrationLib.readers import crop_records
        workFolder = workFolder or tempfile.mkdtemp(prefix="acsg-crops-")
        records, pairs = [], []
        if trainingFolder:
            folder = os.path.expanduser(str(trainingFolder))
            records = [r for r in crop_records(folder, workFolder) if r.image]
            if len(records) < 2:
                raise InputError(f"{folder}: fewer than two crops with an image; fine-tuning needs image pairs")
            pairs = make_pairs(records) or make_pairs(records, mode="all")
        sceneRecords = []
        for k, pair in enumerate(scenePairs or []):
            a = self._pairArgs(pair)
            self.checkInputs(a["fixed"], a["moving"], a.get("fixedSegmentation"), a.get("movingSegmentation"))
            first = len(records) + len(sceneRecords)
            for side in ("fixed", "moving"):
                prepared = self.prepareInput(a[side], a.get(side + "Segmentation"), a.get(side + "Label"), side)
                name = f"scene{k:03d}_{side}"
                image, label = write_crop(os.path.join(workFolder, "scene_crops"), name, prepared.image,
                                          prepared.label)
                sceneRecords.append(CropRecord(name, name, prepared.name, image, label))
            pairs += [(first, first + 1), (first + 1, first)]  # both directions
        if sceneRecords:
            write_index(os.path.join(workFolder, "scene_crops"), sceneRecords)
        if not pairs:
            raise InputError("no training pairs: choose a training data folder or add pairs from the scene")
        return PairDataset(records + sceneRecords, pairs, grid=(modelConfig.input_shape, modelConfig.input_spacing))

    def _newLossChart(self, title: str):
        scene = slicer.mrmlScene
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{title} loss"))
        for name in ("step", "total loss"):
            a = vtk.vtkDoubleArray()
            a.SetName(name)
            table.GetTable().AddColumn(a)
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{title} loss"))
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("step")
        series.SetYColumnName("total loss")
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        series.SetColor(0.85, 0.2, 0.1)
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{title} loss"))
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        chart.SetTitle(f"{title}: training loss")
        chart.SetXAxisTitle("step")
        chart.SetYAxisTitle("loss")
        self.lossTable, self.lossChart = table, chart
        return table, chart

    @staticmethod
    def _appendLoss(table, step, loss):
        t = table.GetTable()
        row = t.InsertNextBlankRow()
        t.SetValue(row, 0, vtk.vtkVariant(float(step)))
        t.SetValue(row, 1, vtk.vtkVariant(float(loss)))
        t.Modified()
        table.Modified()

    def fineTune(self, outputFolder: str, trainingFolder=None, scenePairs=None, checkpoint=None,
                 iterations: int = 200, learningRate: float = 1e-5, batchSize: int = 2, resume: bool = True,
                 device: str = "auto", useLabels: bool = True,
                 progress: Optional[Callable[[int, int, Dict[str, float]], None]] = None,
                 shouldStop: Optional[Callable[[], bool]] = None, lossChart: bool = True) -> FineTuneOutput:
        """Continue training ``checkpoint`` (the shipped model by default) on a folder of data and/or pairs
        of the scene. ``iterations`` is the run's total number of steps: with ``resume`` an interrupted run in
        ``outputFolder`` continues where it stopped. Progress and the loss curve (a plot chart node) are
        updated at every step; ``shouldStop()`` stops after the current step, keeping the run resumable.
        """
        from ACSGRegistrationLib.checkpoint import load_checkpoint
        from ACSGRegistrationLib.config import TrainConfig
        from ACSGRegistrationLib.trainer import FINAL, LAST, Trainer
        outputFolder = os.path.expanduser(str(outputFolder))
        if _isUnset(outputFolder):
            raise InputError("choose an output folder for the fine-tuned model")
        os.makedirs(outputFolder, exist_ok=True)
        init = self.resolveCheckpoint(checkpoint)
        lastPath = os.path.join(outputFolder, LAST)
        source = lastPath if (resume and os.path.isfile(lastPath)) else init
        modelConfig = load_checkpoint(source)["model_config_obj"]
        dataset = self.trainingDataset(modelConfig, trainingFolder, scenePairs, outputFolder)
        cfg = TrainConfig(learning_rate=float(learningRate), batch_size=max(1, min(int(batchSize), len(dataset))),
                          max_steps=int(iterations), checkpoint_every=max(1, min(50, int(iterations) // 4 or 1)),
                          use_labels=bool(useLabels), num_workers=0)
        table = chart = None
        if lossChart:
            table, chart = self._newLossChart(os.path.basename(os.path.normpath(outputFolder)) or "fine-tune")

        def onStep(step, total, terms):
            if table is not None:
                self._appendLoss(table, step, terms.get("total", float("nan")))
            if progress is not None:
                progress(step, total, terms)

        trainer = Trainer(None, cfg, dataset, outputFolder, init_checkpoint=init, device=device, resume=resume,
                          progress=onStep, should_stop=shouldStop, log=logging.info)
        if table is not None:
            for row in trainer.history:  # a resumed run shows its whole curve
                self._appendLoss(table, row.get("step", 0), row.get("total", float("nan")))
        summary = trainer.train()
        final = os.path.join(outputFolder, FINAL)
        newCheckpoint = final if summary["status"] == "finished" and os.path.isfile(final) else lastPath
        return FineTuneOutput(summary, newCheckpoint, table, chart)


#
# ACSGRegistrationTest
#


class ACSGRegistrationTest(ScriptedLoadableModuleTest):
    """Self-test on synthetic vertebrae made here (nothing is downloaded): the logic, then the panel."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RegisterSyntheticVertebrae()
        self.setUp()
        self.test_InputErrors()
        self.setUp()
        self.test_BatchAndFineTune()
        self.setUp()
        self.test_ClickThrough()

    # -- data made by the test ----------------------------------------------------------------------------
    @staticmethod
    def syntheticVertebraArrays(shape=(56, 88, 88), spacing=(1.4, 1.4, 1.6), seed=0, labels=(20, 21)):
        """(CT array in HU, label array) of two stacked vertebra-like shapes (body, arch, spinous and
        transverse processes) in a (k, j, i) volume; index axes are in mm through ``spacing`` (i, j, k)."""
        rng = np.random.default_rng(seed)
        k, j, i = np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing[::-1])],
                              indexing="ij")
        x, y, z = i, j, k  # mm; x left-right, y front-back, z head-feet
        ct = np.full(shape, -900.0, dtype=np.float32)
        body = (x / 60.0) ** 2 + (y / 48.0) ** 2 <= 1.0  # soft tissue cylinder
        ct[body] = 20.0
        lab = np.zeros(shape, dtype=np.uint8)
        for n, (value, zc) in enumerate(zip(labels, (17.0, -17.0))):
            scale = 1.0 + rng.uniform(-0.08, 0.08)
            rx, ry, h = 21.0 * scale * rng.uniform(0.95, 1.05), 16.0 * scale, 11.0 * scale
            yc = -6.0 + rng.uniform(-1.5, 1.5)
            xc = rng.uniform(-1.5, 1.5)
            tilt = rng.uniform(-0.08, 0.08)
            zz = z - zc - tilt * y
            vbody = ((x - xc) / rx) ** 2 + ((y - yc) / ry) ** 2 <= 1.0
            vbody &= np.abs(zz) <= h
            r = np.sqrt((x - xc) ** 2 + (y - yc - ry - 9.0) ** 2)
            arch = (np.abs(r - 11.0) <= 3.2) & (y > yc + ry - 4.0) & (np.abs(zz) <= h * 0.6)
            spinous = (np.abs(x - xc) <= 3.0) & (y > yc + ry + 17.0) & (y < yc + ry + 36.0 * scale) \
                & (np.abs(zz + 3.0) <= h * 0.5)
            transverse = (np.abs(x - xc) <= 34.0 * scale) & (np.abs(y - yc - ry - 7.0) <= 3.0) & (np.abs(zz) <= 3.5)
            mask = vbody | arch | spinous | transverse
            lab[mask] = value
            shell = mask & ~(np.abs(zz) <= h - 2.0)
            ct[mask] = 230.0 + 30.0 * n
            ct[shell | arch | spinous | transverse] = 650.0
        ct += rng.normal(0.0, 15.0, size=shape).astype(np.float32)
        return ct, lab

    @staticmethod
    def addVolume(array, ijkToRas, name, className="vtkMRMLScalarVolumeNode"):
        node = slicer.mrmlScene.AddNewNodeByClass(className, name)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(ijkToRas, dtype=float)))
        slicer.util.updateVolumeFromArray(node, array)
        node.CreateDefaultDisplayNodes()
        return node

    @staticmethod
    def geometry(spacing, rotationDegrees=0.0, flip=(1, 1, 1), shape=(56, 88, 88), centre=(0.0, 0.0, 0.0)):
        """IJK-to-RAS matrix: axes scaled, flipped and rotated about the superior axis, centred on ``centre``."""
        a = np.deg2rad(rotationDegrees)
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        m = np.eye(4)
        m[:3, :3] = rot @ np.diag(np.asarray(flip, float) * np.asarray(spacing, float))
        half = (np.asarray(shape[::-1], float) - 1) / 2.0
        m[:3, 3] = np.asarray(centre, float) - m[:3, :3] @ half
        return m

    def createSyntheticScene(self):
        """Two 'patients': the fixed one with a segmentation node (segments L1, L2) on an oblique grid, the
        moving one with a labelmap (values 20 = L1, 21 = L2) on a flipped grid."""
        shape = (56, 88, 88)
        fixedCt, fixedLab = self.syntheticVertebraArrays(shape, (1.4, 1.4, 1.6), seed=1)
        movingCt, movingLab = self.syntheticVertebraArrays(shape, (1.3, 1.5, 1.6), seed=2)
        # The voxel axes of the arrays are x = left-right (R+), y = front-back (A-), z = head-feet (S+).
        fixedGeometry = self.geometry((1.4, -1.4, 1.6), rotationDegrees=12.0, shape=shape, centre=(10.0, -5.0, 40.0))
        movingGeometry = self.geometry((-1.3, -1.5, 1.6), flip=(-1, 1, 1), shape=shape, centre=(-30.0, 20.0, -60.0))
        fixedVolume = self.addVolume(fixedCt, fixedGeometry, "fixed CT")
        movingVolume = self.addVolume(movingCt, movingGeometry, "moving CT")
        fixedLabelmap = self.addVolume(fixedLab, fixedGeometry, "fixed labels", "vtkMRMLLabelMapVolumeNode")
        fixedSegmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "fixed segmentation")
        fixedSegmentation.CreateDefaultDisplayNodes()
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(fixedLabelmap, fixedSegmentation)
        seg = fixedSegmentation.GetSegmentation()
        for n, (level, rgb) in enumerate((("L1", (0.95, 0.8, 0.3)), ("L2", (0.45, 0.6, 0.95)))):
            seg.GetNthSegment(n).SetName(level)
            seg.GetNthSegment(n).SetColor(*rgb)
        fixedSegmentation.GetDisplayNode().SetVisibility2DFill(False)  # outlines
        ACSGRegistrationLogic._removeNode(fixedLabelmap)
        movingLabelmap = self.addVolume(movingLab, movingGeometry, "moving labels", "vtkMRMLLabelMapVolumeNode")
        # Named labels, like the colour tables that come with TotalSegmentator's or VerSe's label maps.
        colors = slicer.vtkMRMLColorTableNode()
        colors.SetTypeToUser()
        colors.SetNumberOfColors(22)
        colors.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
        for value in range(1, 22):
            colors.SetColor(value, f"label {value}", 0.5, 0.5, 0.5, 1.0)
        colors.SetColor(20, "vertebrae_L1", 0.9, 0.7, 0.3, 1.0)
        colors.SetColor(21, "vertebrae_L2", 0.3, 0.7, 0.9, 1.0)
        colors.SetName("synthetic vertebra labels")
        slicer.mrmlScene.AddNode(colors)
        movingLabelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
        return {"fixedVolume": fixedVolume, "movingVolume": movingVolume, "fixedSegmentation": fixedSegmentation,
                "movingSegmentation": movingLabelmap}

    @staticmethod
    def makeTinyModel(path, seed=0):
        """A tiny untrained ACSGRegNet (fast on a CPU) made to output a clear affine and deformation."""
        import torch
        from ACSGRegistrationLib.checkpoint import save_checkpoint
        from ACSGRegistrationLib.config import tiny_config
        from ACSGRegistrationLib.networks import RegistrationNet
        torch.manual_seed(seed)
        cfg = tiny_config("acsgregnet", (16, 32, 32))
        cfg.input_spacing = 4.0  # the paper's 128 x 128 x 64 mm crop on a 32 x 32 x 16 grid
        net = RegistrationNet(cfg)
        with torch.no_grad():
            net.affine.fc.bias.copy_(torch.tensor([[0.97, 0.06, 0.0, 0.8], [-0.06, 0.97, 0.03, -1.0],
                                                   [0.0, -0.03, 1.02, 0.5]]).flatten())
            net.deformable.decoder_self.head.weight.normal_(0, 2.5)  # a few mm of smooth deformation
        return save_checkpoint(str(path), net, cfg)

    def _tempFolder(self):
        if not hasattr(self, "_tmp"):
            self._tmp = tempfile.TemporaryDirectory(prefix="ACSGRegistrationTest-")
        return self._tmp.name

    def _model(self):
        path = os.path.join(self._tempFolder(), "tiny.pt")
        if not os.path.isfile(path):
            self.makeTinyModel(path)
        return path

    # -- tests ------------------------------------------------------------------------------------------
    def test_RegisterSyntheticVertebrae(self):
        self.delayDisplay("Registering synthetic vertebrae (logic)")
        data = self.createSyntheticScene()
        before = {k: (np.array(slicer.util.arrayFromVolume(v), copy=True), ijkToRasOfNode(v))
                  for k, v in data.items() if v.IsA("vtkMRMLVolumeNode")}
        logic = ACSGRegistrationLogic()
        out = logic.register(data["fixedVolume"], data["movingVolume"], data["fixedSegmentation"],
                             data["movingSegmentation"], "L1", "L1", checkpoint=self._model(), device="cpu")
        for node in (out.warpedVolume, out.transform, out.deformation, out.jacobian, out.warpedSegmentation,
                     out.metricsTable):
            self.assertIsNotNone(node)
            self.assertIsNotNone(node.GetScene())
        self.assertEqual(out.transform.GetDisplayNode().GetVisualizationMode(),
                         slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
        self.assertEqual(set(out.metrics), {"initial", "affine", "final"})
        self.assertEqual(out.metricsTable.GetNumberOfRows(), 3)
        jac = slicer.util.arrayFromVolume(out.jacobian)
        self.assertGreater(float(jac.std()), 1e-4)
        display = out.jacobian.GetDisplayNode()
        self.assertAlmostEqual(display.GetWindowLevelMin(), 0.0)
        self.assertAlmostEqual(display.GetWindowLevelMax(), 2.0)
        # The transform node moves fixed points where the backend's transform does (RAS = flipped LPS).
        forward = out.result.forward_transform()
        grid = out.transform.GetTransformFromParent()
        for p in ([0.0, 0.0, 0.0], [5.0, -8.0, 3.0]):
            centre = np.array(out.result.fixed.TransformContinuousIndexToPhysicalPoint(
                [(n - 1) / 2.0 for n in out.result.fixed.GetSize()]))
            lps = centre + np.array(p)
            expected = np.array(forward.TransformPoint(tuple(lps))) * [-1, -1, 1]
            got = np.array(grid.TransformPoint(list(lps * [-1, -1, 1])))
            self.assertLess(float(np.abs(got - expected).max()), 1e-3)
        for k, (array, matrix) in before.items():
            self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(data[k]), array), k)
            self.assertTrue(np.allclose(ijkToRasOfNode(data[k]), matrix), k)
        self.assertTrue(out.deformation.GetDisplayNode().GetVisibility())
        logic.showResults(out, foreground="Jacobian map", showGrid=False)
        self.assertFalse(out.deformation.GetDisplayNode().GetVisibility())
        self.delayDisplay("Registration of synthetic vertebrae passed")

    def test_InputErrors(self):
        self.delayDisplay("Error messages for bad inputs")
        data = self.createSyntheticScene()
        logic = ACSGRegistrationLogic()
        model = self._model()
        cases = [
            (dict(fixedVolume=None), "no fixed volume"),
            (dict(movingSegmentation=None), "only the fixed volume has a segmentation"),
            (dict(fixedLabel="L7"), "has no segment 'L7'"),
            (dict(movingLabel="99"), "label 99 is not in the moving labelmap"),
            (dict(fixedLabel=None), "choose the fixed vertebra"),
            (dict(warpedVolume=data["fixedVolume"]), "inputs are never overwritten"),
        ]
        for change, message in cases:
            args = dict(fixedVolume=data["fixedVolume"], movingVolume=data["movingVolume"],
                        fixedSegmentation=data["fixedSegmentation"], movingSegmentation=data["movingSegmentation"],
                        fixedLabel="L1", movingLabel="20", warpedVolume=None)
            args.update(change)
            with self.assertRaises(InputError) as caught:
                logic.register(args["fixedVolume"], args["movingVolume"], args["fixedSegmentation"],
                               args["movingSegmentation"], args["fixedLabel"], args["movingLabel"], checkpoint=model,
                               device="cpu", warpedVolume=args["warpedVolume"], show=False)
            self.assertIn(message, str(caught.exception))
        with self.assertRaises(InputError) as caught:
            logic.register(data["fixedVolume"], data["movingVolume"], checkpoint=os.path.join(model + ".missing"))
        self.assertIn("checkpoint not found", str(caught.exception))
        self.delayDisplay("Error messages passed")

    def test_BatchAndFineTune(self):
        self.delayDisplay("Batch registration and fine-tuning (logic)")
        data = self.createSyntheticScene()
        logic = ACSGRegistrationLogic()
        model = self._model()
        pairs = [(data["fixedVolume"], data["movingVolume"], data["fixedSegmentation"], data["movingSegmentation"],
                  "L1", "L1"),
                 dict(fixed=data["fixedVolume"], moving=data["movingVolume"],
                      fixedSegmentation=data["fixedSegmentation"],
                      movingSegmentation=data["movingSegmentation"], fixedLabel="L2", movingLabel="21", name="L2")]
        outs = logic.registerPairs(pairs, checkpoint=model, device="cpu")
        self.assertEqual(len(outs), 2)
        self.assertTrue(all(o.metrics["final"]["dice"] >= 0 for o in outs))
        runFolder = os.path.join(self._tempFolder(), "finetune")
        steps = []
        tuned = logic.fineTune(runFolder, scenePairs=pairs[:1], checkpoint=model, iterations=2, batchSize=2,
                               device="cpu", progress=lambda s, t, terms: steps.append(s))
        self.assertEqual(tuned.summary["status"], "finished")
        self.assertEqual(steps, [1, 2])
        self.assertTrue(os.path.isfile(tuned.checkpoint))
        self.assertEqual(tuned.lossTable.GetNumberOfRows(), 2)
        again = logic.register(data["fixedVolume"], data["movingVolume"], data["fixedSegmentation"],
                               data["movingSegmentation"], "L1", "L1", checkpoint=tuned.checkpoint, device="cpu",
                               show=False)
        self.assertIsNotNone(again.transform)
        self.delayDisplay("Batch and fine-tuning passed")

    def test_ClickThrough(self):
        """The panel as a user drives it: select inputs, Apply, toggle the display, fine-tune, new model."""
        if not _hasGui() or not hasattr(slicer, "modules") or not hasattr(slicer.modules, "acsgregistration"):
            self.delayDisplay("No Slicer GUI here: click-through test skipped")
            return
        self.delayDisplay("Click-through test of the panel")
        data = self.createSyntheticScene()
        slicer.util.selectModule("ACSGRegistration")
        widget = slicer.modules.acsgregistration.widgetRepresentation().self()
        p = widget._parameterNode
        p.checkpointPath = pathlib.Path(self._model())
        p.device = "cpu"
        p.fixedVolume = data["fixedVolume"]
        p.movingVolume = data["movingVolume"]
        p.fixedSegmentation = data["fixedSegmentation"]
        p.movingSegmentation = data["movingSegmentation"]
        p.fixedLabel = "L1"
        p.movingLabel = "20"
        self.assertTrue(widget.ui.applyButton.enabled)
        widget.ui.applyButton.click()
        out = widget.lastOutput
        self.assertIsNotNone(out)
        self.assertEqual(out.fixedVolume, data["fixedVolume"])
        self.assertIsNotNone(out.metricsTable)
        widget.ui.showGridCheckBox.checked = False
        self.assertFalse(out.deformation.GetDisplayNode().GetVisibility())
        widget.ui.showGridCheckBox.checked = True
        self.assertTrue(out.deformation.GetDisplayNode().GetVisibility())
        widget.ui.foregroundComboBox.currentIndex = FOREGROUND_CHOICES.index("Jacobian map")
        composite = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
        self.assertEqual(composite.GetForegroundVolumeID(), out.jacobian.GetID())
        # Fine-tune on the scene pair for two steps; the new model becomes the registration model.
        p.trainingOutputFolder = pathlib.Path(self._tempFolder()) / "panel-finetune"
        p.trainingIterations = 2
        p.resumeTraining = False
        widget.ui.addScenePairButton.click()
        self.assertEqual(widget.ui.scenePairsListWidget.count, 1)
        widget.ui.startTrainingButton.click()
        self.assertIsNotNone(widget.lastFineTune)
        self.assertEqual(str(p.checkpointPath), widget.lastFineTune.checkpoint)
        widget.ui.applyButton.click()
        self.assertIsNot(widget.lastOutput, out)
        self.delayDisplay("Click-through test passed")
