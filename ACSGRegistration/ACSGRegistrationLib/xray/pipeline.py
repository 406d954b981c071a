"""CT to X-ray registration from files (the command line's ``xray-register``): the CT (and its label map, whose
chosen vertebra is the target: the pivot of the pose search and where errors are measured), the X-ray and its
geometry, an initial pose; out: ``pose.json``, ``drr.nii.gz`` (the final DRR on the registration's detector
grid) and ``xray.nii.gz``, both placed where the detector stands in the CT's space, ``projections.json`` (the
source, the detector's corners and the label centroids projected onto the detector), ``overlay.png``
(``overlay``) and ``metrics.json``, written as one unit (``outputs.OutputFolder``). Several X-rays of the patient
(each with its geometry and initial pose) are registered together (``register.PoseSearch.add_view``); the second
view's files end in ``_2`` (``pose_2.json``, ...), and so on. For a simulated X-ray (``xray-example``) its true
pose gives the error before and after (``--true-pose``). The stages are printed as they begin, the search's
progress at least every few seconds (``search_printer``)."""

import functools
import json
import os
import time
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..geometry import write_image, write_text
from . import view_outputs
from .camera import (CArm, check_initial_pose, detector_corners, detector_image, placed, pose_json,
                     project_to_detector, read_pose, source_position)
from .drr import Volume
from .images import carm_of, exposed_field, read_ct, read_geometry, read_xray, target_centre, target_label
from .overlay import SILHOUETTE_PIXELS, OverlayView, silhouette, target_volume, write_overlay
from .register import (DEPTH_PRIOR_MM, DEPTH_PRIOR_WEIGHT, PoseSearch, mean_target_error, prepare_field, prepare_xray,
                       register_pose)

# The registration's detector: its longest side in pixels (the X-ray is area-averaged onto it).
DETECTOR_PIXELS = 96
# The CT is blurred and resampled to this spacing (mm) when finer: DRRs of a coarse volume are fast and smooth.
CT_SPACING = 2.0


# The search's progress is printed at least this often (seconds), besides when each of its phases begins.
PROGRESS_SECONDS = 2.0


def search_printer(log: Callable[[str], None], seconds: float = PROGRESS_SECONDS) -> Callable:
    """``register_pose``'s progress (``register.SearchProgress``) as "searching [k/n] phase (t s)" lines, the
    steps counted across the whole search (the Slicer panel's bar follows the "[k/n]"): when a phase begins, at
    least every ``seconds`` within it, and at the last step; not one per DRR."""
    start = time.perf_counter()
    last = {"time": start, "phase": None}

    def show(done, total, value, phase=""):
        now = time.perf_counter()
        if phase != last["phase"] or now - last["time"] >= seconds or done == total:
            log(f"searching [{done}/{total}] {phase} ({now - start:.0f} s)")
            last.update(time=now, phase=phase)
    return show


def errors_against_truth(pose: np.ndarray, truth: np.ndarray, centre: np.ndarray, points: np.ndarray,
                         carm: CArm) -> Dict[str, float]:
    """A pose's error against the true one, as xray-evaluate measures it (``evaluation.pose_errors``): the mTRE
    over the target's points, the rotation, the target centre's translation (across the view, along it, and in
    all), the projection error on the detector."""
    from .evaluation import pose_errors
    errors = {"mtre_mm": mean_target_error(pose, truth, points), **pose_errors(pose, truth, centre, points, carm)}
    errors["translation_mm"] = float(np.hypot(errors["in_plane_mm"], errors["depth_mm"]))
    return {key: round(value, 3) for key, value in errors.items()}


def truth_summary(truth: Dict) -> str:
    """The error against the truth before -> after, in one line (the command's summary, the overlay's title)."""
    before, after = truth["initial"], truth["final"]
    return (f"mTRE {before['mtre_mm']:.1f} -> {after['mtre_mm']:.1f} mm, rotation {before['rotation_deg']:.1f} -> "
            f"{after['rotation_deg']:.1f} deg, translation {before['translation_mm']:.1f} -> "
            f"{after['translation_mm']:.1f} mm")


def projections(pose: np.ndarray, carm: CArm, ct: sitk.Image, labels: Optional[sitk.Image]) -> Dict:
    """The X-ray source, the detector's corners and each label's centroid projected onto the detector: in the
    CT's LPS mm (where ``detector_image`` places the X-ray) and in X-ray pixels (column, row)."""
    centroids = {}
    if labels is not None:
        from ..preprocessing import label_centroids
        centroids = label_centroids(labels)
    points = np.array([centroids[k] for k in sorted(centroids)]).reshape(-1, 3)
    pixels = carm.project(placed(points, pose)) if len(points) else np.zeros((0, 2))
    on_detector = project_to_detector(points, carm, pose) if len(points) else np.zeros((0, 3))
    return {"source_lps": source_position(pose).tolist(), "detector_corners_lps": detector_corners(carm, pose).tolist(),
            "centroids": {str(k): {"lps": list(map(float, c)), "on_detector_lps": d.tolist(), "pixel": px.tolist()}
                          for k, c, d, px in zip(sorted(centroids), points, on_detector, pixels)}}


