"""The output nodes of a registration and their display: the warped volume, the transform (affine and
deformable part composed: valid on the whole scan), the deformable part alone (drawn as a grid), the Jacobian
map with its diverging colour table, the warped segmentation (outlines in the slice views, surface in 3D) and
the metrics table, grouped in one subject-hierarchy folder. Given nodes are filled instead of new ones, so that
the panel's next Apply reuses the same set.
"""

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional

import numpy as np
import vtk

import slicer

from .conversion import compositeTransformFromResult, gridTransformFromField, removeNode, updateVolumeNodeFromImage

JACOBIAN_COLOR_TAG = "ACSGRegistrationJacobianColors"
DEFORMATION_REFERENCE = "ACSGRegistrationDeformablePart"  # transform node -> its deformable-part node
FOLDER_ATTRIBUTE = "ACSGRegistration.outputFolder"  # marks the subject-hierarchy folders made here
FOREGROUND_CHOICES = ("warped volume", "Jacobian map", "none")


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
    folder: int = 0  # subject-hierarchy folder item holding the output nodes

    def nodes(self) -> Dict[str, object]:
        return {k: v for k, v in (("warpedVolume", self.warpedVolume), ("transform", self.transform),
                                  ("deformation", self.deformation), ("jacobian", self.jacobian),
                                  ("warpedSegmentation", self.warpedSegmentation),
                                  ("metricsTable", self.metricsTable)) if v is not None}


def createOutputNodes(result, fixed, moving, warpedVolume=None, transform=None, jacobian=None,
                      warpedSegmentation=None, metricsTable=None, name: Optional[str] = None,
                      deformation=None) -> RegistrationOutput:
    """Fill the given output nodes (or new ones) from a registration result (``registrar.RegistrationResult``
    or one read back from its folder, ``registrar.SavedResult``); ``fixed``/``moving`` are the prepared inputs
    (``PreparedInput``: the backend's crop and the volume node it came from)."""
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
    gridDisplay(transform, warpedVolume, visible=False)

    # The deformable part alone (fixed space, displacements of a few mm), for the deformation grid in the
    # slice views: the same part of the transform that the Jacobian map describes.
    deformation = deformation or transform.GetNodeReference(DEFORMATION_REFERENCE) \
        or newNode("vtkMRMLGridTransformNode", "deformation")
    deformation.SetAndObserveTransformFromParent(gridTransformFromField(result.deformable_field()))
    transform.SetNodeReferenceID(DEFORMATION_REFERENCE, deformation.GetID())
    gridDisplay(deformation, warpedVolume, visible=True)

    # Jacobian determinant of the deformable part, coloured around 1.
    jacobian = jacobian or newNode("vtkMRMLScalarVolumeNode", "Jacobian")
    updateVolumeNodeFromImage(jacobian, sitk.Cast(result.jacobian, sitk.sitkFloat32))
    setJacobianDisplay(jacobian)

    # Warped segmentation.
    if result.warped_label is not None:
        segName = f"{moving.name or 'vertebra'} (warped)"
        warpedSegmentation = labelOutput(result.warped_label, warpedSegmentation, newNode, moving.volume, segName)
    else:
        warpedSegmentation = None

    folds = folding(sitk.GetArrayViewFromImage(result.jacobian))
    if result.metrics is not None:
        metricsTable = metricsTable or newNode("vtkMRMLTableNode", "metrics")
        fillMetricsTable(metricsTable, result.metrics)
    else:
        metricsTable = None
    output = RegistrationOutput(fixed.volume, moving.volume, warpedVolume, transform, jacobian, warpedSegmentation,
                                metricsTable, result.metrics, folds, result, deformation=deformation)
    groupInFolder(output, base)
    return output


def groupInFolder(output: RegistrationOutput, name: str):
    """Put one registration's output nodes in a subject-hierarchy folder (the folder they are already in when
    they were reused, else a new one named after the pair), so that the Data module shows one item per
    registration."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(output.warpedVolume.GetScene())
    if sh is None:
        return None
    nodes = list(output.nodes().values())
    folder = None
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        parent = sh.GetItemParent(item) if item else 0
        if parent and parent != sh.GetSceneItemID() and sh.GetItemAttribute(parent, FOLDER_ATTRIBUTE) == "1":
            folder = parent
            break
    if folder is None:
        folder = sh.CreateFolderItem(sh.GetSceneItemID(), name)
        sh.SetItemAttribute(folder, FOLDER_ATTRIBUTE, "1")
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        if not item:  # Slicer's subject-hierarchy plugins add an item for every node; without them, added here
            sh.CreateItem(folder, node)
        elif sh.GetItemParent(item) != folder:
            sh.SetItemParent(item, folder)
    output.folder = folder
    return folder


def gridDisplay(transformNode, regionNode, visible):
    """The transform drawn as a grid (8 mm) over ``regionNode`` in the slice views."""
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


def labelOutput(labelImage, node, newNode, movingVolume, segmentName):
    """The warped label as a segmentation (default) or into the given labelmap node."""
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
        # Outline only in the slice views, so that the warped volume stays visible under it; a surface in 3D.
        display = segmentation.GetDisplayNode()
        display.SetVisibility2DFill(False)
        display.SetSliceIntersectionThickness(2)
        segmentation.CreateClosedSurfaceRepresentation()
        display.SetVisibility3D(True)
        return segmentation
    finally:
        if temporary:
            removeNode(labelmap)


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


def jacobianColorNode(scene=None):
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


def setJacobianDisplay(jacobianNode):
    """The Jacobian map's colours (window 0-2, not interpolated) and its colour legend (hidden)."""
    jacobianNode.CreateDefaultDisplayNodes()
    display = jacobianNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(jacobianColorNode(jacobianNode.GetScene()).GetID())
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


