import math

import pytest
import torch

from ACSGRegistrationLib.config import (ModelConfig, model_config_from_dict, paper_config, tiny_config,
                                        to_dict)
from ACSGRegistrationLib.networks import RegistrationNet


def count(module):
    return sum(p.numel() for p in module.parameters())


def transformer_layer_params(e, m):
    attention = 3 * e * e + 3 * e + e * e + e  # q, k, v and output projections with biases
    mlp = e * m + m + m * e + e
    norms = 2 * 2 * e
    return attention + mlp + norms


@pytest.fixture(scope="module")
def paper_model():
    torch.manual_seed(0)
    return RegistrationNet(paper_config()).eval()


def test_paper_configuration_defaults():
    cfg = paper_config()
    assert cfg.input_shape == (64, 128, 128)  # the paper's 128 x 128 x 64 crop, (z, y, x)
    assert (cfg.acsg.embed_dim, cfg.acsg.num_heads, cfg.acsg.mlp_dim, cfg.acsg.num_layers, cfg.acsg.patch_size) \
        == (252, 12, 3072, 12, 8)
    assert len(cfg.affine.channels) == 5 and cfg.affine.blocks_per_level == 2
    assert cfg.integration_steps == 7


def test_paper_model_parameter_counts(paper_model):
    cfg = paper_model.config.acsg
    e, m = cfg.embed_dim, cfg.mlp_dim
    deformable = paper_model.deformable
    per_encoder = cfg.num_layers * transformer_layer_params(e, m) + 2 * e  # + final LayerNorm
    for name in ("self_attention_fixed", "self_attention_moving", "cross_attention"):
        assert count(getattr(deformable, name)) == per_encoder
    tokens = math.prod(deformable.token_grid)
    assert deformable.token_grid == (2, 4, 4)  # 1/4-resolution features cut into 8^3 patches
    assert deformable.position_fixed.numel() == deformable.position_moving.numel() == tokens * e
    assert count(deformable.embed) == cfg.encoder_channels[-1] * cfg.patch_size ** 3 * e + e
    # Affine head: 256 channels on a 2 x 4 x 4 grid -> 12 parameters.
    assert count(paper_model.affine.fc) == 256 * 2 * 4 * 4 * 12 + 12
    # 3 x 12 transformer layers (65.1 M) dominate the ~79 M parameters.
    assert 3 * per_encoder == 65_076_696
    assert 75e6 < count(paper_model) < 85e6


def test_paper_model_forward_on_a_full_size_pair(paper_model):
    fixed = torch.rand(1, 1, 64, 128, 128)
    moving = torch.roll(fixed, 3, dims=4)
    with torch.inference_mode():
        out = paper_model(fixed, moving, (moving > 0.5).float(), with_inverse=True)
    for key in ("velocity", "displacement", "total_map", "inverse_map"):
        assert out[key].shape == (1, 3, 64, 128, 128), key
    for key in ("warped", "warped_affine", "warped_label"):
        assert out[key].shape == (1, 1, 64, 128, 128)
    assert out["affine"].shape == (1, 3, 4)
    # At initialisation the affine is the identity and the deformation is tiny.
    assert torch.allclose(out["affine"], torch.eye(3, 4)[None], atol=1e-6)
    assert out["displacement"].abs().max() < 0.1
    assert torch.isfinite(out["warped"]).all()


def test_baseline_is_selected_from_the_same_config():
    net = RegistrationNet(paper_config("avoxelmorph"))
    assert type(net.deformable).__name__ == "VoxelMorphNet"
    assert net.integration_steps == 0  # the paper's baseline is the plain (non-diffeomorphic) VoxelMorph
    assert 5e6 < count(net) < 8e6


@pytest.mark.parametrize("method", ["acsgregnet", "avoxelmorph"])
def test_tiny_models_run_forward_and_backward(method):
    net = RegistrationNet(tiny_config(method))
    f, m = torch.rand(2, 1, 16, 32, 32), torch.rand(2, 1, 16, 32, 32)
    out = net(f, m)
    out["warped"].mean().backward()
    # The affine head starts at zero weights (identity output), so only it gets gradient in the affine
    # stage at first; every deformable parameter must get some.
    assert net.affine.fc.weight.grad.abs().sum() > 0
    grads = [p.grad for p in net.deformable.parameters()]
    assert all(g is not None for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) >= 0.9 * len(grads)


def test_half_resolution_velocity_option():
    cfg = tiny_config()
    cfg.acsg.velocity_downsample = 2
    out = RegistrationNet(cfg).eval()(torch.rand(1, 1, 16, 32, 32), torch.rand(1, 1, 16, 32, 32))
    assert out["velocity"].shape[2:] == (8, 16, 16)
    assert out["displacement"].shape[2:] == (16, 32, 32)


def test_config_round_trip_and_errors():
    cfg = tiny_config()
    assert model_config_from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown method"):
        ModelConfig(method="transmorph")
    with pytest.raises(ValueError, match="unknown field"):
        model_config_from_dict({"method": "acsgregnet", "depth": 3})
    bad = tiny_config()
    bad.acsg.decoder_channels = (8, 8)
    with pytest.raises(ValueError, match="decoder_channels needs 3 entries"):
        RegistrationNet(bad)
    odd = tiny_config(input_shape=(12, 32, 32))
    with pytest.raises(ValueError, match="divisible by 8"):
        RegistrationNet(odd)


@pytest.mark.parametrize("fixed_shape, moving_shape, message", [
    ((1, 1, 16, 32), (1, 1, 16, 32), "batch, 1, D, H, W"),
    ((1, 1, 16, 32, 32), (1, 1, 16, 32, 16), "shapes differ"),
    ((1, 1, 8, 32, 32), (1, 1, 8, 32, 32), "takes \\(16, 32, 32\\)"),
])
def test_network_rejects_bad_tensors(fixed_shape, moving_shape, message):
    net = RegistrationNet(tiny_config())
    with pytest.raises(ValueError, match=message):
        net(torch.rand(fixed_shape), torch.rand(moving_shape))
