"""The 2D example (``acsgreg example2d``) and the 2D figure: the example's files, registered by the command it
prints (Dice rising, the map near the true one, the figure written); slices shown by where their axes point in
the body (superior at the top, orientation letters), not by their array's order; the command's refusals."""

import json
import os
import shlex

import numpy as np
import pytest
import SimpleITK as sitk

from ACSGRegistrationLib.cli import main
from ACSGRegistrationLib.planar.figures import display_of, draw_planar_figure
from ACSGRegistrationLib.planar.network import PlanarConfig, PlanarNet
from ACSGRegistrationLib.planar.register import PlanarRegistrar, as_planar, plane_axes, structure_mask
from ACSGRegistrationLib.preprocessing import label_centroids
from conftest import SCAN, data_path, refused

L3 = 29  # in the TotalSegmentator example's label map


@pytest.fixture(scope="module")
def example(tmp_path_factory, scan):
    """example2d on the TotalSegmentator example (default: a sagittal slice through L3, a known deformation)."""
    out = tmp_path_factory.mktemp("example") / "example2d"
    printed = _run(["example2d", "--ct", data_path(*SCAN, "ct.nii.gz"), "--ct-seg", data_path(*SCAN, "seg.nii.gz"),
                    "--out", str(out)])
    return out, printed


def _run(args):
    """main(args) == 0; what it printed."""
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    return printed.getvalue()


def _printed_commands(printed):
    """The register2d command lines example2d printed (NIfTI first, then PNG), as argument lists for main."""
    lines = [line.strip() for line in printed.splitlines() if line.strip().startswith("acsgreg register2d")]
    return [shlex.split(line)[1:] for line in lines]


def test_example2d_writes_a_sagittal_slice_of_the_level_and_a_known_deformation_of_it(example, scan):
    out, printed = example
    names = set(os.listdir(out))
    assert {"fixed.nii.gz", "moving.nii.gz", "fixed_seg.nii.gz", "moving_seg.nii.gz", "fixed.png", "moving.png",
            "fixed_seg.png", "moving_seg.png", "true_field.nii", "example.json", "manifest.json"} == names
    fixed = sitk.ReadImage(str(out / "fixed.nii.gz"))
    assert fixed.GetSize() == (128, 128, 1) and fixed.GetSpacing() == (1.0, 1.0, 1.0)
    normal = np.asarray(fixed.GetDirection()).reshape(3, 3)[:, 2]
    assert abs(normal[0]) == pytest.approx(1.0)  # sagittal: across the slice is left-right
    centre = fixed.TransformContinuousIndexToPhysicalPoint((63.5, 63.5, 0.0))
    assert np.allclose(centre, label_centroids(scan[1])[L3], atol=1e-3)  # where L3 lies in the CT
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "fixed_seg.nii.gz")))[0]
    assert labels[64, 64] == L3
    assert json.loads((out / "example.json").read_text())["fixed_label"] == L3
    assert len(_printed_commands(printed)) == 2 and "--true-field" in printed


def test_register2d_registers_the_example_as_printed_and_draws_its_figure(example, tmp_path):
    out, printed = example
    nifti, png = _printed_commands(printed)
    registered = tmp_path / "registered"
    # As printed, with fewer refinement steps (a test's time) and the figure written where the test looks.
    _run(nifti + ["--refine-steps", "10", "--out", str(registered)])
    metrics = json.loads((registered / "metrics.json").read_text())
    assert metrics["final"]["dice"] > metrics["initial"]["dice"] + 0.02, metrics
    truth = metrics["true_map"]
    assert truth["epe_mean_mm"] < 0.5 * truth["identity_epe_mean_mm"], truth
    assert sitk.ReadImage(str(registered / "figure.png")).GetSize()[0] > 1000
    # The PNG copies (a radiograph's route): the same pair, registered the same way.
    _run(png + ["--refine-steps", "10", "--out", str(tmp_path / "png")])
    from_png = json.loads((tmp_path / "png" / "metrics.json").read_text())
    assert from_png["initial"]["dice"] == pytest.approx(metrics["initial"]["dice"], abs=0.01)
    assert from_png["final"]["dice"] > from_png["initial"]["dice"] + 0.02


