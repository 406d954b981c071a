"""Each inference speed-up, before and after, and what it does to accuracy (a benchmark: prints figures).

    python benchmarks/benchmark_speedups.py [--checkpoint MODEL] [--crops DIR] [--out DIR] [--no-paper]

The engine's steps, cumulative, each run over the same pairs in one process:
  reference       the trained network as it is: fp32, batch norm, NCDHW tensors, inverse with every pair
  lazy inverse    the inverse field computed only when asked for (the module and evaluation never ask)
  folded + CL     batch norm folded into the convolutions, channels-last layout, still fp32
  bf16            convolutions and attention in bf16 (native on this CPU or GPU), geometry in fp32

1. The checkpoint (default: the shipped model) on every ordered pair of the real crops (prepared from
   scripts/real_vertebrae.csv unless --crops is given): seconds per pair (registration with its outputs,
   without the metrics; the crops' preprocessing is in benchmark_engine.py), mean Dice,
   the largest per-pair |Dice - reference Dice|, the mean and largest forward-field difference (mm).
2. The paper-size configuration on the real inter-subject L1 pair (128x128x64 at 1 mm). No paper-size
   model is trained, so its weights are random, with the affine layer and flow heads drawn so that the
   fields are a few voxels: this checks the arithmetic of each step, not a trained model's accuracy.
Writes benchmark_speedups.json and .md to --out.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import SimpleITK as sitk
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "ACSGRegistration"))

from ACSGRegistrationLib.config import paper_config  # noqa: E402
from ACSGRegistrationLib.inference import native_bf16, prepare_for_inference  # noqa: E402
from ACSGRegistrationLib.networks import RegistrationNet  # noqa: E402
from ACSGRegistrationLib.registrar import Registrar  # noqa: E402

STEPS = ("reference", "lazy inverse", "folded + CL", "bf16")


def engine_for(step, model, device):
    if step in ("reference", "lazy inverse"):
        return model  # the network as trained (compute_dtype None: plain fp32)
    if step == "folded + CL":
        return prepare_for_inference(model, device, "fp32")
    return prepare_for_inference(model, device, "bf16")


def run_step(registrar, step, pairs, repeats):
    """Per-pair results of one step (with metrics), and its seconds per pair (registration alone: images
    in, outputs out, no metrics; the best of ``repeats`` passes)."""
    registrar.engine = engine_for(step, registrar.model, registrar.device)
    results = []
    for pair in pairs:
        results.append(registrar.register(*pair))
    passes = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for fixed, moving, _fixed_label, _moving_label in pairs:
            result = registrar.register(fixed, moving)
            if step == "reference":
                result.inverse_field  # noqa: B018 -- computed eagerly, as before the change
        passes.append((time.perf_counter() - t0) / len(pairs))
    return results, float(min(passes))


def compare(results, reference):
    dice = [r.metrics["final"]["dice"] for r in results if r.metrics]
    ref_dice = [r.metrics["final"]["dice"] for r in reference if r.metrics]
    diffs = [np.linalg.norm(sitk.GetArrayViewFromImage(r.forward_field) - sitk.GetArrayViewFromImage(q.forward_field),
                            axis=-1) for r, q in zip(results, reference)]
    row = {"field_diff_mean_mm": float(np.mean([d.mean() for d in diffs])),
           "field_diff_max_mm": float(max(d.max() for d in diffs))}
    if dice:
        row.update(dice_mean=float(np.mean(dice)), dice_max_abs_diff=float(np.max(np.abs(np.subtract(dice, ref_dice)))),
                   folding_percent_mean=float(np.mean([r.metrics["final"]["nonpositive_jacobian_percent"]
                                                       for r in results])))
    return row


def bench(registrar, pairs, repeats, steps=STEPS):
    rows, reference = [], None
    for step in steps:
        results, seconds = run_step(registrar, step, pairs, repeats)
        reference = reference or results
        row = {"step": step, "seconds_per_pair": seconds}
        row.update(compare(results, reference))
        rows.append(row)
        print(f"  {step}: {seconds:.3f} s/pair, " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                             if isinstance(v, float) and k != "seconds_per_pair"),
              flush=True)
    for row in rows:
        row["speedup_over_reference"] = rows[0]["seconds_per_pair"] / row["seconds_per_pair"]
    return rows


def real_crop_pairs(crops_dir):
    from ACSGRegistrationLib.datasets import make_pairs, read_index
    from ACSGRegistrationLib.io import read_image
    records = [r for r in read_index(crops_dir) if r.image and r.label]
    images = {r.name: (read_image(r.image), read_image(r.label)) for r in records}
    pairs = []
    for i, j in make_pairs(records, mode="all"):
        (f, fl), (m, ml) = images[records[i].name], images[records[j].name]
        pairs.append((f, m, fl, ml))
    l1 = [(images[a][0], images[b][0], images[a][1], images[b][1])
          for a in images for b in images if a != b and a.endswith("_L1") and b.endswith("_L1")]
    return pairs, l1[:1]


def paper_model(seed=0):
    torch.manual_seed(seed)
    model = RegistrationNet(paper_config()).eval()
    with torch.no_grad():
        model.affine.fc.weight.normal_(0.0, 2e-4)
        for head in (model.deformable.decoder_self.head, model.deformable.decoder_cross.head):
            head.weight.normal_(0.0, 0.05)
    return model


def markdown(info, shipped, paper):
    lines = [f"Device: {info['device']}, torch {info['torch']}, {info['date']}; bf16 native: {info['bf16_native']}", ""]

    def table(title, rows):
        out = [title, "", "| step (cumulative) | s per pair | speed-up | mean Dice | max abs Dice change | "
               "field change mean / max (mm) |", "|---|---|---|---|---|---|"]
        for r in rows:
            dice = f"{r['dice_mean']:.4f}" if "dice_mean" in r else "-"
            change = f"{r['dice_max_abs_diff']:.4f}" if "dice_max_abs_diff" in r else "-"
            out.append(f"| {r['step']} | {r['seconds_per_pair']:.3f} | {r['speedup_over_reference']:.2f}x | {dice} | "
                       f"{change} | {r['field_diff_mean_mm']:.4f} / {r['field_diff_max_mm']:.4f} |")
        return out + [""]
    if shipped:
        lines += table(f"Trained model {info['checkpoint']}, {info['pairs']} real pairs", shipped)
    if paper:
        lines += table("Paper-size configuration (random weights, fields of a few voxels), real L1 pair", paper)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from ACSGRegistrationLib.cli import DEFAULT_MODEL
    parser.add_argument("--checkpoint", default=DEFAULT_MODEL)
    parser.add_argument("--crops", help="a crops folder (default: prepared from scripts/real_vertebrae.csv)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-paper", action="store_true", help="skip the paper-size configuration")
    parser.add_argument("--out", default="benchmark_results")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    crops = args.crops
    if crops is None:
        from ACSGRegistrationLib.readers import prepare
        crops = tempfile.mkdtemp(prefix="acsg_real_crops_")
        prepare(os.path.join(ROOT, "scripts", "real_vertebrae.csv"), crops)
    pairs, l1 = real_crop_pairs(crops)
    registrar = Registrar(args.checkpoint, device=args.device)
    device = registrar.device
    info = {"date": time.strftime("%Y-%m-%d"), "torch": str(torch.__version__), "bf16_native": native_bf16(device),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({torch.get_num_threads()} threads)", "checkpoint": os.path.basename(args.checkpoint),
            "pairs": len(pairs)}
    print(f"{info['checkpoint']} on {len(pairs)} pairs", flush=True)
    shipped = bench(registrar, pairs, args.repeats)
    paper = []
    if not args.no_paper:
        print("paper-size configuration on the L1 pair", flush=True)
        paper = bench(Registrar(model=paper_model(), device=args.device), l1, args.repeats + 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmark_speedups.json"), "w") as fh:
        json.dump({"info": info, "trained_model": shipped, "paper_size": paper}, fh, indent=2)
    text = markdown(info, shipped, paper)
    with open(os.path.join(args.out, "benchmark_speedups.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
