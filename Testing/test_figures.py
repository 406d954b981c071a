"""Figures: the paper's Figure 6 for a real registration (orientation, fold markers) and Figure 5 curves."""

import csv
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

pytest.importorskip("matplotlib")

from ACSGRegistrationLib import figures  # noqa: E402
from ACSGRegistrationLib.config import tiny_config  # noqa: E402
from ACSGRegistrationLib.metrics import jacobian_determinant  # noqa: E402
from ACSGRegistrationLib.networks import RegistrationNet  # noqa: E402
from ACSGRegistrationLib.registrar import Registrar  # noqa: E402
from conftest import ROOT  # noqa: E402

SHAPE = (32, 64, 64)  # real_pair_2mm's arrays
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def folding_model(weight):
    """Untrained tiny AVoxelMorph (plain displacement, no integration): a clear affine, and with a large
    flow head a deformation rough enough to fold; weight 0 keeps the deformable stage at identity."""
    torch.manual_seed(0)
    net = RegistrationNet(tiny_config("avoxelmorph", SHAPE, input_spacing=2.0))  # the 2 mm crops' own grid
    with torch.no_grad():
        net.affine.fc.bias.copy_(torch.tensor([[0.97, 0.08, 0.0, 1.2], [-0.08, 0.97, 0.04, -1.5],
                                               [0.0, -0.04, 1.03, 0.8]]).flatten())
        if weight:
            net.deformable.head.weight.normal_(0, weight)
    return net.eval()


@pytest.fixture(scope="module")
def results(real_pair_2mm):
    fixed, moving = real_pair_2mm
    out = {}
    for name, weight in (("identity", 0.0), ("folded", 3.0)):
        out[name] = Registrar(model=folding_model(weight), device="cpu").register(
            fixed.image, moving.image, fixed.label, moving.label)
    return out


def read_png(path):
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE
    from matplotlib.image import imread
    return imread(path)


def panel(image, box, margin=1):
    left, top, right, bottom = box
    return image[top + margin:bottom - margin, left + margin:right - margin, :3]


def black(pixels):
    return np.all(pixels < 0.12, axis=-1)


