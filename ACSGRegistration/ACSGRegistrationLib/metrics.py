"""Evaluation metrics of the paper's tables: overlap, surface distance and deformation regularity."""

from typing import Dict, Optional, Sequence

import numpy as np
import SimpleITK as sitk
from scipy.spatial import cKDTree

STAGES = ("initial", "affine", "final")
METRICS = ("dice", "precision", "recall", "assd_mm")
FOLDING = ("nonpositive_jacobian", "nonpositive_jacobian_percent")


def table_row(metrics: Optional[Dict], folds: Optional[Dict] = None, **fields) -> Dict:
    """One row of every metrics table (``evaluate``'s metrics.csv, the Slicer module's batch metrics.csv):
    the identifying ``fields``, then ``{metric}_{stage}`` (e.g. ``dice_final``) and the folding of the map
    (``folds``, else the final stage's). Missing values are None; ``metrics`` as in ``stage_metrics``."""
    row = dict(fields)
    for stage in STAGES:
        for m in METRICS:
            row[f"{m}_{stage}"] = (metrics or {}).get(stage, {}).get(m)
    final = folds or (metrics or {}).get("final", {})
    row.update({k: final.get(k) for k in FOLDING})
    return row


def _masks(fixed, warped):
    a = np.asarray(fixed) > 0.5
    b = np.asarray(warped) > 0.5
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    return a, b


def overlap(fixed, warped) -> Dict[str, float]:
    """Dice, precision (of the warped label) and recall (of the fixed label)."""
    a, b = _masks(fixed, warped)
    inter = float(np.logical_and(a, b).sum())
    na, nb = float(a.sum()), float(b.sum())
    return {
        "dice": 2 * inter / (na + nb) if na + nb else 1.0,
        "precision": inter / nb if nb else 0.0,
        "recall": inter / na if na else 0.0,
    }


def _surface_points(mask: np.ndarray, spacing) -> np.ndarray:
    """Boundary voxels of a mask (SimpleITK's label contour, fully connected) as (n, 3) points in mm."""
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    surface = sitk.GetArrayFromImage(sitk.LabelContour(img, fullyConnected=True)) > 0
    return np.argwhere(surface) * np.asarray([float(s) for s in spacing[::-1]])


def assd(fixed, warped, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Average symmetric surface distance in mm; ``spacing`` in SimpleITK (x, y, z) order.

    Distances go from each boundary voxel of one mask to the nearest boundary voxel of the other (exact
    Euclidean distances between voxel centres, found in a k-d tree of the boundary points: the same numbers as
    a distance transform of the volume, 10x faster), averaged over both boundaries.
    """
    a, b = _masks(fixed, warped)
    if not a.any() or not b.any():
        raise ValueError("ASSD is undefined for an empty label map")
    # The boundary test of a voxel sees its neighbours: the masks' joint bounding box with one voxel around it
    # (or the image's edge, where the test sees no outside either) gives the same boundaries as the whole crop.
    either = a | b
    box = []
    for axis in range(either.ndim):
        present = np.flatnonzero(either.any(axis=tuple(k for k in range(either.ndim) if k != axis)))
        box.append(slice(max(int(present[0]) - 1, 0), int(present[-1]) + 2))
    box = tuple(box)
    surf_a, surf_b = _surface_points(a[box], spacing), _surface_points(b[box], spacing)
    total = cKDTree(surf_b).query(surf_a)[0].sum() + cKDTree(surf_a).query(surf_b)[0].sum()
    return float(total / (len(surf_a) + len(surf_b)))


def jacobian_determinant(displacement: np.ndarray) -> np.ndarray:
    """det(I + grad u) of a (3, D, H, W) voxel-unit displacement in array order (central differences)."""
    u = np.asarray(displacement, dtype=np.float64)
    if u.ndim != 4 or u.shape[0] != 3:
        raise ValueError(f"expected a (3, D, H, W) displacement, got shape {u.shape}")
    j = np.empty((3, 3) + u.shape[1:])
    for i in range(3):
        grads = np.gradient(u[i], axis=(0, 1, 2))
        for k in range(3):
            j[i, k] = grads[k] + (1.0 if i == k else 0.0)
    return (j[0, 0] * (j[1, 1] * j[2, 2] - j[1, 2] * j[2, 1])
            - j[0, 1] * (j[1, 0] * j[2, 2] - j[1, 2] * j[2, 0])
            + j[0, 2] * (j[1, 0] * j[2, 1] - j[1, 1] * j[2, 0]))


def folding(jacobian: np.ndarray) -> Dict[str, float]:
    """Number and percentage of voxels with a non-positive Jacobian determinant."""
    count = int((jacobian <= 0).sum())
    return {"nonpositive_jacobian": count, "nonpositive_jacobian_percent": 100.0 * count / jacobian.size}


def stage_metrics(fixed_label, stage_labels: Dict[str, np.ndarray], spacing=(1.0, 1.0, 1.0)) -> Dict[str, Dict]:
    """Dice, precision, recall and ASSD of each stage's warped moving label against the fixed label."""
    table = {}
    for stage, label in stage_labels.items():
        row = overlap(fixed_label, label)
        row["assd_mm"] = assd(fixed_label, label, spacing) if np.any(np.asarray(label) > 0.5) else float("nan")
        table[stage] = row
    return table
