"""The lean transform files (forward_transform.h5, inverse_transform.h5): the displacement field rounded to
FIELD_STEP and stored compressed in float32 (``geometry.write_transform``), read back by SimpleITK, ANTs and Slicer
as the transform in memory (exactly where the field was exported, rounded already, by ``geometry.tapered_field``;
within FIELD_STEP / 2 a component otherwise: far within a hundredth of a millimetre), the affine alone beyond the
band."""

import os
import struct

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ACSGRegistrationLib import geometry
from ACSGRegistrationLib.config import tiny_config
from ACSGRegistrationLib.networks import RegistrationNet
from ACSGRegistrationLib.registrar import Registrar
from ACSGRegistrationLib.saved import load_result

TOLERANCE = 0.01  # mm
FLOAT32 = struct.pack("<BBBBI", 0x11, 0x20, 31, 0, 4)  # an HDF5 datatype message: IEEE float32, little-endian
FLIP = np.array([-1.0, -1.0, 1.0])  # LPS <-> RAS
SHAPE = (16, 32, 32)  # (z, y, x)


def field_on_oblique_grid():
    """A smooth displacement field of a few millimetres on an anisotropic oblique grid (x 22, y 18, z 12)."""
    direction = sitk.VersorTransform((1, 1, 0), np.deg2rad(25)).GetMatrix()
    grid = sitk.Image([22, 18, 12], sitk.sitkUInt8)
    grid.SetSpacing((1.2, 0.8, 1.5))
    grid.SetDirection(direction)
    grid.SetOrigin((3.0, -40.0, 120.0))
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in (12, 18, 22)], indexing="ij")
    rng = np.random.default_rng(0)
    u = np.stack([a * np.sin(x / 3.1 + p) * np.cos(y / 4.3 - p) + b * np.cos(z / 2.7 + p)
                  for a, b, p in rng.uniform(0.5, 3.0, size=(3, 3))], axis=-1)
    field = sitk.GetImageFromArray(u, isVector=True)
    field.CopyInformation(grid)
    return field, grid


