"""Physical-space outputs: what SimpleITK does with the exported fields equals the network's own warp."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ACSGRegistrationLib import geometry
from ACSGRegistrationLib.config import tiny_config
from ACSGRegistrationLib.errors import OutputError
from ACSGRegistrationLib.networks import RegistrationNet
from ACSGRegistrationLib.registrar import Registrar
from conftest import arr

SHAPE = (16, 32, 32)


def perturbed_model(method="acsgregnet", seed=0):
    """An untrained tiny model made to output a clear affine and a clear deformation."""
    torch.manual_seed(seed)
    net = RegistrationNet(tiny_config(method, SHAPE))
    with torch.no_grad():
        net.affine.fc.bias.copy_(torch.tensor([[0.97, 0.08, 0.0, 1.2], [-0.08, 0.97, 0.04, -1.5],
                                               [0.0, -0.04, 1.03, 0.8]]).flatten())
        head = net.deformable.decoder_self.head if method == "acsgregnet" else net.deformable.head
        head.weight.normal_(0, 0.05)
    return net.eval()


def blob_volume(seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, 4, 6, 6, generator=g)
    vol = torch.nn.functional.interpolate(coarse, size=SHAPE, mode="trilinear", align_corners=True)[0, 0]
    vol = (vol * (vol > 0.45)).numpy()
    # Like a masked vertebra crop, the content stays clear of the crop's faces (where ITK and PyTorch
    # treat samples beyond the last voxel differently).
    inner = np.zeros_like(vol)
    inner[3:-3, 3:-3, 3:-3] = 1
    return vol * inner


def with_geometry(array, spacing, direction, origin):
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    return image


def rotation(axis, degrees):
    return tuple(sitk.VersorTransform(axis, np.deg2rad(degrees)).GetMatrix())


GEOMETRIES = {
    "lps-identity": ((1.0, 1.0, 1.0), tuple(np.eye(3).ravel()), (0.0, 0.0, 0.0)),
    "ras-flipped": ((1.0, 1.0, 1.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1), (40.0, -12.0, 5.0)),
    "pir-permuted-anisotropic": ((1.2, 0.8, 1.5), (0, 0, -1, 1, 0, 0, 0, -1, 0), (-30.0, 22.0, 100.0)),
    "oblique": ((1.0, 1.0, 1.0), rotation((1, 1, 0), 25), (3.0, 4.0, -7.0)),
}


@pytest.fixture(scope="module")
def registered():
    out = {}
    net = perturbed_model()
    reg = Registrar(model=net, device="cpu")
    for name, (spacing, direction, origin) in GEOMETRIES.items():
        fixed = with_geometry(blob_volume(1), spacing, direction, origin)
        # The moving crop lives elsewhere in space (another subject's scan).
        moving = with_geometry(blob_volume(2), spacing[::-1], rotation((0, 0, 1), -10), (200.0, -50.0, 10.0))
        out[name] = (fixed, moving, reg.register(fixed, moving))
    return out


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_exported_field_applied_by_simpleitk_reproduces_the_warped_image(registered, name, tmp_path):
    fixed, moving, result = registered[name]
    paths = result.save(str(tmp_path))
    transform = sitk.ReadTransform(paths["forward_transform"])
    resampled = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0)
    ours = arr(result.warped)
    theirs = arr(resampled)
    value_range = float(arr(moving).max() - arr(moving).min())
    assert np.abs(theirs - ours).mean() < 1e-3 * value_range
    # ...and the warp is far from trivial, so the comparison means something.
    assert np.abs(ours - arr(fixed)).mean() > 0.01 * value_range
    field = arr(result.forward_field)
    assert np.abs(field).max() > 50  # the two crops are far apart in physical space


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_forward_then_inverse_is_close_to_identity(registered, name):
    fixed, moving, result = registered[name]
    forward, inverse = result.forward_transform(), result.inverse_transform()
    rng = np.random.default_rng(0)
    errors = []
    for idx in rng.integers([6, 6, 4], [26, 26, 12], size=(100, 3)):
        p = np.array(fixed.TransformIndexToPhysicalPoint([int(i) for i in idx]))
        q = np.array(forward.TransformPoint(tuple(p)))
        errors.append(np.linalg.norm(np.array(inverse.TransformPoint(tuple(q))) - p))
    voxel = min(fixed.GetSpacing())
    assert np.mean(errors) < 0.05 * voxel and np.max(errors) < 0.3 * voxel


def test_field_round_trips_through_voxel_coordinates(registered):
    fixed, moving, result = registered["oblique"]
    coords = geometry.field_to_coordinates(result.forward_field, moving)
    again = geometry.coordinates_to_field(coords, fixed, moving)
    assert np.allclose(arr(again), arr(result.forward_field), atol=1e-4)


def test_physical_affine_maps_the_centre_like_the_affine_stage(registered):
    fixed, moving, result = registered["ras-flipped"]
    # Affine-only warp computed by SimpleITK with the exported 4x4 matrix equals the affine stage's image.
    resampled = sitk.Resample(moving, fixed, geometry.affine_transform(result.affine_lps), sitk.sitkLinear, 0.0)
    assert np.abs(arr(resampled) - arr(result.warped_affine)).mean() < 1e-4


def test_jacobian_map_has_the_fixed_geometry(registered):
    fixed, _, result = registered["oblique"]
    assert result.jacobian.GetSize() == fixed.GetSize()
    assert np.allclose(result.jacobian.GetDirection(), fixed.GetDirection())
    assert np.allclose(result.jacobian.GetOrigin(), fixed.GetOrigin())
    j = arr(result.jacobian)
    assert j.std() > 1e-3 and j.min() > 0  # a real deformation, and a diffeomorphic one


def test_lps_to_ras_flips_the_first_two_axes():
    m = np.eye(4)
    m[:3, 3] = (1, 2, 3)
    r = geometry.lps_to_ras(m)
    assert np.allclose(r[:3, 3], (-1, -2, 3))


def test_outputs_are_written_atomically(registered, tmp_path, monkeypatch):
    _, _, result = registered["lps-identity"]
    target = tmp_path / "warped.nii.gz"
    target.write_bytes(b"previous result")

    def broken(image, path, *args):
        open(path, "wb").write(b"half")
        raise RuntimeError("disk full")
    monkeypatch.setattr(sitk, "WriteImage", broken)
    with pytest.raises(OutputError, match=f"cannot write {target}: disk full"):
        geometry.write_image(result.warped, str(target))
    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["warped.nii.gz"]


def test_a_coarser_model_returns_results_on_the_crops_own_grid():
    """A 2 mm network (the shipped compact model's kind) registering 1 mm crops: it runs on its own grid,
    and its fields, resampled to the crops' grids, reproduce the same physical mapping."""
    torch.manual_seed(0)
    net = RegistrationNet(tiny_config("acsgregnet", (8, 16, 16), input_spacing=2.0))
    with torch.no_grad():
        net.affine.fc.bias.copy_(torch.tensor([[1.0, 0.05, 0.0, 0.6], [-0.05, 1.0, 0.0, -0.4],
                                               [0.0, 0.0, 1.0, 0.3]]).flatten())
        net.deformable.decoder_self.head.weight.normal_(0, 0.05)
    fixed = with_geometry(blob_volume(1), (1.0, 1.0, 1.0), rotation((0, 0, 1), 20), (10.0, 0.0, 0.0))
    moving = with_geometry(blob_volume(2), (1.0, 1.0, 1.0), tuple(np.eye(3).ravel()), (90.0, 5.0, 0.0))
    labels = [sitk.Cast(im > 0.3, sitk.sitkUInt8) for im in (fixed, moving)]
    result = Registrar(model=net.eval(), device="cpu").register(fixed, moving, *labels)
    assert result.warped.GetSize() == fixed.GetSize() and result.jacobian.GetSize() == fixed.GetSize()
    assert result.inverse_field.GetSize() == moving.GetSize()
    # Fixed points are carried to the moving crop, ~80 mm away, and the inverse brings them back.
    transform = result.forward_transform()
    inverse = result.inverse_transform()
    for idx in [(10, 10, 6), (16, 16, 8), (20, 12, 9)]:
        p = np.array(fixed.TransformIndexToPhysicalPoint(idx))
        q = np.array(transform.TransformPoint(tuple(p)))
        assert np.linalg.norm(q - p) > 70
        assert np.linalg.norm(np.array(inverse.TransformPoint(tuple(q))) - p) < 0.3
    assert set(result.metrics) == {"initial", "affine", "final"}
