"""Scans with vertebra labels, found in the users' data layouts, turned into a crops folder.

A ``VertebraSource`` is one vertebra of one scan: the CT (or "" when only the label map is available), the
label map, the vertebra's label value in it and its level ("L1" ... "L5"; "T12" etc. where asked for).
Readers exist for a generic manifest CSV and for the VerSe, TotalSegmentator and AbdomenAtlas layouts;
``find_sources`` recognises the layout by itself. The layout readers check, from the label centroids in
physical space, that the levels they assign run from head to feet, because a wrong label convention would
otherwise silently pair different vertebrae.
"""

import csv
import os
import re
import warnings
from collections import namedtuple
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .crops import INDEX, CropRecord, read_index, write_crop, write_index
from .errors import InputError
from .geometry import write_image
from .io import read_image
from .preprocessing import (PreprocessingError, VertebraCrop, crop_size, crop_vertebra, label_centroids,
                            label_statistics)
from .vertebrae import (ABDOMENATLAS_IDS, LUMBAR, SPINE, TOTALSEGMENTATOR_IDS, VERSE_IDS, convention_names,
                        level_order_problem, normalise_levels)

MANIFEST_FIELDS = ("image", "label", "label_id", "level", "subject")

_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_VERSE_MASK = re.compile(r"^(?P<prefix>.+)_seg-vert_msk\.nii(\.gz)?$", re.IGNORECASE)
_VERSE_CT = re.compile(r"^(?P<prefix>.+)_ct\.nii(\.gz)?$", re.IGNORECASE)
_VERSE_SUBJECT = re.compile(r"^sub-(?P<subject>[^_]+)_?(?P<scan>.*)$")
_TOTALSEG_NAME = r"vertebrae_(?P<level>[A-Z]\d+)"  # TotalSegmentator's structure name of a vertebra
_TOTALSEG_LEVEL = re.compile(rf"^{_TOTALSEG_NAME}\.nii(\.gz)?$", re.IGNORECASE)
_TOTALSEG_MAPS = ("seg.nii.gz", "segmentations.nii.gz", "seg.nii", "segmentations.nii")
_TOTALSEG_CTS = ("ct.nii.gz", "ct.nii")
_ABDOMENATLAS = re.compile(r"^BDMAP_.+\.nii(\.gz)?$")


@dataclass
class VertebraSource:
    image: str  # CT in Hounsfield units, or "" for a label-only source (a shape without its scan)
    label: str  # label map: multi-label, or a binary file of this vertebra alone
    label_id: int  # the vertebra's value in ``label``
    level: str  # "L1" ... "L5" (or another of SPINE)
    subject: str
    scan: str = ""  # tells apart several scans of one subject (VerSe "dir-ax"); "" for one scan
    centroid: Optional[Tuple[float, float, float]] = None  # physical (LPS, mm) where the reader measured it

    @property
    def has_image(self) -> bool:
        return bool(self.image)

    @property
    def name(self) -> str:
        """Name of the vertebra's crop: subject, scan (if any) and level."""
        return "_".join(part for part in (self.subject, self.scan, self.level) if part)


# ---------------------------------------------------------------------------------------------- levels


def label_map_names(path: str, labels: sitk.Image) -> Dict[int, str]:
    """Value -> level name ("L1"; "" where unknown) of every label of a label map file: from a TotalSegmentator
    ``structures.csv`` beside it, else from the label convention that fits its centroids."""
    centroids = label_centroids(labels)
    structures = os.path.join(os.path.dirname(os.path.abspath(path)), "structures.csv")
    ids = _structure_ids(structures) if os.path.isfile(structures) else None
    named = {i: lv for lv, i in ids.items()} if ids else convention_names(centroids)
    return {value: named.get(value, "") for value in sorted(centroids)}


