"""CT to X-ray registration from files (the command line's ``xray-register``): the CT (and its label map, whose
chosen vertebra is the target: the pivot of the pose search and where errors are measured), the X-ray and its
geometry, an initial pose; out: ``pose.json``, ``drr.nii.gz`` (the final DRR on the registration's detector
grid), ``overlay.png`` and ``metrics.json``, written as one unit (``outputs.OutputFolder``)."""

import json
import os
import time
from typing import Dict, Optional

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..geometry import write_image, write_text
from ..io import read_image
from .camera import CArm, pose_json, read_pose
from .drr import Volume
from .images import carm_of, read_geometry, read_xray
from .register import PoseSearch, prepare_xray, register_pose

# The registration's detector: its longest side in pixels (the X-ray is area-averaged onto it).
DETECTOR_PIXELS = 96
# The CT is blurred and resampled to this spacing (mm) when finer: DRRs of a coarse volume are fast and smooth.
CT_SPACING = 2.0


def target_centre(ct: sitk.Image, labels: Optional[sitk.Image], label, where: str) -> np.ndarray:
    """The pivot (LPS mm): the chosen label's centroid, or the CT's centre without a label map."""
    if labels is None:
        return np.asarray(ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in ct.GetSize()]))
    from ..preprocessing import label_centroids
    centroids = label_centroids(labels)
    if label is None:
        if len(centroids) != 1:
            raise InputError(f"{where} holds labels {sorted(centroids)}: choose the target with --label")
        label = next(iter(centroids))
    if int(label) not in centroids:
        raise InputError(f"label {label} is not in {where} (it holds {sorted(centroids)})")
    return np.asarray(centroids[int(label)])


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


def register_files(ct_path: str, xray_path: str, init_path: str, out_dir: str, geometry_path: Optional[str] = None,
                   seg_path: Optional[str] = None, label=None, method: str = "cmaes+gradient",
                   evaluations: int = 600, refine_steps: int = 60, detector_pixels: int = DETECTOR_PIXELS,
                   ct_spacing: float = CT_SPACING, device: str = "cpu", seed: int = 0, log=print) -> Dict:
    """Every input is read and checked before any work; returns {"paths", "metrics"}."""
    from ..outputs import OutputFolder
    folder = OutputFolder(out_dir, inputs=(ct_path, xray_path, init_path, geometry_path, seg_path),
                          kind="X-ray registration")
    ct = read_image(ct_path, "CT")
    labels = read_image(seg_path, "CT label map") if seg_path else None
    centre = target_centre(ct, labels, label, seg_path or "")
    xray = read_xray(xray_path)
    carm_full: CArm = carm_of(xray, read_geometry(geometry_path), where=geometry_path or "--geometry")
    initial = read_pose(init_path)
    carm = carm_full.scaled(max(carm_full.size) / float(detector_pixels)) \
        if max(carm_full.size) > detector_pixels else carm_full
    resample = min(ct.GetSpacing()) < ct_spacing
    spacing = ct_spacing if resample else min(ct.GetSpacing())
    volume = Volume.from_image(ct, spacing=ct_spacing if resample else None, device=device)
    pixels = prepare_xray(xray.pixels, carm.size, device=device)
    log(f"CT {ct.GetSize()} resampled to {tuple(volume.shape_ijk)} at {spacing:.1f} mm; X-ray "
        f"{carm_full.size[0]} x {carm_full.size[1]} registered on {carm.size[0]} x {carm.size[1]} pixels")
    search = PoseSearch(volume, carm, pixels, initial, centre)
    t0 = time.perf_counter()
    result = register_pose(search, method, evaluations, refine_steps, seed)
    with torch.no_grad():
        final = torch.as_tensor(result["parameters"], dtype=volume.mu.dtype, device=volume.mu.device)
        drr = search.render(final[None])[0].cpu().numpy()
    metrics = {"method": method, "similarity": "gradient NCC", "initial_similarity": result["initial_similarity"],
               "final_similarity": result["similarity"], "evaluations": result["evaluations"],
               "seconds": round(time.perf_counter() - t0, 2), "polarity": result["polarity"],
               "detector": carm.to_dict(), "target_centre_lps": centre.tolist(), "ct_spacing_mm": spacing}
    with folder:
        paths = {"pose": os.path.join(folder.path, "pose.json"), "drr": os.path.join(folder.path, "drr.nii.gz"),
                 "overlay": os.path.join(folder.path, "overlay.png"),
                 "metrics": os.path.join(folder.path, "metrics.json")}
        write_text(pose_json(result["ct_to_source"]), paths["pose"])
        image = sitk.GetImageFromArray(drr.astype(np.float32))
        image.SetSpacing(carm.pixel_spacing_mm)
        write_image(image, paths["drr"])
        overlay_png(search.xray.cpu().numpy(), drr, paths["overlay"])
        write_text(json.dumps(metrics, indent=2), paths["metrics"])
    return {"paths": folder.final_paths(paths), "metrics": metrics}
