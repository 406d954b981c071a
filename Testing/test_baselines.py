"""The ANTs SyN baseline (optional antspyx): SimpleITK <-> ANTs geometry, and a small registration."""

import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from ACSGRegistrationLib import baselines
from ACSGRegistrationLib.metrics import STAGES
from ACSGRegistrationLib.errors import InputError

SHAPE = (32, 48, 48)  # (z, y, x)
SPACING = (2.0, 2.0, 2.0)


@pytest.fixture(scope="module")
def ants():
    return pytest.importorskip("ants")


def oblique_flipped_direction(angle=20.0):
    """A rotation about an oblique axis composed with a flip of x (determinant -1)."""
    rot = Rotation.from_rotvec(np.deg2rad(angle) * np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5]))
    return rot.as_matrix() @ np.diag([-1.0, 1.0, 1.0])


def make_image(array, spacing, direction, origin):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetDirection(tuple(np.asarray(direction).ravel()))
    image.SetOrigin(origin)
    return image


def blob(shift=(0.0, 0.0, 0.0), scale=1.0, seed=0):
    """A textured ellipsoid ("vertebra") and its mask, centred in the crop plus ``shift`` voxels."""
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij")
    c = (np.asarray(SHAPE) - 1) / 2 + np.asarray(shift)
    r = np.sqrt(((z - c[0]) / (8 * scale)) ** 2 + ((y - c[1]) / (12 * scale)) ** 2
                + ((x - c[2]) / (10 * scale)) ** 2)
    mask = (r <= 1).astype(np.uint8)
    texture = gaussian_filter(np.random.default_rng(seed).standard_normal(SHAPE), 2) * 0.5
    volume = gaussian_filter(mask.astype(np.float64), 1.0) + 0.3 * (r <= 0.5) + mask * texture
    return volume.astype(np.float32), mask


# -- without antspyx ----------------------------------------------------------------------------------------

def test_missing_antspyx_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ants", None)  # makes "import ants" fail
    image = sitk.GetImageFromArray(np.zeros(SHAPE, np.float32))
    with pytest.raises(ImportError, match="pip install antspyx"):
        baselines.register_ants_syn(image, image)


def test_field_jacobian_of_a_linear_field_on_an_oblique_grid():
    """u(p) = B (p - c) in mm on an oblique, flipped, anisotropic grid: det(I + B) everywhere."""
    spacing, direction, origin = (0.8, 1.3, 2.1), oblique_flipped_direction(), (12.0, -30.0, 7.5)
    grid = make_image(np.zeros((9, 10, 11), np.float32), spacing, direction, origin)
    b = np.array([[0.05, -0.1, 0.02], [0.03, 0.08, -0.04], [0.1, 0.0, -0.06]])
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in (11, 10, 9)], indexing="ij"), -1).reshape(-1, 3)
    points = np.asarray(origin) + idx @ (direction @ np.diag(spacing)).T
    u = (points - points.mean(0)) @ b.T  # rows in (x, y, z) index order
    field = sitk.GetImageFromArray(u.reshape(11, 10, 9, 3).transpose(2, 1, 0, 3), isVector=True)
    field.CopyInformation(grid)
    np.testing.assert_allclose(baselines.field_jacobian(field), np.linalg.det(np.eye(3) + b), rtol=1e-9)


# -- SimpleITK <-> ANTs ----------------------------------------------------------------------------------------

def test_sitk_ants_round_trip_keeps_values_and_geometry(ants, tmp_path):
    spacing, direction, origin = (0.7, 1.3, 2.9), oblique_flipped_direction(), (-101.25, 33.5, 1207.0)
    values = np.random.default_rng(1).standard_normal((5, 7, 9)).astype(np.float32)  # (z, y, x)
    image = make_image(values, spacing, direction, origin)

    a = baselines.sitk_to_ants(image)
    assert a.shape == (9, 7, 5)  # ANTs arrays are (x, y, z)
    np.testing.assert_array_equal(a.numpy(), values.transpose(2, 1, 0))
    assert a.origin == pytest.approx(origin, abs=0) and a.spacing == pytest.approx(spacing, abs=0)
    np.testing.assert_array_equal(a.direction, direction)
    # The same voxel is at the same physical point for both libraries.
    for index in [(0, 0, 0), (8, 0, 0), (0, 6, 0), (0, 0, 4), (3, 5, 2)]:
        np.testing.assert_allclose(ants.transform_index_to_physical_point(a, index),
                                   image.TransformIndexToPhysicalPoint(index), atol=1e-9)
        assert a[index] == image[index]

    back = baselines.ants_to_sitk(a)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), values)
    assert back.GetOrigin() == image.GetOrigin() and back.GetSpacing() == image.GetSpacing()
    assert back.GetDirection() == image.GetDirection()

    # Independent path: ANTs writes NIfTI, SimpleITK reads it (float32 header: tolerances).
    ants.image_write(a, str(tmp_path / "a.nii.gz"))
    read = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), values)
    np.testing.assert_allclose(read.GetOrigin(), origin, atol=1e-3)
    np.testing.assert_allclose(read.GetDirection(), direction.ravel(), atol=1e-5)
    np.testing.assert_allclose(read.GetSpacing(), spacing, atol=1e-5)

    mask = make_image((values > 0).astype(np.uint8), spacing, direction, origin)
    mask_back = baselines.ants_to_sitk(baselines.sitk_to_ants(mask))
    assert mask_back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask_back), values > 0)