def test_register2d_refuses_a_true_map_off_the_fixed_images_grid_or_frame(example, tmp_path, capsys):
    out, printed = example
    nifti, png = _printed_commands(printed)
    target = str(tmp_path / "out")
    # The PNG's frame is not the slice's (the same pixels, other axes): the true map is refused there.
    refused(png + ["--true-field", str(out / "true_field.nii"), "--out", target], "does not lie on its image",
            capsys, target)
    refused(nifti + ["--true-field", str(out / "fixed_seg.nii.gz"), "--out", target],
            "is not a 2D displacement field", capsys, target)


def _sagittal_slice(upside_down: bool) -> sitk.Image:
    """A sagittal one-slice volume, 40 x 30 mm, with a bright mark at its superior-anterior corner. Stored head
    up (rows running inferior), or upside down: its rows running superior, the same picture in the body."""
    array = np.zeros((30, 40), np.float32)
    array[2:6, 30:38] = 1.0  # the top rows (superior), the right-hand columns (anterior)
    column, row = np.array([0.0, -1.0, 0.0]), np.array([0.0, 0.0, -1.0])  # A, I (LPS)
    origin = np.array([5.0, 20.0, 40.0])
    if upside_down:
        array, origin, row = array[::-1].copy(), origin + row * 29, -row
    volume = sitk.GetImageFromArray(array[None])
    volume.SetDirection(np.stack([column, row, np.cross(column, row)], axis=1).ravel().tolist())
    volume.SetOrigin(origin.tolist())
    return volume


def _mark_height(volume: sitk.Image) -> float:
    """The S coordinate (LPS z) of the mark's centre."""
    rows, columns = np.nonzero(sitk.GetArrayFromImage(volume)[0])
    return volume.TransformContinuousIndexToPhysicalPoint((columns.mean(), rows.mean(), 0.0))[2]


def test_a_slice_stored_upside_down_is_shown_superior_at_the_top_with_its_letters():
    stored = {way: _sagittal_slice(way) for way in (False, True)}
    assert _mark_height(stored[True]) == pytest.approx(_mark_height(stored[False]))  # the same slice in the body
    shown = {}
    for way, volume in stored.items():
        image = as_planar(volume, "slice")
        display = display_of(image)
        assert display.flip_rows == way and not display.transpose and not display.flip_columns
        assert display.letters == {"top": "S", "bottom": "I", "left": "P", "right": "A"}
        shown[way] = display.array(sitk.GetArrayFromImage(image))
        # The figure's fixed panel shows it so, letters on its sides (a registration of the slice to itself).
        net = PlanarNet(PlanarConfig(encoder=(4, 4, 4, 4), decoder=(4, 4, 4, 4)))
        result = PlanarRegistrar(net=net, refine_steps=0).register(image, image)
        fixed_panel = draw_planar_figure(result).axes[0]
        assert np.array_equal(np.asarray(fixed_panel.images[0].get_array()), shown[way])
        letters = {text.get_text(): text.get_position() for text in fixed_panel.texts}
        assert letters["S"][1] > letters["I"][1] and letters["A"][0] > letters["P"][0]  # axes fractions
    assert np.array_equal(shown[True], shown[False])
    rows, columns = np.nonzero(shown[True])
    assert rows.max() < 10 and columns.min() > 25  # the mark at the top right: superior, anterior


def test_other_slices_and_2d_images_are_shown_by_their_axes():
    # An axial slice whose array runs along P (columns) and L (rows): shown transposed, R on the left, A up.
    axial = sitk.GetImageFromArray(np.zeros((1, 20, 30), np.float32))
    axial.SetDirection([0, 1, 0, 1, 0, 0, 0, 0, -1])  # columns P, rows L, across I
    display = display_of(as_planar(axial, "axial"))
    assert display.transpose and display.letters == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    # A coronal slice, head up as stored: as is.
    coronal = sitk.GetImageFromArray(np.zeros((20, 1, 30), np.float32))  # (z, y, x): thin along y, index 1
    coronal.SetDirection([1, 0, 0, 0, 1, 0, 0, 0, -1])
    display = display_of(as_planar(coronal, "coronal"))
    assert plane_axes(as_planar(coronal, "coronal")).T.tolist() == [[1, 0, 0], [0, 0, 1]]
    assert not (display.transpose or display.flip_rows or display.flip_columns)
    assert display.letters == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    # A 2D image (a PNG, a radiograph) says nothing about the body: as stored, no letters.
    display = display_of(sitk.Image([30, 20], sitk.sitkFloat32))
    assert not (display.transpose or display.flip_rows or display.flip_columns) and display.letters is None


