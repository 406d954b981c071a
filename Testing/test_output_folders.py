"""Output folders as a unit: after a full disk, kill -9, Ctrl+C or two runs at once, the folder holds either the
previous complete set or the new one (never a mix, never a partial file), and a rerun succeeds and leaves no
temporary files behind."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import SimpleITK as sitk

from ACSGRegistrationLib import geometry
from ACSGRegistrationLib.errors import InputError, OutputError
from ACSGRegistrationLib.outputs import MANIFEST, OutputFolder

# A writer process: two different results (sets "A" and "B": other crop sizes, so every file differs), saved
# over and over to one folder. Each set's summary.json names it.
WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from ACSGRegistrationLib.config import tiny_config
    from ACSGRegistrationLib.errors import InputError
    from ACSGRegistrationLib.networks import RegistrationNet
    from ACSGRegistrationLib.registrar import Registrar

    def result(name):
        torch.manual_seed(0)
        net = RegistrationNet(tiny_config(input_shape=(16, 32, 32), input_spacing=2.0))
        shape = (24, 40, 40) if name == "A" else (20, 36, 36)
        z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
        image = lambda c: np.exp(-((z / 0.6) ** 2 + ((y - c) / 0.5) ** 2 + (x / 0.5) ** 2)).astype(np.float32)
        res = Registrar(model=net, device="cpu", affine_steps=0).register(image(0.0), image(0.15), image(0.0) > 0.5,
                                                                          image(0.15) > 0.5)
        res.notes.append(name)
        return res

    target, which, loops = sys.argv[1], sys.argv[2], int(sys.argv[3])
    results = {name: result(name) for name in "AB"}
    print("ready", flush=True)
    busy = 0
    for k in range(loops):
        try:
            results[which if which in "AB" else "AB"[k % 2]].save(target)
        except InputError:  # another writer holds the folder
            busy += 1
    print("done", busy, flush=True)
""")


def start_writer(target, which, loops):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(target), which, str(loops)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Each set written once, undisturbed: the NIfTI files' checksums (their bytes are reproducible)."""
    base = tmp_path_factory.mktemp("references")
    refs = {}
    for name in "AB":
        writer = start_writer(base / name, name, 1)
        out, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err
        refs[name] = {f: sha(base / name / f) for f in os.listdir(base / name) if f.endswith(".nii.gz")}
    assert refs["A"].keys() == refs["B"].keys() and all(refs["A"][f] != refs["B"][f] for f in refs["A"])
    return refs


def check_complete_set(target, references):
    """The folder is one complete set: every file its manifest lists, at its size, all of one set; returns it."""
    manifest = json.load(open(os.path.join(target, MANIFEST)))
    assert manifest["complete"]
    assert sorted(os.listdir(target)) == sorted(list(manifest["files"]) + [MANIFEST])
    for name, size in manifest["files"].items():
        assert os.path.getsize(os.path.join(target, name)) == size, name
    which = json.load(open(os.path.join(target, "summary.json")))["notes"][-1]
    for name, digest in references[which].items():
        assert sha(os.path.join(target, name)) == digest, f"{name} is not from set {which}"
    sitk.ReadTransform(os.path.join(target, "forward_transform.h5"))  # readable whole
    return which


def leftovers(target):
    parent, name = os.path.split(str(target))
    return [e for e in os.listdir(parent) if e.startswith(f".{name}.")]


def wait_ready(writer):
    line = writer.stdout.readline()
    assert line.startswith("ready"), writer.stderr.read()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_killed_or_interrupted_save_leaves_a_complete_set(tmp_path, references, sig):
    target = tmp_path / "out"
    writer = start_writer(target, "A", 1)
    assert writer.wait(timeout=300) == 0
    for delay in (0.05, 0.3, 0.7, 1.2):
        writer = start_writer(target, "AB", 1000)
        wait_ready(writer)
        time.sleep(delay)
        writer.send_signal(sig)
        writer.wait(timeout=60)
        check_complete_set(target, references)
        if sig == signal.SIGINT:  # Python unwinds: the staging folder and the lock are gone at once
            assert leftovers(target) == []
    writer = start_writer(target, "B", 1)  # the rerun: succeeds and cleans what kill -9 left
    assert writer.wait(timeout=300) == 0, writer.stderr.read()
    assert check_complete_set(target, references) == "B"
    assert leftovers(target) == []


def test_two_runs_on_one_folder_never_mix(tmp_path, references):
    target = tmp_path / "out"
    writers = [start_writer(target, which, 6) for which in ("A", "B")]
    outputs = [w.communicate(timeout=600) for w in writers]
    assert all(w.returncode == 0 for w in writers), [o[1] for o in outputs]
    refusals = [int(out.split()[-1]) for out, _ in outputs]
    assert sum(refusals) < 12  # some saves went through
    check_complete_set(target, references)
    assert leftovers(target) == []


def save_set(source_folder, target):
    """Copy a written set through OutputFolder (the same path every writer of this package takes)."""
    with OutputFolder(str(target)) as folder:
        for name in os.listdir(source_folder):
            source, path = os.path.join(source_folder, name), os.path.join(folder.path, name)
            if name.endswith(".nii.gz"):
                geometry.write_image(sitk.ReadImage(source), path)
            elif name != MANIFEST:
                geometry.write_atomically(lambda tmp: shutil.copyfile(source, tmp), path)


def mount_small_disk(path, megabytes):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    if not mount_small_disk(disk, 200):
        pytest.skip("cannot mount a tmpfs here (not root, or no mount namespace): see the injected failure test")
    yield disk
    subprocess.run(["umount", str(disk)], capture_output=True)


def test_full_disk_keeps_the_previous_set_and_a_rerun_succeeds(small_disk, references, tmp_path_factory):
    sets = tmp_path_factory.getbasetemp()
    source = {name: next(sets.glob(f"references*/{name}")) for name in "AB"}
    target = small_disk / "out"
    save_set(source["A"], target)
    assert check_complete_set(target, references) == "A"
    # Fill the disk, leaving room for a part of set B only (half its bytes).
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    size_b = sum(os.path.getsize(os.path.join(source["B"], name)) for name in os.listdir(source["B"]))
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - size_b // 2))
    with pytest.raises(OutputError, match="nothing was changed"):
        save_set(source["B"], target)
    assert check_complete_set(target, references) == "A"
    assert leftovers(target) == []
    filler.unlink()
    save_set(source["B"], target)
    assert check_complete_set(target, references) == "B"


def test_a_silently_short_write_is_caught_before_the_swap(references, tmp_path_factory, tmp_path, monkeypatch):
    """The NIfTI writer only prints 'wrote only N of M bytes' on a full disk: the read-back catches it."""
    sets = tmp_path_factory.getbasetemp()
    source = {name: next(sets.glob(f"references*/{name}")) for name in "AB"}
    target = tmp_path / "out"
    save_set(source["A"], target)
    real_write = sitk.WriteImage

    def short_write(image, path, *args):
        real_write(image, path, *args)
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 3])
    monkeypatch.setattr(geometry.sitk, "WriteImage", short_write)
    with pytest.raises(OutputError, match="could not be written completely"):
        save_set(source["B"], target)
    monkeypatch.undo()
    assert check_complete_set(target, references) == "A"
    assert leftovers(target) == []


def test_a_locked_folder_is_refused_at_once(tmp_path):
    target = tmp_path / "out"
    with OutputFolder(str(target)):
        with pytest.raises(InputError, match="being written by another run"):
            with OutputFolder(str(target)):
                pass
    assert leftovers(target) == [] and os.listdir(target) == [MANIFEST]  # the (empty) set was published
