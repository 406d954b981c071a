"""Pairs registered from files and written to folders: one pair (``acsgreg register --fixed ... --out DIR``)
or many (``acsgreg register --pairs pairs.csv --out DIR``), through the same steps so that both give the
same files.

A batch loads the model once and overlaps the slow parts: while one pair registers, the next pair's files
are read and cropped in a thread and the previous pair's outputs are written in another (reading and
writing run in SimpleITK and zlib, which release Python's lock), and a scan that several pairs share is read
once (``ScanCache``). Each pair's folder is written as a unit
(``outputs.OutputFolder``); ``metrics.csv`` (one row per pair: status, error, Dice/ASSD per stage, folding,
seconds) is rewritten after every pair, so an interrupted batch keeps its table. A failing row is reported
and the batch carries on, unless asked to stop.
"""

import contextvars
import csv
import os
import re
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .errors import ACSGError, InputError
from .inputs import PreparedInput, read_input

# The outputs of a pair: what RegistrationResult.write_files writes, and two that need the input files too.
PAIR_OUTPUTS = {
    "figure": "figure.png: the paper's Figure 6 (moving, fixed, warped, field, grid, Jacobian)",
    "scan": "moving_on_fixed_scan.nii.gz (and moving_seg_on_fixed_scan.nii.gz): the moving whole scan and its "
            "label map resampled onto the fixed scan through the transform",
}
PAIR_COLUMNS = ("fixed", "moving", "fixed_seg", "moving_seg", "fixed_vertebra", "moving_vertebra", "name")
# Other spellings the command line accepts for the same thing.
COLUMN_ALIASES = {"fixed_label": "fixed_vertebra", "moving_label": "moving_vertebra",
                  "fixed_segmentation": "fixed_seg", "moving_segmentation": "moving_seg"}
METRICS_TABLE = "metrics.csv"


def output_names() -> Dict[str, str]:
    """Every output a pair can have, name -> what it writes."""
    from .outputs import OUTPUTS
    return {**OUTPUTS, **PAIR_OUTPUTS}


def parse_outputs(text: str, option: str = "--outputs", known: Optional[Sequence[str]] = None,
                  default: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
    """``"warped,transform"`` -> the outputs' names; ``default`` stands for the default set, ``all`` for all
    ``known`` (default: a pair's 3D outputs, ``output_names``; the 2D command passes its own)."""
    if known is None:
        from .outputs import DEFAULT_OUTPUTS
        known, default = output_names(), DEFAULT_OUTPUTS
    chosen: List[str] = []
    for word in (w.strip() for w in str(text).split(",")):
        names = tuple(default) if word == "default" else tuple(known) if word == "all" else (word,) if word else ()
        for name in names:
            if name not in known:
                raise InputError(f"{option}: unknown output {name!r}; choose from default, all, "
                                 f"{', '.join(known)}")
            if name not in chosen:
                chosen.append(name)
    if not chosen:
        raise InputError(f"{option} is empty: name at least one output ({', '.join(known)})")
    return tuple(chosen)


@dataclass
class Pair:
    """One row of a pairs table (paths as given, resolved against the table's folder)."""

    name: str
    fixed: str
    moving: str
    fixed_seg: Optional[str] = None
    moving_seg: Optional[str] = None
    fixed_vertebra: Optional[str] = None
    moving_vertebra: Optional[str] = None
    row: int = 0  # the table's line number, for messages

    def inputs(self) -> Tuple[str, ...]:
        return tuple(p for p in (self.fixed, self.moving, self.fixed_seg, self.moving_seg) if p)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def read_pairs(path: str) -> List[Pair]:
    """The pairs of a CSV table (columns ``PAIR_COLUMNS``; fixed and moving required; relative paths from the
    table's folder; ``name``: each pair's output folder, default ``pair_<row>``), checked as a whole first:
    unknown columns, missing cells, repeated or unsafe names are refused with the line they are on."""
    if not os.path.isfile(path):
        raise InputError(f"--pairs {path}: no such file")
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [COLUMN_ALIASES.get(h.strip().lower(), h.strip().lower()) for h in reader.fieldnames or []]
            raw = [list(row.values()) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"--pairs {path}: cannot read it as a CSV table ({exc})") from None
    unknown = [h for h in header if h not in PAIR_COLUMNS]
    if unknown or not {"fixed", "moving"} <= set(header):
        raise InputError(f"--pairs {path}: columns {', '.join(PAIR_COLUMNS)} (fixed and moving required); "
                         + (f"unknown: {', '.join(unknown)}" if unknown else f"found: {', '.join(header)}"))
    pairs, names = [], {}
    for line, values in enumerate(raw, start=2):
        cells = {h: (v or "").strip() if isinstance(v, str) else "" for h, v in zip(header, values)}
        if not any(cells.values()):
            continue  # blank line
        for key in ("fixed", "moving"):
            if not cells.get(key):
                raise InputError(f"--pairs {path}, line {line}: no {key} image")
        for key in ("fixed", "moving", "fixed_seg", "moving_seg"):
            if cells.get(key):
                cells[key] = os.path.join(base, os.path.expanduser(cells[key]))
        name = cells.get("name") or f"pair_{len(pairs) + 1:03d}"
        if not _SAFE_NAME.match(name) or name in (METRICS_TABLE,):
            raise InputError(f"--pairs {path}, line {line}: name {name!r} cannot be a folder name (letters, "
                             "digits, '.', '_', '+', '-')")
        if name in names:
            raise InputError(f"--pairs {path}, line {line}: name {name!r} is also on line {names[name]}")
        names[name] = line
        pairs.append(Pair(name=name, row=line, **{k: cells.get(k) or None for k in PAIR_COLUMNS if k != "name"}))
    if not pairs:
        raise InputError(f"--pairs {path} lists no pairs")
    return pairs


class ScanCache:
    """``io.read_image`` remembering the last ``capacity`` files it read (by path, size and modification time):
    a batch over several vertebrae of the same scans decompresses each scan once, not once per pair (a 34 MB
    .nii.gz CT: 0.7 s). The images are shared, never modified: every step of the cropping makes new ones."""

    def __init__(self, capacity: int = 4):
        self.capacity, self.images = capacity, OrderedDict()

    def __call__(self, path: str, what: str = "image"):
        from .io import read_image
        try:
            stat = os.stat(path)
            key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
        except OSError:
            return read_image(path, what)  # names the missing file
        if key in self.images:
            self.images.move_to_end(key)
            return self.images[key]
        image = self.images[key] = read_image(path, what)
        while len(self.images) > self.capacity:
            self.images.popitem(last=False)
        return image


def read_pair(pair: Pair, intensity: str = "auto", reader=None) -> Tuple[PreparedInput, PreparedInput]:
    """Both sides of a pair, read and cropped (the rules of ``inputs``); ``reader``: a ``ScanCache`` or None."""
    options = {"reader": reader} if reader is not None else {}
    return (read_input(pair.fixed, pair.fixed_seg, pair.fixed_vertebra, "fixed", intensity, **options),
            read_input(pair.moving, pair.moving_seg, pair.moving_vertebra, "moving", intensity, **options))


def short_name(path: str) -> str:
    """'folder/file' of a path: scans are often all called ct.nii.gz."""
    return os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path))