def mid_folds(jacobian):
    j = sitk.GetArrayFromImage(jacobian)
    return {"transversal": int((j[j.shape[0] // 2] <= 0).sum()), "sagittal": int((j[:, :, j.shape[2] // 2] <= 0).sum())}


def test_deformable_field_is_the_one_the_jacobian_describes(results):
    result = results["folded"]
    u = figures.deformable_field(result)  # (z, y, x, 3) LPS mm; the crop is identity-direction
    voxels = np.moveaxis(u[..., ::-1] / np.asarray(result.fixed.GetSpacing())[::-1], -1, 0)
    np.testing.assert_allclose(jacobian_determinant(voxels), sitk.GetArrayFromImage(result.jacobian), atol=1e-3)
    ident = figures.deformable_field(results["identity"])
    assert np.abs(ident).max() < 1e-3  # the exported field holds the affine, the deformable part is zero


def test_registration_figure_marks_folds_exactly_where_they_are(results, real_pair_2mm, tmp_path):
    fixed_label = real_pair_2mm[0].label
    images, infos = {}, {}
    for name, result in results.items():
        path = str(tmp_path / f"{name}.png")
        infos[name] = figures.registration_figure(result, path, title=name, fixed_label=fixed_label)
        assert os.path.getsize(path) > 20_000
        images[name] = read_png(path)
        h, w = images[name].shape[:2]
        assert w > 1500 and 400 < h < w
    assert sorted(os.listdir(tmp_path)) == ["folded.png", "identity.png"]  # no temporary files left

    expected = mid_folds(results["folded"].jacobian)
    assert sum(expected.values()) > 0, "the perturbed model should fold somewhere in the middle planes"
    for name in results:
        shown = mid_folds(results[name].jacobian)
        assert infos[name]["folds"] == shown
        for row in figures.ROWS:
            marks = black(panel(images[name], infos[name]["panels"][(row, "jacobian")])).sum()
            assert (marks > 0) == (shown[row] > 0), (name, row, marks, shown[row])
    assert sum(mid_folds(results["identity"].jacobian).values()) == 0

    # The colour-coded field: uniform grey for the identity deformable stage, varied for the other.
    flat = panel(images["identity"], infos["identity"]["panels"][("transversal", "field_rgb")])
    varied = panel(images["folded"], infos["folded"]["panels"][("transversal", "field_rgb")])
    assert flat.std() < 0.01 and np.allclose(flat.mean(), 0.5, atol=0.02)
    assert varied.std() > 0.02


def test_orientation_of_the_planes(results, tmp_path):
    """One folded voxel in each plane shows up where the radiological convention puts it."""
    result = results["identity"]
    jac = np.ones(SHAPE, dtype=np.float32)
    nz, ny, nx = SHAPE
    # Transversal plane (z = 16): anterior-left voxel (small y, large x): top right of the panel.
    jac[nz // 2, 8, 52] = -0.5
    # Sagittal plane (x = 32): superior-posterior voxel (large z, large y): top right of the panel.
    jac[26, 50, nx // 2] = -0.5
    image = sitk.GetImageFromArray(jac)
    image.CopyInformation(result.jacobian)
    info = figures.registration_figure(dataclasses.replace(result, jacobian=image), str(tmp_path / "o.png"))
    png = read_png(str(tmp_path / "o.png"))
    assert info["folds"] == {"transversal": 1, "sagittal": 1}
    for row, (h_frac, v_frac) in (("transversal", ((52 + 0.5) / nx, (8 + 0.5) / ny)),
                                  ("sagittal", ((50 + 0.5) / ny, 1 - (26 + 0.5) / nz))):
        left, top, right, bottom = info["panels"][(row, "jacobian")]
        ys, xs = np.nonzero(black(panel(png, (left, top, right, bottom), margin=0)))
        assert len(xs) > 0
        # The centre of the black marks (fill, outline, ring) is on the voxel's centre.
        assert abs(np.median(xs) / (right - left) - h_frac) < 0.03, row
        assert abs(np.median(ys) / (bottom - top) - v_frac) < 0.05, row


def write_history(path, rows):
    keys = list(rows[0])
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, keys)
        writer.writeheader()
        writer.writerows(rows)


def synthetic_history(steps, level, with_dice, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(1, steps + 1):
        decay = np.exp(-s / (steps / 4))
        row = {"step": s, "total": 0.0,
               "affine_ncc": -0.3 - 0.3 * (1 - decay) * level + 0.03 * rng.standard_normal(),
               "deformable_ncc": -0.4 - 0.4 * (1 - decay) * level + 0.03 * rng.standard_normal(),
               "smoothness": 0.02 * decay + 0.002 * rng.random()}
        if with_dice:
            row["affine_dice"] = -0.6 - 0.1 * (1 - decay) + 0.02 * rng.standard_normal()
            row["deformable_dice"] = -0.7 - 0.2 * (1 - decay) + 0.02 * rng.standard_normal()
        rows.append(row)
    return rows


def test_loss_curves_figure(tmp_path):
    acsg = synthetic_history(300, 1.0, True, 0)
    avm = synthetic_history(180, 0.8, False, 1)
    run_dir = tmp_path / "acsgregnet"
    run_dir.mkdir()
    write_history(str(run_dir / "history.csv"), acsg)
    # A run without labels has empty Dice cells, as the trainer's csv writer leaves them.
    avm_rows = [dict(r, affine_dice="", deformable_dice="") for r in avm]

    path = str(tmp_path / "curves.png")
    info = figures.loss_curves_figure({"ACSGRegNet": str(run_dir), "AVoxelMorph": avm_rows}, path,
                                      title="Training loss")
    assert info["runs"] == {"ACSGRegNet": 300, "AVoxelMorph": 180}
    assert info["windows"] == {"ACSGRegNet": 6, "AVoxelMorph": 4}
    assert set(info["terms"]["ACSGRegNet"]) == {"affine_ncc", "affine_dice", "deformable_ncc",
                                                 "deformable_dice", "smoothness"}
    assert set(info["terms"]["AVoxelMorph"]) == {"affine_ncc", "deformable_ncc", "smoothness"}
    image = read_png(path)
    assert image.shape[1] > 1200 and image.shape[0] > 400 and os.path.getsize(path) > 20_000

    # One csv path, and a handful of rows (window 1: no smoothing).
    single = figures.loss_curves_figure(str(run_dir / "history.csv"), str(tmp_path / "one.png"))
    assert single["runs"] == {"acsgregnet": 300}
    few = figures.loss_curves_figure(acsg[:5], str(tmp_path / "few.png"))
    assert few["windows"] == {"run": 1}
    assert os.path.getsize(tmp_path / "few.png") > 5_000
    with pytest.raises(ValueError):
        figures.loss_curves_figure([], str(tmp_path / "none.png"))
    assert not os.path.exists(tmp_path / "none.png")


def test_moving_average():
    v = np.array([1.0, 1.0, np.nan, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(figures.moving_average(v, 3), 1.0)
    ramp = np.arange(10.0)
    np.testing.assert_allclose(figures.moving_average(ramp, 3)[1:-1], ramp[1:-1])
    np.testing.assert_array_equal(figures.moving_average(ramp, 1), ramp)
    assert figures.smoothing_window(10) == 1 and figures.smoothing_window(1000) == 20


def test_backend_does_not_need_matplotlib_and_figures_leave_pyplot_alone(tmp_path):
    code = ("import sys; import ACSGRegistrationLib.figures as f; assert 'matplotlib' not in sys.modules; "
            f"f.loss_curves_figure([{{'step': 1, 'affine_ncc': -0.5}}], {str(tmp_path / 'x.png')!r}); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "ACSGRegistration"))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(tmp_path))
