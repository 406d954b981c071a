"""Mask crops of every lumbar vertebra in ../shared/data/shapes (label maps without CT) for synthesis.

    python scripts/prepare_shape_crops.py OUT_DIR [--data ../shared/data] [--spacing 2]

The crop always covers the paper's 128 x 128 x 64 mm; ``--spacing`` sets its voxel size (2 mm for the
compact model). Writes a crops folder (crops.csv with empty image columns) that
``train --synthetic-labels`` reads: the readers' prepare() of the shapes folder, at that spacing.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ACSGRegistration"))

from ACSGRegistrationLib.preprocessing import CROP_SIZE  # noqa: E402
from ACSGRegistrationLib.readers import prepare  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--data", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       "..", "shared", "data"))
    parser.add_argument("--spacing", type=float, default=1.0, help="voxel size in mm (default 1)")
    args = parser.parse_args(argv)
    size = tuple(int(round(n / args.spacing)) for n in CROP_SIZE)
    records = prepare(os.path.join(args.data, "shapes"), args.out, size=size, spacing=args.spacing)
    print(f"{len(records)} mask crops in {args.out}")


if __name__ == "__main__":
    main()