def write_pair(result, pair: Pair, fixed: PreparedInput, moving: PreparedInput, folder: str,
               outputs: Sequence[str]) -> Dict[str, str]:
    """A pair's ``outputs`` written into ``folder`` (the result's own, then the whole-scan ones and the figure)."""
    from . import geometry
    paths = result.write_files(folder, [o for o in outputs if o not in PAIR_OUTPUTS])
    if "scan" in outputs:
        paths["moving_on_fixed_scan"] = os.path.join(folder, "moving_on_fixed_scan.nii.gz")
        geometry.write_image(result.warp_scan(moving.source, fixed.source), paths["moving_on_fixed_scan"])
        if pair.moving_seg:
            from .io import read_image
            paths["moving_seg_on_fixed_scan"] = os.path.join(folder, "moving_seg_on_fixed_scan.nii.gz")
            labels = read_image(pair.moving_seg, "moving label map")
            geometry.write_image(result.warp_scan(labels, fixed.source, label=True), paths["moving_seg_on_fixed_scan"])
    if "figure" in outputs:
        from .figures import registration_figure
        paths["figure"] = os.path.join(folder, "figure.png")
        registration_figure(result, paths["figure"], fixed_label=fixed.label,
                            title=f"{short_name(pair.moving)} -> {short_name(pair.fixed)}")
    return paths


def save_pair(result, pair: Pair, fixed: PreparedInput, moving: PreparedInput, target: str,
              outputs: Sequence[str], checkpoint: str = "") -> Dict[str, str]:
    """``write_pair`` into ``target`` as a unit; the files' final paths."""
    from .outputs import REGISTRATION, OutputFolder
    with OutputFolder(target, inputs=pair.inputs() + ((checkpoint,) if checkpoint else ()),
                      kind=REGISTRATION) as folder:
        paths = write_pair(result, pair, fixed, moving, folder.path, outputs)
    return folder.final_paths(paths)


@dataclass
class PairReport:
    """How one pair went: ``status`` ok, failed or not run."""

    pair: Pair
    status: str
    error: str = ""
    metrics: Optional[Dict] = None
    folding: Optional[Dict] = None
    seconds: float = 0.0  # the registration's (Registrar.register); reading and writing run beside others':
    seconds_reading: float = 0.0
    seconds_writing: float = 0.0
    folder: str = ""

    def row(self) -> Dict:
        from .metrics import table_row
        return table_row(self.metrics, self.folding, name=self.pair.name, status=self.status, error=self.error,
                         fixed=self.pair.fixed, moving=self.pair.moving, seconds=round(self.seconds, 4),
                         seconds_reading=round(self.seconds_reading, 4),
                         seconds_writing=round(self.seconds_writing, 4), folder=self.folder)


