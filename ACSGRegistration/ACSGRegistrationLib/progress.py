"""How long commands report their progress on the console, one format for every command and for the Slicer panel
that reads it from a background process: "stage 2/3: registering" when a stage begins, "[k/n] ..." for the steps
within it (training steps, refinement steps, crops, DRRs of the pose search); and how such a process is asked to
stop where no signal reaches it (Windows): a file whose path ``$ACSG_STOP_FILE`` names appears."""

import re
from typing import Callable

STAGE_PATTERN = re.compile(r"^stage (\d+)/(\d+): (.*)$")
STEP_PATTERN = re.compile(r"\[(\d+)/(\d+)\]")
STOP_FILE_VARIABLE = "ACSG_STOP_FILE"


def stage_line(number: int, total: int, text: str) -> str:
    return f"stage {number}/{total}: {text}"


def step_printer(log: Callable[[str], None], label: str = "", parts: int = 10) -> Callable:
    """``progress(k, n, *anything)`` that logs "label [k/n]" at the first step, the last, and each tenth between
    (a search of 400 DRRs logs about a dozen lines, not 400)."""
    def show(step, total, *rest):
        if total > 0 and (step == 1 or step == total or (step * parts) // total != ((step - 1) * parts) // total):
            log(f"{label} [{step}/{total}]".strip())
    return show
