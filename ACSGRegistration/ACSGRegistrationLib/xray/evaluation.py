"""CT to X-ray registration measured in simulation (the command line's ``xray-evaluate``): no real X-rays are
available to this project, so each case is a realistic X-ray (``simulation``: neighbouring vertebrae moved,
Poisson noise, blur, gamma, collimation, either polarity) rendered from the CT at its own resolution on a detector
twice finer than the registration's, at a known pose; the registration starts from that pose perturbed so that
the starting mTRE falls in a bin (0-10, 10-20, 20-40, 40-60 mm). Every method runs on the same cases in the
same run. Per case: mTRE over the target vertebra, success at 10 / 5 / 2 mm, rotation error, translation error
of the vertebra's centre in the detector's plane and in depth, projection error on the detector, seconds.
With two views, each case also has a lateral X-ray (the C-arm turned 90 degrees about the patient's head-foot
axis, the patient unmoved, the motion between the shots known), with its own noise: the AP cases stay those of a
one-view run with the same seed; errors are those of the first (AP) view.
"""

import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from ..geometry import write_csv, write_text
from .camera import CArm, lateral_motion, moved_pose, placed
from .drr import Volume
from .register import DEPTH_PRIOR_MM, PoseSearch, mean_target_error, prepare_field, prepare_xray, register_pose
from .simulation import Realism, XraySimulator, label_points, random_parameters, random_view

BINS = ((0.0, 10.0), (10.0, 20.0), (20.0, 40.0), (40.0, 60.0))
SUCCESS_MM = (10.0, 5.0, 2.0)


def pose_errors(estimate: np.ndarray, truth: np.ndarray, centre: np.ndarray, points: np.ndarray,
                carm: CArm) -> Dict[str, float]:
    """Rotation (degrees), the target centre's translation error across the view and along it (mm, source
    frame), and the mean projection error of the target's points on the detector (mm)."""
    relative = estimate[:3, :3] @ truth[:3, :3].T
    angle = np.degrees(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1.0, 1.0)))
    a, b = placed(centre, estimate)[0], placed(centre, truth)[0]
    pixels = [carm.project(placed(points, m)) for m in (estimate, truth)]
    on_detector = np.linalg.norm((pixels[0] - pixels[1]) * np.asarray(carm.pixel_spacing_mm), axis=1).mean()
    return {"rotation_deg": float(angle), "in_plane_mm": float(np.linalg.norm((a - b)[:2])),
            "depth_mm": float(abs((a - b)[2])), "projection_mm": float(on_detector)}


def starting_offset(rng: np.random.Generator, truth: np.ndarray, centre: np.ndarray, points: np.ndarray,
                    low: float, high: float) -> Tuple[np.ndarray, float]:
    """A random pose offset whose mTRE from the truth lies in [low, high): rotation and translation in the
    ratio of the training's (10° : 15 mm in-plane : 30 mm depth), scaled to the bin, drawn until it fits."""
    target = rng.uniform(low, high)
    for _ in range(1000):
        scale = target / 35.0 * rng.uniform(0.5, 1.5)
        offset = random_parameters(rng, 10.0 * scale, 15.0 * scale, 30.0 * scale)
        start = moved_pose(truth, offset, centre)
        error = mean_target_error(start, truth, points)
        if low <= error < high:
            return start, error
    raise RuntimeError(f"no starting pose found in the {low}-{high} mm bin")


def simulation_detectors(detector_pixels: int = 64) -> Tuple[CArm, CArm]:
    """The simulated X-rays' detector (1.6 mm pixels at 1,020 mm, twice finer than the registration's) and the
    registration's (``detector_pixels`` a side)."""
    detector = CArm(1020.0, (1.6, 1.6), (2 * detector_pixels, 2 * detector_pixels))
    return detector, detector.scaled(2)