# -- registration ----------------------------------------------------------------------------------------------

GEOMETRY = dict(spacing=SPACING, direction=oblique_flipped_direction(15.0), origin=(-40.0, 20.0, 100.0))


@pytest.fixture(scope="module")
def synthetic_pair():
    (fv, fm), (mv, mm) = blob(), blob(shift=(2.0, -3.0, 2.5), scale=1.12, seed=1)
    return tuple(make_image(a, **GEOMETRY) for a in (fv, mv, fm, mm))


@pytest.fixture(scope="module")
def syn_result(ants, synthetic_pair):
    fixed, moving, fixed_label, moving_label = synthetic_pair
    return baselines.register_ants_syn(fixed, moving, fixed_label, moving_label, threads=2)


def test_syn_improves_dice_with_little_folding(syn_result):
    m = syn_result.metrics
    assert set(m) == set(STAGES)
    assert m["initial"]["dice"] < 0.8
    assert m["final"]["dice"] > 0.9 and m["final"]["dice"] > m["initial"]["dice"] + 0.15
    assert m["affine"]["dice"] > m["initial"]["dice"]
    assert m["final"]["assd_mm"] < m["initial"]["assd_mm"]
    assert m["final"]["nonpositive_jacobian_percent"] < 0.1
    assert m["final"]["nonpositive_jacobian"] == int((syn_result.jacobian <= 0).sum())
    assert syn_result.seconds > 0 and syn_result.method == "ANTs SyN"


def test_outputs_live_on_the_fixed_grid(syn_result, synthetic_pair):
    fixed = synthetic_pair[0]
    for image in (syn_result.warped, syn_result.warped_affine, syn_result.warped_label,
                  syn_result.warped_label_affine, syn_result.forward_field):
        assert image.GetSize() == fixed.GetSize()
        assert image.GetOrigin() == fixed.GetOrigin() and image.GetSpacing() == fixed.GetSpacing()
        assert image.GetDirection() == fixed.GetDirection()
    for label in (syn_result.warped_label, syn_result.warped_label_affine):
        assert label.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayViewFromImage(label))) <= {0, 1}
    assert syn_result.jacobian.shape == SHAPE


def test_forward_field_applied_by_simpleitk_gives_the_ants_result(syn_result, synthetic_pair):
    """The composed field follows ITK's convention (fixed point p -> moving point p + u(p), mm, LPS)."""
    _, moving, _, moving_label = synthetic_pair
    transform = syn_result.forward_transform()
    warped = sitk.Resample(moving, syn_result.warped, transform, sitk.sitkLinear, 0.0)
    diff = np.abs(sitk.GetArrayFromImage(warped) - sitk.GetArrayFromImage(syn_result.warped))
    assert diff.max() < 1e-3 * np.ptp(sitk.GetArrayFromImage(moving))
    label = sitk.GetArrayFromImage(sitk.Resample(moving_label, syn_result.warped, transform,
                                                 sitk.sitkNearestNeighbor, 0))
    ours = sitk.GetArrayFromImage(syn_result.warped_label)
    assert 2 * np.logical_and(label, ours).sum() / (label.sum() + ours.sum()) > 0.95  # genericLabel vs nearest


def test_jacobian_agrees_with_ants(ants, synthetic_pair, tmp_path):
    """Our central-difference det(I + grad w) of the SyN warp against ANTs' own Jacobian image."""
    fixed, moving = synthetic_pair[:2]
    a_fixed = baselines.sitk_to_ants(fixed)
    reg = ants.registration(a_fixed, baselines.sitk_to_ants(moving), "SyN", outprefix=str(tmp_path / "r_"))
    warp = [f for f in reg["fwdtransforms"] if f.endswith("1Warp.nii.gz")][0]
    ours = baselines.field_jacobian(sitk.ReadImage(warp))
    theirs = baselines.ants_to_sitk(ants.create_jacobian_determinant_image(a_fixed, warp))
    inner = (slice(2, -2),) * 3  # away from the faces, where one-sided differences differ
    a, b = ours[inner].ravel() - 1, sitk.GetArrayFromImage(theirs)[inner].ravel() - 1
    assert np.ptp(a) > 0.05  # a real deformation, not the identity
    # ITK's finite-difference stencil differs a little from central differences: compare the fields'
    # shape (correlation) and scale (slope), which a units or axis-order error would break.
    assert np.corrcoef(a, b)[0, 1] > 0.995
    assert 0.97 < np.dot(a, b) / np.dot(b, b) < 1.03
    assert np.abs(a - b).mean() < 2e-3


def test_labels_must_sit_on_their_images_grid(ants, synthetic_pair):
    fixed, moving, fixed_label, moving_label = synthetic_pair
    shifted = sitk.Image(moving_label)
    shifted.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(InputError, match="moving label is not on its image's grid"):
        baselines.register_ants_syn(fixed, moving, fixed_label, shifted)
    with pytest.raises(TypeError, match="outprefix"):
        baselines.register_ants_syn(fixed, moving, outprefix="/tmp/x")


def test_threads_go_to_itk(ants, syn_result):
    assert os.environ[baselines.THREADS_ENV] == "2"
