"""Every bad input the command line and the Python API must refuse: one line naming the file, label or option,
exit code 2 (never a traceback), and nothing written — no output folder, no hidden leftovers beside it."""

import os
import pickle
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ACSGRegistrationLib.checkpoint import load_checkpoint
from ACSGRegistrationLib.cli import main
from ACSGRegistrationLib.config import tiny_config
from ACSGRegistrationLib.errors import CheckpointError, InputError
from ACSGRegistrationLib.inference import native_bf16
from ACSGRegistrationLib.networks import RegistrationNet
from ACSGRegistrationLib.outputs import MANIFEST
from ACSGRegistrationLib.registrar import Registrar
from conftest import data_path, refused, register_args, write  # the fixtures scan, model, files: conftest


# -- the images --------------------------------------------------------------------------------------------
def test_whole_scans_without_vertebra_choice_are_refused(files, capsys, model):
    refused(register_args(files["ct"], files["ct"], files["out"], files["seg"], files["seg"], None, None, model),
            "choose the fixed vertebra", capsys, files["out"])


def test_whole_scans_without_label_maps_are_not_taken_for_crops(files, capsys, model):
    refused(register_args(files["ct"], files["ct"], files["out"], checkpoint=model),
            "a whole scan, not a vertebra crop", capsys, files["out"])


@pytest.mark.parametrize("suffix, message", [(".nii.gz", "cut short"), (".nii", "truncated")])
def test_truncated_nifti_is_refused_not_read_as_zeros(files, scan, capsys, model, suffix, message):
    whole = write(scan[0], files["dir"], "whole" + suffix)
    data = open(whole, "rb").read()
    cut = os.path.join(files["dir"], "cut" + suffix)
    with open(cut, "wb") as fh:
        fh.write(data[:len(data) * 2 // 3])
    err = refused(register_args(cut, files["ct"], files["out"], files["seg"], files["seg"], checkpoint=model),
                  message, capsys, files["out"])
    assert "cut" + suffix in err  # names the file


def test_constant_image_is_refused(files, scan, capsys, model):
    flat = sitk.Image(scan[0])
    flat = sitk.Cast(flat * 0 + 40, scan[0].GetPixelID())
    path = write(flat, files["dir"], "flat.nii.gz")
    refused(register_args(files["ct"], path, files["out"], files["seg"], files["seg"], checkpoint=model),
            "the moving image is constant", capsys, files["out"])


def test_ct_without_rescale_intercept_is_refused_not_clipped(files, scan, capsys, model):
    """A CT stored from 0 up (no intercept applied): taking it for HU would silently clip it."""
    raw = sitk.Cast(sitk.Clamp(scan[0], lowerBound=-1024) + 1024, sitk.sitkUInt16)
    path = write(raw, files["dir"], "raw.nii.gz")
    refused(register_args(path, files["ct"], files["out"], files["seg"], files["seg"], checkpoint=model),
            "neither Hounsfield units", capsys, files["out"])


def test_two_component_and_2d_images_are_refused(files, scan, capsys, model):
    pair = write(sitk.Compose(scan[0], scan[0]), files["dir"], "vector.nii.gz")
    refused(register_args(pair, files["ct"], files["out"], files["seg"], files["seg"], checkpoint=model),
            "2 values per voxel", capsys, files["out"])
    flat = write(scan[0][:, :, 50], files["dir"], "slice.nii.gz")
    refused(register_args(flat, files["ct"], files["out"], files["seg"], files["seg"], checkpoint=model),
            "is 2D; a 3D volume is needed", capsys, files["out"])


def test_missing_file(files, capsys, model):
    refused(register_args(os.path.join(files["dir"], "absent.nii.gz"), files["ct"], files["out"], checkpoint=model),
            "argument --fixed: " + os.path.join(files["dir"], "absent.nii.gz") + ": no such file", capsys,
            files["out"])


# -- the label maps ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vertebra, message", [("0", "label 0 is the background"), ("99", "label 99 is not in"),
                                               ("C3", "cannot find 'C3'")])
def test_labels_that_are_not_a_vertebra_of_the_map(files, capsys, model, vertebra, message):
    refused(register_args(files["ct"], files["ct"], files["out"], files["seg"], files["seg"], vertebra, "L1", model),
            message, capsys, files["out"])


def test_one_voxel_label_is_too_small(files, scan, capsys, model):
    speck = sitk.Image(scan[1].GetSize(), sitk.sitkUInt8)
    speck.CopyInformation(scan[1])
    speck[60, 50, 60] = 1
    path = write(speck, files["dir"], "speck.nii.gz")
    refused(register_args(files["ct"], files["ct"], files["out"], path, files["seg"], "1", "L1", model),
            "too small for a vertebra", capsys, files["out"])


