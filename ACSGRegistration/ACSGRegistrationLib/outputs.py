"""Output folders written as a unit: a folder holds one run's complete set of files, or the previous one.

A run writes into a hidden temporary folder beside its target (``.<name>.tmp-<pid>-<random>``), checks every
file it wrote (not empty; NIfTI files whole, as ``io.incomplete_reason`` checks inputs; JSON parsable;
flushed to disk), writes ``manifest.json`` last, and only then swaps the folder in: in one atomic step where
the system can exchange two folders (Linux ``renameat2``), else by two renames whose gap a crash can only
fill with the previous set (restored by the next run). A failed, interrupted or killed run therefore leaves
the target as it was, and the next run on that target removes what the dead one left behind.

One run per target at a time: a lock file beside the target (released by the system when a process dies,
so a killed run never blocks the next).

One rule for every output folder, checked before any work (``check_target``): a command writes only into a new
or empty folder, or one that holds its own kind of output (the manifest's ``kind``: a registration's, crops, an
evaluation's, ...). Another command's output, files the user put there, a file in the folder's place or above
it, or the run's own inputs are refused with the reason; ``--overwrite`` (``overwriting``) lets a command replace
another kind of output, and write beside the user's files, which are never deleted: they are carried into the
new folder (a file of the same name as an output is refused instead).
"""

import contextlib
import contextvars
import ctypes
import errno
import json
import os
import shutil
import tempfile
import time
from typing import Dict, Iterable, List, Optional

from . import __version__
from .errors import InputError, OutputError
from .io import incomplete_reason

MANIFEST = "manifest.json"
# The kinds of output folder (a manifest's "kind"), by what writes them.
REGISTRATION = "registration"
EVALUATION = "evaluation"
MAP_EVALUATION = "map evaluation"
# --overwrite of the command running (``overwriting``): replace another kind of output, write beside the user's files.
_OVERWRITE = contextvars.ContextVar("overwrite", default=False)


@contextlib.contextmanager
def overwriting(enabled: bool = True):
    """Within the block, output folders may replace another command's output and hold the user's files
    (carried over, never deleted): what a command's ``--overwrite`` means."""
    token = _OVERWRITE.set(bool(enabled))
    try:
        yield
    finally:
        _OVERWRITE.reset(token)

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


def read_manifest(folder: str) -> Optional[Dict]:
    """A folder's manifest (None where it has none or it cannot be read)."""
    try:
        with open(os.path.join(folder, MANIFEST)) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _files_in(folder: str) -> List[str]:
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, f), folder) for f in files]
    return sorted(found)


# What file browsers leave in a folder they showed: neither the user's work nor ours.
BROWSER_FILES = (".DS_Store", "Thumbs.db", "desktop.ini")


def foreign_files(folder: str) -> List[str]:
    """Files in an output folder that its manifest does not list: the user's (or another program's)."""
    manifest = read_manifest(folder) or {}
    listed = set(manifest.get("files", {})) | {MANIFEST}
    return [f for f in _files_in(folder) if f not in listed and os.path.basename(f) not in BROWSER_FILES]


def _listing(files: List[str], most: int = 3) -> str:
    return ", ".join(files[:most]) + (f" and {len(files) - most} more" if len(files) > most else "")


def beside(out_dir: str, what: str) -> str:
    """A folder next to ``out_dir`` for what comes of its files (``<out>-registered``): inside it, that output
    would be another command's in ``out_dir``. "." and ".." are named by the folders they are."""
    path = os.path.normpath(out_dir)
    if path in (os.curdir, os.pardir):
        path = os.path.abspath(path)
    return f"{path}-{what}"