AFFINE = np.array([[0.98, 0.07, -0.02, 12.5], [-0.06, 1.03, 0.05, -7.25], [0.03, -0.04, 0.96, 30.0],
                   [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lean")
    field, grid = field_on_oblique_grid()
    exported = geometry.tapered_field(field)
    transform = geometry.composite_transform(AFFINE, exported)
    path, reference = str(folder / "forward_transform.h5"), str(folder / "as_simpleitk_writes_it.h5")
    geometry.write_transform(transform, path)
    sitk.WriteTransform(transform, reference)
    return {"path": path, "reference": reference, "transform": transform, "exported": exported, "grid": grid,
            "field": field, "folder": folder}


def on_grid(transform, grid):
    """The map's displacement (mm) at the voxel centres of ``grid``."""
    return sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, grid.GetSize(), grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection()))


def points(written):
    """Points inside the crop (continuous indices), and points beyond the band (at least 10 mm outside it)."""
    grid, exported, rng = written["grid"], written["exported"], np.random.default_rng(1)
    inside = np.array([grid.TransformContinuousIndexToPhysicalPoint(i.tolist())
                       for i in rng.uniform(0, np.array(grid.GetSize()) - 1, size=(200, 3))])
    size = np.array(exported.GetSize())
    index = rng.uniform(-20, size + 20, size=(4000, 3))
    # At least 8 voxels (over 6 mm) beyond the band's grid along one of its axes.
    far = np.any((index < -8) | (index > size - 1 + 8), axis=1)
    outside = np.array([exported.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in index[far][:200]])
    assert len(outside) == 200
    return inside, outside


def transform_points(transform, pts):
    return np.array([transform.TransformPoint(p.tolist()) for p in pts])


def affine_points(pts):
    return pts @ AFFINE[:3, :3].T + AFFINE[:3, 3]


def test_the_field_is_stored_compressed_in_float32(written):
    voxels = int(np.prod(written["exported"].GetSize()))
    size = os.path.getsize(written["path"])
    # SimpleITK's file: 24 bytes a voxel (3 doubles); float32 uncompressed would be 12.
    assert os.path.getsize(written["reference"]) > 24 * voxels
    assert size < 6 * voxels + 16384, (size, voxels)
    with open(written["path"], "rb") as fh:
        assert FLOAT32 in fh.read()
    # What is read back is the exported field, rounded to FIELD_STEP (float32 holds such values exactly)...
    read = sitk.CompositeTransform(sitk.ReadTransform(written["path"]))
    stored = sitk.GetArrayFromImage(sitk.DisplacementFieldTransform(read.GetNthTransform(1)).GetDisplacementField())
    steps = stored / geometry.FIELD_STEP
    assert np.array_equal(steps, np.round(steps))
    assert np.array_equal(stored, sitk.GetArrayFromImage(written["exported"]))
    # ...within half a step of the field the crop's grid had (the band of the taper around it).
    band = (stored.shape[0] - written["field"].GetSize()[2]) // 2
    inner = stored[band:-band, band:-band, band:-band]
    assert np.abs(inner - sitk.GetArrayFromImage(written["field"])).max() <= geometry.FIELD_STEP / 2 + 1e-12
    assert np.abs(inner).max() > 2.0  # ... and the field is far from nothing


def test_an_hdf5_library_reads_the_same_layout_as_itks_writer(written):
    h5py = pytest.importorskip("h5py")  # not a dependency: a second reader where it happens to be installed
    with h5py.File(written["path"], "r") as lean, h5py.File(written["reference"], "r") as ref:
        ours, theirs = [], []
        lean.visit(ours.append)
        ref.visit(theirs.append)
        # ITK's groups and datasets (without its notes of versions: ITKVersion, HDFVersion, OSName, OSVersion).
        assert ours == [name for name in theirs if name.startswith("TransformGroup")]
        params = lean["TransformGroup/2/TransformParameters"]
        assert params.dtype == np.float32 and params.compression == "gzip" and params.shuffle
        for name in ours:
            if isinstance(lean[name], h5py.Dataset):
                a, b = lean[name][()], ref[name][()]
                assert a.dtype == b.dtype or name == params.name[1:]
                assert np.abs(a - b).max() <= geometry.FIELD_STEP / 2 if a.dtype == np.float32 else \
                    np.array_equal(a, b)


def test_simpleitk_reads_the_same_map(written):
    read = sitk.ReadTransform(written["path"])
    composite = sitk.CompositeTransform(read)
    assert [composite.GetNthTransform(i).GetName() for i in range(composite.GetNumberOfTransforms())] == \
        ["AffineTransform", "DisplacementFieldTransform"]
    original = written["transform"]
    for i in range(2):
        assert composite.GetNthTransform(i).GetFixedParameters() == original.GetNthTransform(i).GetFixedParameters()
    assert composite.GetNthTransform(0).GetParameters() == original.GetNthTransform(0).GetParameters()
    error = np.linalg.norm(on_grid(read, written["grid"]) - on_grid(original, written["grid"]), axis=-1)
    assert error.max() < 1e-9
    inside, _ = points(written)
    assert np.abs(transform_points(read, inside) - transform_points(original, inside)).max() < 1e-9


def test_a_field_not_yet_rounded_is_written_within_half_a_step(written):
    """As today's files held it (the crop's field, unrounded, in doubles), within FIELD_STEP / 2 a component."""
    original = geometry.composite_transform(AFFINE, written["field"])
    path = str(written["folder"] / "unrounded.h5")
    geometry.write_transform(original, path)
    read = sitk.ReadTransform(path)
    grid = written["grid"]
    error = np.abs(on_grid(read, grid) - on_grid(original, grid))
    assert geometry.FIELD_STEP / 8 < error.max() <= np.abs(AFFINE[:3, :3]).sum(axis=1).max() * geometry.FIELD_STEP / 2
    assert np.linalg.norm(on_grid(read, grid) - on_grid(original, grid), axis=-1).max() < TOLERANCE


def test_beyond_the_band_the_affine_alone_applies(written):
    read = sitk.ReadTransform(written["path"])
    field = sitk.GetArrayFromImage(
        sitk.DisplacementFieldTransform(sitk.CompositeTransform(read).GetNthTransform(1)).GetDisplacementField())
    for face in (field[0], field[-1], field[:, 0], field[:, -1], field[:, :, 0], field[:, :, -1]):
        assert not face.any()  # the band falls to exactly zero
    _, outside = points(written)
    assert np.abs(transform_points(read, outside) - affine_points(outside)).max() < 1e-9
    inside, _ = points(written)
    assert np.linalg.norm(transform_points(read, inside) - affine_points(inside), axis=1).max() > 1.0


def test_ants_reads_the_same_map(written):
    ants = pytest.importorskip("ants")
    import pandas as pd
    inside, outside = points(written)
    pts = np.vstack([inside, outside])
    expected = transform_points(written["transform"], pts)
    moved = ants.apply_transforms_to_points(3, pd.DataFrame(pts, columns=["x", "y", "z"]), [written["path"]])
    assert np.abs(moved[["x", "y", "z"]].to_numpy() - expected).max() < TOLERANCE
    read = ants.read_transform(written["path"])
    got = np.array([read.apply_to_point(p.tolist()) for p in pts])
    assert np.abs(got - expected).max() < TOLERANCE
    assert np.abs(got[len(inside):] - affine_points(outside)).max() < TOLERANCE


def slicer_map(slicer, path, pts):
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(path)
    assert storage.ReadData(node)
    ras = node.GetTransformFromParent()
    return np.array([np.array(ras.TransformPoint((p * FLIP).tolist())) * FLIP for p in pts])


def test_slicer_reads_the_same_map(written):
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLTransformStorageNode"):
        pytest.skip("the 'slicer' package here is not slicer-core")
    inside, outside = points(written)
    pts = np.vstack([inside, outside])
    lean = slicer_map(slicer, written["path"], pts)
    # The same as Slicer reads SimpleITK's own file (it interpolates its own way, so compare it with itself)...
    assert np.abs(lean - slicer_map(slicer, written["reference"], pts)).max() < 1e-6
    # ...the field inside (Slicer's interpolation of this curvy, oblique field is within 0.1 mm of SimpleITK's),
    # the affine alone outside.
    assert np.abs(lean[:len(inside)] - transform_points(written["transform"], inside)).max() < 0.2
    assert np.linalg.norm(lean[:len(inside)] - affine_points(inside), axis=1).max() > 1.0
    assert np.abs(lean[len(inside):] - affine_points(outside)).max() < TOLERANCE


def test_other_transforms_are_written_as_simpleitk_writes_them(tmp_path):
    affine = geometry.affine_transform(AFFINE)
    for name in ("affine.h5", "affine.tfm"):
        geometry.write_transform(affine, str(tmp_path / name))
        assert sitk.ReadTransform(str(tmp_path / name)).GetParameters() == affine.GetParameters()
    with open(tmp_path / "affine.h5", "rb") as fh:
        assert FLOAT32 not in fh.read()


def blob(seed):
    g = torch.Generator().manual_seed(seed)
    vol = torch.nn.functional.interpolate(torch.rand(1, 1, 4, 6, 6, generator=g), size=SHAPE, mode="trilinear",
                                          align_corners=True)[0, 0].numpy()
    image = sitk.GetImageFromArray((vol * (vol > 0.45)).astype(np.float32))
    image.SetOrigin((10.0 * seed, -5.0 * seed, 3.0 * seed))
    return image


def test_a_registration_writes_both_transforms_lean(tmp_path):
    torch.manual_seed(0)
    net = RegistrationNet(tiny_config(input_shape=SHAPE)).eval()
    result = Registrar(model=net, device="cpu", affine_steps=0).register(blob(1), blob(2))
    paths = result.save(str(tmp_path / "out"), ["transform", "inverse", "fields", "jacobian"])
    grid = result.jacobian  # the fixed crop's grid
    for key, original in (("forward_transform", result.forward_transform()),
                          ("inverse_transform", result.inverse_transform())):
        with open(paths[key], "rb") as fh:
            assert FLOAT32 in fh.read()
        read = sitk.ReadTransform(paths[key])
        if key == "inverse_transform":  # where the inverse's field is: the crop, mapped by the affine
            points_ = np.array([grid.TransformIndexToPhysicalPoint([int(i) for i in idx])
                                for idx in np.ndindex(*grid.GetSize())][::7])
            points_ = transform_points(result.forward_transform(), points_)
            assert np.abs(transform_points(read, points_) - transform_points(original, points_)).max() < 1e-9
        else:
            error = np.linalg.norm(on_grid(read, grid) - on_grid(original, grid), axis=-1)
            assert error.max() < 1e-9
    # The folder read back (from its float32 deformable_field.nii, as the Slicer module does) is the same map.
    saved = load_result(str(tmp_path / "out"))
    error = np.linalg.norm(on_grid(saved.forward_transform(), grid)
                           - on_grid(sitk.ReadTransform(paths["forward_transform"]), grid), axis=-1)
    assert error.max() < 1e-9
