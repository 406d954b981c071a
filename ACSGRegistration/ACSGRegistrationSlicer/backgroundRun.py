"""A backend command (``acsgreg``'s subcommands: register, prepare, finetune, xray-register) in its own process,
so that Slicer stays responsive while it runs, as SlicerTotalSegmentator does: the panel polls it from a
``qt.QTimer`` (``poll`` never blocks), shows its progress (the command's "stage k/n" and "[k/n]" lines:
``ACSGRegistrationLib.progress``) and its whole output, and ``cancel`` ends it and everything it started within
about a second (``processTree``), never waiting unbounded. The process writes its outputs as a unit
(``ACSGRegistrationLib.outputs``), so a cancelled run leaves nothing half-made. PyTorch is imported by that
process only, never by Slicer's."""

import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, List, Optional

from ACSGRegistrationLib.progress import STAGE_PATTERN, STEP_PATTERN, STOP_FILE_VARIABLE

from . import processTree
from .dependencies import hasGui

LOSS_PATTERN = re.compile(r"\btotal=([-+0-9.eE]+|nan|inf)")
MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pythonExecutable() -> str:
    """Slicer's own Python (PythonSlicer, which has Slicer's packages) inside Slicer; this Python elsewhere."""
    if hasGui():
        found = shutil.which("PythonSlicer", path=os.path.dirname(sys.executable)) or shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def backendEnvironment() -> dict:
    """The environment of the backend's process: Slicer's startup environment inside Slicer (what
    PythonSlicer expects), with the module folder first on the Python path (the backend package lives there)."""
    import slicer
    env = dict(slicer.util.startupEnvironment()) if hasGui() else dict(os.environ)
    paths = [MODULE_DIR] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class BackgroundRun:
    """``python -m ACSGRegistrationLib <arguments>`` in its own process (and process group)."""

    def __init__(self, arguments: List[str], title: str, onLine: Optional[Callable[[str], None]] = None):
        self.arguments = [str(a) for a in arguments]
        self.title = title
        self.onLine = onLine
        self.lines: List[str] = []
        self.fraction = 0.0
        self.stageText = ""
        self._stage = None  # (number, total) of the stage running
        self.cancelled = False
        self.stopFile = None
        self.process = None
        self.started = self.ended = None
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader = None
        self._readerDone = False

    # -- running ------------------------------------------------------------------------------------------
    def start(self) -> "BackgroundRun":
        """Start the process, once: a run the logic has started is started again by the panel's bookkeeping."""
        if self.process is not None:
            return self
        command = [pythonExecutable(), "-m", "ACSGRegistrationLib"] + self.arguments
        environment = backendEnvironment()
        handle, self.stopFile = tempfile.mkstemp(prefix="acsg-stop-")
        os.close(handle)
        os.remove(self.stopFile)  # its appearance is the request
        environment[STOP_FILE_VARIABLE] = self.stopFile
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, text=True, bufsize=1, env=environment,
                                        cwd=MODULE_DIR, encoding="utf-8", errors="replace",
                                        **processTree.popenOptions())
        self._reader = threading.Thread(target=self._read, name=f"ACSGRegistration {self.title}", daemon=True)
        self._reader.start()
        return self

    def _read(self):
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def poll(self) -> List[str]:
        """The lines printed since the last call (never waits); updates ``fraction``."""
        new = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._readerDone = True
                continue
            new.append(line)
            self._follow(line)
            if self.onLine is not None:
                self.onLine(line)
        self.lines += new
        if self.ended is None and self.finished:
            self.ended = time.monotonic()
        return new

    def _follow(self, line: str) -> None:
        """Progress from a line: a stage starts at (k - 1) / n; its steps move within it."""
        stage = STAGE_PATTERN.match(line)
        if stage:
            number, total = int(stage.group(1)), int(stage.group(2))
            if total > 0:
                self._stage, self.stageText = (number, total), stage.group(3)
                self.fraction = (number - 1) / total
            return
        step = STEP_PATTERN.search(line)
        if step and int(step.group(2)) > 0:
            within = min(1.0, int(step.group(1)) / int(step.group(2)))
            if self._stage is None:
                self.fraction = within
            else:
                number, total = self._stage
                self.fraction = (number - 1 + within) / total

    @property
    def finished(self) -> bool:
        return self.process is not None and self.process.poll() is not None and self._readerDone

    @property
    def succeeded(self) -> bool:
        return self.finished and not self.cancelled and self.process.returncode == 0

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> bool:
        """Poll until the process ends (scripts and tests; the panel polls from a timer). True when it ended."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            self.poll()
            if end is not None and time.monotonic() > end:
                return False
            time.sleep(interval)
        self.poll()
        return True

    def cancel(self, grace: float = 0.5) -> None:
        """Ask the process to stop (training saves after its step if that ends within ``grace``), then end its
        whole tree: gone within about ``grace`` + 0.5 s; never waits more than ``grace`` + 10 s in all."""
        if self.process is None or self.process.poll() is not None:
            return
        self.cancelled = True
        processTree.stopTree(self.process, self.stopFile, grace)

    def cleanUp(self) -> None:
        if self.stopFile and os.path.exists(self.stopFile):
            os.remove(self.stopFile)

    # -- what it said -------------------------------------------------------------------------------------
    def errorMessage(self) -> str:
        """The backend's own error line ("error: ..."), else the last lines it printed."""
        errors = [line[len("error: "):] for line in self.lines if line.startswith("error: ")]
        if errors:
            return errors[-1]
        tail = "\n".join(self.lines[-8:])
        return f"{self.title} ended with exit code {self.process.returncode}" + (f":\n{tail}" if tail else "")

    def notes(self) -> List[str]:
        return [line[len("note: "):] for line in self.lines if line.startswith("note: ")]

    @property
    def message(self) -> str:
        """What the status label shows: the stage and the last line printed."""
        if not self.lines:
            return f"{self.title}: starting..."
        last = self.lines[-1]
        if self._stage is not None and not STAGE_PATTERN.match(last):
            return f"{self.stageText} ({self._stage[0]}/{self._stage[1]}): {last}"
        return last


def lossFromLine(line: str) -> Optional[float]:
    """The total loss of a training progress line, or None."""
    match = LOSS_PATTERN.search(line)
    return float(match.group(1)) if match else None


def stepFromLine(line: str) -> Optional[int]:
    match = STEP_PATTERN.search(line)
    return int(match.group(1)) if match else None
