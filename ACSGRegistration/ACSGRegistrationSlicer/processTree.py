"""Ending a background process and everything it started, on every OS, without ever waiting unbounded.

POSIX: the process leads its own process group (``start_new_session``), so one ``killpg`` reaches its workers.
Windows: ``PythonSlicer`` is a launcher that starts the real Python as a child; killing the launcher alone leaves
the child running and holding the output pipe. The tree is ended with ``psutil`` where it is installed (the
children are listed before the parent dies), else with ``taskkill /T /F``, which every Windows has. A console
signal (CTRL_BREAK_EVENT) is no option: a process started with CREATE_NO_WINDOW from Slicer, which has no
console, cannot receive one. A gentle stop is asked through a stop file instead (``ACSG_STOP_FILE``, which the
command line's training loop watches)."""

import os
import signal
import subprocess
from typing import Callable, Optional

IS_WINDOWS = os.name == "nt"
# subprocess's constants exist only on Windows.
CREATE_NEW_PROCESS_GROUP = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200)
CREATE_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)


def popenOptions() -> dict:
    """Popen's options for a background process whose tree can be ended as a whole."""
    if IS_WINDOWS:
        return {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    return {"start_new_session": True}


def askToStop(process) -> None:
    """The gentle request on POSIX (SIGTERM to the group: training saves after its step); on Windows the caller's
    stop file is the request."""
    if not IS_WINDOWS:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass


def killTree(process, timeout: float = 5.0, run: Callable = subprocess.run, psutilModule=None) -> None:
    """End ``process`` and all its descendants; each OS call is bounded by ``timeout`` seconds."""
    if not IS_WINDOWS:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    psutil = psutilModule if psutilModule is not None else _psutil()
    if psutil is not None:
        try:
            parent = psutil.Process(process.pid)
            tree = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            return
        for member in tree:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=timeout)
        return
    try:
        run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, timeout=timeout, creationflags=CREATE_NO_WINDOW)
    except (OSError, subprocess.TimeoutExpired):
        process.kill()  # the launcher at least


def _psutil():
    try:
        import psutil
        return psutil
    except ImportError:
        return None


def stopTree(process, stopFile: Optional[str], grace: float, timeout: float = 5.0) -> bool:
    """Ask the process to stop (stop file, and SIGTERM on POSIX), give it ``grace`` seconds, then end its tree.
    True when it has ended; never waits longer than ``grace`` + 2 x ``timeout``."""
    if process.poll() is not None:
        return True
    if stopFile:
        try:
            with open(stopFile, "w"):
                pass
        except OSError:
            pass
    askToStop(process)
    try:
        process.wait(timeout=grace)
        return True
    except subprocess.TimeoutExpired:
        pass
    killTree(process, timeout)
    try:
        process.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False
