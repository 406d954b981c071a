import numpy as np
import pytest

from ACSGRegistrationLib.metrics import assd, folding, jacobian_determinant, overlap, stage_metrics


def sphere(shape, radius_mm, spacing_xyz, center_mm=None):
    zz, yy, xx = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing_xyz[::-1])], indexing="ij")
    if center_mm is None:
        center_mm = [(n - 1) * s / 2 for n, s in zip(shape, spacing_xyz[::-1])]
    d = np.sqrt((zz - center_mm[0]) ** 2 + (yy - center_mm[1]) ** 2 + (xx - center_mm[2]) ** 2)
    return (d <= radius_mm).astype(np.uint8)


@pytest.mark.parametrize("spacing", [(0.5, 0.5, 0.5), (0.4, 0.4, 0.8)])
def test_assd_of_concentric_spheres_matches_the_radius_difference(spacing):
    shape = (64, 80, 80) if spacing[2] == 0.5 else (40, 80, 80)
    a = sphere(shape, 12.0, spacing)
    b = sphere(shape, 9.0, spacing)
    # Boundary voxels lie up to one voxel inside the continuous surface: allow the largest voxel size.
    assert assd(a, b, spacing) == pytest.approx(3.0, abs=max(spacing))
    assert assd(a, a, spacing) == pytest.approx(0.0, abs=1e-9)


def test_assd_respects_spacing():
    a = sphere((40, 40, 40), 8.0, (1, 1, 1))
    b = np.roll(a, 3, axis=2)  # 3 voxels along x
    d1 = assd(a, b, (1, 1, 1))
    assert d1 > 0.5
    assert assd(a, b, (2, 2, 2)) == pytest.approx(2 * d1)
    # Stretching only the axis of the shift lengthens the distances, but less than twofold.
    assert d1 < assd(a, b, (2, 1, 1)) < 2 * d1


def test_overlap_scores():
    a = np.zeros((10, 10, 10))
    a[2:6] = 1
    b = np.zeros((10, 10, 10))
    b[4:8] = 1
    o = overlap(a, b)
    assert o["dice"] == pytest.approx(0.5)
    assert o["precision"] == pytest.approx(0.5) and o["recall"] == pytest.approx(0.5)


def test_jacobian_of_the_identity_is_one():
    j = jacobian_determinant(np.zeros((3, 8, 9, 10)))
    assert np.allclose(j, 1.0)
    assert folding(j)["nonpositive_jacobian"] == 0


def test_jacobian_of_a_scaling():
    shape = (12, 12, 12)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    u = 0.2 * grid  # x -> 1.2 x
    assert np.allclose(jacobian_determinant(u), 1.2 ** 3)


def test_a_constructed_fold_is_counted():
    shape = (10, 10, 20)
    u = np.zeros((3,) + shape)
    x = np.arange(shape[2], dtype=float)
    # Along x, map x -> x - 3 (x - 10) inside 8..12: the slope there is -2, so the map folds.
    fold = np.clip(x, 8, 12) - 10
    u[2] = -3 * fold[None, None, :]
    j = jacobian_determinant(u)
    f = folding(j)
    assert f["nonpositive_jacobian"] > 0
    assert f["nonpositive_jacobian"] == int((j <= 0).sum())
    assert f["nonpositive_jacobian_percent"] == pytest.approx(100 * f["nonpositive_jacobian"] / j.size)
    assert np.all(j[:, :, :6] > 0)  # far from the fold the map is regular


def test_stage_metrics_table():
    a = sphere((30, 30, 30), 8.0, (1, 1, 1))
    table = stage_metrics(a, {"initial": np.roll(a, 4, 0), "affine": np.roll(a, 1, 0), "final": a})
    assert table["initial"]["dice"] < table["affine"]["dice"] < table["final"]["dice"] == 1.0
    assert table["final"]["assd_mm"] == 0.0 < table["affine"]["assd_mm"] < table["initial"]["assd_mm"]


def test_empty_label_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        assd(np.zeros((5, 5, 5)), np.ones((5, 5, 5)))


def test_assd_equals_the_brute_force_mean_of_surface_distances():
    """ASSD (computed in the masks' bounding box) against every pair of boundary points, masks touching the
    image's edge included (their edge voxels are not boundary)."""
    rng = np.random.default_rng(3)
    spacing = (0.8, 1.3, 2.0)
    for _ in range(3):
        a = np.zeros((14, 18, 16), bool)
        b = np.zeros_like(a)
        a[rng.integers(0, 4):rng.integers(8, 15), 2:rng.integers(9, 18), rng.integers(0, 5):12] = True
        b[3:rng.integers(9, 13), rng.integers(0, 6):15, 4:rng.integers(10, 17)] = True

        def boundary(mask):
            padded = np.pad(mask, 1, mode="edge")  # outside the image counts as the mask itself
            inner = np.ones_like(mask)
            for dz in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        inner &= padded[1 + dz:15 + dz, 1 + dy:19 + dy, 1 + dx:17 + dx]
            return np.argwhere(mask & ~inner) * np.asarray(spacing[::-1])
        pa, pb = boundary(a), boundary(b)
        distances = np.linalg.norm(pa[:, None] - pb[None], axis=2)
        expected = (distances.min(1).sum() + distances.min(0).sum()) / (len(pa) + len(pb))
        assert assd(a, b, spacing) == pytest.approx(expected, rel=1e-9)