def showLayers(output: RegistrationOutput, foreground: str = "warped volume", opacity: float = 0.5):
    """The fixed volume in the background of every slice view, the warped volume or the Jacobian map in the
    foreground at ``opacity`` (the fade between fixed and warped)."""
    if foreground not in FOREGROUND_CHOICES:
        raise ValueError(f"foreground must be one of {', '.join(FOREGROUND_CHOICES)}")
    front = {"warped volume": output.warpedVolume, "Jacobian map": output.jacobian}.get(foreground)
    for composite in _sliceComposites(output):
        composite.SetBackgroundVolumeID(output.fixedVolume.GetID())
        composite.SetForegroundVolumeID(front.GetID() if front is not None else None)
        composite.SetForegroundOpacity(float(opacity))


def setOpacity(output: RegistrationOutput, opacity: float):
    """Only the foreground opacity of the slice views that show this registration."""
    for composite in _sliceComposites(output):
        if composite.GetBackgroundVolumeID() == output.fixedVolume.GetID():
            composite.SetForegroundOpacity(float(opacity))


def setGridVisible(output: RegistrationOutput, visible: bool):
    gridNode = output.deformation if output.deformation is not None else output.transform
    if gridNode is not None and gridNode.GetDisplayNode() is not None:
        gridNode.GetDisplayNode().SetVisibility(bool(visible))


def setSegmentationVisible(output: RegistrationOutput, visible: bool):
    if output.warpedSegmentation is None:
        return
    if output.warpedSegmentation.IsA("vtkMRMLSegmentationNode"):
        output.warpedSegmentation.CreateDefaultDisplayNodes()
        output.warpedSegmentation.GetDisplayNode().SetVisibility(bool(visible))
        return
    for composite in _sliceComposites(output):
        if visible:
            composite.SetLabelVolumeID(output.warpedSegmentation.GetID())
        elif composite.GetLabelVolumeID() == output.warpedSegmentation.GetID():
            composite.SetLabelVolumeID(None)


def setLegendVisible(output: RegistrationOutput, visible: bool, foreground: str):
    """The Jacobian map's colour legend, shown only while the map is the foreground."""
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(output.jacobian) if output.jacobian else None
    if legend is not None:
        legend.SetVisibility(bool(visible and foreground == "Jacobian map"))


def centreViews(output: RegistrationOutput):
    """Centre the slice views on the crop."""
    bounds = [0.0] * 6
    output.warpedVolume.GetRASBounds(bounds)
    middle = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
    scene = output.fixedVolume.GetScene()
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").JumpSliceByCentering(*middle)


def showResults(output: RegistrationOutput, foreground: str = "warped volume", opacity: float = 0.5,
                showGrid: bool = True, showWarpedSegmentation: bool = True, showColorLegend: bool = True,
                centre: bool = True):
    """Everything at once (after a registration): layers, grid, warped segmentation, legend, centring."""
    showLayers(output, foreground, opacity)
    setGridVisible(output, showGrid)
    setSegmentationVisible(output, showWarpedSegmentation)
    setLegendVisible(output, showColorLegend, foreground)
    if centre:
        centreViews(output)


class DisplaySettings(NamedTuple):
    foreground: str = "warped volume"
    opacity: float = 0.5
    grid: bool = True
    segmentation: bool = True
    legend: bool = True


def applyDisplay(output: RegistrationOutput, now: DisplaySettings, before: Optional[DisplaySettings] = None,
                 centre: bool = False):
    """Everything when there is no ``before`` (just after a registration), else only what changed: a toggle
    changes what it names and nothing else (not the layers of every view at each click)."""
    if before is None:
        showResults(output, now.foreground, now.opacity, now.grid, now.segmentation, now.legend, centre)
        return
    if now.foreground != before.foreground:
        showLayers(output, now.foreground, now.opacity)
    elif now.opacity != before.opacity:
        setOpacity(output, now.opacity)
    if now.grid != before.grid:
        setGridVisible(output, now.grid)
    if now.segmentation != before.segmentation:
        setSegmentationVisible(output, now.segmentation)
    if (now.legend, now.foreground) != (before.legend, before.foreground):
        setLegendVisible(output, now.legend, now.foreground)


def _sliceComposites(output: RegistrationOutput):
    scene = output.fixedVolume.GetScene()
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]


def summaryText(output: RegistrationOutput) -> str:
    """One line for the panel and the log: time, Dice before/after, ASSD, folding, and the inputs' notes."""
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
