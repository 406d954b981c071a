"""The module's 2D mode: two single-slice volumes (a radiograph, a DRR or one CT slice loaded in Slicer) registered
by the backend's 2D network (``ACSGRegistrationLib.planar``) and its refinement on the pair, in Slicer's
process (about half a second for a 128 x 128 mm view; Slicer keeps painting meanwhile), with the same outputs as
in 3D: the warped volume, the map as a grid transform node, the Jacobian map, and the warped label map. Inputs
are never modified.

A single-slice volume is taken as a 2D image in its slice's plane (``planar.register.as_planar``: the in-plane
axes of its geometry). The field is lifted back as a one-slice displacement grid in that plane, which Slicer
applies within the slice (slices at an angle to the volume's axes: the in-plane part of their geometry).
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import slicer

from ACSGRegistrationLib.errors import InputError

from .conversion import gridTransformFromField, updateVolumeNodeFromImage, volumeNodeToImage
from .dependencies import hasGui


def isSingleSlice(volumeNode) -> bool:
    """A volume one voxel thick along one of its axes (a 2D image loaded as a volume)."""
    data = volumeNode.GetImageData() if volumeNode is not None else None
    return data is not None and min(data.GetDimensions()) == 1 and sorted(data.GetDimensions())[1] > 1


@dataclass
class PlanarOutput:
    warpedVolume: object
    transform: object
    jacobian: object
    warpedLabels: Optional[object] = None
    metrics: Optional[Dict] = None
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)


def _thinAxis(image) -> int:
    return [k for k, n in enumerate(image.GetSize()) if n == 1][-1]


def _lift(planar, like, planeAxes=None):
    """A 2D image of ``like``'s slice back on ``like``'s one-slice 3D grid; a 2D vector field too, given the
    LPS directions of its 2D frame's axes (``planar.register.plane_axes`` of the slice as the backend read it):
    its in-plane (a, b) vectors -> a e_x + b e_y, nothing across the slice."""
    import SimpleITK as sitk
    thin = _thinAxis(like)
    array = sitk.GetArrayFromImage(planar)
    isVector = planeAxes is not None
    if isVector:
        array = array.astype(np.float64) @ np.asarray(planeAxes).T
    lifted = sitk.GetImageFromArray(np.expand_dims(array, axis=2 - thin), isVector=isVector)
    lifted.CopyInformation(like)
    return lifted


def _planarOf(volumeNode, name: str):
    from ACSGRegistrationLib.planar.register import as_planar
    if not isSingleSlice(volumeNode):
        raise InputError(f"'{volumeNode.GetName()}' is not a single-slice volume: the 2D mode registers 2D images")
    image3d = volumeNodeToImage(volumeNode)
    return image3d, as_planar(image3d, f"{name} '{volumeNode.GetName()}'")


def _keepPainting(step: int, total: int) -> None:
    """Progress of the refinement: lets Slicer handle its events every few steps (no frozen window)."""
    if step % 10 == 0 and hasGui():
        slicer.app.processEvents()


def registerPlanarNodes(fixedVolume, movingVolume, fixedSegmentation=None, movingSegmentation=None,
                        fixedLabel=None, movingLabel=None, model: Optional[str] = None, name: Optional[str] = None,
                        refineSteps: Optional[int] = None) -> PlanarOutput:
    """Register two single-slice volumes. Each may have a segmentation (a labelmap volume on its slice, or a
    segmentation node) and its structure, named as the panel lists it (segment name, level such as "L1", "20:
    vertebrae_L1" or a label value; omitted where there is one): the structure centres the views and its Dice is
    reported. ``refineSteps``: the refinement's steps per grid (default the backend's; 0: the network alone)."""
    from ACSGRegistrationLib.planar.register import PlanarRegistrar, as_planar, plane_axes, structure_mask
    from .labels import labelImage
    fixed3d, fixed = _planarOf(fixedVolume, "fixed volume")
    _, moving = _planarOf(movingVolume, "moving volume")
    masks, movingMap = [], None
    for segmentation, label, volume, image, what in ((fixedSegmentation, fixedLabel, fixedVolume, fixed, "fixed"),
                                                     (movingSegmentation, movingLabel, movingVolume, moving,
                                                      "moving")):
        if segmentation is None:
            masks.append(None)
            continue
        where = f"{what} segmentation '{segmentation.GetName()}'"
        if segmentation.IsA("vtkMRMLLabelMapVolumeNode"):
            _planarOf(segmentation, f"{what} label map")  # one slice, as its image
        binary, _name = labelImage(segmentation, label, volume, what)
        masks.append(structure_mask(as_planar(binary, where), image, 1, where))
        if what == "moving":  # warped with its values where it is a label map, else the structure's mask
            movingMap = _planarOf(segmentation, where)[1] if segmentation.IsA("vtkMRMLLabelMapVolumeNode") \
                else masks[-1]
    registrar = PlanarRegistrar(model, refine_steps=refineSteps, progress=_keepPainting)
    result = registrar.register(fixed, moving, masks[0], masks[1], moving_labels=movingMap)
    base = name or f"{movingVolume.GetName()} to {fixedVolume.GetName()}"
    scene = slicer.mrmlScene
    warped = updateVolumeNodeFromImage(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{base} warped"),
                                       _lift(result.warped, fixed3d))
    jacobian = updateVolumeNodeFromImage(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{base} Jacobian"),
                                         _lift(result.jacobian, fixed3d))
    transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", f"{base} transform")
    transform.SetAndObserveTransformFromParent(gridTransformFromField(_lift(result.forward_field, fixed3d,
                                                                             plane_axes(fixed))))
    warpedLabels = None
    if result.warped_label is not None:
        warpedLabels = updateVolumeNodeFromImage(
            scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{base} warped labels"),
            _lift(result.warped_label, fixed3d))
    return PlanarOutput(warped, transform, jacobian, warpedLabels, result.metrics, result.seconds,
                        list(result.notes))


def summaryText(output: PlanarOutput) -> str:
    text = f"2D registration in {output.seconds:.2f} s"
    if output.metrics:
        before, after = output.metrics["initial"], output.metrics["final"]
        text += (f": Dice {before['dice']:.3f} -> {after['dice']:.3f}, ASSD {after['assd_mm']:.2f} mm, "
                 f"det J <= 0 {after['nonpositive_jacobian_percent']:.2f} %")
    return text