def _views(xray_path, init_path, geometry_path):
    """(X-ray, initial pose, geometry) paths of each view: one path or a list of each; one geometry may serve
    every view."""
    def listed(value):
        return [] if value is None else [value] if isinstance(value, (str, os.PathLike)) else list(value)
    xrays, inits, geometries = listed(xray_path), listed(init_path), listed(geometry_path)
    if not xrays:
        raise InputError("no X-ray given (--xray)")
    if len(inits) != len(xrays):
        raise InputError(f"{len(xrays)} X-ray(s) need as many initial poses (--init, one per X-ray, in the same "
                         f"order), got {len(inits)}")
    if len(geometries) not in (0, 1, len(xrays)):
        raise InputError(f"{len(xrays)} X-rays need one geometry (--geometry) for all or one each, "
                         f"got {len(geometries)}")
    geometries = geometries if len(geometries) == len(xrays) else (geometries or [None]) * len(xrays)
    return list(zip(xrays, inits, geometries))


def register_files(ct_path: str, xray_path: Union[str, Sequence[str]], init_path: Union[str, Sequence[str]],
                   out_dir: str, geometry_path: Union[None, str, Sequence[Optional[str]]] = None,
                   seg_path: Optional[str] = None, label=None, method: str = "cmaes+gradient",
                   evaluations: int = 400, refine_steps: int = 60, detector_pixels: int = DETECTOR_PIXELS,
                   ct_spacing: float = CT_SPACING, device: str = "cpu", seed: int = 0,
                   log: Callable[[str], None] = functools.partial(print, flush=True),
                   prost_model: Optional[str] = None, depth_prior_mm: Optional[float] = None,
                   true_pose_path: Optional[str] = None) -> Dict:
    """Every input is read and checked before any work; returns {"paths", "metrics"}. The ``prost`` methods
    use ``prost_model`` (default: the shipped ProST model), on the first view. Several views: lists of X-rays,
    initial poses and geometries (or one geometry for all), in the same order. ``depth_prior_mm``: the width of
    the depth prior with one view (default ``register.DEPTH_PRIOR_MM``). ``true_pose_path``: the first view's
    true pose (a simulated X-ray's ``TRUE_POSE.json``): ``metrics["truth"]`` holds the errors against it at the
    initial and the final pose (``errors_against_truth``; needs the label map). ``log``: each line as it comes
    (printed and flushed: a background reader sees each stage as it begins)."""
    if depth_prior_mm is not None and not depth_prior_mm > 0:
        raise InputError(f"depth_prior_mm must be positive, got {depth_prior_mm}")
    depth_prior_mm = DEPTH_PRIOR_MM if depth_prior_mm is None else float(depth_prior_mm)
    from ..outputs import OutputFolder
    from ..progress import stage_line
    views = _views(xray_path, init_path, geometry_path)
    if true_pose_path is not None and seg_path is None:
        raise InputError("--true-pose needs --ct-seg (and --label): the error is measured over the target vertebra")
    folder = OutputFolder(out_dir, inputs=(ct_path, seg_path, true_pose_path, *[p for view in views for p in view]),
                          kind="X-ray registration")
    log(stage_line(1, 3, f"reading the CT and {'the X-ray' if len(views) == 1 else f'{len(views)} X-rays'}"))
    ct, labels = read_ct(ct_path, seg_path)
    # With a label map, the refinement looks at the target vertebra's neighbourhood on the X-ray (the
    # per-vertebra mode): over the whole image its optimum drifts along the ray (register.TARGET_MARGIN_MM).
    if labels is None:
        centre, target_points = target_centre(ct, None, label, ""), None
    else:
        from .simulation import label_points
        target, centre = target_label(labels, label, seg_path)
        target_points = label_points(labels, target, count=500, seed=seed)
    xrays, full_carms, initials, exposed = [], [], [], []
    for xray_file, init_file, geometry_file in views:
        xrays.append(read_xray(xray_file))
        geometry, where = read_geometry(geometry_file), geometry_file or "--geometry"
        full_carms.append(carm_of(xrays[-1], geometry, where=where))
        exposed.append(exposed_field(xrays[-1], geometry, where=where))
        initials.append(read_pose(init_file))
        check_initial_pose(initials[-1], full_carms[-1], centre, init_file)
    truth = None if true_pose_path is None else read_pose(true_pose_path)
    net = None
    if method.startswith("prost"):
        from ..resources import PROST_MODEL, shipped_model_path
        from .prost import load_prost
        prost_model = prost_model or shipped_model_path(PROST_MODEL)
        net = load_prost(prost_model, map_location=device)["net"].to(device)
    carms = [carm.at_most(detector_pixels) for carm in full_carms]
    resample = min(ct.GetSpacing()) < ct_spacing
    spacing = ct_spacing if resample else min(ct.GetSpacing())
    volume = Volume.from_image(ct, spacing=ct_spacing if resample else None, device=device)
    pixels = [prepare_xray(x.pixels, c.size, device=device) for x, c in zip(xrays, carms)]
    # The shutters' shadow is left out of the comparison (register.compared_pixels).
    fields = [None if e is None else prepare_field(e, c.size, device=device) for e, c in zip(exposed, carms)]
    for number, (full, carm) in enumerate(zip(full_carms, carms), 1):
        log(f"X-ray {number}: {full.size[0]} x {full.size[1]} registered on {carm.size[0]} x {carm.size[1]} pixels")
    log(f"CT {ct.GetSize()} resampled to {tuple(volume.shape_ijk)} at {spacing:.1f} mm")
    search = PoseSearch(volume, carms[0], pixels[0], initials[0], centre, target_points=target_points,
                        depth_prior_mm=depth_prior_mm, field=fields[0])
    searches = [search] + [search.add_view(c, x, i, f)
                           for c, x, i, f in zip(carms[1:], pixels[1:], initials[1:], fields[1:])]
    t0 = time.perf_counter()
    learned = None
    if net is not None:
        from .prost import LearnedSimilarity
        learned = LearnedSimilarity(net, ct, centre, full_carms[0], xrays[0].pixels, device=device)
    log(stage_line(2, 3, f"searching the pose ({method})"))
    result = register_pose(search, method, evaluations, refine_steps, seed, learned=learned,
                           progress=search_printer(log))
    region = "(the refinement's around the target vertebra)" if target_points is not None else "(whole image)"
    if len(views) == 1:
        similarity = f"gradient NCC {region} less the depth prior ({DEPTH_PRIOR_WEIGHT} at {depth_prior_mm:g} mm " \
                     f"along the ray)"
    else:
        similarity = f"gradient NCC {region}, the mean over the {len(views)} views (no depth prior: each view " \
                     f"sees the others' depth)"
    metrics = {"method": method, "similarity": similarity, "views": len(views), "prost_model": prost_model,
               "initial_similarity": result["initial_similarity"], "final_similarity": result["similarity"],
               "evaluations": result["evaluations"], "seconds": round(time.perf_counter() - t0, 2),
               "polarity": result["polarity"], "detector": carms[0].to_dict(), "target_centre_lps": centre.tolist(),
               "ct_spacing_mm": spacing,
               "shutters": ["known: their shadow left out" if e is not None else "none given" for e in exposed]}
    if truth is not None:
        metrics["truth"] = {"file": true_pose_path, **{
            when: errors_against_truth(pose, truth, centre, np.asarray(target_points), full_carms[0])
            for when, pose in (("initial", initials[0]), ("final", result["ct_to_source"]))}}
    final = torch.as_tensor(result["parameters"], dtype=volume.mu.dtype, device=volume.mu.device)
    log(stage_line(3, 3, "writing the outputs"))
    outline = None if labels is None else target_volume(labels, target, spacing)
    title = f"xray-register, {method}: gradient NCC {metrics['initial_similarity']:.3f} -> " \
            f"{metrics['final_similarity']:.3f}"
    if truth is not None:
        title += f"\nerror against {os.path.basename(true_pose_path)}: {truth_summary(metrics['truth'])}"
    with folder:
        paths = {}
        for number, (view, xray, full, carm) in enumerate(zip(searches, xrays, full_carms, carms), 1):
            with torch.no_grad():
                pose = view.pose(final).cpu().numpy().astype(np.float64)
                drr, drr_initial = view.render(torch.stack((final, torch.zeros_like(final)))).cpu().numpy()
            named = {kind: os.path.join(folder.path, name) for kind, name in view_outputs(number).items()}
            write_text(pose_json(pose), named["pose"])
            # The DRR (registration grid) and the X-ray (its own) placed where the detector stands in the CT's space.
            write_image(detector_image(drr, carm, pose), named["drr"])
            write_image(detector_image(xray.pixels, full, pose), named["xray"])
            write_text(json.dumps(projections(pose, full, ct, labels), indent=2), named["projections"])
            grid = full.at_most(SILHOUETTE_PIXELS)
            outlines = [None, None] if outline is None else [silhouette(outline, grid, p) for p in (
                view.pose(torch.zeros_like(final)).cpu().numpy(), pose)]
            caption = f"X-ray{f' {number} of {len(views)}' if len(views) > 1 else ''}" + (
                f" and the target (label {target})" if outline is not None else "")
            write_overlay(OverlayView(xray.pixels, view.given.cpu().numpy(), view.polarity > 0, drr_initial, drr,
                                      *outlines, title, caption, full.pixel_spacing_mm), named["overlay"])
            # Keyed by file name less its extension: pose, ..., pose_2, ...
            paths.update({os.path.basename(path).split(".")[0]: path for path in named.values()})
        paths["metrics"] = os.path.join(folder.path, "metrics.json")
        write_text(json.dumps(metrics, indent=2), paths["metrics"])
    return {"paths": folder.final_paths(paths), "metrics": metrics}
