"""CT to X-ray registration from files (the command line's ``xray-register``): the CT (and its label map, whose
chosen vertebra is the target: the pivot of the pose search and where errors are measured), the X-ray and its
geometry, an initial pose; out: ``pose.json``, ``drr.nii.gz`` (the final DRR on the registration's detector
grid) and ``xray.nii.gz``, both placed where the detector stands in the CT's space, ``projections.json`` (the
source, the detector's corners and the label centroids projected onto the detector), ``overlay.png`` and
``metrics.json``, written as one unit (``outputs.OutputFolder``)."""

import json
import os
import time
from typing import Dict, Optional

import numpy as np
import SimpleITK as sitk
import torch

from ..geometry import write_image, write_text
from ..io import read_image
from .camera import CArm, detector_corners, detector_image, placed, pose_json, project_to_detector, read_pose, \
    source_position
from .drr import Volume
from .images import carm_of, read_geometry, read_xray, target_centre, target_label
from .register import DEPTH_PRIOR_MM, DEPTH_PRIOR_WEIGHT, PoseSearch, prepare_xray, register_pose

# The registration's detector: its longest side in pixels (the X-ray is area-averaged onto it).
DETECTOR_PIXELS = 96
# The CT is blurred and resampled to this spacing (mm) when finer: DRRs of a coarse volume are fast and smooth.
CT_SPACING = 2.0


def overlay_png(xray: np.ndarray, drr: np.ndarray, path: str) -> None:
    """The X-ray in grey with the final DRR's edges in colour (where the CT's bone lands)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gx, gy = np.gradient(drr)
    edges = np.hypot(gx, gy)
    figure, axis = plt.subplots(figsize=(6, 6 * xray.shape[0] / xray.shape[1]), dpi=100)
    axis.imshow(xray, cmap="gray")
    axis.imshow(np.ma.masked_less(edges, np.percentile(edges, 90)), cmap="autumn", alpha=0.6)
    axis.set_axis_off()
    figure.tight_layout(pad=0)
    figure.savefig(path)
    plt.close(figure)


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


def register_files(ct_path: str, xray_path: str, init_path: str, out_dir: str, geometry_path: Optional[str] = None,
                   seg_path: Optional[str] = None, label=None, method: str = "cmaes+gradient",
                   evaluations: int = 600, refine_steps: int = 60, detector_pixels: int = DETECTOR_PIXELS,
                   ct_spacing: float = CT_SPACING, device: str = "cpu", seed: int = 0, log=print,
                   prost_model: Optional[str] = None) -> Dict:
    """Every input is read and checked before any work; returns {"paths", "metrics"}. The ``prost`` methods
    use ``prost_model`` (default: the shipped ProST model)."""
    from ..outputs import OutputFolder
    folder = OutputFolder(out_dir, inputs=(ct_path, xray_path, init_path, geometry_path, seg_path),
                          kind="X-ray registration")
    ct = read_image(ct_path, "CT")
    labels = read_image(seg_path, "CT label map") if seg_path else None
    # With a label map, the refinement looks at the target vertebra's neighbourhood on the X-ray (the
    # per-vertebra mode): over the whole image its optimum drifts along the ray (register.TARGET_MARGIN_MM).
    if labels is None:
        centre, target_points = target_centre(ct, None, label, ""), None
    else:
        from .simulation import label_points
        target, centre = target_label(labels, label, seg_path)
        target_points = label_points(labels, target, count=500, seed=seed)
    xray = read_xray(xray_path)
    carm_full: CArm = carm_of(xray, read_geometry(geometry_path), where=geometry_path or "--geometry")
    initial = read_pose(init_path)
    net = None
    if method.startswith("prost"):
        from ..resources import PROST_MODEL, shipped_model_path
        from .prost import load_prost
        prost_model = prost_model or shipped_model_path(PROST_MODEL)
        net = load_prost(prost_model, map_location=device)["net"].to(device)
    carm = carm_full.at_most(detector_pixels)
    resample = min(ct.GetSpacing()) < ct_spacing
    spacing = ct_spacing if resample else min(ct.GetSpacing())
    volume = Volume.from_image(ct, spacing=ct_spacing if resample else None, device=device)
    pixels = prepare_xray(xray.pixels, carm.size, device=device)
    log(f"CT {ct.GetSize()} resampled to {tuple(volume.shape_ijk)} at {spacing:.1f} mm; X-ray "
        f"{carm_full.size[0]} x {carm_full.size[1]} registered on {carm.size[0]} x {carm.size[1]} pixels")
    search = PoseSearch(volume, carm, pixels, initial, centre, target_points=target_points)
    t0 = time.perf_counter()
    learned = None
    if net is not None:
        from .prost import LearnedSimilarity
        learned = LearnedSimilarity(net, ct, centre, carm_full, xray.pixels, device=device)
    result = register_pose(search, method, evaluations, refine_steps, seed, learned=learned)
    with torch.no_grad():
        final = torch.as_tensor(result["parameters"], dtype=volume.mu.dtype, device=volume.mu.device)
        drr = search.render(final[None])[0].cpu().numpy()
    region = "(the refinement's around the target vertebra)" if target_points is not None else "(whole image)"
    metrics = {"method": method, "similarity": f"gradient NCC {region} less the depth prior ({DEPTH_PRIOR_WEIGHT} "
                                                f"at {DEPTH_PRIOR_MM:g} mm along the ray)",
               "prost_model": prost_model,
               "initial_similarity": result["initial_similarity"], "final_similarity": result["similarity"],
               "evaluations": result["evaluations"], "seconds": round(time.perf_counter() - t0, 2),
               "polarity": result["polarity"], "detector": carm.to_dict(), "target_centre_lps": centre.tolist(),
               "ct_spacing_mm": spacing}
    pose = result["ct_to_source"]
    with folder:
        paths = {name: os.path.join(folder.path, name + extension) for name, extension in (
            ("pose", ".json"), ("drr", ".nii.gz"), ("xray", ".nii.gz"), ("projections", ".json"),
            ("overlay", ".png"), ("metrics", ".json"))}
        write_text(pose_json(pose), paths["pose"])
        # The DRR (registration grid) and the X-ray (its own) placed where the detector stands in the CT's space.
        write_image(detector_image(drr, carm, pose), paths["drr"])
        write_image(detector_image(xray.pixels, carm_full, pose), paths["xray"])
        write_text(json.dumps(projections(pose, carm_full, ct, labels), indent=2), paths["projections"])
        overlay_png(search.xray.cpu().numpy(), drr, paths["overlay"])
        write_text(json.dumps(metrics, indent=2), paths["metrics"])
    return {"paths": folder.final_paths(paths), "metrics": metrics}
