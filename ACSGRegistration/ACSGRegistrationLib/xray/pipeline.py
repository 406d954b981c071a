"""CT to X-ray registration from files (the command line's ``xray-register``): the CT (and its label map, whose
chosen vertebra is the target: the pivot of the pose search and where errors are measured), the X-ray and its
geometry, an initial pose; out: ``pose.json``, ``drr.nii.gz`` (the final DRR on the registration's detector
grid) and ``xray.nii.gz``, both placed where the detector stands in the CT's space, ``projections.json`` (the
source, the detector's corners and the label centroids projected onto the detector), ``overlay.png`` and
``metrics.json``, written as one unit (``outputs.OutputFolder``). Several X-rays of the patient (each with its
geometry and initial pose) are registered together (``register.PoseSearch.add_view``); the second view's files
end in ``_2`` (``pose_2.json``, ...), and so on."""

import json
import os
import time
from typing import Dict, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..geometry import write_image, write_text
from ..io import read_image
from . import view_outputs
from .camera import CArm, check_initial_pose, detector_corners, detector_image, placed, pose_json, project_to_detector, read_pose, \
    source_position
from .drr import Volume
from .images import carm_of, exposed_field, read_geometry, read_xray, target_centre, target_label
from .register import DEPTH_PRIOR_MM, DEPTH_PRIOR_WEIGHT, PoseSearch, prepare_field, prepare_xray, register_pose

# The registration's detector: its longest side in pixels (the X-ray is area-averaged onto it).
DETECTOR_PIXELS = 96
# The CT is blurred and resampled to this spacing (mm) when finer: DRRs of a coarse volume are fast and smooth.
CT_SPACING = 2.0


def overlay_png(xray: np.ndarray, drr: np.ndarray, path: str) -> None:
    """The X-ray in grey with the final DRR's strongest edges (its top tenth: where the CT's bone lands) in
    orange, written as an RGB PNG with SimpleITK: no figure library (Slicer does not bundle matplotlib)."""
    grey = xray.astype(np.float64)
    low, high = np.percentile(grey, (0.5, 99.5))
    grey = np.clip((grey - low) / max(high - low, 1e-12), 0.0, 1.0)
    gy, gx = np.gradient(drr.astype(np.float64))
    edges = np.hypot(gx, gy)
    if edges.shape != grey.shape:  # the DRR is on the registration's grid: nearest pixel on the X-ray's
        rows = np.minimum((np.arange(grey.shape[0]) * edges.shape[0]) // grey.shape[0], edges.shape[0] - 1)
        columns = np.minimum((np.arange(grey.shape[1]) * edges.shape[1]) // grey.shape[1], edges.shape[1] - 1)
        edges = edges[np.ix_(rows, columns)]
    strong = edges >= np.percentile(edges, 90)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgb[strong] = 0.4 * rgb[strong] + 0.6 * np.array([1.0, 0.55, 0.0])
    image = sitk.GetImageFromArray(np.round(255 * rgb).astype(np.uint8), isVector=True)
    write_image(image, path)


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
                   ct_spacing: float = CT_SPACING, device: str = "cpu", seed: int = 0, log=print,
                   prost_model: Optional[str] = None, depth_prior_mm: Optional[float] = None) -> Dict:
    """Every input is read and checked before any work; returns {"paths", "metrics"}. The ``prost`` methods
    use ``prost_model`` (default: the shipped ProST model), on the first view. Several views: lists of X-rays,
    initial poses and geometries (or one geometry for all), in the same order. ``depth_prior_mm``: the width of
    the depth prior with one view (default ``register.DEPTH_PRIOR_MM``)."""
    if depth_prior_mm is not None and not depth_prior_mm > 0:
        raise InputError(f"depth_prior_mm must be positive, got {depth_prior_mm}")
    depth_prior_mm = DEPTH_PRIOR_MM if depth_prior_mm is None else float(depth_prior_mm)
    from ..outputs import OutputFolder
    from ..progress import stage_line, step_printer
    views = _views(xray_path, init_path, geometry_path)
    folder = OutputFolder(out_dir, inputs=(ct_path, seg_path, *[p for view in views for p in view]),
                          kind="X-ray registration")
    log(stage_line(1, 3, f"reading the CT and {'the X-ray' if len(views) == 1 else f'{len(views)} X-rays'}"))
    from ..validation import check_image_values, check_label_grid, check_label_values
    ct = read_image(ct_path, "CT")
    check_image_values(ct, f"the CT {ct_path}")
    labels = read_image(seg_path, "CT label map") if seg_path else None
    if labels is not None:
        check_label_values(labels, f"the CT label map {seg_path}")
        check_label_grid(ct, labels, "the CT label map", seg_path)
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
                           progress=step_printer(log, "searching"))
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
    final = torch.as_tensor(result["parameters"], dtype=volume.mu.dtype, device=volume.mu.device)
    log(stage_line(3, 3, "writing the outputs"))
    with folder:
        paths = {}
        for number, (view, xray, full, carm) in enumerate(zip(searches, xrays, full_carms, carms), 1):
            with torch.no_grad():
                pose = view.pose(final).cpu().numpy().astype(np.float64)
                drr = view.render(final[None])[0].cpu().numpy()
            named = {kind: os.path.join(folder.path, name) for kind, name in view_outputs(number).items()}
            write_text(pose_json(pose), named["pose"])
            # The DRR (registration grid) and the X-ray (its own) placed where the detector stands in the CT's space.
            write_image(detector_image(drr, carm, pose), named["drr"])
            write_image(detector_image(xray.pixels, full, pose), named["xray"])
            write_text(json.dumps(projections(pose, full, ct, labels), indent=2), named["projections"])
            overlay_png(view.xray.cpu().numpy(), drr, named["overlay"])
            # Keyed by file name less its extension: pose, ..., pose_2, ...
            paths.update({os.path.basename(path).split(".")[0]: path for path in named.values()})
        paths["metrics"] = os.path.join(folder.path, "metrics.json")
        write_text(json.dumps(metrics, indent=2), paths["metrics"])
    return {"paths": folder.final_paths(paths), "metrics": metrics}
