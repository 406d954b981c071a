"""``acsgreg xray-example`` then the ``xray-register`` command it prints, as a newcomer runs them: the example's
files (a simulated X-ray, GEOMETRY.json, POSE.json, TRUE_POSE.json) are what xray-register reads, its progress is
printed as it goes, the error against the truth is reported and drops, the overlay is written (with matplotlib, and
without it as in Slicer); and what either command refuses. On a small synthetic spine: seconds, not minutes."""

import contextlib
import io
import json
import re
import shlex
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from ACSGRegistrationLib.cli import main
from ACSGRegistrationLib.progress import STAGE_PATTERN, STEP_PATTERN
from ACSGRegistrationLib.xray.camera import lateral_motion, read_pose
from ACSGRegistrationLib.xray.images import carm_of, exposed_field, read_geometry, read_xray

# A quick registration (the test is about the files and what is printed, not the search's budget).
QUICK = ["--detector-pixels", "64", "--evaluations", "60", "--refine-steps", "10"]


def spine_phantom():
    """Three 'vertebrae' (labels 30, 31, 32 from the feet up, 30 mm apart) in a soft-tissue body, 2 mm voxels: each
    a body, a ring behind it and a bar to one side (no symmetry for a rotation to hide in)."""
    shape = (56, 44, 48)  # k, j, i
    k, j, i = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * 2.0 for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    hu[(i / 44) ** 2 + (j / 36) ** 2 < 1] = 40.0
    labels = np.zeros(shape, dtype=np.uint8)
    for level, z in ((30, -30.0), (31, 0.0), (32, 30.0)):
        body = (i ** 2 + (j + 6) ** 2 < 12 ** 2) & (np.abs(k - z) < 9)
        ring = (np.abs(np.sqrt(i ** 2 + (j - 12) ** 2) - 7) < 2.5) & (np.abs(k - z - 2) < 6)
        bar = (np.abs(i - 14) < 3) & (np.abs(j - 8) < 8) & (np.abs(k - z + 3) < 3)
        hu[body] = 700.0
        hu[ring | bar] = 1100.0
        labels[body | ring | bar] = level
    image = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(hu.astype(np.float32)), 1.0)
    image.SetSpacing((2.0, 2.0, 2.0))
    image.SetOrigin([-(n - 1.0) for n in shape[::-1]])
    seg = sitk.GetImageFromArray(labels)
    seg.CopyInformation(image)
    return image, seg


@pytest.fixture(scope="module")
def spine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spine")
    image, seg = spine_phantom()
    paths = {"ct": str(folder / "ct.nii.gz"), "seg": str(folder / "seg.nii.gz"), "folder": folder}
    sitk.WriteImage(image, paths["ct"])
    sitk.WriteImage(seg, paths["seg"])
    return paths


def example_args(spine, out, *extra):
    return ["xray-example", "--ct", spine["ct"], "--ct-seg", spine["seg"], "--label", "31", "--out", str(out),
            "--detector-pixels", "128", *extra]


def printed_command(printed: str):
    """The xray-register command xray-example printed, as a shell would split it (continuation lines joined)."""
    text = printed.split("next, register it")[1].split("\n", 1)[1]
    return shlex.split(text.replace("\\\n", " "))


@pytest.fixture(scope="module")
def example(spine):
    """xray-example's one-view output and what it printed (once for the module: capsys is per test)."""
    out = spine["folder"] / "example"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(example_args(spine, out)) == 0
    return out, printed.getvalue()


def test_the_example_writes_what_xray_register_reads(example):
    out, printed = example
    assert sorted(p.name for p in out.iterdir()) == ["GEOMETRY.json", "POSE.json", "TRUE_POSE.json", "manifest.json",
                                                     "xray.png"]
    xray = read_xray(str(out / "xray.png"))
    geometry = read_geometry(str(out / "GEOMETRY.json"))
    carm = carm_of(xray, geometry)
    assert carm.size == (128, 128) and carm.source_to_detector_mm == 1020.0
    assert carm.pixel_spacing_mm == pytest.approx((1.6, 1.6))
    assert exposed_field(xray, geometry).any()  # the shutters (where drawn) as GEOMETRY.json gives them
    start, truth = read_pose(str(out / "POSE.json")), read_pose(str(out / "TRUE_POSE.json"))
    # a C-arm's start: 5 deg about some axis, the target's centre 15 mm off (the defaults)
    angle = np.degrees(np.arccos(np.clip((np.trace(start[:3, :3] @ truth[:3, :3].T) - 1) / 2, -1, 1)))
    assert angle == pytest.approx(5.0, abs=1e-3)
    assert re.search(r"the target \d+\.\d mm off on average \(mTRE\)", printed), printed
    command = printed_command(printed)
    assert command[:2] == ["acsgreg", "xray-register"]
    for option, value in (("--xray", "xray.png"), ("--geometry", "GEOMETRY.json"), ("--init", "POSE.json"),
                          ("--true-pose", "TRUE_POSE.json"), ("--label", "31")):
        assert command[command.index(option) + 1].endswith(value), (option, command)
    assert command[command.index("--out") + 1] == str(out) + "-registered"


