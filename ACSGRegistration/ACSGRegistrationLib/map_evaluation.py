"""The evaluation of maps: every method side by side on real pairs, known deformations and self-registration.

For each vertebra of a manifest (CSV ``image,label,label_id,level,subject``: whole scans with their label
maps) and each method (networks, refined networks, ANTs SyN):
- ``pair``: every ordered pair of its crops (``datasets.make_pairs`` mode, "all" by default): Dice,
  precision, recall, ASSD per stage, and the map's regularity and inverse consistency;
- ``known-crop`` / ``known-scan``: the vertebra and a seeded random warp of it (``maps.RandomMap``), of the
  crop alone or of the whole scan (then both crops are cut from whole scans): TRE inside the vertebra beside
  the identity's, with regularity and inverse consistency;
- ``self``: the crop registered to itself: Dice and the mean displacement inside the vertebra.
Writes ``maps.csv`` (one row per method and case), ``maps.md`` (means per method and kind) and
``acceptance.md`` (the bars of the maps issue, each with its measured value).
"""

import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import SimpleITK as sitk

from . import maps
from .evaluation import map_columns
from .geometry import write_csv, write_text
from .errors import InputError

KINDS = ("pair", "known-crop", "known-scan", "self")
SUMMARY_COLUMNS = ("dice_initial", "dice_affine", "dice_final", "assd_final", "vertebra_nonpositive_percent",
                   "vertebra_sdlogj", "vertebra_p1", "vertebra_p99", "crop_nonpositive_percent", "crop_sdlogj",
                   "inverse_mean_mm", "inverse_p95_mm", "inverse_outside_percent", "tre_mean_mm", "tre_p95_mm",
                   "tre_max_mm", "identity_tre_mean_mm", "displacement_mm", "seconds")


@dataclass
class Vertebra:
    name: str
    subject: str
    level: str
    scan: sitk.Image
    segmentation: sitk.Image
    label_id: int


def read_manifest(path: str) -> List[Vertebra]:
    """Vertebrae with their scans, from a manifest CSV or a data folder (``readers.find_sources``); each
    scan and label map is read once."""
    from .io import read_image
    from .readers import find_sources
    cache: Dict[str, sitk.Image] = {}

    def load(p, what):
        if p not in cache:
            cache[p] = read_image(p, what)
        return cache[p]
    out = []
    for source in find_sources(path):
        if not source.has_image:
            raise InputError(f"{path}: {source.name} has no image (a label-only source cannot be registered)")
        out.append(Vertebra(source.name, source.subject, source.level, load(source.image, "image"),
                            load(source.label, "label map"), source.label_id))
    if not out:
        raise InputError(f"{path} lists no vertebrae")
    return out


def map_row(method: str, kind: str, fixed: str, moving: str, result, fixed_label: sitk.Image) -> Dict:
    row = {"method": method, "kind": kind, "fixed": fixed, "moving": moving, "seconds": result.seconds}
    if result.metrics:
        for stage in ("initial", "affine", "final"):
            row[f"dice_{stage}"] = result.metrics[stage]["dice"]
        row["assd_final"] = result.metrics["final"]["assd_mm"]
    row.update(map_columns(result, fixed_label))
    return row


def evaluate_maps(methods, vertebrae: Sequence[Vertebra], out_dir: str, seeds: Sequence[int] = (0, 1, 2),
                  pair_mode: str = "all", kinds: Sequence[str] = KINDS, log=print) -> List[Dict]:
    """Run every method on every case of ``kinds`` and write the tables (see the module's docstring)."""
    from .crops import CropRecord
    from .datasets import make_pairs
    from .preprocessing import crop_vertebra
    from .outputs import MAP_EVALUATION, OutputFolder, check_target
    check_target(out_dir, kind=MAP_EVALUATION)  # before the work, not after it
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise InputError(f"unknown case kind(s) {', '.join(sorted(unknown))}; choose from {', '.join(KINDS)}")
    crops = [crop_vertebra(v.scan, v.segmentation, v.label_id, name=v.name) for v in vertebrae]
    cases = []  # (kind, fixed name, moving name, fixed, moving, fixed label, moving label, psi)
    if "pair" in kinds:
        records = [CropRecord(v.name, v.subject, v.level, "", "") for v in vertebrae]
        for i, j in make_pairs(records, mode=pair_mode):
            cases.append(("pair", vertebrae[i].name, vertebrae[j].name, crops[i].image, crops[j].image,
                          crops[i].label, crops[j].label, None))
    for kind, whole in (("known-crop", False), ("known-scan", True)):
        if kind in kinds:
            for v, crop in zip(vertebrae, crops):
                for seed in seeds:
                    c = maps.known_deformation_case(v.scan, v.segmentation, v.label_id, seed, whole_scan=whole,
                                                    fixed_crop=crop)
                    cases.append((kind, v.name, f"{v.name} warped #{seed}", c.fixed, c.moving, c.fixed_label,
                                  c.moving_label, c.psi))
    if "self" in kinds:
        for v, c in zip(vertebrae, crops):
            cases.append(("self", v.name, v.name, c.image, c.image, c.label, c.label, None))
    rows = []
    for name, run in methods:
        t0 = time.perf_counter()
        for n, (kind, fname, mname, f, m, fl, ml, psi) in enumerate(cases, 1):
            result = run(f, m, fl, ml)
            row = map_row(name, kind, fname, mname, result, fl)
            if psi is not None:
                row.update(maps.target_errors(result.forward_field, fl, psi))
            if kind == "self":
                row["displacement_mm"] = maps.displacement_inside(result.forward_field, fl)
            rows.append(row)
            extra = f", TRE {row['tre_mean_mm']:.2f} mm (identity {row['identity_tre_mean_mm']:.2f})" if psi else ""
            log(f"{name} [{n}/{len(cases)}] {kind} {mname} -> {fname}: Dice {row.get('dice_final', float('nan')):.3f}, "
                f"SDlogJ {row['vertebra_sdlogj']:.2f}, |J|<=0 {row['vertebra_nonpositive_percent']:.2f} %{extra}")
        log(f"{name}: {len(cases)} cases in {time.perf_counter() - t0:.0f} s")
    with OutputFolder(out_dir, kind=MAP_EVALUATION) as folder:
        write_csv(rows, os.path.join(folder.path, "maps.csv"))
        write_text(summary_markdown(rows), os.path.join(folder.path, "maps.md"))
        write_text(acceptance_markdown(rows), os.path.join(folder.path, "acceptance.md"))
    return rows


