"""The 2D study: known deformations and inter-subject pairs of views of test CTs, every method on the same
images (the networks given, SimpleITK's Demons and B-spline, the identity).

- **Known deformations** (``data.known_deformation``, seeded): end-point error inside the vertebrae (mean, 95th
  percentile, max, mm) of each method's map against the truth, beside the identity's; folding (% of pixels
  with det J <= 0 over the view).
- **Inter-subject pairs**: views of the same kind and level from two CTs, each centred on its vertebra: Dice
  and ASSD of that vertebra before (centred) and after; folding; inverse consistency (each pair is registered
  both ways: how far the map A -> B followed by B -> A lands from where it started, inside A's vertebra, mm).
- **Self-registration**: each view registered to itself; the map should stay the identity.
- Seconds per pair (network: the forward pass on the CPU, and with refinement its optimisation on the pair;
  baselines: their registration).
"""

import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..geometry import write_csv, write_text
from ..metrics import assd, folding, overlap
from .baselines import run_baseline
from .data import View, endpoint_error, identity_error, image_tensor, known_deformation, vertebra_masks
from .network import PlanarNet, jacobian_determinant_2d, warp_planar
from .refinement import PlanarRefineConfig, refine_field

REFINED = " + refinement"

CASE_COLUMNS = ("case", "kind", "view", "label", "subject", "method", "epe_mean_mm", "epe_p95_mm", "epe_max_mm",
                "identity_epe_mm", "dice_initial", "dice_final", "assd_final_mm", "inverse_consistency_mm",
                "folding_percent", "seconds")


def _method_field(method: str, nets: Dict[str, PlanarNet], fixed: torch.Tensor, moving: torch.Tensor,
                  refine: Optional[PlanarRefineConfig]):
    """(pixel displacement (1, 2, H, W), seconds) of one method."""
    started = time.perf_counter()
    if method in nets:
        with torch.no_grad():
            field = nets[method].field(fixed, moving)
    elif method.endswith(REFINED):
        field = refine_field(nets[method[:-len(REFINED)]], fixed, moving, refine)
    else:
        field = torch.from_numpy(run_baseline(method, fixed[0, 0].numpy(), moving[0, 0].numpy()))[None]
    return field, time.perf_counter() - started


def _folding(field: torch.Tensor) -> float:
    return folding(jacobian_determinant_2d(field)[0].numpy())["nonpositive_jacobian_percent"]


def known_cases(views: Sequence[View], seeds: Sequence[int]) -> List[Dict]:
    cases = []
    for view in views:
        for seed in seeds:
            rng = np.random.default_rng(1000 * seed + view.label)
            fixed, labels = image_tensor(view.image), image_tensor(view.labels)
            truth = known_deformation(fixed, labels, rng)
            cases.append({"kind": "known", "view": view, "fixed": fixed, "moving": truth.moving,
                          "moving_labels": truth.moving_labels, "backward": truth.backward,
                          "mask": vertebra_masks(labels), "seed": seed})
    return cases


def self_cases(views: Sequence[View]) -> List[Dict]:
    """Each view registered to itself: the truth is the identity (a zero backward field)."""
    cases = []
    for view in views:
        fixed, labels = image_tensor(view.image), image_tensor(view.labels)
        cases.append({"kind": "self", "view": view, "fixed": fixed, "moving": fixed.clone(),
                      "backward": torch.zeros(2, *fixed.shape[-2:]), "mask": vertebra_masks(labels)})
    return cases


def subject_pairs(views: Sequence[View]) -> List[Dict]:
    """Ordered pairs of views of the same kind and level from different subjects."""
    pairs = []
    for a in views:
        for b in views:
            if a.subject != b.subject and a.kind == b.kind and a.label == b.label:
                pairs.append({"kind": "inter-subject", "view": a, "fixed": image_tensor(a.image),
                              "moving": image_tensor(b.image),
                              "fixed_mask": (image_tensor(a.labels) == a.label).float(),
                              "moving_mask": (image_tensor(b.labels) == b.label).float(), "other": b})
    return pairs