def test_the_printed_command_registers_it_reporting_progress_and_the_error(example, capsys):
    out, printed = example
    command = printed_command(printed)
    assert main(command[1:] + QUICK) == 0
    lines = capsys.readouterr().out.splitlines()
    stages = [int(STAGE_PATTERN.match(line).group(1)) for line in lines if STAGE_PATTERN.match(line)]
    assert stages == [1, 2, 3]
    # the search's progress between its stage lines, counted once across the whole search (the Slicer bar)
    search = lines[[i for i, line in enumerate(lines) if line.startswith("stage 2/3")][0] + 1:
                   [i for i, line in enumerate(lines) if line.startswith("stage 3/3")][0]]
    steps = [tuple(int(v) for v in STEP_PATTERN.search(line).groups()) for line in search]
    assert len(steps) >= 5 and all(line.startswith("searching [") for line in search)
    assert [done for done, _ in steps] == sorted(done for done, _ in steps) and steps[-1][0] == steps[-1][1]
    assert any("CMA-ES run 2 of 2" in line for line in search) and any("refining" in line for line in search)
    report = [line for line in lines if line.startswith("error against")]
    assert len(report) == 1 and "TRUE_POSE.json: mTRE 15.0 ->" in report[0], lines
    registered = out.parent / (out.name + "-registered")
    truth = json.loads((registered / "metrics.json").read_text())["truth"]
    assert truth["file"].endswith("TRUE_POSE.json")
    for key in ("mtre_mm", "rotation_deg", "translation_mm", "in_plane_mm", "depth_mm", "projection_mm"):
        assert key in truth["initial"] and key in truth["final"]
    assert truth["initial"]["rotation_deg"] == pytest.approx(5.0, abs=0.01)
    assert truth["initial"]["translation_mm"] == pytest.approx(15.0, abs=0.01)
    assert truth["final"]["mtre_mm"] < 0.7 * truth["initial"]["mtre_mm"], truth
    assert (registered / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_views_the_lateral_beside_the_ap(spine, tmp_path, capsys):
    out = tmp_path / "two"
    assert main(example_args(spine, out, "--views", "2", "--seed", "3")) == 0
    command = printed_command(capsys.readouterr().out)
    assert [command[i + 1].rsplit("/", 1)[-1] for i, word in enumerate(command) if word == "--xray"] == [
        "xray.png", "xray_2.png"]
    assert [command[i + 1].rsplit("/", 1)[-1] for i, word in enumerate(command) if word == "--init"] == [
        "POSE.json", "POSE_2.json"]
    truth, ap, lateral = (read_pose(str(out / name)) for name in ("TRUE_POSE.json", "POSE.json", "POSE_2.json"))
    # the second view's initial pose: the first's moved by the C-arm's turn (known), as its true pose is
    from ACSGRegistrationLib.preprocessing import label_centroids
    centre = label_centroids(sitk.ReadImage(spine["seg"]))[31]
    assert np.allclose(lateral, lateral_motion(truth, centre) @ ap, atol=1e-6)
    seen_from = [np.linalg.inv(pose)[:3, 2] for pose in (ap, lateral)]  # each view's principal ray in the CT
    assert abs(np.dot(*seen_from)) < 0.2  # about 90 degrees apart
    assert read_xray(str(out / "xray_2.png")).size == (128, 128)


def test_the_overlay_without_matplotlib_as_in_slicer(monkeypatch, tmp_path):
    """Slicer does not bundle matplotlib: the overlay is then a plain RGB image of the X-ray's size, the
    target's outlines drawn in (at the initial pose in blue, at the final one in orange)."""
    from ACSGRegistrationLib.xray.overlay import OverlayView, write_overlay
    xray = np.random.default_rng(0).uniform(size=(80, 60))
    outline_initial, outline_final = np.zeros((40, 30)), np.zeros((40, 30))
    outline_initial[5:15, 5:15], outline_final[20:30, 10:20] = 5.0, 5.0
    view = OverlayView(xray, xray[::2, ::2], True, xray[::2, ::2], xray[::2, ::2], outline_initial, outline_final,
                       "title", "caption", (1.0, 1.0))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    write_overlay(view, str(tmp_path / "plain.png"))
    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain.png")))
    assert rgb.shape == (80, 60, 3)
    orange = (rgb[..., 0] > 200) & (rgb[..., 2] < 80)
    blue = (rgb[..., 2] > 200) & (rgb[..., 0] < 80)
    assert orange[40:60, 20:40].any() and not orange[:30].any()
    assert blue[10:30, 10:30].any() and not blue[40:].any()
    monkeypatch.delitem(sys.modules, "matplotlib")
    write_overlay(view, str(tmp_path / "figure.png"))
    assert sitk.ReadImage(str(tmp_path / "figure.png")).GetSize()[0] > 800  # the figure, three panels


def test_refusals(spine, example, tmp_path, capsys):
    out, _ = example
    # a label the map does not hold: named, with those it holds; nothing written
    assert main(["xray-example", "--ct", spine["ct"], "--ct-seg", spine["seg"], "--label", "7", "--out",
                 str(tmp_path / "a")]) == 2
    assert "label 7 is not in" in capsys.readouterr().err and not (tmp_path / "a").exists()
    # a folder that holds the user's files, as every command refuses it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(example_args(spine, tmp_path / "mine")) == 2
    assert "holds files" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    # a missing CT: refused as the options are parsed
    with pytest.raises(SystemExit) as exit_code:
        main(["xray-example", "--ct", str(tmp_path / "none.nii.gz"), "--ct-seg", spine["seg"], "--out",
              str(tmp_path / "b")])
    assert exit_code.value.code == 2 and "no such file" in capsys.readouterr().err
    # --true-pose measures over the target: it needs the label map
    assert main(["xray-register", "--ct", spine["ct"], "--xray", str(out / "xray.png"), "--geometry",
                 str(out / "GEOMETRY.json"), "--init", str(out / "POSE.json"), "--true-pose",
                 str(out / "TRUE_POSE.json"), "--out", str(tmp_path / "c")]) == 2
    assert "--true-pose needs --ct-seg" in capsys.readouterr().err and not (tmp_path / "c").exists()
    # a true pose that is not one
    (tmp_path / "bad.json").write_text(json.dumps({"ct_to_source": np.eye(3).tolist()}))
    assert main(["xray-register", "--ct", spine["ct"], "--ct-seg", spine["seg"], "--label", "31", "--xray",
                 str(out / "xray.png"), "--geometry", str(out / "GEOMETRY.json"), "--init",
                 str(out / "POSE.json"), "--true-pose", str(tmp_path / "bad.json"), "--out",
                 str(tmp_path / "d")]) == 2
    assert "bad.json: ct_to_source must be a finite 4x4 matrix" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_the_search_counts_its_steps_once_across_its_phases():
    """register_pose's progress: one count from the first phase to the last (the Slicer panel's bar crosses the
    stage once), each phase named."""
    from ACSGRegistrationLib.xray.register import SearchProgress, search_phases
    phases = search_phases("prost+cmaes+gradient", 50, 10, 2, 20)
    assert [name for name, _ in phases] == ["ProST's learned descent", "CMA-ES run 1 of 2", "CMA-ES run 2 of 2",
                                            "refining CMA-ES's best answer", "refining the best start"]
    heard = []
    progress = SearchProgress(phases, lambda done, total, value, phase: heard.append((done, total, phase)))
    descent = progress.next()
    for step in range(1, 21):
        descent(step, 20, 0.0)
    first_run = progress.next()
    first_run(45, 50, 0.0)  # CMA-ES converged early: the next phase starts where it would have
    second_run = progress.next()
    second_run(54, 50, 0.0)  # a last generation past the budget counts as the phase's end
    assert heard[19] == (20, 140, "ProST's learned descent") and heard[20] == (65, 140, "CMA-ES run 1 of 2")
    assert heard[21] == (120, 140, "CMA-ES run 2 of 2")
    for _ in range(2):
        refine = progress.next()
        refine(10, 10, 0.0)
    assert heard[-1] == (140, 140, "refining the best start") and progress.next() is None
    assert SearchProgress(phases).next() is None  # nobody listening