def check_target(target: str, inputs: Iterable[str] = (), option: str = "--out", kind: Optional[str] = None,
                 overwrite: Optional[bool] = None) -> str:
    """The absolute target folder, or an InputError naming ``option`` and what is wrong with it (the module
    docstring's rule); ``kind``: the output the command writes; ``overwrite``: default ``overwriting``'s."""
    overwrite = _OVERWRITE.get() if overwrite is None else overwrite
    if not target or not str(target).strip():
        raise InputError(f"{option} is empty: give an output folder")
    path = os.path.abspath(os.path.expanduser(str(target)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{option} {target} is a file: give a folder for the outputs")
    above = os.path.dirname(path)
    while above and not os.path.exists(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    if os.path.exists(above) and not os.path.isdir(above):
        raise InputError(f"{option} {target}: {above} is a file, so no folder can be made inside it")
    real = os.path.realpath(path)
    for item in inputs:
        if not item:
            continue
        source = os.path.realpath(os.path.abspath(str(item)))
        if source == real or source.startswith(real + os.sep):
            raise InputError(f"{option} {target} holds the input {item}: the outputs replace that folder; "
                             "choose another one")
    if os.path.isdir(path) and os.listdir(path):
        manifest = read_manifest(path)
        if manifest is not None and kind is not None and manifest.get("kind") != kind and not overwrite:
            raise InputError(f"{option} {target} holds another command's output ({manifest.get('kind')}, "
                             f"{len(manifest.get('files', {}))} files): writing {kind} there would replace it; "
                             "choose another folder, or pass --overwrite to replace it")
        others = foreign_files(path)
        if others and not overwrite:
            whose = "that ACSGRegistration did not write" if manifest is None else "that its manifest does not list"
            raise InputError(f"{option} {target} holds files {whose} ({_listing(others)}); they are never "
                             "deleted: choose a new or empty folder, or pass --overwrite to write the outputs "
                             "beside them (they are kept)")
    parent = os.path.dirname(path)
    if os.path.exists(parent) and not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {target}: cannot write in {parent} (permission denied)")
    return path


# What a training run's folder holds besides its checkpoints and history: the crops it prepared (the command
# line's crops_<data>, the Slicer panel's crops, scene_crops and training_crops).
RUN_FOLDER_DATA = ("crops", "scene_crops", "training_crops", "crops_")


def check_run_folder(folder: str, run_files: Iterable[str], option: str = "--out",
                     overwrite: Optional[bool] = None) -> str:
    """A training run's folder (checkpoints written in place, resumed): new, empty, or one a run wrote
    (``run_files``, its crops); another command's output or the user's files are refused unless
    ``overwrite`` (then kept beside the run's files, never deleted)."""
    overwrite = _OVERWRITE.get() if overwrite is None else overwrite
    path = check_target(folder, option=option, kind=None, overwrite=True)  # a file, below a file
    if not os.path.isdir(path) or overwrite:
        return path
    known = set(run_files) | set(BROWSER_FILES)
    others = [name for name in sorted(os.listdir(path)) if name not in known and not name.startswith(".tmp-")
              and not (os.path.isdir(os.path.join(path, name)) and name.startswith(RUN_FOLDER_DATA))]
    if others:
        manifest = read_manifest(path)
        what = f"another command's output ({manifest.get('kind')})" if manifest else \
            f"files that no training run wrote ({_listing(others)})"
        raise InputError(f"{option} {folder} holds {what}: a run's checkpoints would be written among them; choose "
                         "a new or empty folder, or pass --overwrite to write the run there (nothing is deleted)")
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

    def __init__(self, target: str, inputs: Iterable[str] = (), option: str = "--out", kind: str = "outputs",
                 overwrite: Optional[bool] = None):
        self.target = check_target(target, inputs, option, kind, overwrite)
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
        self._carry_foreign_files(written)
        manifest = {"complete": True, "kind": self.kind, "files": written, "writer": f"acsgregistration {__version__}",
                    "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        manifest_path = os.path.join(self.path, MANIFEST)
        with open(manifest_path, "w") as fh:
            json.dump(manifest, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        swap_in(self.path, self.target)

    def _carry_foreign_files(self, written: Dict[str, int]) -> None:
        """The user's files in the target (allowed by --overwrite) go into the new folder: never deleted. One of
        the same name as an output is refused: nothing is changed then."""
        if not os.path.isdir(self.target):
            return
        others = foreign_files(self.target)
        clashes = [f for f in others if f in written]
        if clashes:
            raise OutputError(f"the outputs would replace your file(s) {_listing(clashes)} in {self.target}: "
                              "nothing was changed there; move them, or choose another folder")
        for name in others:
            source, copy = os.path.join(self.target, name), os.path.join(self.path, name)
            os.makedirs(os.path.dirname(copy), exist_ok=True)
            try:
                os.link(source, copy)
            except OSError:
                shutil.copy2(source, copy)

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
