"""Bad input gets a specific error, and the user's inputs are never modified."""

import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ACSGRegistrationLib.checkpoint import CheckpointError, build_model, content_hash, load_checkpoint, save_checkpoint
from ACSGRegistrationLib.config import tiny_config
from ACSGRegistrationLib.io import read_image
from ACSGRegistrationLib.networks import RegistrationNet
from ACSGRegistrationLib.preprocessing import PreprocessingError, crop_vertebra
from ACSGRegistrationLib.registrar import Registrar
from ACSGRegistrationLib.errors import InputError

SHAPE = (16, 32, 32)


@pytest.fixture(scope="module")
def registrar():
    torch.manual_seed(0)
    return Registrar(model=RegistrationNet(tiny_config(input_shape=SHAPE)), device="cpu")


def volume(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((32, 32), np.float32), "3D volume, got a 2D array"),
    (np.zeros((2, 16, 32, 32), np.float32), "3D volume, got a 4D array"),
])
def test_wrong_dimensions(registrar, bad, message):
    with pytest.raises(InputError, match=message):
        registrar.register(bad, volume())
    with pytest.raises(InputError, match="moving image must be a 3D volume"):
        registrar.register(volume(), bad)


def test_mismatched_label_shape(registrar):
    with pytest.raises(InputError, match="moving label has shape"):
        registrar.register(volume(), volume(), (volume() > 0.5), np.ones((8, 8, 8)))


def test_nans_are_reported_with_their_count(registrar):
    bad = volume()
    bad[0, 0, :3] = np.nan
    with pytest.raises(InputError, match="fixed image has 3 NaN or infinite voxel"):
        registrar.register(bad, volume())


def test_empty_label_map(registrar):
    with pytest.raises(InputError, match="fixed label is empty"):
        registrar.register(volume(), volume(seed=1), np.zeros(SHAPE), volume(seed=2) > 0.5)


def test_other_sizes_are_resampled_to_the_model_grid_and_back(registrar):
    # Any crop size works: the network sees its own grid, the results come back on the user's grids.
    fixed, moving = volume((20, 30, 36)), volume((24, 28, 30), seed=1)
    labels = (fixed > 0.5).astype(np.float32), (moving > 0.5).astype(np.float32)
    result = registrar.register(fixed, moving, *labels)
    assert result.warped.GetSize() == (36, 30, 20) and result.jacobian.GetSize() == (36, 30, 20)
    assert result.inverse_field.GetSize() == (30, 28, 24)
    assert result.metrics["initial"]["dice"] > 0.3


def test_inputs_are_not_modified(registrar):
    fixed, moving = volume(), volume(seed=1)
    label = (volume(seed=2) > 0.5).astype(np.float32)
    copies = [a.copy() for a in (fixed, moving, label)]
    image = sitk.GetImageFromArray(moving)
    image.SetOrigin((5.0, 6.0, 7.0))
    before = (image.GetOrigin(), sitk.GetArrayFromImage(image).copy())
    registrar.register(fixed, image, label, label)
    for a, b in zip((fixed, moving, label), copies):
        assert np.array_equal(a, b)
    assert image.GetOrigin() == before[0] and np.array_equal(sitk.GetArrayFromImage(image), before[1])


def test_gpu_requested_without_one():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(InputError, match="PyTorch sees no CUDA GPU"):
        Registrar(model=RegistrationNet(tiny_config()), device="gpu")


# -- checkpoints ------------------------------------------------------------------------------------

def test_checkpoint_round_trip_in_half_precision(tmp_path):
    net = RegistrationNet(tiny_config())
    path = save_checkpoint(str(tmp_path / "m.pt"), net, net.config, half=True, summary={"note": "x"})
    payload = load_checkpoint(path)
    assert payload["versions"]["torch"] == str(torch.__version__)
    loaded = build_model(payload, path)
    for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == a.dtype, k
        assert torch.allclose(a.float(), b.float(), atol=1e-3, rtol=1e-3), k


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Registrar(str(tmp_path / "nope.pt"))


def test_corrupt_checkpoint(tmp_path):
    net = RegistrationNet(tiny_config())
    path = save_checkpoint(str(tmp_path / "m.pt"), net, net.config)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # truncated, as by a crash in a naive writer
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        Registrar(path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(junk))


def test_foreign_checkpoint(tmp_path):
    path = str(tmp_path / "foreign.pt")
    torch.save({"model": {"w": torch.zeros(3)}}, path)
    with pytest.raises(CheckpointError, match="not an ACSGRegistration checkpoint"):
        Registrar(path)


def test_incompatible_checkpoint(tmp_path):
    net = RegistrationNet(tiny_config())
    path = save_checkpoint(str(tmp_path / "m.pt"), net, net.config)
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["acsg"]["embed_dim"] = 16  # weights no longer fit the configuration
    payload["model_config"]["acsg"]["num_heads"] = 2
    payload["content_sha256"] = content_hash(payload["model_config"], payload["state_dict"])  # consistent, unfit
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="weights do not fit .* of another shape"):
        Registrar(path)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="please update"):
        Registrar(path)


# -- files and scans --------------------------------------------------------------------------------

def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match=f"cannot read image {bad}"):
        read_image(str(bad))
    with pytest.raises(InputError, match="not found"):
        read_image(str(tmp_path / "missing.nii.gz"))


def test_missing_vertebra_level_names_the_labels_present():
    image = sitk.GetImageFromArray(np.zeros((20, 20, 20), np.float32))
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[5:10, 5:10, 5:10] = 20
    with pytest.raises(PreprocessingError, match=r"scan\.nii: label 24 is not in the label map \(labels present: \[20\]\)"):
        crop_vertebra(image, sitk.GetImageFromArray(labels), 24, size=(16, 16, 16), name="scan.nii")


def test_vertebra_cut_by_the_scan_edge_is_warned_about():
    image = sitk.GetImageFromArray(np.zeros((20, 20, 20), np.float32))
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[0:12, 2:16, 2:16] = 22  # 2352 mm^3: vertebra-sized
    with pytest.warns(UserWarning, match="touches the edge of the scan"):
        crop = crop_vertebra(image, sitk.GetImageFromArray(labels), 22, size=(16, 16, 16), name="scan.nii")
    assert any("L" in w or "22" in w for w in crop.warnings)


def test_gzip_nifti_completeness_read_from_the_trailer_or_by_decompressing(tmp_path):
    """A whole .nii.gz passes on its gzip trailer; one whose voxels end early but whose gzip stream is whole (a
    truncated file compressed again) is refused; a whole file of two gzip streams (bgzip, concatenation) is read."""
    import gzip
    from ACSGRegistrationLib.io import incomplete_reason
    image = sitk.GetImageFromArray(np.arange(24 * 20 * 16, dtype=np.int16).reshape(16, 20, 24))
    raw = str(tmp_path / "scan.nii")
    sitk.WriteImage(image, raw)
    data = open(raw, "rb").read()
    whole = tmp_path / "whole.nii.gz"
    whole.write_bytes(gzip.compress(data))
    assert incomplete_reason(str(whole)) == ""
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(data[:-1000]))
    assert "truncated" in incomplete_reason(str(short))
    with pytest.raises(InputError, match="short.nii.gz"):
        read_image(str(short))
    two = tmp_path / "two.nii.gz"
    two.write_bytes(gzip.compress(data[:5000]) + gzip.compress(data[5000:]))
    assert incomplete_reason(str(two)) == ""
    assert np.array_equal(sitk.GetArrayFromImage(read_image(str(two))), sitk.GetArrayFromImage(image))