def lateral_beside(simulator: XraySimulator, detector: CArm, carm: CArm, truth: np.ndarray, start: np.ndarray,
                   rng: np.random.Generator, realism: Realism) -> Tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """A lateral X-ray beside an AP case (the C-arm turned 90 degrees about the patient's head-foot axis through
    the target, the patient unmoved): the X-ray, rendered with ``rng``'s noise and on the registration's grid,
    its initial pose, ``start`` moved by the C-arm's (known) motion between the shots, and its exposed field on
    the grid; ``register_case``'s ``other_views`` entry."""
    motion = lateral_motion(truth, simulator.centre)
    lateral, exposed = simulator.exposure(detector, motion @ truth, rng, realism)
    return prepare_xray(lateral, carm.size), motion @ start, prepare_field(exposed, carm.size)


def register_case(spec: Dict, volume: Volume, carm: CArm, detector: CArm, ct: sitk.Image, xray: np.ndarray,
                  on_grid: torch.Tensor, start: np.ndarray, truth: np.ndarray, centre: np.ndarray, points: np.ndarray,
                  seed: int = 0, should_stop: Optional[Callable[[], bool]] = None,
                  other_views: Sequence[Tuple[torch.Tensor, np.ndarray, torch.Tensor]] = (),
                  field: Optional[torch.Tensor] = None) -> Tuple[Dict, Dict[str, float]]:
    """One method (``spec``: as ``evaluate_subject``'s ``methods`` values) on one simulated case (the X-ray at
    the detector's resolution and on the registration's grid): ``register_pose``'s result, and the final mTRE,
    ``pose_errors`` (in the first view) and seconds (the learned similarity's set-up counted). ``other_views``:
    (X-ray on the registration's grid, initial pose, exposed field) of more views on the same C-arm
    (``PoseSearch.add_view``); ``field``: the first X-ray's exposed field on the grid (the shutters known, as a
    C-arm knows them)."""
    from .prost import LearnedSimilarity
    options = {k: v for k, v in spec.items() if k not in ("method", "learned", "region", "depth_prior_mm")}
    whole = spec.get("region", "vertebra") == "image"
    search = PoseSearch(volume, carm, on_grid, start, centre, target_points=None if whole else points,
                        depth_prior_mm=spec.get("depth_prior_mm", DEPTH_PRIOR_MM), field=field)
    for other, other_start, other_field in other_views:
        search.add_view(carm, other, other_start, other_field)
    t0 = time.perf_counter()
    learned = None
    if spec.get("learned") is not None:
        learned = LearnedSimilarity(spec["learned"], ct, centre, detector, xray)
    result = register_pose(search, spec["method"], learned=learned, seed=seed, should_stop=should_stop, **options)
    errors = {"final_mtre_mm": mean_target_error(result["ct_to_source"], truth, points),
              **pose_errors(result["ct_to_source"], truth, centre, points, carm),
              "seconds": time.perf_counter() - t0}
    return result, errors


def evaluate_subject(name: str, ct: sitk.Image, labels: sitk.Image, label: int, methods: Dict[str, Dict],
                     cases_per_bin: int, seed: int = 0, bins: Sequence[Tuple[float, float]] = BINS,
                     registration_spacing: float = 3.0, detector_pixels: int = 64,
                     log: Callable[[str], None] = print, should_stop: Optional[Callable[[], bool]] = None,
                     views: int = 1) -> List[Dict]:
    """Rows (one per case and method). ``methods``: {row name: {"method": a POSE_SEARCH_METHODS name,
    "learned": a ``prost.ProSTNet`` or None, optionally "region" ("image": the whole X-ray) and
    "depth_prior_mm" (``PoseSearch``'s), and ``register_pose``'s budget keywords}}. ``views``: 1, or 2 (a
    lateral beside each AP X-ray, registered together)."""
    if views not in (1, 2):
        raise ValueError(f"views must be 1 or 2, not {views}")
    rng = np.random.default_rng(seed)
    simulator = XraySimulator(ct, labels, label)  # the CT's own resolution: not the registration's grid
    centre = simulator.centre
    points = label_points(labels, label, count=500, seed=seed)
    detector, carm = simulation_detectors(detector_pixels)
    volume = Volume.from_image(ct, spacing=registration_spacing)
    realism = Realism()
    rows = []
    for number, (low, high) in enumerate(bins):
        for case in range(cases_per_bin):
            truth = random_view(rng, centre)
            xray, exposed = simulator.exposure(detector, truth, rng, realism)
            on_grid, field = prepare_xray(xray, carm.size), prepare_field(exposed, carm.size)
            start, start_error = starting_offset(rng, truth, centre, points, low, high)
            others = []
            if views == 2:  # its own noise stream: the AP cases stay those of a one-view run
                others.append(lateral_beside(simulator, detector, carm, truth, start,
                                             np.random.default_rng([seed, number, case]), realism))
            for row_name, spec in methods.items():
                result, errors = register_case(spec, volume, carm, detector, ct, xray, on_grid, start, truth,
                                               centre, points, seed=case, should_stop=should_stop,
                                               other_views=others, field=field)
                final, seconds = errors.pop("final_mtre_mm"), errors.pop("seconds")
                row = {"ct": name, "method": row_name, "views": views, "bin": f"{low:g}-{high:g}", "case": case,
                       "start_mtre_mm": round(start_error, 2), "final_mtre_mm": round(final, 2)}
                row.update({f"success_{int(s)}mm": int(final < s) for s in SUCCESS_MM})
                row.update({k: round(v, 2) for k, v in errors.items()})
                row.update({"seconds": round(seconds, 1), "polarity": result["polarity"]})
                rows.append(row)
                log(f"{name} {row_name:>22} bin {row['bin']:>5} case {case}: mTRE {start_error:5.1f} -> "
                    f"{final:6.2f} mm, {seconds:4.0f} s")
    return rows