def _measure(labels: sitk.Image) -> Dict[int, Tuple[Tuple[float, float, float], float]]:
    """(physical centroid, volume in mm^3) of every non-zero label."""
    stats = label_statistics(labels)
    return {int(lab): (tuple(stats.GetCentroid(lab)), stats.GetPhysicalSize(lab)) for lab in stats.GetLabels()}


def _warn_small_levels(volumes: Dict[str, float], where: str):
    """Warn about levels far smaller than their neighbours (up to two levels either side): fragments of
    model predictions (seen in the AbdomenAtlas demo maps) or vertebrae cut by the scan's edge. They are
    kept: the caller decides."""
    for lv, volume in volumes.items():
        near = [v for other, v in volumes.items() if other != lv and abs(SPINE.index(other) - SPINE.index(lv)) <= 2]
        if len(near) >= 2 and volume < 0.5 * float(np.median(near)):
            warnings.warn(f"{where}: {lv} is {volume / 1000:.1f} cm^3 against {np.median(near) / 1000:.1f} cm^3 "
                          f"for its neighbours: partial or fragmented label?", stacklevel=3)


def _order_accepted(centroids: Dict[str, Sequence[float]], where: str, strict: bool) -> bool:
    problem = level_order_problem(centroids, where)
    if problem is None:
        return True
    if strict:
        raise InputError(problem)
    warnings.warn(f"{problem}; skipped", stacklevel=3)
    return False


# ------------------------------------------------------------------------------ sources of one scan


def sources_from_label_map(label: str, ids: Dict[str, int], subject: str, image: str = "",
                           levels: Sequence[str] = LUMBAR, scan: str = "",
                           strict: bool = False) -> List[VertebraSource]:
    """One source per requested level present in a multi-label map whose convention is ``ids``."""
    measured = _measure(read_image(label, "label map"))
    found = {lv: measured[ids[lv]][0] for lv in normalise_levels(levels) if ids.get(lv) in measured}
    if not _order_accepted(found, label, strict):
        return []
    _warn_small_levels({lv: measured[ids[lv]][1] for lv in found}, label)
    return [VertebraSource(image, label, ids[lv], lv, subject, scan, found[lv]) for lv in found]


def sources_from_level_files(files: Dict[str, str], subject: str, image: str = "",
                             levels: Sequence[str] = LUMBAR, strict: bool = False) -> List[VertebraSource]:
    """One source per requested level from binary masks, one file per level (``files``: level -> path).

    Empty masks are absent levels (TotalSegmentator writes a file for every vertebra, empty or not).
    """
    found, volumes = {}, {}
    for lv in normalise_levels(levels):
        if lv not in files:
            continue
        measured = _measure(read_image(files[lv], f"{lv} mask"))
        if measured and 1 not in measured:
            raise InputError(f"{files[lv]}: expected a binary mask of {lv} with value 1, "
                             f"found label(s) {', '.join(map(str, sorted(measured)))}")
        if measured:
            found[lv], volumes[lv] = measured[1]
    where = os.path.dirname(next(iter(files.values()))) if files else subject
    if not _order_accepted(found, where, strict):
        return []
    _warn_small_levels(volumes, where)
    return [VertebraSource(image, files[lv], 1, lv, subject, "", found[lv]) for lv in found]


# --------------------------------------------------------------------------------------------- layouts
#
# Each layout is found in two steps: ``detect`` lists its scans from file names only (cheap, and what
# ``find_sources`` uses to recognise a layout), ``read`` opens one scan's label maps.

Layout = namedtuple("Layout", "name pattern detect read")


def _walk(folder: str):
    """(directory, sorted file names, sub-directory list) below ``folder``, in a reproducible order."""
    for directory, subdirs, files in os.walk(folder):
        subdirs.sort()
        yield directory, sorted(files), subdirs


