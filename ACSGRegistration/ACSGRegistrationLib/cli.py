"""Command line: ``acsgreg <command>`` (also ``python -m ACSGRegistrationLib <command>``), installed with the
package. Each method's wing defines its subcommands (``cli_3d``, ``xray/cli.py``, ``planar/cli.py``); this module
assembles them and runs one. Errors about the user's input end the program with a one-line message and exit
code 2; an input file that does not exist is refused while the options are parsed, before PyTorch loads.
"""

import argparse
import os
import sys
import warnings

from .cli_options import HelpFormatter
from .errors import ACSGError


class OneLineErrors(argparse.ArgumentParser):
    """A bad option is one line, as every other error (argparse would print the usage first); exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} ('{self.prog} --help' lists the options)\n")


def build_parser():
    """The parser of every subcommand: each method's wing adds its own (``cli_3d``, ``xray.cli``, ``planar.cli``)."""
    from . import cli_3d
    from .planar import cli as planar_cli
    from .xray import cli as xray_cli
    parser = OneLineErrors(prog="acsgreg", formatter_class=HelpFormatter,
                           description="Registration of spine images: ACSGRegNet on vertebra CT (register, ...), "
                                       "CT to X-ray pose (xray-...), 2D deformable (...2d).",
                           epilog="'acsgreg COMMAND --help' explains a command and ends with an example to "
                                  "start from.\nexample:\n  acsgreg register --help")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_3d.add_commands(sub)
    xray_cli.add_commands(sub)
    planar_cli.add_commands(sub)
    for name, command in sub.choices.items():
        if name != "export":  # export writes one file (refused where it would replace its input)
            command.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return parser


OVERWRITE_HELP = ("write into --out even where it holds another command's output (replaced) or files of yours "
                  "(kept: never deleted); without it such a folder is refused before any work")
# Set to show the traceback of an unexpected error (a bug) instead of its one-line report.
TRACEBACK_VARIABLE = "ACSG_TRACEBACK"


def main(argv=None):
    """Run a subcommand. Every error is one line on stderr, no traceback: the command's own (bad input or
    options, exit 2), Ctrl+C ("interrupted", exit 130: output folders are written as a unit, so nothing
    half-made is left), and an unexpected one (a bug, exit 3; ``$ACSG_TRACEBACK`` shows where)."""
    from .outputs import overwriting
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings(), overwriting(getattr(args, "overwrite", False)):
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
            return args.func(args)
    except (ACSGError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written (an output folder keeps what it held before)", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line, unless asked for the traceback
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        last = (str(exc).strip().splitlines() or [""])[-1]
        print(f"error: unexpected {type(exc).__name__}: {last} (a bug; please report it with the command; "
              f"{TRACEBACK_VARIABLE}=1 shows where it happened)", file=sys.stderr)
        return 3


def run():
    """The console command: ``main``, then the process ends at once. Tearing down PyTorch's modules at exit
    takes 0.3-0.4 s of a 2-core CPU, a tenth of a registration from a fresh process, and serves nothing: every
    output is on disk (flushed and fsync'ed) by then. ``main`` returns normally for callers in Python."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
