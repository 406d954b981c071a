"""Scans with vertebra labels, listed in a manifest, turned into a crops folder."""

import csv
import os
import warnings
from dataclasses import dataclass
from typing import List

from .datasets import CropRecord, write_crop, write_index
from .io import read_image
from .preprocessing import crop_vertebra
from .validation import InputError

MANIFEST_FIELDS = ("image", "label", "label_id", "level", "subject")


@dataclass
class VertebraSource:
    image: str
    label: str
    label_id: int
    level: str
    subject: str


def read_manifest(path: str) -> List[VertebraSource]:
    """Generic manifest: CSV with image, label, label_id, level, subject (paths relative to the CSV)."""
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
            sources.append(VertebraSource(os.path.join(base, row["image"]), os.path.join(base, row["label"]),
                                          label_id, row["level"], row["subject"]))
    return sources


def prepare_sources(sources: List[VertebraSource], out_dir: str, size=None, spacing: float = 1.0) -> List[CropRecord]:
    """Crop every listed vertebra into ``out_dir`` and write its index; scans are read once each."""
    from .preprocessing import CROP_SIZE
    os.makedirs(out_dir, exist_ok=True)
    cache = {}
    records = []
    for s in sources:
        for path, what in ((s.image, "image"), (s.label, "label map")):
            if path not in cache:
                if len(cache) > 4:  # a few whole scans at a time are enough: manifests list scans in order
                    cache.clear()
                cache[path] = read_image(path, what)
        name = f"{s.subject}_{s.level}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            crop = crop_vertebra(cache[s.image], cache[s.label], s.label_id, size or CROP_SIZE, spacing,
                                 name=f"{os.path.basename(s.label)} level {s.level}")
        for note in crop.warnings:
            warnings.warn(note)
        image_path, label_path = write_crop(out_dir, name, crop.image, crop.label)
        records.append(CropRecord(name, s.subject, s.level, image_path, label_path))
    write_index(out_dir, records)
    return records


def prepare_manifest(manifest: str, out_dir: str) -> List[CropRecord]:
    return prepare_sources(read_manifest(manifest), out_dir)