def evaluate_cases(cases: Sequence[Dict], nets: Dict[str, PlanarNet],
                   baselines: Sequence[str] = ("demons", "bspline"), progress=None,
                   refine: Optional[PlanarRefineConfig] = None) -> List[Dict]:
    """Rows of every method on every case; with ``refine``, each network refined on each pair as well
    (``<name> + refinement``)."""
    rows, both_ways = [], {}
    refined = [name + REFINED for name in nets] if refine is not None and refine.steps > 0 else []
    methods = ["identity"] + list(nets) + refined + list(baselines)
    for k, case in enumerate(cases):
        view = case["view"]
        for method in methods:
            if method == "identity":
                field, seconds = torch.zeros(1, 2, *case["fixed"].shape[-2:]), 0.0
            else:
                field, seconds = _method_field(method, nets, case["fixed"], case["moving"], refine)
            row = {"case": k, "kind": case["kind"], "view": view.kind, "label": view.label,
                   "subject": view.subject + ("" if "other" not in case else f"<-{case['other'].subject}"),
                   "method": method, "folding_percent": _folding(field), "seconds": seconds}
            if case["kind"] in ("known", "self"):
                error = endpoint_error(field, case["backward"], case["mask"])
                identity = identity_error(case["backward"], case["mask"])
                row.update(epe_mean_mm=error["mean"], epe_p95_mm=error["p95"], epe_max_mm=error["max"],
                           identity_epe_mm=identity["mean"])
            else:
                fixed_mask = case["fixed_mask"][0, 0].numpy() > 0.5
                warped = warp_planar(case["moving_mask"], field)[0, 0].numpy() > 0.5
                initial = case["moving_mask"][0, 0].numpy() > 0.5
                row.update(dice_initial=overlap(fixed_mask, initial)["dice"],
                           dice_final=overlap(fixed_mask, warped)["dice"],
                           assd_final_mm=assd(fixed_mask, warped, (1.0, 1.0)) if warped.any() else float("nan"))
                both_ways[(method, id(view), id(case["other"]))] = (row, field, case["fixed_mask"][0, 0])
            rows.append(row)
        if progress is not None:
            progress(k + 1, len(cases))
    for (method, fixed_view, moving_view), (row, field, mask) in both_ways.items():
        reverse = both_ways.get((method, moving_view, fixed_view))
        if reverse is not None:  # A -> B then B -> A: endpoint_error's composition with the reverse map as truth
            row["inverse_consistency_mm"] = endpoint_error(field, reverse[1][0], mask)["mean"]
    return rows


def _mean(values) -> float:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def summary_markdown(rows: Sequence[Dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = []
    known = [r for r in rows if r["kind"] == "known"]
    if known:
        identity = _mean(r["epe_mean_mm"] for r in known if r["method"] == "identity")
        lines += ["Known deformations (end-point error inside the vertebrae, mm; folding over the view):", "",
                  "| method | EPE mean | EPE p95 | EPE max | change from the identity | folding % | seconds/pair |",
                  "|---|---|---|---|---|---|---|"]
        for method in methods:
            mine = [r for r in known if r["method"] == method]
            mean = _mean(r["epe_mean_mm"] for r in mine)
            lines.append(f"| {method} | {mean:.3f} | {_mean(r['epe_p95_mm'] for r in mine):.3f} | "
                         f"{_mean(r['epe_max_mm'] for r in mine):.3f} | {100 * (mean / identity - 1):+.1f} % | "
                         f"{_mean(r['folding_percent'] for r in mine):.3f} | {_mean(r['seconds'] for r in mine):.3f} |")
        views = list(dict.fromkeys(r["view"] for r in known))
        lines += ["", "Per view (EPE mean, mm):", "", "| method | " + " | ".join(views) + " |",
                  "|---|" + "---|" * len(views)]
        for method in methods:
            cells = [f"{_mean(r['epe_mean_mm'] for r in known if r['method'] == method and r['view'] == v):.3f}"
                     for v in views]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    itself = [r for r in rows if r["kind"] == "self"]
    if itself:
        lines += ["", "Each view registered to itself (how far the map moves points inside the vertebrae, mm):", "",
                  "| method | mean | p95 | max | folding % |", "|---|---|---|---|---|"]
        for method in methods:
            mine = [r for r in itself if r["method"] == method]
            lines.append(f"| {method} | {_mean(r['epe_mean_mm'] for r in mine):.3f} | "
                         f"{_mean(r['epe_p95_mm'] for r in mine):.3f} | {_mean(r['epe_max_mm'] for r in mine):.3f} | "
                         f"{_mean(r['folding_percent'] for r in mine):.3f} |")
    pairs = [r for r in rows if r["kind"] == "inter-subject"]
    if pairs:
        lines += ["", "Inter-subject pairs (the centred vertebra):", "",
                  "| method | Dice before | Dice after | ASSD after (mm) | inverse consistency (mm) | folding % | "
                  "seconds/pair |", "|---|---|---|---|---|---|---|"]
        for method in methods:
            mine = [r for r in pairs if r["method"] == method]
            lines.append(f"| {method} | {_mean(r['dice_initial'] for r in mine):.3f} | "
                         f"{_mean(r['dice_final'] for r in mine):.3f} | "
                         f"{_mean(r['assd_final_mm'] for r in mine):.3f} | "
                         f"{_mean(r.get('inverse_consistency_mm') for r in mine):.3f} | "
                         f"{_mean(r['folding_percent'] for r in mine):.3f} | {_mean(r['seconds'] for r in mine):.3f} |")
    return "\n".join(lines) + "\n"


REPORT_KIND = "2D evaluation"


def write_report(rows: Sequence[Dict], out: str, title: Optional[str] = None) -> Dict[str, str]:
    """cases.csv and summary.md, written as one folder (``outputs.OutputFolder``)."""
    from ..outputs import OutputFolder
    with OutputFolder(out, kind=REPORT_KIND) as folder:
        paths = {"cases": os.path.join(folder.path, "cases.csv"), "summary": os.path.join(folder.path, "summary.md")}
        write_csv(list(rows), paths["cases"], list(CASE_COLUMNS))
        write_text((f"# {title}\n\n" if title else "") + summary_markdown(rows), paths["summary"])
    return folder.final_paths(paths)
