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


def test_affine_stage_dice_sampled_near_the_label_equals_soft_dice_and_its_gradient():
    """The affine stage samples the moving label only where it can be non-zero (its bounding box): the loss and
    the gradient with respect to the coordinates are soft_dice's, including at integer positions on the box."""
    from ACSGRegistrationLib.layers import identity_grid, sample
    from ACSGRegistrationLib.registrar import _LabelDice
    torch.manual_seed(0)
    fixed = torch.zeros(2, 1, 16, 24, 20)
    fixed[:, :, 4:11, 6:15, 5:16] = 1.0
    moving = torch.zeros(2, 1, 16, 24, 20)
    moving[0, :, 5:12, 8:16, 6:15] = 1.0
    moving[1, :, 3:9, 9:20, 4:12] = 0.6
    coords = identity_grid((16, 24, 20), "cpu", torch.float32) + torch.randn(2, 3, 16, 24, 20) * 1.5
    coords[:, :, ::3] = coords[:, :, ::3].round()  # integer positions, where the gradient reads both neighbours
    coords.requires_grad_(True)
    expected = soft_dice(fixed, sample(moving, coords))
    grad_expected, = torch.autograd.grad(expected, coords)
    ours = _LabelDice(fixed, moving)(coords)
    grad_ours, = torch.autograd.grad(ours, coords)
    assert torch.allclose(ours, expected, atol=1e-6)
    assert torch.allclose(grad_ours, grad_expected, atol=1e-9)
    assert grad_expected.abs().max() > 1e-4


def test_registration_loss_takes_the_edge_aware_smoothness_when_asked():
    import dataclasses
    torch.manual_seed(0)
    fixed = torch.zeros(1, 1, 10, 10, 10)
    fixed[..., 4:] = 1.0  # an edge across x
    displacement = torch.zeros(1, 3, 10, 10, 10)
    displacement[..., 4:] = 2.0  # the field jumps at the edge
    out = {"warped_affine": fixed, "warped": fixed, "displacement": displacement}
    plain = RegistrationLoss(LossConfig())(fixed, out)["smoothness"]
    aware = RegistrationLoss(dataclasses.replace(LossConfig(), smoothness_edge_alpha=5.0))(fixed, out)["smoothness"]
    assert plain > 0 and aware < 0.01 * plain