def summarise(rows: List[Dict]) -> List[Dict]:
    """Per CT, method and bin: cases, success rates, median final mTRE of the successes (10 mm), median
    errors, mean seconds."""
    groups: Dict[Tuple[str, str, str], List[Dict]] = {}
    for row in rows:
        groups.setdefault((row["ct"], row["method"], row["views"], row["bin"]), []).append(row)
    table = []
    for (ct, method, views, bin_name), members in groups.items():
        final = np.array([m["final_mtre_mm"] for m in members], dtype=float)
        ok = final < 10.0
        summary = {"ct": ct, "method": method, "views": views, "bin": bin_name, "cases": len(members)}
        summary.update({f"success@{int(s)}": round(float((final < s).mean()) * 100, 1) for s in SUCCESS_MM})
        summary["median_mtre_successes_mm"] = round(float(np.median(final[ok])), 2) if ok.any() else None
        for key in ("rotation_deg", "in_plane_mm", "depth_mm", "projection_mm"):
            summary[f"median_{key}"] = round(float(np.median([m[key] for m in members])), 2)
        summary["seconds"] = round(float(np.mean([m["seconds"] for m in members])), 1)
        table.append(summary)
    return table


def markdown_table(summary: List[Dict]) -> str:
    header = ["CT", "method", "views", "start mTRE (mm)", "cases", "success@10 / 5 / 2 (%)",
              "median mTRE of successes (mm)", "rotation (°)", "in-plane (mm)", "depth (mm)", "projection (mm)",
              "s / case"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summary:
        median = "–" if s["median_mtre_successes_mm"] is None else f"{s['median_mtre_successes_mm']:.2f}"
        lines.append(f"| {s['ct']} | {s['method']} | {s['views']} | {s['bin']} | {s['cases']} | "
                     f"{s['success@10']:.0f} / {s['success@5']:.0f} / {s['success@2']:.0f} | {median} | "
                     f"{s['median_rotation_deg']:.1f} | "
                     f"{s['median_in_plane_mm']:.1f} | {s['median_depth_mm']:.1f} | {s['median_projection_mm']:.1f}"
                     f" | {s['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


REPORT_KIND = "X-ray evaluation"


def write_report(rows: List[Dict], out_dir: str) -> Dict[str, str]:
    """cases.csv, summary.csv and summary.md, written as one folder (``outputs.OutputFolder``)."""
    from ..outputs import OutputFolder
    with OutputFolder(out_dir, kind=REPORT_KIND) as folder:
        paths = {"cases": os.path.join(folder.path, "cases.csv"), "summary": os.path.join(folder.path, "summary.csv"),
                 "table": os.path.join(folder.path, "summary.md")}
        summary = summarise(rows)
        write_csv(rows, paths["cases"])
        write_csv(summary, paths["summary"])
        write_text(markdown_table(summary), paths["table"])
    return folder.final_paths(paths)
