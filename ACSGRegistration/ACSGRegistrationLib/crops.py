"""Crops folders: one ``<name>.nii.gz`` image and ``<name>_label.nii.gz`` mask per vertebra and an index
``crops.csv`` (name, subject, level, image, label; paths relative to the folder). ``prepare`` writes such
folders; training, evaluation and fine-tuning read them. No PyTorch here: the Slicer module writes and merges
indexes in Slicer's own process."""

import csv
import os
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import SimpleITK as sitk

from .errors import InputError
from .geometry import write_csv, write_image

INDEX = "crops.csv"
FIELDS = ("name", "subject", "level", "image", "label")


@dataclass
class CropRecord:
    name: str
    subject: str
    level: str
    image: str  # absolute path, or "" for a mask-only crop (a label map whose CT is not available)
    label: str  # absolute path, or "" when the crop has no mask


def write_crop(out_dir: str, name: str, image: sitk.Image, label: Optional[sitk.Image]) -> Tuple[str, str]:
    image_path = os.path.join(out_dir, f"{name}.nii.gz")
    write_image(image, image_path)
    label_path = ""
    if label is not None:
        label_path = os.path.join(out_dir, f"{name}_label.nii.gz")
        write_image(label, label_path)
    return image_path, label_path


def write_index(out_dir: str, records: Sequence[CropRecord]):
    relative = lambda p: os.path.relpath(p, out_dir) if p else ""  # noqa: E731
    rows = [dict(asdict(r), image=relative(r.image), label=relative(r.label)) for r in records]
    write_csv(rows, os.path.join(out_dir, INDEX), FIELDS)


def read_index(folder: str) -> List[CropRecord]:
    path = os.path.join(folder, INDEX)
    if not os.path.isfile(path):
        raise InputError(f"{folder} is not a crops folder: it has no {INDEX} (run 'prepare' first)")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(FIELDS) - set(reader.fieldnames or ())
        if missing:
            raise InputError(f"{path} lacks column(s) {', '.join(sorted(missing))}")
        records = []
        for row in reader:
            resolve = lambda p: os.path.normpath(os.path.join(folder, p)) if p else ""  # noqa: E731
            records.append(CropRecord(row["name"], row["subject"], row["level"], resolve(row["image"]),
                                      resolve(row["label"])))
    if not records:
        raise InputError(f"{path} lists no crops")
    gone = [p for r in records for p in (r.image, r.label) if p and not os.path.isfile(p)]
    if gone:
        names = ", ".join(os.path.basename(p) for p in gone[:3]) + (f" and {len(gone) - 3} more" if len(gone) > 3 else "")
        raise InputError(f"{path} lists {len(gone)} file(s) that are not in {folder} ({names}): were they deleted? "
                         "Prepare the crops folder again")
    return records
