"""Output folders written as a unit: a folder holds one run's complete set of files, or the previous one.

A run writes into a hidden temporary folder beside its target (``.<name>.tmp-<pid>-<random>``), checks every
file it wrote (not empty; NIfTI files whole, as ``io.incomplete_reason`` checks inputs; JSON parsable;
flushed to disk), writes ``manifest.json`` last, and only then swaps the folder in: in one atomic step where
the system can exchange two folders (Linux ``renameat2``), else by two renames whose gap a crash can only
fill with the previous set (restored by the next run). A failed, interrupted or killed run therefore leaves
the target as it was, and the next run on that target removes what the dead one left behind.

One run per target at a time: a lock file beside the target (released by the system when a process dies,
so a killed run never blocks the next). Targets are refused before any work when they are a file, hold the
run's inputs, or are folders this package did not write (which it would replace).
"""

import ctypes
import errno
import json
import os
import shutil
import tempfile
import time
from typing import Dict, Iterable, Optional

from . import __version__
from .errors import InputError, OutputError
from .io import incomplete_reason

MANIFEST = "manifest.json"

# What a registration can write (``RegistrationResult.write_files``), and what it writes by default.
OUTPUTS = {
    "warped": "warped.nii.gz: the moving crop warped onto the fixed crop",
    "warped_affine": "warped_affine.nii.gz: the same after the affine stage alone",
    "warped_label": "warped_label.nii.gz: the moving vertebra's mask warped (with --moving-seg)",
    "jacobian": "jacobian.nii: det of the deformable part's Jacobian on the fixed crop",
    "transform": "forward_transform.h5: the whole map, fixed point -> moving point, valid on the whole scans "
                 "(ITK, SimpleITK, ANTs and Slicer read it)",
    "fields": "its parts: affine_transform.tfm and deformable_field.nii (float32 displacement, LPS mm)",
    "inverse": "inverse_transform.h5 and inverse_deformable_field.nii (computed only when asked for: as long "
               "as the registration)",
    "metrics": "metrics.json: Dice, precision, recall, ASSD per stage, folding (both labels given)",
}
DEFAULT_OUTPUTS = ("warped", "warped_label", "jacobian", "transform", "metrics")


def _hidden(target: str, kind: str) -> str:
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}.{kind}")


def _is_ours(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST))


def check_target(target: str, inputs: Iterable[str] = (), option: str = "--out") -> str:
    """The absolute target folder, or an InputError naming ``option`` and what is wrong with it."""
    if not target or not str(target).strip():
        raise InputError(f"{option} is empty: give an output folder")
    path = os.path.abspath(os.path.expanduser(str(target)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{option} {target} is a file: give a folder for the outputs")
    real = os.path.realpath(path)
    for item in inputs:
        if not item:
            continue
        source = os.path.realpath(os.path.abspath(str(item)))
        if source == real or source.startswith(real + os.sep):
            raise InputError(f"{option} {target} holds the input {item}: the outputs replace that folder; "
                             "choose another one")
    if os.path.isdir(path) and os.listdir(path) and not _is_ours(path):
        raise InputError(f"{option} {target} already holds files that ACSGRegistration did not write (no "
                         f"{MANIFEST}); it is never replaced: choose a new or empty folder")
    parent = os.path.dirname(path)
    if os.path.exists(parent) and not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {target}: cannot write in {parent} (permission denied)")
    return path


class FolderLock:
    """An exclusive, non-blocking lock on ``.<name>.lock`` beside a folder, held by this process until
    ``release``; the system drops it when the process dies."""

    def __init__(self, target: str, option: str = "--out"):
        self.path = _hidden(os.path.abspath(target), "lock")
        self.target, self.option, self.fd = target, option, None

    def acquire(self) -> "FolderLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if not _try_lock(fd):
                os.close(fd)
                raise InputError(f"{self.option} {self.target} is being written by another run now "
                                 f"(lock {self.path}); wait for it to finish or choose another folder")
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:  # not a lock file that its holder removed between our open and lock
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # while still held: a waiting process re-checks the file it locked
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def clean_leftovers(target: str) -> None:
    """What dead runs left beside ``target`` (call with its lock held): temporary folders are removed; a
    previous complete set moved aside by a swap that was cut short is put back."""
    parent, name = os.path.split(target)
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        path = os.path.join(parent, entry)
        if entry.startswith(f".{name}.old-") and not os.path.exists(target) and _is_ours(path):
            os.rename(path, target)
        elif entry.startswith((f".{name}.tmp-", f".{name}.old-")):
            shutil.rmtree(path, ignore_errors=True)


def remove_orphaned_files(folder: str) -> None:
    """Half-written files (``geometry.atomic_path``'s ``.tmp-*``) that a killed process left in ``folder``."""
    if os.path.isdir(folder):
        for entry in os.listdir(folder):
            if entry.startswith(".tmp-") and os.path.isfile(os.path.join(folder, entry)):
                os.remove(os.path.join(folder, entry))


def verify_file(path: str) -> str:
    """Why a written file is not usable ('' when it is); flushes it to disk."""
    size = os.path.getsize(path)
    if size == 0:
        return "it is empty"
    reason = incomplete_reason(path)
    if reason:
        return reason
    if path.endswith(".json"):
        try:
            with open(path) as fh:
                json.load(fh)
        except ValueError as exc:
            return f"it is not valid JSON ({exc})"
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return ""


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Swap two folders atomically (Linux renameat2); False where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), b)


