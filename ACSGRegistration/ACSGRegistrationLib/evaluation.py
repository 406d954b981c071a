"""The paper's evaluation tables: per-level Dice, precision, recall, ASSD at each stage, and folding."""

import os
from collections import defaultdict
from typing import Dict, List, Optional

import numpy as np

from .config import METHODS
from .errors import InputError
from .geometry import write_csv, write_text
from .metrics import METRICS, STAGES, table_row
from .resources import model_labels


def format_stage_table(metrics: Dict[str, Dict[str, float]]) -> str:
    """One pair's metrics as a small text table (rows: stages)."""
    lines = [f"{'stage':8s} " + " ".join(f"{m:>10s}" for m in METRICS)]
    for stage in STAGES:
        row = metrics.get(stage, {})
        lines.append(f"{stage:8s} " + " ".join(f"{row.get(m, float('nan')):10.3f}" for m in METRICS))
    fold = metrics.get("final", {})
    if "nonpositive_jacobian" in fold:
        lines.append(f"|J|<=0: {fold['nonpositive_jacobian']} voxels ({fold['nonpositive_jacobian_percent']:.2f} %)")
    return "\n".join(lines)


# The map beside the overlap (see maps.py): inside the fixed vertebra, from the exported transform.
MAP_COLUMNS = (("vertebra_nonpositive_percent", "% J<=0 in vertebra"), ("vertebra_sdlogj", "SDlogJ in vertebra"),
               ("vertebra_p1", "J 1st pct"), ("inverse_mean_mm", "fwd-inv mm"))


def map_columns(result, fixed_label) -> Dict[str, float]:
    """Regularity and inverse consistency of a result's map inside the fixed vertebra."""
    from . import maps
    row = maps.regularity(result.forward_field, result.affine_lps, fixed_label)
    row.update(maps.inverse_consistency(result.forward_field, result.inverse_field, fixed_label))
    return row


def summary_markdown(rows: List[Dict]) -> str:
    """Tables 1-4 of the paper: one block per method, rows per level and the average."""
    by_method = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    out = []
    for method, mrows in by_method.items():
        out.append(f"### {method}\n")
        maps_shown = [(k, title) for k, title in MAP_COLUMNS if all(k in r for r in mrows)]
        head = ["level", "pairs"] + [f"{m} {s}" for m in METRICS for s in STAGES] + ["|J|<=0", "% |J|<=0"] \
            + [title for _, title in maps_shown] + ["s/pair"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        levels = sorted({r["level"] for r in mrows})
        groups = [(lv, [r for r in mrows if r["level"] == lv]) for lv in levels] + [("Average", mrows)]
        for name, group in groups:
            vals = [name, str(len(group))]
            for m in METRICS:
                for s in STAGES:
                    vals.append(f"{np.nanmean([r[f'{m}_{s}'] for r in group]):.3f}")
            vals.append(f"{np.nanmean([r['nonpositive_jacobian'] for r in group]):.0f}")
            vals.append(f"{np.nanmean([r['nonpositive_jacobian_percent'] for r in group]):.2f}")
            vals += [f"{np.nanmean([r[k] for r in group]):.3f}" for k, _ in maps_shown]
            vals.append(f"{np.mean([r['seconds'] for r in group]):.2f}")
            out.append("| " + " | ".join(vals) + " |")
        out.append("")
    return "\n".join(out)


def write_tables(rows: List[Dict], out_dir: str) -> Dict[str, str]:
    """metrics.csv and metrics.md, written as one folder (``outputs.OutputFolder``)."""
    from .outputs import EVALUATION, OutputFolder
    with OutputFolder(out_dir, kind=EVALUATION) as folder:
        paths = {"csv": os.path.join(folder.path, "metrics.csv"), "markdown": os.path.join(folder.path, "metrics.md")}
        write_csv(rows, paths["csv"])
        write_text(summary_markdown(rows), paths["markdown"])
    return folder.final_paths(paths)


def network_method(checkpoint: str, device: str = "auto", refine_steps: int = 0, precision: str = "auto",
                   label: Optional[str] = None):
    """(name, register function) for a trained network; the name says which network (``label``, default
    ``resources.model_labels``' for this file alone) and refinement.

    Every method's function takes (fixed, moving, fixed_label, moving_label) crops and returns its result
    (``metrics``, ``seconds``, ``forward_field``, ``inverse_field``, ``affine_lps``)."""
    from .registrar import Registrar
    registrar = Registrar(checkpoint, device=device, precision=precision, refine_steps=refine_steps)
    name = METHODS[registrar.model.config.method]
    name += f" ({label or model_labels([checkpoint])[0]})"  # two checkpoints stay apart in the tables
    if refine_steps:
        name += f" + refinement ({refine_steps} steps)"
    return name, registrar.register


def ants_method(**kwargs):
    from .baselines import register_ants_syn

    def run(fixed, moving, fixed_label, moving_label):
        return register_ants_syn(fixed, moving, fixed_label, moving_label, **kwargs)
    return "ANTs SyN", run


def evaluate(methods, crops_dir: str, out_dir: str, pair_mode: str = "inter-subject", log=print) -> List[Dict]:
    """Register every pair of a crops folder with each method and write the tables side by side.

    ``methods`` is a list of (name, function(fixed, moving, fixed_label, moving_label) -> result).
    """
    from .crops import read_index
    from .datasets import make_pairs
    from .io import read_image
    from .outputs import EVALUATION, check_target
    check_target(out_dir, [crops_dir], kind=EVALUATION)  # before the work, not after it
    records = [r for r in read_index(crops_dir) if r.image and r.label]
    pairs = make_pairs(records, mode=pair_mode)
    if not pairs:
        raise InputError(f"{crops_dir} has no {pair_mode} pairs of image crops to evaluate")
    images = {}

    def load(path):
        if path not in images:
            images[path] = read_image(path)
        return images[path]
    rows = []
    for name, run in methods:
        for n, (i, j) in enumerate(pairs, 1):
            f, m = records[i], records[j]
            result = run(load(f.image), load(m.image), load(f.label), load(m.label))
            level = f.level if f.level == m.level else f"{m.level}->{f.level}"
            row = table_row(result.metrics, method=name, fixed=f.name, moving=m.name, level=level,
                            seconds=result.seconds)
            row.update(map_columns(result, load(f.label)))
            rows.append(row)
            log(f"{name} [{n}/{len(pairs)}] {m.name} -> {f.name}: Dice {result.metrics['final']['dice']:.3f}, "
                f"{result.seconds:.2f} s")
    paths = write_tables(rows, out_dir)
    log(summary_markdown(rows))
    log(f"tables: {paths['csv']}, {paths['markdown']}")
    return rows
