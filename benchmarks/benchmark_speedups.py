"""Each inference speed-up, before and after, and what it does to accuracy (a benchmark: prints figures).

    python benchmarks/benchmark_speedups.py [--checkpoint MODEL] [--crops DIR] [--out DIR] [--no-paper]

The engine's steps, cumulative, each run over the same pairs in one process:
  reference       the trained network as it is: fp32, batch norm, NCDHW tensors, inverse with every pair,
                  PyTorch's grid_sample (one core for one pair on the CPU)
  lazy inverse    the inverse field computed only when asked for (the module and evaluation never ask)
  every core      resampling cut into one slab per thread (layers.grid_sample)
  folded + CL     batch norm folded into the convolutions, channels-last layout, still fp32
  bf16            the deformable network in bf16 (native on this CPU or GPU); affine net and geometry fp32
  kept memory     freed memory kept for the next tensors (inference.keep_freed_memory; process-wide, so
                  each configuration runs in a fresh process and this step comes last)
  torch.compile   (with --compile) the bf16 engine compiled by TorchInductor; its compile time is reported

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
import multiprocessing
import os
import tempfile
import time
import warnings

import numpy as np
import SimpleITK as sitk
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from ACSGRegistrationLib import layers
from ACSGRegistrationLib.config import paper_config
from ACSGRegistrationLib.inference import keep_freed_memory, native_bf16, prepare_for_inference
from ACSGRegistrationLib.networks import RegistrationNet
from ACSGRegistrationLib.registrar import Registrar, choose_device

STEPS = ("reference", "lazy inverse", "every core", "folded + CL", "bf16", "kept memory")


def engine_for(step, model, device):
    layers.SAMPLE_ON_EVERY_CORE = step not in ("reference", "lazy inverse")
    if step in ("reference", "lazy inverse", "every core"):
        return model  # the network as trained (compute_dtype None: plain fp32)
    if step == "folded + CL":
        return prepare_for_inference(model, device, "fp32")
    engine = prepare_for_inference(model, device, "bf16")
    if step == "kept memory":
        keep_freed_memory()
    if step == "torch.compile":
        engine.forward = torch.compile(engine.forward)
    return engine


def run_step(registrar, step, pairs, repeats):
    """Per-pair results of one step (with metrics), and its seconds per pair (registration alone: images
    in, outputs out, no metrics; the median of ``repeats`` passes)."""
    registrar.engine = engine_for(step, registrar.model, registrar.device)
    t0 = time.perf_counter()
    results = [registrar.register(*pairs[0])]
    first = time.perf_counter() - t0  # includes the compilation for torch.compile
    for pair in pairs[1:]:
        results.append(registrar.register(*pair))
    passes = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for fixed, moving, _fixed_label, _moving_label in pairs:
            result = registrar.register(fixed, moving)
            if step == "reference":
                result.inverse_field  # noqa: B018 -- computed eagerly, as before the change
        passes.append((time.perf_counter() - t0) / len(pairs))
    return results, float(np.median(passes)), first


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
        results, seconds, first = run_step(registrar, step, pairs, repeats)
        reference = reference or results
        row = {"step": step, "seconds_per_pair": seconds, "first_call_seconds": first}
        row.update(compare(results, reference))
        rows.append(row)
        print(f"  {step}: {seconds:.3f} s/pair, " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                             if isinstance(v, float) and k != "seconds_per_pair"),
              flush=True)
    for row in rows:
        row["speedup_over_reference"] = rows[0]["seconds_per_pair"] / row["seconds_per_pair"]
    return rows


def real_crop_pairs(crops_dir):
    from ACSGRegistrationLib.crops import read_index
    from ACSGRegistrationLib.datasets import make_pairs
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


def paper_model(pair, rms_voxels=2.0, seed=0):
    """Paper-size network with random weights whose velocity field has an RMS of ``rms_voxels`` on
    ``pair`` (the flow heads rescaled; the fusion starts as the gated sum, nearly linear in them), and a
    slightly perturbed affine layer."""
    torch.manual_seed(seed)
    model = RegistrationNet(paper_config()).eval()
    heads = (model.deformable.decoder_self.head, model.deformable.decoder_cross.head)
    fixed, moving = (torch.from_numpy(sitk.GetArrayFromImage(im))[None, None] for im in pair[:2])
    with torch.no_grad():
        model.affine.fc.weight.normal_(0.0, 2e-4)
        for _ in range(2):
            rms = model(fixed, moving)["velocity"].pow(2).mean().sqrt().item()
            for head in heads:
                head.weight.mul_(rms_voxels / rms)
    return model


def markdown(info, shipped, paper):
    lines = [f"Device: {info['device']}, torch {info['torch']}, {info['date']}; bf16 native: {info['bf16_native']}", ""]

    def table(title, rows):
        out = [title, "", "| step (cumulative) | s per pair | speed-up | first call s | mean Dice | "
               "max abs Dice change | field change mean / max (mm) |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            dice = f"{r['dice_mean']:.4f}" if "dice_mean" in r else "-"
            change = f"{r['dice_max_abs_diff']:.4f}" if "dice_max_abs_diff" in r else "-"
            out.append(f"| {r['step']} | {r['seconds_per_pair']:.3f} | {r['speedup_over_reference']:.2f}x | "
                       f"{r['first_call_seconds']:.2f} | {dice} | "
                       f"{change} | {r['field_diff_mean_mm']:.4f} / {r['field_diff_max_mm']:.4f} |")
        return out + [""]
    if shipped:
        lines += table(f"Trained model {info['checkpoint']}, {info['pairs']} real pairs", shipped)
    if paper:
        lines += table("Paper-size configuration (random weights, velocity RMS 2 voxels), real L1 pair", paper)
    return "\n".join(lines)


def trained_section(checkpoint, crops, device, repeats):
    warnings.simplefilter("ignore")
    pairs, _ = real_crop_pairs(crops)
    print(f"{os.path.basename(checkpoint)} on {len(pairs)} pairs", flush=True)
    return len(pairs), bench(Registrar(checkpoint, device=device, keep_memory=False), pairs, repeats)


def paper_section(crops, device, repeats, compile_step):
    warnings.simplefilter("ignore")
    _, l1 = real_crop_pairs(crops)
    print("paper-size configuration on the L1 pair", flush=True)
    steps = STEPS + (("torch.compile",) if compile_step else ())
    return bench(Registrar(model=paper_model(l1[0]), device=device, keep_memory=False), l1, repeats, steps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from ACSGRegistrationLib.resources import shipped_model_path
    parser.add_argument("--checkpoint", default=shipped_model_path())
    parser.add_argument("--crops", help="a crops folder (default: prepared from scripts/real_vertebrae.csv)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the pairs (median)")
    parser.add_argument("--paper-repeats", type=int, default=9, help="timed passes for the paper-size network")
    parser.add_argument("--no-paper", action="store_true", help="skip the paper-size configuration")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile step for the paper-size network")
    parser.add_argument("--out", default="benchmark_results")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    crops = args.crops
    if crops is None:
        from ACSGRegistrationLib.readers import prepare
        crops = tempfile.mkdtemp(prefix="acsg_real_crops_")
        prepare(os.path.join(ROOT, "scripts", "real_vertebrae.csv"), crops)
    device = choose_device(args.device)
    info = {"date": time.strftime("%Y-%m-%d"), "torch": str(torch.__version__), "bf16_native": native_bf16(device),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({torch.get_num_threads()} threads)", "checkpoint": os.path.basename(args.checkpoint),
            "pairs": None}
    # Each configuration in a fresh process: the memory policy of the last step is process-wide.
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        info["pairs"], shipped = pool.apply(trained_section, (args.checkpoint, crops, args.device, args.repeats))
        paper = [] if args.no_paper else pool.apply(paper_section, (crops, args.device, args.paper_repeats,
                                                                    args.compile))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmark_speedups.json"), "w") as fh:
        json.dump({"info": info, "trained_model": shipped, "paper_size": paper}, fh, indent=2)
    text = markdown(info, shipped, paper)
    with open(os.path.join(args.out, "benchmark_speedups.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