def swap_in(staged: str, target: str) -> None:
    """Make ``staged`` the folder at ``target``; the folder that was there is removed."""
    if not os.path.exists(target):
        os.rename(staged, target)
        return
    if _exchange(staged, target):
        shutil.rmtree(staged, ignore_errors=True)  # now the previous set
        return
    aside = _hidden(target, f"old-{os.getpid()}")
    os.rename(target, aside)
    os.rename(staged, target)
    shutil.rmtree(aside, ignore_errors=True)


class OutputFolder:
    """``with OutputFolder(target, inputs) as folder:`` write into ``folder.path``; on leaving the block
    without an error the files are checked and swapped in as ``target`` (``folder.paths`` maps what was
    written to its final place); on an error, Ctrl+C or a kill, ``target`` keeps what it held."""

    def __init__(self, target: str, inputs: Iterable[str] = (), option: str = "--out", kind: str = "outputs"):
        self.target = check_target(target, inputs, option)
        self.option, self.kind = option, kind
        self.lock: Optional[FolderLock] = None
        self.path = ""

    def __enter__(self) -> "OutputFolder":
        self.lock = FolderLock(self.target, self.option).acquire()
        try:
            clean_leftovers(self.target)
            parent, name = os.path.split(self.target)
            self.path = tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent)
            os.chmod(self.path, 0o777 & ~_umask())
        except OSError as exc:
            self.lock.release()
            raise InputError(f"{self.option} {self.target}: cannot write there ({exc.strerror or exc})") from None
        return self

    def final(self, staged_path: str) -> str:
        """Where a file written in the staging folder ends up."""
        return os.path.join(self.target, os.path.relpath(staged_path, self.path))

    def final_paths(self, paths: Dict[str, str]) -> Dict[str, str]:
        return {key: self.final(p) for key, p in paths.items()}

    def commit(self) -> None:
        written = {}
        for root, _, files in os.walk(self.path):
            for file in files:
                path = os.path.join(root, file)
                reason = verify_file(path)
                if reason:
                    raise OutputError(f"{os.path.relpath(path, self.path)} could not be written completely in "
                                      f"{self.target} ({reason}; is the disk full?): nothing was changed there")
                written[os.path.relpath(path, self.path)] = os.path.getsize(path)
        manifest = {"complete": True, "kind": self.kind, "files": written, "writer": f"acsgregistration {__version__}",
                    "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        manifest_path = os.path.join(self.path, MANIFEST)
        with open(manifest_path, "w") as fh:
            json.dump(manifest, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        swap_in(self.path, self.target)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None and issubclass(exc_type, OSError):
                # A write failed inside the block (a full disk): say so in the terms of the target.
                reason = str(exc).replace(self.path, self.target)
                raise OutputError(f"{reason}; nothing was changed in {self.target}") from None
            if exc_type is None:
                try:
                    self.commit()
                except OSError as error:
                    if isinstance(error, OutputError):
                        raise
                    raise OutputError(f"could not write the outputs in {self.target} ({error.strerror or error}); "
                                      "nothing was changed there") from None
        finally:
            if os.path.isdir(self.path):
                shutil.rmtree(self.path, ignore_errors=True)
            self.lock.release()
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
