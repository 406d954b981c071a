"""What every wing's command line shares: option types with bounds, input paths checked as the options are
parsed (before PyTorch is imported), help texts, examples, progress lines and stop requests."""

import argparse
import os
import shlex
import subprocess
import time

from .errors import InputError
from .progress import STOP_FILE_VARIABLE, stage_line

DEVICE_HELP = "auto (default: a CUDA GPU where there is one), cpu, cuda, cuda:N or mps"
SEED_HELP = "seed of the random draws, for a run that can be repeated exactly (default 0)"
THREADS_HELP = "CPU threads for PyTorch (default: PyTorch's, one per core)"


def duration(seconds: float) -> str:
    for unit, length in (("days", 86400.0), ("hours", 3600.0), ("minutes", 60.0)):
        if seconds >= 2 * length:
            return f"{seconds / length:.0f} {unit}"
    return f"{seconds:.0f} s"


def number(kind, minimum=None, maximum=None, above=None, cost=None):
    """An argparse type: a number of ``kind`` within bounds (argparse then names the option and exits 2).
    ``cost``: (seconds per unit, what that is) for an upper bound's message: how long the value would take."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        low = (minimum is not None and value < minimum) or (above is not None and value <= above)
        if value != value or low or (maximum is not None and value > maximum):
            bounds = [f"at least {minimum}" if minimum is not None else "",
                      f"above {above}" if above is not None else "",
                      f"at most {maximum}" if maximum is not None else ""]
            time_taken = ""
            if cost is not None and maximum is not None and value > maximum:
                time_taken = f" (about {cost[0]:g} s {cost[1]}: {text} would take about {duration(value * cost[0])})"
            raise argparse.ArgumentTypeError(f"must be {' and '.join(b for b in bounds if b)}, got {text}{time_taken}")
        return value
    return parse


COUNT = number(int, minimum=1)
BATCH = number(int, minimum=1, maximum=64)  # 3D crops (and ProST's CT projections) per step: memory grows with it
STEPS = number(int, minimum=0)
# Options whose large values take long: bounded, the message says how long (measured on this project's 2-core CPU).
REFINE_STEPS = number(int, minimum=0, maximum=2000, cost=(0.3, "a step on a CPU"))
PLANAR_STEPS = number(int, minimum=0, maximum=5000, cost=(0.01, "a step per grid on a CPU"))
POSE_STEPS = number(int, minimum=0, maximum=10000, cost=(0.01, "a step per view on a CPU"))
DRR_EVALUATIONS = number(int, minimum=1, maximum=100000, cost=(0.01, "a DRR per view on a CPU"))
POSITIVE = number(float, above=0.0)
FRACTION = number(float, minimum=0.0, maximum=1.0)

PRECISION_HELP = ("inference precision: auto (default: bf16 where the CPU or GPU computes it natively, else "
                  "fp32), fp32 or bf16")


def progress_printer(every: int = 10):
    start = time.perf_counter()

    def show(step, total, terms):
        if step == 1 or step % every == 0 or step == total:
            rate = (time.perf_counter() - start) / max(step, 1)
            parts = " ".join(f"{k}={v:.4f}" for k, v in terms.items() if k != "step")
            print(f"[{step}/{total}] {parts}  ({rate:.2f} s/step)", flush=True)
    return show


def stage(index: int, total: int, text: str) -> None:
    """A stage of a long command (``progress.stage_line``): what the Slicer panel's progress bar follows."""
    print(stage_line(index, total, text), flush=True)


def stop_requests():
    """Ctrl+C or SIGTERM ask the training loop to stop after its step and save (also where a shell
    started the run in the background, with SIGINT ignored); so does the file that ``$ACSG_STOP_FILE`` names
    once it exists (how the Slicer panel asks on Windows, where a windowless process gets no console signal)."""
    import signal
    requested = []
    stop_file = os.environ.get(STOP_FILE_VARIABLE)

    def handler(signum, frame):
        print(f"stop requested ({signal.Signals(signum).name}): saving after this step", flush=True)
        requested.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)

    def should_stop():
        if not requested and stop_file and os.path.exists(stop_file):
            print("stop requested (stop file): saving after this step", flush=True)
            requested.append(stop_file)
        return bool(requested)
    return should_stop


def check_device(args):
    """The device and precision options, refused before any work where this machine lacks them."""
    from .inference import check_precision
    from .registrar import choose_device
    device = choose_device(args.device)
    if getattr(args, "precision", None):
        check_precision(args.precision, device)


def choices(option: str, text: str, allowed, empty_ok: bool = False) -> list:
    """A comma-separated option's items, in order, each one of ``allowed``; InputError naming the option."""
    items = [w.strip() for w in (text or "").split(",") if w.strip()]
    unknown = [w for w in items if w not in allowed]
    if unknown or not (items or empty_ok):
        found = f"unknown {', '.join(unknown)}" if unknown else "nothing given"
        raise InputError(f"{option} {text!r}: {found}; choose from {', '.join(allowed)}")
    return items


def _path_type(kinds, what):
    """An argparse type: a path that exists as one of ``kinds`` ("file", "folder"); refused while the options
    are parsed, before any work or import (argparse names the option; exit code 2)."""
    def parse(text):
        path = os.path.expanduser(text)
        if "file" in kinds and os.path.isfile(path) or "folder" in kinds and os.path.isdir(path):
            return path
        if os.path.exists(path):
            raise argparse.ArgumentTypeError(f"{text} is a {'folder' if os.path.isdir(path) else 'file'}: "
                                             f"give {what}")
        raise argparse.ArgumentTypeError(f"{text}: no such {' or '.join(kinds)} (give {what})")
    return parse


INPUT_FILE = _path_type(("file",), "an existing file")
INPUT_IMAGE = _path_type(("file",), "an image file")
INPUT_FOLDER = _path_type(("folder",), "an existing folder")
INPUT_FILE_OR_FOLDER = _path_type(("file", "folder"), "an existing file or folder")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and the examples (the epilog) as written, line by line; option help wrapped."""


def add_command(sub, name: str, summary: str, example: str, description: str = ""):
    """A subcommand whose help ends with an example to start from (``example``: command lines, one per line)."""
    lines = "\n".join(f"  {line}" for line in example.strip().splitlines())
    return sub.add_parser(name, help=summary, description=description or summary[:1].upper() + summary[1:] + ".",
                          epilog=f"example:\n{lines}", formatter_class=HelpFormatter)


def copyable_command(arguments, width: int = 100) -> str:
    """A command line for the user to copy and run: quoted for the shell of this OS; on POSIX shells each option
    with its value on a line of its own (continued by a backslash) once the whole is longer than ``width``."""
    if os.name == "nt":  # cmd and PowerShell take neither POSIX quoting nor backslash continuations
        return subprocess.list2cmdline(arguments)
    line = shlex.join(arguments)
    if len(line) <= width:
        return line
    parts, current = [], shlex.join(arguments[:2])
    for word in arguments[2:]:
        if word.startswith("--"):
            parts.append(current)
            current = shlex.quote(word)
        else:
            current += " " + shlex.quote(word)
    return " \\\n    ".join(parts + [current])
