"""Ending a background run and everything it started (ACSGRegistrationSlicer.processTree, BackgroundRun.cancel):
for real on this OS (a process whose child would outlive a plain kill), and on Windows with the OS calls stood in
(psutil, or taskkill where psutil is missing): the launcher's children ended too, no console signal sent (a
windowless process from Slicer cannot receive one), a stop file as the gentle request, and no wait without a
bound."""

import os
import subprocess
import sys
import time
import types

import pytest

from conftest import slicer_module  # noqa: E402

slicer, M = slicer_module()  # the module's helpers import slicer
from ACSGRegistrationSlicer import backgroundRun, processTree  # noqa: E402


def alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is dead
        return fh.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(os.name != "posix" or not os.path.isdir("/proc"), reason="the real process tree: POSIX")
def test_the_whole_tree_ends_here_within_a_second(tmp_path):
    """A launcher whose child (the real worker) holds the output pipe: both end, and the pipe closes."""
    child_pid = tmp_path / "child.pid"
    launcher = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
                f"'import os, time; open(r\"{child_pid}\", \"w\").write(str(os.getpid())); time.sleep(60)']); "
                f"p.wait()")
    process = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               **processTree.popenOptions())
    end = time.monotonic() + 20
    while not (child_pid.exists() and child_pid.read_text()):
        assert time.monotonic() < end, "the child did not start"
        time.sleep(0.02)
    child = int(child_pid.read_text())
    asked = time.monotonic()
    assert processTree.stopTree(process, None, grace=0.3) is True
    assert time.monotonic() - asked < 1.0
    end = time.monotonic() + 2
    while alive(child) and time.monotonic() < end:
        time.sleep(0.02)
    assert not alive(child), "the launcher's child outlived the cancel"
    assert process.stdout.read() == b""  # the pipe is closed: a reader thread would end


class FakeProcess:
    """A Popen whose ``wait`` refuses to wait without a bound, and which dies when ``dies_after`` waits passed."""

    def __init__(self, pid=4242, dies_after=None):
        self.pid, self.returncode, self.waits, self.killed, self.signals = pid, None, [], False, []
        self.dies_after = dies_after

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        assert timeout is not None, "waited on a process without a timeout"
        self.waits.append(timeout)
        if self.dies_after is not None and len(self.waits) > self.dies_after:
            self.returncode = -9
            return self.returncode
        raise subprocess.TimeoutExpired("fake", timeout)

    def kill(self):
        self.killed = True

    def send_signal(self, sig):
        self.signals.append(sig)


def fake_psutil(tree):
    """psutil with a launcher (pid 4242) whose descendants are ``tree``; kills are recorded in order."""
    killed = []

    class NoSuchProcess(Exception):
        pass

    class Proc:
        def __init__(self, pid):
            self.pid = pid

        def children(self, recursive=False):
            assert recursive, "only the launcher's direct children: the real Python's own workers would survive"
            assert not killed, "children must be listed before the launcher is killed (then they are orphans)"
            return [Proc(pid) for pid in tree]

        def kill(self):
            killed.append(self.pid)

    module = types.SimpleNamespace(Process=Proc, NoSuchProcess=NoSuchProcess, killed=killed, waited=[])
    module.wait_procs = lambda procs, timeout=None: module.waited.append((sorted(p.pid for p in procs), timeout))
    return module


@pytest.fixture()
def windows(monkeypatch):
    """processTree as on Windows; a POSIX call there fails the test."""
    monkeypatch.setattr(processTree, "IS_WINDOWS", True)

    def posix_only(*args):
        raise AssertionError("a POSIX process-group call on Windows")
    monkeypatch.setattr(os, "killpg", posix_only)


def test_windows_kills_the_launchers_tree_with_psutil(windows):
    psutil = fake_psutil([5001, 5002])
    process = FakeProcess()
    processTree.killTree(process, timeout=3.0, psutilModule=psutil)
    assert sorted(psutil.killed) == [4242, 5001, 5002] and psutil.killed[-1] == 4242
    assert psutil.waited == [([4242, 5001, 5002], 3.0)]  # bounded