def summary_markdown(rows: List[Dict]) -> str:
    """Means per method and kind of case (one table per kind)."""
    out = []
    for kind in KINDS:
        group = [r for r in rows if r["kind"] == kind]
        if not group:
            continue
        cols = [c for c in SUMMARY_COLUMNS if any(c in r for r in group)]
        out += [f"### {kind} ({len({(r['fixed'], r['moving']) for r in group})} cases)", "",
                "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        by_method = defaultdict(list)
        for r in group:
            by_method[r["method"]].append(r)
        for method, mrows in by_method.items():
            vals = [f"{np.nanmean([r.get(c, np.nan) for r in mrows]):.3f}" for c in cols]
            out.append(f"| {method} | " + " | ".join(vals) + " |")
        out.append("")
    return "\n".join(out)


def _mean(rows, key):
    return float(np.nanmean([r[key] for r in rows])) if rows else float("nan")


def acceptance(rows: List[Dict], reference: str = "ANTs SyN") -> List[Dict]:
    """The maps issue's bars for every method, each as {method, bar, value, passed}."""
    checks = []
    ref = {(r["kind"], r["fixed"], r["moving"]): r for r in rows if r["method"] == reference}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        pairs = [r for r in mine if r["kind"] == "pair"]
        scan = [r for r in mine if r["kind"] == "known-scan"]
        selfs = [r for r in mine if r["kind"] == "self"]
        everything = [r for r in mine if r["kind"] != "self"]

        def check(bar, value, passed):
            checks.append({"method": method, "bar": bar, "value": value, "passed": bool(passed)})
        ref_pairs = [ref.get(("pair", r["fixed"], r["moving"])) for r in pairs]
        if pairs and all(ref_pairs):
            for key, bar in (("dice_final", f"mean final Dice >= {reference}'s"),
                             ("dice_affine", f"mean affine Dice >= {reference}'s affine")):
                mine_mean, ref_mean = _mean(pairs, key), _mean(ref_pairs, key)
                check(bar, f"{mine_mean:.3f} vs {ref_mean:.3f}", mine_mean >= ref_mean)
            worst = max(r["vertebra_sdlogj"] / max(q["vertebra_sdlogj"], 1e-6) for r, q in zip(pairs, ref_pairs))
            check(f"SDlogJ in vertebra <= 1.5 x {reference}'s on every pair", f"max ratio {worst:.2f}", worst <= 1.5)
        if everything:
            check("% J<=0 in vertebra < 0.1 on every case",
                  f"max {max(r['vertebra_nonpositive_percent'] for r in everything):.3f}",
                  max(r["vertebra_nonpositive_percent"] for r in everything) < 0.1)
            check("1st percentile of J in vertebra >= 0.2 on every case",
                  f"min {min(r['vertebra_p1'] for r in everything):.3f}",
                  min(r["vertebra_p1"] for r in everything) >= 0.2)
            check("mean SDlogJ in vertebra <= 0.40", f"{_mean(everything, 'vertebra_sdlogj'):.3f}",
                  _mean(everything, "vertebra_sdlogj") <= 0.40)
            check("mean forward-inverse residual in vertebra <= 0.5 mm", f"{_mean(everything, 'inverse_mean_mm'):.3f}",
                  _mean(everything, "inverse_mean_mm") <= 0.5)
        if scan:
            per_vertebra = defaultdict(list)
            for r in scan:
                per_vertebra[r["fixed"]].append(r)
            tre = {k: _mean(v, "tre_mean_mm") for k, v in per_vertebra.items()}
            ident = {k: _mean(v, "identity_tre_mean_mm") for k, v in per_vertebra.items()}
            check("known deformations, whole scans: mean TRE <= 1.0 mm", f"{np.mean(list(tre.values())):.3f}",
                  np.mean(list(tre.values())) <= 1.0)
            worst = max(tre[k] / ident[k] for k in tre)
            check("known deformations, whole scans: TRE <= 1/3 of the identity's on each vertebra",
                  f"max ratio {worst:.3f}", worst <= 1 / 3)
        if selfs:
            check("self-registration: Dice >= 0.99", f"min {min(r['dice_final'] for r in selfs):.4f}",
                  min(r["dice_final"] for r in selfs) >= 0.99)
            check("self-registration: mean displacement in vertebra < 0.5 mm",
                  f"max {max(r['displacement_mm'] for r in selfs):.3f}", max(r["displacement_mm"] for r in selfs) < 0.5)
    return checks


def acceptance_markdown(rows: List[Dict]) -> str:
    lines = ["| method | bar | value | holds |", "|---|---|---|---|"]
    lines += [f"| {c['method']} | {c['bar']} | {c['value']} | {'yes' if c['passed'] else '**no**'} |"
              for c in acceptance(rows)]
    return "\n".join(lines) + "\n"