@pytest.mark.parametrize("change, message", [
    (lambda seg: seg.SetOrigin(np.add(seg.GetOrigin(), (30.0, 0.0, 0.0)).tolist()), "origin 30.0 mm away"),
    (lambda seg: seg.SetSpacing((2.0, 2.0, 2.0)), "voxel size (2, 2, 2) where its image has (3, 3, 3)"),
    (lambda seg: seg.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1)), "another orientation"),
])
def test_label_map_off_its_image_is_refused(files, scan, capsys, model, change, message):
    seg = sitk.Image(scan[1])
    change(seg)
    path = write(seg, files["dir"], "moved_seg.nii.gz")
    err = refused(register_args(files["ct"], files["ct"], files["out"], files["seg"], path, checkpoint=model),
                  message, capsys, files["out"])
    assert "moved_seg.nii.gz" in err


def test_label_map_on_another_grid_outside_its_image(files, scan, capsys, model):
    seg = sitk.RegionOfInterest(scan[1], [60, 60, 60], [20, 20, 20])
    seg.SetOrigin(np.add(seg.GetOrigin(), (0.0, 0.0, 900.0)).tolist())
    path = write(seg, files["dir"], "far_seg.nii.gz")
    refused(register_args(files["ct"], files["ct"], files["out"], files["seg"], path, checkpoint=model),
            "lies outside its image", capsys, files["out"])


def test_vertebra_without_label_map(files, capsys, model):
    args = register_args(files["ct"], files["ct"], files["out"], checkpoint=model) + ["--fixed-vertebra", "L1"]
    refused(args, "no fixed label map was given", capsys, files["out"])


# -- options -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--refine-steps", "-5"], "argument --refine-steps: must be at least 0 and at most 2000, got -5"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "device 'cuda:"),
    (["--intensity", "mri"], "argument --intensity: invalid choice"),
])
def test_register_options_out_of_range(files, capsys, model, extra, message):
    refused(register_args(files["ct"], files["ct"], files["out"], files["seg"], files["seg"], checkpoint=model,
                          extra=extra), message, capsys, files["out"])


@pytest.mark.skipif(native_bf16(torch.device("cpu")), reason="this CPU computes bf16 natively")
def test_bf16_where_the_cpu_would_only_emulate_it(files, capsys, model):
    refused(register_args(files["ct"], files["ct"], files["out"], files["seg"], files["seg"], checkpoint=model,
                          extra=["--precision", "bf16", "--device", "cpu"]), "does not compute bf16 natively",
            capsys, files["out"])


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["--checkpoint-every", "0"], "argument --checkpoint-every: must be at least 1"),
    (["--lr", "0"], "argument --lr: must be above 0.0"),
    (["--known-fraction", "2"], "argument --known-fraction: must be at least 0.0 and at most 1.0"),
    (["--steps", "ten"], "argument --steps: 'ten' is not a whole number"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_training_options_out_of_range(tmp_path, capsys, extra, message):
    out = str(tmp_path / "run")
    refused(["train", "--synthetic-labels", str(tmp_path), "--out", out, *extra], message, capsys, out)


def test_config_that_is_not_json_names_the_file(tmp_path, capsys):
    config = tmp_path / "model.yaml"
    config.write_text("input_shape: [64, 128, 128]\n")
    out = str(tmp_path / "run")
    refused(["train", "--synthetic-labels", data_path("shapes", "verse"), "--config", str(config), "--out", out,
             "--steps", "1"], f"--config {config} is not a valid JSON model configuration", capsys, out)


# -- output folders ------------------------------------------------------------------------------------------
def test_output_folder_problems_are_found_before_the_work(files, capsys, model, tmp_path):
    args = lambda out: register_args(files["ct"], files["ct"], out, files["seg"], files["seg"],  # noqa: E731
                                     checkpoint=model)
    a_file = tmp_path / "result.txt"
    a_file.write_text("mine")
    refused(args(str(a_file)), "is a file: give a folder", capsys, str(a_file))
    assert a_file.read_text() == "mine"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    refused(args(str(theirs)), "did not write", capsys, str(theirs))
    assert (theirs / "keep.txt").read_text() == "mine"
    inputs = os.path.dirname(files["seg"])
    own = register_args(files["ct"], files["ct"], inputs, files["seg"], files["seg"], checkpoint=model)
    assert main(own) == 2 and "holds the input" in capsys.readouterr().err


# -- checkpoints ---------------------------------------------------------------------------------------------
def damaged_copies(model, folder):
    """(path, message) of checkpoints damaged in the ways the issue found."""
    payload = load_checkpoint(model)
    payload.pop("model_config_obj")
    cases = []

    def save(name, data, message):
        path = os.path.join(folder, name)
        torch.save(data, path)
        cases.append((path, message))

    nan = dict(payload, state_dict=dict(payload["state_dict"]))
    key = next(k for k, v in nan["state_dict"].items() if v.is_floating_point())
    nan["state_dict"][key] = torch.full_like(nan["state_dict"][key], float("nan"))
    save("nan.pt", nan, "checksum mismatch")
    nan_rehashed = dict(nan)
    from ACSGRegistrationLib.checkpoint import content_hash
    nan_rehashed["content_sha256"] = content_hash(nan["model_config"], nan["state_dict"])
    save("nan_rehashed.pt", nan_rehashed, "NaN or infinite weights")
    edited = dict(payload, model_config=dict(payload["model_config"], input_spacing=1.0))
    save("spacing_edited.pt", edited, "checksum mismatch")
    steps = dict(payload, model_config=dict(payload["model_config"], integration_steps=3))
    save("steps_edited.pt", steps, "checksum mismatch")
    no_hash = {k: v for k, v in payload.items() if k != "content_sha256"}
    save("hash_removed.pt", no_hash, "lacks its checksum")
    # Flipped bytes inside the largest stored tensor (its record in the zip archive).
    with zipfile.ZipFile(model) as archive:
        largest = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda info: info.file_size)
    data = bytearray(open(model, "rb").read())
    local = data[largest.header_offset:largest.header_offset + 30]  # the local header's own name/extra lengths
    start = largest.header_offset + 30 + int.from_bytes(local[26:28], "little") \
        + int.from_bytes(local[28:30], "little") + largest.file_size // 2
    for i in range(8):
        data[start + i] ^= 0xFF
    flipped = os.path.join(folder, "flipped.pt")
    open(flipped, "wb").write(bytes(data))
    cases.append((flipped, "is damaged"))
    pickled = os.path.join(folder, "pickled.pt")
    with open(pickled, "wb") as fh:
        pickle.dump({"format": "acsgregistration-checkpoint", "net": Registrar}, fh)
    cases.append((pickled, "not a readable checkpoint"))
    return cases


