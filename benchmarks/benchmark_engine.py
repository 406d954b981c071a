"""Speed and memory of the registration engine (a benchmark: prints figures, asserts nothing).

    python benchmarks/benchmark_engine.py [--device auto|cpu|cuda] [--repeats 3] [--out DIR]

For each method's default (paper-size) configuration: parameters, registration wall time of one
128x128x64 pair (network + physical-space outputs, model loaded once), pairs per second at batch 1
and at larger batches, a training step's time, and peak memory (CPU RSS, GPU allocated).
Writes benchmark_engine.json and .md to --out.
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["acsgregnet", "avoxelmorph"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", default="benchmark_results")
    args = parser.parse_args(argv)
    device = choose_device(args.device)
    info = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": str(torch.__version__)}
    rows = [bench_method(m, device, args.repeats, args.batches) for m in args.methods]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmark_engine.json"), "w") as fh:
        json.dump({"info": info, "results": rows}, fh, indent=2)
    lines = [f"Device: {info['device']}, torch {info['torch']}, {info['date']}", "",
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
