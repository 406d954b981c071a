import pytest
import torch

from ACSGRegistrationLib.config import LossConfig
from ACSGRegistrationLib.losses import RegistrationLoss, box_mean, diffusion_regulariser, local_ncc, soft_dice


def blobs(seed=0, shape=(1, 1, 20, 24, 22)):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(shape[:2] + (5, 6, 5), generator=g)
    return torch.nn.functional.interpolate(coarse, size=shape[2:], mode="trilinear", align_corners=True)


def test_lncc_of_an_image_with_itself_is_the_optimum():
    x = blobs()
    best = local_ncc(x, x)
    for other in (blobs(1), x + 0.05 * torch.randn_like(x), torch.roll(x, 2, dims=3)):
        assert local_ncc(x, other) < best - 0.01


def test_lncc_of_a_textured_image_with_itself_is_one():
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    assert local_ncc(x, x) == pytest.approx(1.0, abs=2e-3)


def test_lncc_is_symmetric_and_scale_invariant():
    a, b = blobs(0), blobs(1)
    assert local_ncc(a, b) == pytest.approx(float(local_ncc(b, a)), abs=1e-6)
    assert local_ncc(a, 3 * b + 1) == pytest.approx(float(local_ncc(a, b)), rel=0.05)


def test_lncc_is_finite_on_constant_images():
    flat = torch.zeros(1, 1, 12, 12, 12)
    value = local_ncc(flat, flat)
    assert torch.isfinite(value)


def test_lncc_rejects_even_windows():
    with pytest.raises(ValueError, match="odd"):
        local_ncc(blobs(), blobs(), window=4)


def test_box_mean_equals_full_average_pooling():
    x = torch.rand(2, 1, 11, 13, 12)
    full = torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False)
    assert torch.allclose(box_mean(x, 5), full, atol=1e-6)


def test_diffusion_regulariser():
    assert diffusion_regulariser(torch.ones(1, 3, 6, 6, 6)) == 0  # a translation is not penalised
    ramp = torch.arange(6.0).view(1, 1, 6, 1, 1).expand(1, 3, 6, 6, 6)
    assert diffusion_regulariser(ramp) == pytest.approx(1.0 / 3.0)


def test_soft_dice():
    a = torch.zeros(1, 1, 8, 8, 8)
    a[..., 2:6, 2:6, 2:6] = 1
    assert soft_dice(a, a) == pytest.approx(1.0)
    assert soft_dice(a, torch.zeros_like(a)) < 1e-3


def test_total_loss_uses_the_paper_weights():
    cfg = LossConfig()
    assert (cfg.affine_similarity, cfg.deformable_similarity, cfg.smoothness, cfg.affine_dice,
            cfg.deformable_dice, cfg.ncc_window) == (0.3, 0.7, 0.001, 0.01, 0.1, 9)
    f, m = blobs(0), blobs(1)
    lab = (f > 0.5).float()
    out = {"warped_affine": m, "warped": f, "displacement": torch.zeros(1, 3, 20, 24, 22),
           "warped_label_affine": lab, "warped_label": lab}
    terms = RegistrationLoss(cfg)(f, out, lab)
    expected = (0.3 * terms["affine_ncc"] + 0.7 * terms["deformable_ncc"] + 0.001 * terms["smoothness"]
                + 0.01 * terms["affine_dice"] + 0.1 * terms["deformable_dice"])
    assert terms["total"] == pytest.approx(float(expected))
    assert terms["deformable_ncc"] < terms["affine_ncc"]  # warped == fixed scores best
