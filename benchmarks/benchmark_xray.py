"""CT to X-ray pose search in simulation (a benchmark: prints figures, asserts nothing).

    python benchmarks/benchmark_xray.py [--cases 8] [--method cmaes+gradient] [--start-deg 8 --start-mm 8]

The TotalSegmentator example CT of ../shared/data, target L1: an X-ray is rendered at a known pose (an AP view
turned a few degrees) on a detector twice finer than the registration's, through Beer-Lambert with Poisson
noise, displayed bone bright; each case starts from that pose perturbed by random rotations (σ ``--start-deg``
per axis about L1's centre) and translations (σ ``--start-mm`` per axis). Per case: mTRE over L1 before and
after (3D, mm), success at 10 / 5 / 2 mm, seconds. No real X-rays are available here: simulation only.
"""

import argparse
import os
import time

import numpy as np
import SimpleITK as sitk
import torch

from ACSGRegistrationLib.preprocessing import label_centroids
from ACSGRegistrationLib.xray import POSE_SEARCH_METHODS
from ACSGRegistrationLib.xray.camera import CArm, look_at, pose_from_parameters
from ACSGRegistrationLib.xray.drr import Volume, render
from ACSGRegistrationLib.xray.register import PoseSearch, mean_target_error, prepare_xray, register_pose

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--method", choices=POSE_SEARCH_METHODS, default=POSE_SEARCH_METHODS[0])
    parser.add_argument("--evaluations", type=int, default=400)
    parser.add_argument("--refine-steps", type=int, default=40)
    parser.add_argument("--restarts", type=int, default=2, help="CMA-ES runs per case, the best kept")
    parser.add_argument("--start-deg", type=float, default=8.0)
    parser.add_argument("--start-mm", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=os.environ.get("ACSG_DATA", DATA))
    args = parser.parse_args(argv)
    folder = os.path.join(args.data, "ct", "totalsegmentator-example")
    ct, seg = sitk.ReadImage(os.path.join(folder, "ct.nii.gz")), sitk.ReadImage(os.path.join(folder, "seg.nii.gz"))
    centre = np.asarray(label_centroids(seg)[31])  # L1 (TotalSegmentator v1 label)
    voxels = np.argwhere(sitk.GetArrayFromImage(seg) == 31)[::50][:, ::-1]
    points = np.array([seg.TransformIndexToPhysicalPoint([int(v) for v in index]) for index in voxels])
    detector = CArm(1020.0, (1.6, 1.6), (128, 128))
    truth = look_at(centre, 750.0, lao_deg=5.0, cranial_deg=-3.0)
    rng = np.random.default_rng(args.seed)
    line = render(Volume.from_image(ct), detector, torch.as_tensor(truth, dtype=torch.float32)).numpy()
    xray = -np.log(np.maximum(rng.poisson(2000 * np.exp(-line)), 1) / 2000)
    volume, carm = Volume.from_image(ct, spacing=3.0), detector.scaled(2)
    rows = []
    for case in range(args.cases):
        p = np.concatenate([rng.normal(0, np.deg2rad(args.start_deg), 3), rng.normal(0, args.start_mm, 3)])
        start = pose_from_parameters(torch.as_tensor(p), torch.as_tensor(truth), torch.as_tensor(centre)).numpy()
        search = PoseSearch(volume, carm, prepare_xray(xray, carm.size), start, centre)
        t0 = time.perf_counter()
        result = register_pose(search, args.method, args.evaluations, args.refine_steps, seed=10 * case,
                               restarts=args.restarts)
        rows.append((mean_target_error(start, truth, points), mean_target_error(result["ct_to_source"], truth, points),
                     time.perf_counter() - t0))
        print(f"case {case}: mTRE {rows[-1][0]:5.1f} -> {rows[-1][1]:6.2f} mm, gradient NCC "
              f"{result['initial_similarity']:.3f} -> {result['similarity']:.3f}, {rows[-1][2]:.0f} s", flush=True)
    final = np.array([r[1] for r in rows])
    print(f"{args.method}: start mTRE median {np.median([r[0] for r in rows]):.1f} mm; success@10/5/2 mm "
          f"{(final < 10).mean():.0%} / {(final < 5).mean():.0%} / {(final < 2).mean():.0%}; median final mTRE "
          f"of successes {np.median(final[final < 10]) if (final < 10).any() else float('nan'):.2f} mm; "
          f"{np.mean([r[2] for r in rows]):.0f} s per case")


if __name__ == "__main__":
    main()
