"""A backend command (``acsgreg``'s subcommands: register, prepare, finetune) in its own process, so that
Slicer stays responsive while it runs, as SlicerTotalSegmentator does: the panel polls it from a ``qt.QTimer``
(``poll`` never blocks), shows its progress lines, and ``cancel`` stops it within about a second. The process
writes its outputs as a unit (``ACSGRegistrationLib.outputs``), so a cancelled run leaves nothing half-made.
PyTorch is imported by that process only, never by Slicer's."""

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, List, Optional

from .dependencies import hasGui

# "[12/200] total=0.4321 ..." (training), "refining [3/50]" (refinement): the step and the total.
STEP_PATTERN = re.compile(r"\[(\d+)/(\d+)\]")
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
        self.cancelled = False
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
        options = {}
        if os.name == "posix":
            options["start_new_session"] = True  # cancel stops the whole group (data-loading workers too)
        else:
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, text=True, bufsize=1, env=backendEnvironment(),
                                        cwd=MODULE_DIR, **options)
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
            step = STEP_PATTERN.search(line)
            if step and int(step.group(2)) > 0:
                self.fraction = int(step.group(1)) / int(step.group(2))
            if self.onLine is not None:
                self.onLine(line)
        self.lines += new
        if self.ended is None and self.finished:
            self.ended = time.monotonic()
        return new

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
        """Ask the process to stop (SIGTERM: training saves after its step if that ends within ``grace``), then
        kill it: it is gone within about ``grace`` + 0.5 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.cancelled = True
        self._signal(signal.SIGTERM if os.name == "posix" else signal.CTRL_BREAK_EVENT)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL if os.name == "posix" else None)
            self.process.wait(timeout=5)

    def _signal(self, sig):
        try:
            if os.name == "posix":
                os.killpg(self.process.pid, sig)
            elif sig is None:
                self.process.kill()
            else:
                self.process.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

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
        """The last line printed (for a status label)."""
        return self.lines[-1] if self.lines else f"{self.title}: starting..."


def lossFromLine(line: str) -> Optional[float]:
    """The total loss of a training progress line, or None."""
    match = LOSS_PATTERN.search(line)
    return float(match.group(1)) if match else None


def stepFromLine(line: str) -> Optional[int]:
    match = STEP_PATTERN.search(line)
    return int(match.group(1)) if match else None