def test_damaged_checkpoints_are_refused_with_their_reason(files, capsys, model, tmp_path):
    for path, message in damaged_copies(model, str(tmp_path)):
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
        err = refused(register_args(files["ct"], files["ct"], files["out"], files["seg"], files["seg"],
                                    checkpoint=path), message, capsys, files["out"])
        assert "weights_only=False" not in err and os.path.basename(path) in err


def test_finetuning_from_a_nan_checkpoint_is_refused(capsys, model, tmp_path):
    path, _ = next(c for c in damaged_copies(model, str(tmp_path)) if c[0].endswith("nan_rehashed.pt"))
    out = str(tmp_path / "run")
    refused(["finetune", "--checkpoint", path, "--synthetic-labels", data_path("shapes", "verse"), "--out", out,
             "--steps", "1"], "NaN or infinite weights", capsys, out)


# -- the Python API ------------------------------------------------------------------------------------------
def test_api_refuses_constant_images_tiny_labels_and_unknown_devices():
    torch.manual_seed(0)
    net = RegistrationNet(tiny_config(input_shape=(16, 32, 32)))
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        Registrar(model=net, device="tpu")
    registrar = Registrar(model=net, device="cpu")
    image = np.random.default_rng(0).random((16, 32, 32)).astype(np.float32)
    with pytest.raises(InputError, match="fixed image is constant"):
        registrar.register(np.full_like(image, 0.3), image)
    speck = np.zeros_like(image)
    speck[8, 16, 16] = 1
    with pytest.raises(InputError, match="fixed label covers 1 voxel"):
        registrar.register(image, image, speck, (image > 0.5).astype(np.float32))


def test_a_result_with_nan_is_an_error_never_written(tmp_path):
    torch.manual_seed(0)
    net = RegistrationNet(tiny_config(input_shape=(16, 32, 32)))
    with torch.no_grad():
        next(p for p in net.deformable.parameters() if p.dim() > 1).fill_(float("nan"))
    image = np.random.default_rng(0).random((16, 32, 32)).astype(np.float32)
    from ACSGRegistrationLib.errors import ResultError
    with pytest.raises(ResultError, match="NaN or infinite"):
        Registrar(model=net, device="cpu", affine_steps=0).register(image, image[::-1].copy())


def test_written_sets_carry_their_manifest(files, model, capsys):
    """A good run for contrast: the folder is complete and says so."""
    code = main(register_args(files["ct"], files["ct"], files["out"], files["seg"], files["seg"], "L1", "L2", model))
    assert code == 0, capsys.readouterr().err
    assert os.path.isfile(os.path.join(files["out"], MANIFEST))
    assert not [n for n in os.listdir(os.path.dirname(files["out"])) if n.startswith(".")]
