"""The vertebra in a segmentation or labelmap node: the choices offered, the user's choice resolved by the
backend's rules (``ACSGRegistrationLib.vertebrae``: "L1" matches "vertebrae_L1", a label value, a segment
name), and its binary mask. Label values are listed once per change of the labelmap (a whole-body
TotalSegmentator map takes seconds to scan), not at every panel event."""

from typing import Dict, List, Optional

import numpy as np
import vtk

import slicer

from ACSGRegistrationLib.errors import InputError

from .conversion import removeNode, volumeNodeToImage

# node ID -> (what the names were computed from, label value -> name)
_labelmapNamesCache: Dict[str, tuple] = {}


def _labelmapKey(labelmapNode):
    """What a labelmap's names depend on: its voxels and its colour table (their modification times)."""
    display = labelmapNode.GetDisplayNode()
    color = display.GetColorNode() if display is not None else None
    image = labelmapNode.GetImageData()
    return (image.GetMTime() if image is not None else 0, color.GetID() if color is not None else None,
            color.GetMTime() if color is not None else 0)


def labelmapNames(labelmapNode) -> Dict[int, str]:
    """Label value -> name: from the labelmap's colour table, else the level names of the label convention
    that fits its centroids (the backend's rule for label map files, so that "L1" means the same here)."""
    key = _labelmapKey(labelmapNode)
    cached = _labelmapNamesCache.get(labelmapNode.GetID())
    if cached is not None and cached[0] == key:
        return dict(cached[1])
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
    _labelmapNamesCache[labelmapNode.GetID()] = (key, dict(names))
    return names


def labelChoices(segmentationNode) -> List[str]:
    """Texts offered in the panel's vertebra list: segment names, or 'value: name' for labelmaps."""
    if segmentationNode is None:
        return []
    if segmentationNode.IsA("vtkMRMLSegmentationNode"):
        seg = segmentationNode.GetSegmentation()
        return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    if segmentationNode.GetImageData() is None:
        return []
    return [f"{v}: {n}" if n else str(v) for v, n in labelmapNames(segmentationNode).items()]


def sameLevelChoice(text, choices) -> Optional[str]:
    """The one choice of the same vertebral level as ``text`` (e.g. "L1" -> "vertebrae_L1"), else None."""
    from ACSGRegistrationLib.vertebrae import level_of
    level = level_of(text)
    if level is None:
        return None
    hits = [c for c in choices if level_of(c) == level]
    return hits[0] if len(hits) == 1 else None


def resolveLabel(segmentationNode, label, what: str):
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
    return resolve_vertebra(labelmapNames(segmentationNode), label, what, "labelmap", owner)


def labelImage(segmentationNode, label, referenceVolume, what: str):
    """(binary SimpleITK mask of the chosen vertebra, its name); the segmentation node is left as it is."""
    import SimpleITK as sitk
    key, name = resolveLabel(segmentationNode, label, what)
    if segmentationNode.IsA("vtkMRMLSegmentationNode"):
        scene = segmentationNode.GetScene()
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__ACSGRegistration_temp__")
        # The export adds a colour table named after the segmentation: removed with the temporary labelmap.
        colorTables = {scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode").GetID()
                       for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode"))}
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(key)
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, ids, labelmap, referenceVolume)
            if not ok or labelmap.GetImageData() is None:
                raise InputError(f"could not export segment '{name}' of '{segmentationNode.GetName()}'")
            image = volumeNodeToImage(labelmap)
        finally:
            display = labelmap.GetDisplayNode()
            color = display.GetColorNode() if display is not None else None
            removeNode(labelmap)
            if color is not None and color.GetID() not in colorTables:
                removeNode(color)
        value = 1
    else:
        image = volumeNodeToImage(segmentationNode)
        value = int(key)
    binary = sitk.Cast(image == value, sitk.sitkUInt8)
    if not np.any(sitk.GetArrayViewFromImage(binary)):
        raise InputError(f"the {what} vertebra '{name}' is empty")
    return binary, name
