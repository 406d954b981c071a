"""The two sides of a pair taken from the scene: their checks (missing, wrong or conflicting nodes; outputs that
would overwrite an input) and their export to SimpleITK (the volume and the chosen vertebra's mask), the same
for a registration in Slicer's process and one in the background."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ACSGRegistrationLib.errors import InputError
from ACSGRegistrationLib.inputs import PreparedInput as BackendInput

from .conversion import volumeNodeToImage
from .labels import labelImage


@dataclass
class InputSide:
    """One side as exported: its volume node, the volume as a SimpleITK image (float32, LPS), the chosen
    vertebra's binary mask on it (None for a ready crop) and the vertebra's name."""

    volume: object
    source: sitk.Image
    mask: Optional[sitk.Image] = None
    name: str = ""
    notes: List[str] = field(default_factory=list)


@dataclass
class PreparedInput(BackendInput):
    """One side as the registrar in Slicer's process gets it: the backend's crop and the volume node."""

    volume: object = None

    @classmethod
    def of(cls, volume, prepared: BackendInput) -> "PreparedInput":
        return cls(**vars(prepared), volume=volume)


def exportInput(volume, segmentation=None, label=None, what: str = "fixed") -> InputSide:
    """The volume and its vertebra's mask as SimpleITK images; the nodes are left as they are."""
    source = volumeNodeToImage(volume, np.float32)
    if min(source.GetSize()) < 2:
        raise InputError(f"the {what} volume '{volume.GetName()}' is not 3D (size {source.GetSize()})")
    if segmentation is None:
        return InputSide(volume, source)
    mask, name = labelImage(segmentation, label, volume, what)
    return InputSide(volume, source, mask, name)


def checkInputs(fixedVolume, movingVolume, fixedSegmentation=None, movingSegmentation=None,
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
    checkOutputs([fixedVolume, movingVolume, fixedSegmentation, movingSegmentation], outputs or {})


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


def pairArguments(pair) -> Dict:
    """A pair of nodes or files as a dict: fixed, moving, fixedSegmentation, movingSegmentation, fixedLabel,
    movingLabel (and name) from a tuple in that order or a dict with those keys."""
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