def check_batch_folder(out: str, pairs: Sequence[Pair]) -> str:
    """The batch's folder: new, empty, or one a previous batch wrote (it has a metrics table); never one that
    holds an input."""
    from .outputs import REGISTRATION, check_target, read_manifest
    path = check_target(out, kind=None, overwrite=True)  # a file, or below one; its own contents next
    if read_manifest(path) is not None:
        raise InputError(f"--out {out} holds the output of a single run ({read_manifest(path).get('kind')}), not "
                         "a batch: choose another folder for the batch")
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, METRICS_TABLE)):
        raise InputError(f"--out {out} already holds files that no batch of ACSGRegistration wrote (no "
                         f"{METRICS_TABLE}); choose a new or empty folder")
    for pair in pairs:
        check_target(os.path.join(path, pair.name), pair.inputs(), option=f"--out {out}, pair {pair.name}:",
                     kind=REGISTRATION)
    return path


def register_pairs(registrar: Callable[[], object], pairs: Sequence[Pair], out: str, outputs: Sequence[str],
                   intensity: str = "auto", stop_on_error: bool = False,
                   report: Optional[Callable[[int, int, PairReport], None]] = None,
                   should_stop: Optional[Callable[[], bool]] = None, checkpoint: str = "") -> List[PairReport]:
    """Register ``pairs`` into ``out/<name>/`` and ``out/metrics.csv``; ``registrar()`` gives the Registrar
    (called after the first pair's reading has started, so that loading the model overlaps it). Each finished
    pair is passed to ``report(done, total, its PairReport)``; ``should_stop()`` ends the batch between pairs
    (the rows not run are left out of the table). With ``stop_on_error`` the first failure raises."""
    from .geometry import write_csv
    from .metrics import folding
    out = check_batch_folder(out, pairs)
    os.makedirs(out, exist_ok=True)
    reports: List[PairReport] = []
    total = len(pairs)

    def finish(item: PairReport) -> None:
        reports.append(item)
        write_csv([r.row() for r in reports], os.path.join(out, METRICS_TABLE))
        if report is not None:
            report(len(reports), total, item)
        if item.status == "failed" and stop_on_error:
            raise InputError(f"pair {item.pair.name} (line {item.pair.row}): {item.error}")

    with ThreadPoolExecutor(1, thread_name_prefix="acsg-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="acsg-write") as writer:
        scans = ScanCache()  # used by the reading thread alone
        reading: Future = reader.submit(_timed, read_pair, pairs[0], intensity, scans)
        engine = registrar()
        writing: Optional[Tuple[Future, PairReport]] = None
        for k, pair in enumerate(pairs):
            if should_stop is not None and should_stop():
                break
            item = PairReport(pair, "failed")
            try:
                (fixed, moving), item.seconds_reading = reading.result()
            except (ACSGError, OSError, RuntimeError, ValueError) as exc:
                fixed = moving = None
                item.error = str(exc)
            if k + 1 < total:
                reading = reader.submit(_timed, read_pair, pairs[k + 1], intensity, scans)
            result = None
            if fixed is not None:
                try:
                    result, item.seconds = _timed(engine.register, fixed.image, moving.image, fixed.label,
                                                  moving.label)
                except (ACSGError, RuntimeError, ValueError) as exc:
                    item.error = str(exc)
            if writing is not None:  # the previous pair's files, written while this one registered
                finish(_written(*writing))
                writing = None
            if result is None:
                finish(item)
                continue
            result.notes = fixed.notes + moving.notes
            item.metrics, item.folding = result.metrics, folding(_array(result.jacobian))
            # In this thread's context: the command's --overwrite (outputs.overwriting) holds there too.
            writing = (writer.submit(contextvars.copy_context().run, _timed, save_pair, result, pair, fixed, moving,
                                     os.path.join(out, pair.name), outputs, checkpoint), item)
        if writing is not None:
            finish(_written(*writing))
    return reports


def _written(future: Future, item: PairReport) -> PairReport:
    """``item`` once its pair's files are written (or failed to be)."""
    try:
        item.seconds_writing = future.result()[1]
        item.status, item.folder = "ok", item.pair.name
    except (ACSGError, OSError, RuntimeError, ValueError) as exc:
        item.error = f"writing the outputs: {exc}"
    return item


def _timed(function, *args):
    """(function(*args), its seconds)."""
    started = time.perf_counter()
    return function(*args), time.perf_counter() - started


def _array(image):
    import SimpleITK as sitk
    return sitk.GetArrayViewFromImage(image)