def test_example2d_refusals(tmp_path, capsys, scan):
    ct, seg = data_path(*SCAN, "ct.nii.gz"), data_path(*SCAN, "seg.nii.gz")
    out = tmp_path / "out"
    base = ["example2d", "--ct", ct, "--ct-seg", seg, "--out", str(out)]
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused(base, "holds files that ACSGRegistration did not write", capsys, str(out))
    (out / "keep.txt").unlink()
    (out / "manifest.json").write_text(json.dumps({"kind": "2D registration", "files": {}}))
    assert main(base) == 2 and "holds another command's output (2D registration" in capsys.readouterr().err
    assert os.listdir(out) == ["manifest.json"]
    (out / "manifest.json").unlink()
    refused(base + ["--moving-ct", ct], "give --moving-ct and --moving-ct-seg together", capsys, str(out))
    refused(base + ["--level", "X9"], "give one vertebra level", capsys, str(out))
    refused(base + ["--level", "L1,L2"], "give one vertebra level", capsys, str(out))
    refused(base + ["--level", "C3"], "has none of the vertebrae C3", capsys, str(out))
    # A vertebra cut by the scan's edge: the scan cut through L3's middle.
    from ACSGRegistrationLib.preprocessing import label_statistics
    box = label_statistics(scan[1]).GetBoundingBox(L3)
    cut = box[2] + box[5] // 2
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for image, name in zip(scan, ("ct.nii.gz", "seg.nii.gz")):
        sitk.WriteImage(image[:, :, cut:], str(inputs / name))
    refused(["example2d", "--ct", str(inputs / "ct.nii.gz"), "--ct-seg", str(inputs / "seg.nii.gz"), "--out",
             str(out)], "L3 is cut by the scan's edge", capsys, str(out))
    assert main(["example2d", "--ct", str(inputs / "ct.nii.gz"), "--ct-seg", str(inputs / "seg.nii.gz"), "--out",
                 str(inputs), "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err and sorted(os.listdir(inputs)) == ["ct.nii.gz", "seg.nii.gz"]
    # --overwrite writes beside the user's file, which is kept.
    (out / "keep.txt").write_text("mine")
    assert main(base + ["--level", "L2", "--overwrite"]) == 0
    assert (out / "keep.txt").read_text() == "mine" and (out / "fixed.nii.gz").is_file()


def test_slicer_registers_the_sagittal_example_with_the_map_in_the_slices_plane(example):
    """In Slicer (where slicer-core is installed), the example's one-slice volumes, whose slice is sagittal in the
    CT: the grid transform node moves points within the slice as the backend's map does (its 2D vectors lifted
    along the plane's axes, not the volume's index axes)."""
    from conftest import slicer_module
    slicer, module = slicer_module()
    import slicer_environment
    from ACSGRegistrationSlicer import conversion
    slicer_environment.new_scene()
    out, _ = example
    images = {name: sitk.ReadImage(str(out / f"{name}.nii.gz")) for name in ("fixed", "moving", "fixed_seg",
                                                                             "moving_seg")}
    nodes = {name: conversion.updateVolumeNodeFromImage(slicer.mrmlScene.AddNewNodeByClass(
        "vtkMRMLLabelMapVolumeNode" if name.endswith("_seg") else "vtkMRMLScalarVolumeNode", name), image)
        for name, image in images.items()}
    output = module.ACSGRegistrationLogic().registerPlanar(nodes["fixed"], nodes["moving"], nodes["fixed_seg"],
                                                           nodes["moving_seg"], str(L3), refineSteps=0)
    assert output.metrics["final"]["dice"] > output.metrics["initial"]["dice"]
    fixed = as_planar(images["fixed"], "fixed")
    masks = [structure_mask(as_planar(images[f"{k}_seg"], k), as_planar(images[k], k), L3, k)
             for k in ("fixed", "moving")]
    backend = PlanarRegistrar(refine_steps=0).register(fixed, as_planar(images["moving"], "moving"), *masks)
    u = sitk.GetArrayFromImage(backend.forward_field) @ plane_axes(fixed).T  # (rows, columns, LPS)
    assert np.abs(u).max() > 0.5
    transform = output.transform.GetTransformFromParent()
    for row, column in np.random.default_rng(0).integers(10, 118, size=(30, 2)):
        x, y, z = images["fixed"].TransformIndexToPhysicalPoint((int(column), int(row), 0))
        moved = transform.TransformPoint((-x, -y, z))  # RAS in Slicer
        assert np.allclose([-moved[0], -moved[1], moved[2]], np.add((x, y, z), u[row, column]), atol=1e-3)