def test_windows_without_psutil_uses_taskkill_on_the_tree(windows, monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)
    calls = []
    processTree.killTree(FakeProcess(), timeout=4.0, run=lambda command, **options: calls.append((command, options)))
    (command, options), = calls
    assert command == ["taskkill", "/F", "/T", "/PID", "4242"]  # /T: the whole tree
    assert options["timeout"] == 4.0 and options["creationflags"] & processTree.CREATE_NO_WINDOW

    def hangs(command, **options):
        raise subprocess.TimeoutExpired(command, options["timeout"])
    process = FakeProcess()
    processTree.killTree(process, timeout=4.0, run=hangs)
    assert process.killed  # the launcher at least, and no hang


def test_windows_stop_asks_by_file_then_ends_the_tree_without_a_console_signal(windows, monkeypatch, tmp_path):
    psutil = fake_psutil([5001])
    monkeypatch.setitem(sys.modules, "psutil", psutil)
    stop = tmp_path / "stop"
    process = FakeProcess(dies_after=1)  # ignores the stop file, dies when its tree is killed
    assert processTree.stopTree(process, str(stop), grace=0.5, timeout=2.0) is True
    assert stop.exists()  # the gentle request the training loop watches
    assert process.waits == [0.5, 2.0] and sorted(psutil.killed) == [4242, 5001]
    assert process.signals == []  # no CTRL_BREAK_EVENT: it fails on a CREATE_NO_WINDOW process


def test_a_process_that_never_ends_is_given_up_on_within_the_bound(windows, monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", fake_psutil([]))
    process = FakeProcess()  # never dies
    started = time.monotonic()
    assert processTree.stopTree(process, None, grace=0.2, timeout=0.3) is False
    assert time.monotonic() - started < 1.0 and process.waits == [0.2, 0.3]


def test_the_panels_cancel_and_finish_never_wait_unbounded(windows, monkeypatch):
    """A run whose process cannot be ended (and whose pipe never closes): Cancel returns, finish() returns with
    an error; the panel is never frozen."""
    from ACSGRegistrationLib.errors import Cancelled, InputError
    from ACSGRegistrationSlicer.runs import StagedRun
    monkeypatch.setitem(sys.modules, "psutil", fake_psutil([]))
    run = StagedRun()
    run.stage = backgroundRun.BackgroundRun(["register"], "registration")
    run.stage.process = FakeProcess()  # its reader never sees the end of the output
    started = time.monotonic()
    run.cancel()
    assert time.monotonic() - started < 2 + 0.5 + 5 + 5 + 1  # cancel's grace, kill and its wait, the poll
    with pytest.raises(Cancelled):
        run.ended("registration", timeout=1.0)
    monkeypatch.setitem(sys.modules, "psutil", fake_psutil([]))
    other = StagedRun()
    other.stage = backgroundRun.BackgroundRun(["register"], "registration")
    other.stage.process = FakeProcess()
    with pytest.raises(InputError, match="did not end within 1 s"):
        other.ended("registration", timeout=1.0)


def test_background_processes_start_windowless_in_their_own_group_on_windows(windows):
    options = processTree.popenOptions()
    assert options == {"creationflags": processTree.CREATE_NEW_PROCESS_GROUP | processTree.CREATE_NO_WINDOW}


def test_the_training_loop_stops_when_the_stop_file_appears(tmp_path, monkeypatch):
    """The gentle request on Windows: the command line's training loop watches the file ``$ACSG_STOP_FILE``."""
    import signal
    from ACSGRegistrationLib.cli_options import stop_requests
    from ACSGRegistrationLib.progress import STOP_FILE_VARIABLE
    stop = tmp_path / "stop"
    monkeypatch.setenv(STOP_FILE_VARIABLE, str(stop))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        should_stop = stop_requests()
        assert not should_stop()
        stop.write_text("")
        assert should_stop() and should_stop()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