def _detect_verse(folder: str):
    """(prefix, ct or "", mask) per VerSe scan; CT and mask may lie in different sub-folders."""
    masks, cts = {}, {}
    for directory, files, _ in _walk(folder):
        for f in files:
            for pattern, found in ((_VERSE_MASK, masks), (_VERSE_CT, cts)):
                m = pattern.match(f)
                if m:
                    prefix = m.group("prefix")
                    if prefix in found:
                        raise InputError(f"two VerSe files for {prefix} under {folder}: {found[prefix]} and "
                                         f"{os.path.join(directory, f)}")
                    found[prefix] = os.path.join(directory, f)
    for prefix in sorted(set(cts) - set(masks)):
        warnings.warn(f"{cts[prefix]} has no vertebra mask ({prefix}_seg-vert_msk.nii.gz): skipped")
    return [(prefix, cts.get(prefix, ""), masks[prefix]) for prefix in sorted(masks)]


def _read_verse(scan, levels, strict):
    prefix, image, mask = scan
    m = _VERSE_SUBJECT.match(prefix)
    subject, scan_id = (m.group("subject"), m.group("scan")) if m else (prefix, "")
    return sources_from_label_map(mask, VERSE_IDS, subject, image, levels, scan_id, strict)


def _structure_ids(path: str) -> Optional[Dict[str, int]]:
    """Vertebra ids from a TotalSegmentator-style ``structures.csv`` (columns structure, id), if it has them."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not {"structure", "id"} <= set(reader.fieldnames or ()):
            return None
        ids = {}
        for row in reader:
            m = re.match(rf"^{_TOTALSEG_NAME}$", row["structure"].strip(), re.IGNORECASE)
            if m:
                try:
                    ids[m.group("level").upper()] = int(row["id"])
                except ValueError:
                    raise InputError(f"{path}: id {row['id']!r} of {row['structure']} is not an integer") from None
    return ids or None


def _detect_totalsegmentator(folder: str):
    """Case folders: ``ct.nii.gz`` (optional) with a multi-label map or ``vertebrae_<level>`` masks."""
    cases = []
    for directory, files, subdirs in _walk(folder):
        names = {f.lower(): f for f in files}
        multi = _first(directory, names, _TOTALSEG_MAPS)
        image = _first(directory, names, _TOTALSEG_CTS)
        level_files = _level_files(directory, files)
        if not level_files and "segmentations" in subdirs:
            seg_dir = os.path.join(directory, "segmentations")
            level_files = _level_files(seg_dir, sorted(os.listdir(seg_dir)))
        if multi or level_files:
            if "segmentations" in subdirs:
                subdirs.remove("segmentations")  # part of this case, not a case of its own
            csv_path = os.path.join(directory, "structures.csv")
            cases.append((directory, image, multi, level_files, csv_path if os.path.isfile(csv_path) else ""))
        elif image:
            warnings.warn(f"{image} has no vertebra labels beside it (seg.nii.gz, segmentations.nii.gz or "
                          f"segmentations/vertebrae_L1.nii.gz ...): skipped")
    return cases


def _first(directory: str, names: Dict[str, str], candidates: Sequence[str]) -> str:
    """Path of the first candidate file name present (``names``: lower-case name -> name), or ""."""
    return next((os.path.join(directory, names[n]) for n in candidates if n in names), "")


def _level_files(directory: str, files: Sequence[str]) -> Dict[str, str]:
    found = {}
    for f in files:
        m = _TOTALSEG_LEVEL.match(f)
        if m and m.group("level").upper() in SPINE:
            found[m.group("level").upper()] = os.path.join(directory, f)
    return found


def _read_totalsegmentator(case, levels, strict):
    directory, image, multi, level_files, structures = case
    subject = os.path.basename(os.path.normpath(directory))
    if multi:  # one read for all levels, preferred over the per-level masks when both exist
        ids = (_structure_ids(structures) if structures else None) or TOTALSEGMENTATOR_IDS
        return sources_from_label_map(multi, ids, subject, image, levels, "", strict)
    return sources_from_level_files(level_files, subject, image, levels, strict)


def _detect_abdomenatlas(folder: str):
    return [os.path.join(directory, f) for directory, files, _ in _walk(folder) for f in files
            if _ABDOMENATLAS.match(f)]


def _read_abdomenatlas(path, levels, strict):
    # Label-only: the combined vertebra maps come without their CT. The convention counts from L5 up,
    # which the centroid check verifies file by file (the data README asks for it).
    subject = _NIFTI.sub("", os.path.basename(path))
    return sources_from_label_map(path, ABDOMENATLAS_IDS, subject, "", levels, "", strict)


VERSE = Layout("VerSe", "*_seg-vert_msk.nii.gz (with *_ct.nii.gz)", _detect_verse, _read_verse)
TOTALSEGMENTATOR = Layout("TotalSegmentator", "ct.nii.gz with seg.nii.gz or segmentations/vertebrae_L1.nii.gz ...",
                          _detect_totalsegmentator, _read_totalsegmentator)
ABDOMENATLAS = Layout("AbdomenAtlas", "BDMAP_*.nii.gz", _detect_abdomenatlas, _read_abdomenatlas)
LAYOUTS = (VERSE, TOTALSEGMENTATOR, ABDOMENATLAS)


def _check_folder(folder: str):
    if not os.path.isdir(folder):
        raise InputError(f"data folder not found: {folder}")


def _find(layout: Layout, folder: str, levels, strict) -> List[VertebraSource]:
    _check_folder(folder)
    scans = layout.detect(folder)
    if not scans:
        raise InputError(f"{folder} holds no {layout.name} files ({layout.pattern})")
    return [s for scan in scans for s in layout.read(scan, levels, strict)]


def find_verse(folder: str, levels: Sequence[str] = LUMBAR, strict: bool = False) -> List[VertebraSource]:
    """VerSe: ``<prefix>_ct.nii.gz`` and ``<prefix>_seg-vert_msk.nii.gz`` anywhere below ``folder``
    (rawdata/derivatives or flat); masks without CT give label-only sources. Subject from ``sub-<id>``."""
    return _find(VERSE, folder, levels, strict)


def find_totalsegmentator(folder: str, levels: Sequence[str] = LUMBAR,
                          strict: bool = False) -> List[VertebraSource]:
    """TotalSegmentator case folders (``folder`` itself or any below it): ``ct.nii.gz`` (or none: label-only)
    with a v2 multi-label ``seg.nii.gz`` / ``segmentations.nii.gz`` (ids from ``structures.csv`` if present),
    or binary ``[segmentations/]vertebrae_<level>.nii.gz`` masks. Subject = case folder name."""
    return _find(TOTALSEGMENTATOR, folder, levels, strict)


def find_abdomenatlas(folder: str, levels: Sequence[str] = LUMBAR, strict: bool = False) -> List[VertebraSource]:
    """AbdomenAtlas combined vertebra maps ``BDMAP_*.nii.gz`` (label-only, 1=L5 ... 5=L1, 6=T12 ...).

    A file whose centroids contradict that order is skipped with a warning (an ``InputError`` if ``strict``).
    """
    return _find(ABDOMENATLAS, folder, levels, strict)


def find_sources(path: str, levels: Sequence[str] = LUMBAR, strict: bool = False) -> List[VertebraSource]:
    """Sources from a manifest CSV (its rows as they are), or from a folder in any (or several) of the LAYOUTS."""
    if os.path.isfile(path):
        if path.lower().endswith(".csv"):
            return read_manifest(path)
        raise InputError(f"{path} is neither a manifest CSV nor a data folder")
    if not os.path.isdir(path):
        raise InputError(f"not found: {path} (expected a manifest CSV or a data folder)")
    detected = [(layout, layout.detect(path)) for layout in LAYOUTS]
    if not any(scans for _, scans in detected):
        raise InputError(f"no scans recognised in {path}: expected a manifest CSV or a folder with "
                         + "; ".join(f"{lay.name} files ({lay.pattern})" for lay in LAYOUTS))
    sources = [s for layout, scans in detected for scan in scans for s in layout.read(scan, levels, strict)]
    if not sources:
        found = ", ".join(f"{len(scans)} {layout.name}" for layout, scans in detected if scans)
        raise InputError(f"{path}: {found} scan(s) found, but none has a vertebra of "
                         f"{', '.join(normalise_levels(levels))}")
    return sources


def read_manifest(path: str) -> List[VertebraSource]:
    """Generic manifest: CSV with image, label, label_id, level, subject (paths relative to the CSV).

    An empty image cell makes a label-only source.
    """
    if not os.path.isfile(path):
        raise InputError(f"manifest not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    sources = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(MANIFEST_FIELDS) - set(reader.fieldnames or ())
        if missing:
            raise InputError(f"{path} lacks column(s) {', '.join(sorted(missing))}")
        for n, row in enumerate(reader, 2):
            try:
                label_id = int(row["label_id"])
            except ValueError:
                raise InputError(f"{path} line {n}: label_id {row['label_id']!r} is not an integer") from None
            image = os.path.join(base, row["image"]) if row["image"].strip() else ""
            sources.append(VertebraSource(image, os.path.join(base, row["label"]), label_id, row["level"],
                                          row["subject"]))
    return sources


# ------------------------------------------------------------------------------------------- cropping


def _crop_label_only(labels: sitk.Image, label_id: int, size, spacing: float, name: str,
                     stats: Optional[sitk.LabelShapeStatisticsImageFilter] = None) -> VertebraCrop:
    where = f"{name}: " if name else ""
    stats = stats or label_statistics(labels)
    if not stats.HasLabel(int(label_id)):
        present = ", ".join(map(str, stats.GetLabels())) or "none"
        raise PreprocessingError(f"{where}label {label_id} is not in the label map (labels present: {present})")
    # crop_vertebra needs an image on the label map's grid and would convert all of it to float: give it
    # the vertebra's bounding box plus one voxel instead. The mask, its centroid, the crop grid and the
    # scan-edge check are the same as on the whole map (the margin is zero, or the map's own edge).
    lo = np.asarray(stats.GetBoundingBox(int(label_id))[:3])
    hi = lo + np.asarray(stats.GetBoundingBox(int(label_id))[3:])
    start = np.maximum(lo - 1, 0)
    stop = np.minimum(hi + 1, labels.GetSize())
    roi = sitk.RegionOfInterest(labels, [int(v) for v in stop - start], [int(v) for v in start])
    crop = crop_vertebra(roi, roi, label_id, size, spacing, name=name)
    return VertebraCrop(None, crop.label, crop.name, crop.warnings, crop.span)


def crop_label_only(labels: sitk.Image, label_id: int, size: Optional[Sequence[int]] = None, spacing: float = 1.0,
                    name: str = "") -> sitk.Image:
    """Binary uint8 mask of one vertebra on the crop grid ``crop_vertebra`` uses (``preprocessing.crop_grid``
    centred on the vertebra's centroid), for label maps whose CT is not available."""
    return _crop_label_only(labels, label_id, size or crop_size(spacing), spacing, name).label


class _ScanCache:
    """Whole scans (and label statistics) read once each; a few at a time, as sources come scan by scan."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.images: Dict[str, sitk.Image] = {}
        self.stats: Dict[str, sitk.LabelShapeStatisticsImageFilter] = {}

    def image(self, path: str, what: str) -> sitk.Image:
        if path not in self.images:
            if len(self.images) >= self.keep:
                self.images.clear()
                self.stats.clear()
            self.images[path] = read_image(path, what)
        return self.images[path]

    def label_stats(self, path: str) -> sitk.LabelShapeStatisticsImageFilter:
        labels = self.image(path, "label map")
        if path not in self.stats:
            self.stats[path] = label_statistics(labels)
        return self.stats[path]


def _unique_names(sources: Sequence[VertebraSource]):
    seen: Dict[str, VertebraSource] = {}
    for s in sources:
        if s.name in seen:
            raise InputError(f"two sources would both be written as crop {s.name}: {seen[s.name].label} and "
                             f"{s.label} (give them different subjects or scans)")
        seen[s.name] = s


def prepare_sources(sources: List[VertebraSource], out_dir: str, size=None, spacing: float = 1.0,
                    progress: Optional[Callable[[int, int, str], None]] = None) -> List[CropRecord]:
    """Crop every listed vertebra into ``out_dir`` and write its index; scans are read once each; ``progress(k,
    n, name)`` after each crop.

    Label-only sources get a mask crop and an empty image in the index. The folder is written as a unit
    (``outputs.OutputFolder``): a failed or interrupted run leaves it as it was, never partly cropped.
    """
    from .outputs import OutputFolder
    _unique_names(sources)  # before anything is written
    inputs = [p for s in sources for p in (s.image, s.label)]
    with OutputFolder(out_dir, inputs, option="crops folder", kind="crops") as folder:
        cache = _ScanCache()
        records = []
        for s in sources:
            where = f"{s.label} level {s.level}"
            try:
                labels = cache.image(s.label, "label map")
                image = cache.image(s.image, "image") if s.has_image else None
            except InputError as exc:
                raise InputError(f"{exc} (needed for {s.name})") from exc
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if image is not None:
                    crop = crop_vertebra(image, labels, s.label_id, size or crop_size(spacing), spacing, name=where)
                else:
                    crop = _crop_label_only(labels, s.label_id, size or crop_size(spacing), spacing, where,
                                            cache.label_stats(s.label))
            for note in crop.warnings:
                warnings.warn(note)
            if crop.image is not None:
                image_path, label_path = write_crop(folder.path, s.name, crop.image, crop.label)
            else:
                image_path, label_path = "", os.path.join(folder.path, f"{s.name}_label.nii.gz")  # write_crop's naming
                write_image(crop.label, label_path)
            records.append(CropRecord(s.name, s.subject, s.level, image_path, label_path))
            if progress is not None:
                progress(len(records), len(sources), s.name)
        write_index(folder.path, records)
    return read_index(folder.target)


def prepare(path: str, out_dir: str, levels: Sequence[str] = LUMBAR, size=None, spacing: float = 1.0,
            progress: Optional[Callable[[int, int, str], None]] = None) -> List[CropRecord]:
    """Crops of every vertebra ``find_sources`` finds at ``path`` (a manifest CSV or a data folder)."""
    sources = find_sources(path, levels)
    if not sources:
        raise InputError(f"{path} lists no vertebra to crop: nothing was written")
    return prepare_sources(sources, out_dir, size, spacing, progress)


def prepare_manifest(manifest: str, out_dir: str, spacing: float = 1.0,
                     progress: Optional[Callable[[int, int, str], None]] = None) -> List[CropRecord]:
    """The CLI's 'prepare': a manifest CSV, or any data folder the readers recognise; crops cover the paper's
    128 x 128 x 64 mm at ``spacing`` mm."""
    return prepare(manifest, out_dir, spacing=spacing, progress=progress)


def crop_records(path: str, work_folder: str) -> List[CropRecord]:
    """The crops of a crops folder (``crops.csv``), or of a manifest CSV or data folder cropped (at 1 mm) into
    ``work_folder`` first; cropped once: a later call finds the crops there."""
    if os.path.isfile(os.path.join(path, INDEX)):
        return read_index(path)
    target = os.path.join(work_folder, "crops_" + _NIFTI.sub("", os.path.basename(os.path.normpath(path)))
                          .replace(".csv", ""))
    if os.path.isfile(os.path.join(target, INDEX)):
        return read_index(target)
    return prepare(path, target)
