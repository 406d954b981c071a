"""Training: the affine stage recovers a known motion, a tiny model overfits a real pair, runs resume."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ACSGRegistrationLib.checkpoint import load_checkpoint
from ACSGRegistrationLib.config import TrainConfig, tiny_config
from ACSGRegistrationLib.datasets import ArrayPairDataset
from ACSGRegistrationLib.errors import ResultError
from ACSGRegistrationLib.layers import affine_coordinates, identity_grid, sample
from ACSGRegistrationLib.losses import local_ncc
from ACSGRegistrationLib.networks.affine import AffineNet
from ACSGRegistrationLib.networks import RegistrationNet
from ACSGRegistrationLib.registrar import Registrar
from ACSGRegistrationLib.trainer import LAST, Trainer
from conftest import ROOT, arr

SHAPE = (32, 64, 64)


def pair_items(pair):
    fixed, moving = pair
    return [dict(fixed=arr(fixed.image), moving=arr(moving.image), fixed_label=arr(fixed.label),
                 moving_label=arr(moving.label))]


def test_affine_stage_recovers_a_known_rotation_and_translation(real_pair_2mm):
    fixed_crop = real_pair_2mm[1]
    fixed = torch.from_numpy(arr(fixed_crop.image))[None, None]
    # Moving = fixed under a known rigid motion: 8 degrees about z plus (1.5, -2, 2.5) voxels.
    angle = np.deg2rad(8.0)
    truth = torch.tensor([[[1.0, 0.0, 0.0, 1.5],
                           [0.0, np.cos(angle), -np.sin(angle), -2.0],
                           [0.0, np.sin(angle), np.cos(angle), 2.5]]], dtype=torch.float32)
    # moving(truth(x)) = fixed(x)  <=>  moving = fixed o truth^-1
    from ACSGRegistrationLib.layers import invert_affine
    moving = sample(fixed, affine_coordinates(invert_affine(truth), SHAPE, SHAPE))

    torch.manual_seed(0)
    # Optimised on this one pair in eval mode: batch-norm statistics stay fixed, so the matrix the loop
    # optimises is the one the network then reports.
    net = AffineNet(tiny_config(input_shape=SHAPE).affine, SHAPE).eval()
    optimiser = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(150):
        matrix = net(fixed, moving)
        loss = -local_ncc(fixed, sample(moving, affine_coordinates(matrix, SHAPE, SHAPE)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        matrix = net(fixed, moving)
    mask = torch.from_numpy(arr(fixed_crop.label)).bool()
    found = affine_coordinates(matrix, SHAPE, SHAPE)[0][:, mask]
    expected = affine_coordinates(truth, SHAPE, SHAPE)[0][:, mask]
    error = (found - expected).norm(dim=0)
    identity_error = (identity_grid(SHAPE)[0][:, mask] - expected).norm(dim=0)
    assert identity_error.mean() > 2.5  # voxels: the motion is real
    assert error.mean() < 0.25, f"mean error {error.mean():.2f} voxels (2 mm each)"


def test_tiny_model_overfits_one_real_pair(real_pair_2mm, tmp_path):
    items = pair_items(real_pair_2mm)
    cfg = tiny_config("acsgregnet", SHAPE)
    losses = []
    trainer = Trainer(cfg, TrainConfig(learning_rate=1e-3, batch_size=1, max_steps=40, checkpoint_every=100),
                      ArrayPairDataset(items), str(tmp_path), device="cpu",
                      progress=lambda step, total, terms: losses.append(terms["total"]), log=lambda *_: None)
    before = Registrar(model=trainer.model, device="cpu", affine_steps=0).register(
        items[0]["fixed"], items[0]["moving"], items[0]["fixed_label"], items[0]["moving_label"]).metrics
    summary = trainer.train()
    after = Registrar(model=trainer.model, device="cpu", affine_steps=0).register(
        items[0]["fixed"], items[0]["moving"], items[0]["fixed_label"], items[0]["moving_label"]).metrics
    assert summary["status"] == "finished" and summary["steps"] == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05
    assert after["final"]["dice"] > before["final"]["dice"] + 0.15
    assert after["final"]["dice"] > 0.85
    assert after["final"]["nonpositive_jacobian_percent"] < 1.0
    assert os.path.isfile(tmp_path / "model.pt") and os.path.isfile(tmp_path / "history.csv")


def synthetic_items(n=3, shape=(16, 32, 32)):
    g = torch.Generator().manual_seed(5)
    items = []
    for _ in range(n):
        coarse = torch.rand(2, 1, 4, 6, 6, generator=g)
        vols = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[:, 0]
        items.append(dict(fixed=vols[0].numpy(), moving=vols[1].numpy(),
                          fixed_label=(vols[0] > 0.5).float().numpy(), moving_label=(vols[1] > 0.5).float().numpy()))
    return items


def small_run(out, steps, stop_at=None, init=None, cfg=None):
    stops = {"n": 0}

    def should_stop():
        stops["n"] += 1
        return stop_at is not None and stops["n"] > stop_at
    trainer = Trainer(cfg if init is None else None,
                      TrainConfig(learning_rate=1e-3, batch_size=2, max_steps=steps, checkpoint_every=2, seed=3),
                      ArrayPairDataset(synthetic_items()), out, init_checkpoint=init, device="cpu",
                      should_stop=should_stop, log=lambda *_: None)
    return trainer, trainer.train()


def test_cancel_saves_and_resume_continues_the_same_schedule(tmp_path):
    cfg = tiny_config()
    reference, ref_summary = small_run(str(tmp_path / "ref"), 6, cfg=cfg)
    _, cancelled = small_run(str(tmp_path / "run"), 6, stop_at=3, cfg=cfg)
    assert cancelled["status"] == "cancelled" and cancelled["steps"] == 3
    resumed, summary = small_run(str(tmp_path / "run"), 6, cfg=cfg)
    assert summary["status"] == "finished" and summary["steps"] == 6
    ref_losses = [h["total"] for h in reference.history]
    run_losses = [h["total"] for h in resumed.history]
    assert run_losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-6)
    for a, b in zip(reference.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_diverging_training_stops_without_saving_the_bad_state(tmp_path):
    """A non-finite loss stops the run with an error; last.pt keeps the last good step (here: step 2)."""
    out = str(tmp_path / "run")
    trainer = Trainer(tiny_config(), TrainConfig(learning_rate=1e-3, batch_size=2, max_steps=6, checkpoint_every=2),
                      ArrayPairDataset(synthetic_items()), out, device="cpu", log=lambda *_: None)
    real_loss = trainer.loss

    def diverging(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        if trainer.step >= 3:
            terms["total"] = terms["total"] * float("nan")
        return terms
    trainer.loss = diverging
    with pytest.raises(ResultError, match="training diverged at step 4: non-finite loss"):
        trainer.train()
    payload = load_checkpoint(os.path.join(out, "last.pt"))  # checked: finite weights, intact checksum
    assert payload["step"] == 2
    assert not [name for name in os.listdir(out) if name.startswith(".tmp-")]


def test_one_training_run_per_folder(tmp_path):
    from ACSGRegistrationLib.errors import InputError
    from ACSGRegistrationLib.outputs import FolderLock
    out = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".tmp-abc-last.pt").write_bytes(b"half a checkpoint")  # left by a killed run
    with FolderLock(out, "the run folder"):
        with pytest.raises(InputError, match="the run folder .* is being written by another run"):
            small_run(out, 2, cfg=tiny_config())
    small_run(out, 2, cfg=tiny_config())
    assert not (tmp_path / "run" / ".tmp-abc-last.pt").exists()


def test_killed_training_resumes_from_its_checkpoint(tmp_path):
    """A CLI training run killed with SIGKILL mid-way resumes from its last checkpoint and finishes."""
    crops = make_crops_folder(tmp_path / "crops")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ACSGRegistrationLib", "train", "--crops", str(crops), "--out", str(out),
           "--config", "tiny", "--steps", "400", "--batch-size", "2", "--checkpoint-every", "2", "--lr", "1e-3",
           "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "ACSGRegistration"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / LAST).exists() and load_checkpoint(str(out / LAST))["step"] >= 4:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(str(out / LAST))["step"]
    assert 4 <= killed_at < 400
    cmd[cmd.index("--steps") + 1] = str(killed_at + 4)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {out / LAST} at step {killed_at}" in done.stdout
    state = load_checkpoint(str(out / LAST))
    assert state["step"] == killed_at + 4 and state["summary"]["status"] == "finished"
    assert [h["step"] for h in state["history"]] == list(range(1, killed_at + 5))


def make_crops_folder(folder, n=3, shape=(16, 32, 32)):
    from ACSGRegistrationLib.crops import CropRecord, write_crop, write_index
    os.makedirs(folder, exist_ok=True)
    records = []
    for k, item in enumerate(synthetic_items(n, shape)):
        image = sitk.GetImageFromArray(item["fixed"])
        label = sitk.GetImageFromArray(item["fixed_label"].astype(np.uint8))
        paths = write_crop(str(folder), f"s{k}_L1", image, label)
        records.append(CropRecord(f"s{k}_L1", f"s{k}", "L1", *paths))
    write_index(str(folder), records)
    return folder


def test_finetune_starts_from_the_checkpoint_weights(tmp_path):
    cfg = tiny_config()
    base, _ = small_run(str(tmp_path / "base"), 2, cfg=cfg)
    tuned, summary = small_run(str(tmp_path / "tuned"), 2, init=str(tmp_path / "base" / "model.pt"))
    assert summary["init_checkpoint"].endswith("model.pt") and summary["steps"] == 2
    assert tuned.model_config == cfg
    # Fine-tuning moved the weights away from the starting point, but not far (two small steps).
    start = base.model.state_dict()["affine.fc.bias"]
    now = tuned.model.state_dict()["affine.fc.bias"]
    assert 0 < (now - start).abs().max() < 0.05


def test_resume_refuses_another_configuration(tmp_path):
    from ACSGRegistrationLib.checkpoint import CheckpointError
    small_run(str(tmp_path / "run"), 2, cfg=tiny_config())
    other = tiny_config("avoxelmorph")
    with pytest.raises(CheckpointError, match="another model configuration"):
        small_run(str(tmp_path / "run"), 4, cfg=other)


def test_distributed_training_under_torchrun(tmp_path):
    """Two CPU processes (gloo) train the same schedule and write one checkpoint."""
    crops = make_crops_folder(tmp_path / "crops", n=4)
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "ACSGRegistration"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ACSGRegistrationLib", "train", "--crops", str(crops), "--out", str(out), "--config", "tiny",
           "--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = load_checkpoint(str(out / LAST))
    assert state["step"] == 3 and state["summary"]["world_size"] == 2
    assert os.path.isfile(out / "model.pt")


def test_test_time_refinement_improves_the_pair_and_can_be_cancelled(real_pair_2mm):
    from ACSGRegistrationLib.errors import Cancelled
    # The real L1 pair at 4 mm (16 x 32 x 32), to keep 25 optimisation steps cheap.
    half = lambda a: torch.nn.functional.avg_pool3d(torch.from_numpy(a)[None, None], 2)[0, 0].numpy()  # noqa: E731
    items = pair_items(real_pair_2mm)[0]
    args = [half(items[k]) for k in ("fixed", "moving", "fixed_label", "moving_label")]
    args[2], args[3] = (args[2] > 0.5).astype(np.float32), (args[3] > 0.5).astype(np.float32)
    torch.manual_seed(0)
    net = RegistrationNet(tiny_config("acsgregnet", (16, 32, 32)))
    plain = Registrar(model=net, device="cpu").register(*args).metrics
    seen = []
    refiner = Registrar(model=net, device="cpu", refine_steps=25,
                        progress=lambda step, total: seen.append((step, total)))
    refined_result = refiner.register(*args)
    refined = refined_result.metrics
    assert seen[-1] == (25, 25)
    assert refined["final"]["dice"] > plain["final"]["dice"] + 0.03, (plain["final"], refined["final"])
    # With the regularisers in its loss, the refined map does not fold.
    assert refined["final"]["nonpositive_jacobian"] == 0
    # Without labels, refinement still runs (image similarity and regularisers only).
    assert refiner.register(*args[:2]).metrics is None
    # The shared network itself is left as it was (refinement optimises the pair's maps, not the weights).
    assert Registrar(model=net, device="cpu").register(*args).metrics["final"]["dice"] == \
        pytest.approx(plain["final"]["dice"])
    calls = []
    stopper = Registrar(model=net, device="cpu", refine_steps=25, should_stop=lambda: len(calls) >= 2,
                        progress=lambda step, total: calls.append(step))
    with pytest.raises(Cancelled, match="cancelled at step 2 of 25"):
        stopper.register(*args)


def test_sigterm_stops_a_command_line_run_cleanly(tmp_path):
    """A stop request (SIGTERM, or Ctrl+C) ends the step in progress, saves, and exits with 130."""
    crops = make_crops_folder(tmp_path / "crops")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ACSGRegistrationLib", "train", "--crops", str(crops), "--out", str(out),
           "--config", "tiny", "--steps", "400", "--batch-size", "2", "--checkpoint-every", "2", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "ACSGRegistration"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / LAST).exists():
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "stop requested (SIGTERM)" in stdout
    state = load_checkpoint(str(out / LAST))
    assert state["summary"]["status"] == "cancelled" and 2 <= state["step"] < 400
