"""The command line's help teaches: every subcommand's help ends with an example that names it, every option
has a help text that states its default, and an input file that does not exist is refused while the options are
parsed (before PyTorch loads). The parser is walked, so a new option without help fails here."""

import argparse
import subprocess
import sys

import pytest

from ACSGRegistrationLib.cli import build_parser


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices.items())


def options(command):
    return [a for a in command._actions if a.option_strings and a.help != argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction)]


def test_every_subcommand_has_an_example_and_every_option_a_help_with_its_default():
    missing_example, missing_help, missing_default = [], [], []
    for name, command in subcommands():
        epilog = command.epilog or ""
        if "example:" not in epilog or f"acsgreg {name} " not in epilog:
            missing_example.append(name)
        for action in options(command):
            flag = f"{name} {action.option_strings[-1]}"
            if not (action.help or "").strip():
                missing_help.append(flag)
            # A value option with a default (not a switch, not "none") says what it is.
            takes_value = action.nargs != 0
            if takes_value and action.default not in (None, False) and "default" not in action.help:
                missing_default.append(flag)
    assert not missing_example, f"no example in the help of {missing_example}"
    assert not missing_help, f"options without help: {missing_help}"
    assert not missing_default, f"options whose help does not state the default: {missing_default}"
    assert len(subcommands()) >= 13


def test_help_prints_the_example_as_written():
    """The example keeps its lines (a formatter that rewraps would join a multi-line command into one)."""
    parser = build_parser()
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["register", "--help"])
    assert done.value.code == 0
    text = subcommands()[[n for n, _ in subcommands()].index("register")][1].format_help()
    example = text[text.index("example:"):].splitlines()
    assert example[1].strip() == "acsgreg register \\"
    assert any(line.strip().startswith("--fixed ../shared/data/ct/") for line in example)


def test_a_missing_input_file_is_refused_before_pytorch_loads(tmp_path):
    """In a fresh process: the one-line error names the option, and PyTorch was never imported."""
    code = ("import sys\nfrom ACSGRegistrationLib.cli import main\n"
            "try:\n    main(['register', '--fixed', sys.argv[1], '--moving', sys.argv[1], '--out', sys.argv[2]])\n"
            "finally:\n    print('torch imported:', 'torch' in sys.modules)")
    missing = str(tmp_path / "no_such_scan.nii.gz")
    done = subprocess.run([sys.executable, "-c", code, missing, str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "argument --fixed" in done.stderr and "no_such_scan.nii.gz: no such file" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "torch imported: False" in done.stdout
    assert not (tmp_path / "out").exists()


def test_a_folder_given_for_a_file_is_named(tmp_path):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["register", "--fixed", str(tmp_path), "--moving", str(tmp_path),
                                   "--out", str(tmp_path / "out")])
    assert done.value.code == 2
