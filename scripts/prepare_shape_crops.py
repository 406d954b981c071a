"""Mask crops of every lumbar vertebra in ../shared/data/shapes (label maps without CT) for synthesis.

    python scripts/prepare_shape_crops.py OUT_DIR [--data ../shared/data] [--spacing 2]

The crop always covers the paper's 128 x 128 x 64 mm; ``--spacing`` sets its voxel size (2 mm for the
compact model).

Writes a crops folder (crops.csv with empty image columns) that ``train --synthetic-labels`` reads.
"""

import argparse
import glob
import os
import sys
import warnings

import SimpleITK as sitk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ACSGRegistration"))

from ACSGRegistrationLib.datasets import CropRecord, write_crop, write_index  # noqa: E402
from ACSGRegistrationLib.preprocessing import CROP_SIZE, PreprocessingError, crop_vertebra  # noqa: E402

LEVELS = ("L1", "L2", "L3", "L4", "L5")


def shape_sources(data):
    """(label map path, {level: label id}, subject) for each label map of the shapes folder."""
    for path in sorted(glob.glob(os.path.join(data, "shapes", "verse", "*_seg-vert_msk.nii.gz"))):
        yield path, {lv: 20 + k for k, lv in enumerate(LEVELS)}, os.path.basename(path).split("_")[0]
    for path in sorted(glob.glob(os.path.join(data, "shapes", "abdomenatlas-demo", "BDMAP_*.nii.gz"))):
        # Counted from the bottom: 1 = L5 ... 5 = L1 (order checked by the readers' tests).
        yield path, {lv: 5 - k for k, lv in enumerate(LEVELS)}, os.path.basename(path).split(".")[0]
    for path in sorted(glob.glob(os.path.join(data, "shapes", "totalsegmentator-s0224", "vertebrae_L*.nii.gz"))):
        level = os.path.basename(path).split("_")[1].split(".")[0]
        yield path, {level: 1}, "s0224"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--data", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       "..", "shared", "data"))
    parser.add_argument("--spacing", type=float, default=1.0, help="voxel size in mm (default 1)")
    args = parser.parse_args(argv)
    size = tuple(int(round(n / args.spacing)) for n in CROP_SIZE)
    records = []
    for path, levels, subject in shape_sources(args.data):
        labels = sitk.ReadImage(path)
        for level, label_id in levels.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    crop = crop_vertebra(labels, labels, label_id, size, args.spacing, name=os.path.basename(path))
            except PreprocessingError as exc:
                print(f"skipped: {exc}")
                continue
            for note in crop.warnings:  # kept: the paper's crops cut the largest vertebrae too
                print("note:", note)
            name = f"{subject}_{level}"
            _, label_path = write_crop(args.out, name, crop.label, crop.label)
            os.remove(os.path.join(args.out, f"{name}.nii.gz"))
            records.append(CropRecord(name, subject, level, "", label_path))
            print(f"{name}: {int(sitk.GetArrayViewFromImage(crop.label).sum())} voxels")
    write_index(args.out, records)
    print(f"{len(records)} mask crops in {args.out}")


if __name__ == "__main__":
    main()
