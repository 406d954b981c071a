"""``overlay.png`` of a CT to X-ray registration, for a user to judge it at a glance: the X-ray with the target
vertebra's outline projected at the initial pose (dashed) and at the final one (solid), and the X-ray and the DRR
in a checkerboard around the target before and after (where the pose is right, the edges run on across the tiles),
titled with the method, the similarity and, for a simulated X-ray, the error against the truth. Drawn with
matplotlib (on its Agg canvas, no pyplot); where it is missing (Slicer does not bundle it, and its panel shows its
own overlay in a slice view) a plain RGB image of the X-ray with the outlines (or, without a target, the DRR's
strongest edges) is written with SimpleITK instead.

The outline is the target's silhouette: its mask rendered as a DRR (``drr.render_by_planes``; each pixel the
length in mm of its ray through the vertebra), cut at ``SILHOUETTE_MM``."""

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..geometry import write_atomically, write_image
from .drr import Volume, render_by_planes

# A ray that crosses this much of the target (mm) is inside its outline: a thin process still counts, a grazed
# corner of the resampled mask does not.
SILHOUETTE_MM = 1.0
# The outline's grid: the X-ray's detector sampled so that its longest side has at most this many pixels.
SILHOUETTE_PIXELS = 256
# Around the target, the checkerboards show this much beside its outlines (mm on the detector), and this many
# tiles across the wider side.
CHECKER_MARGIN_MM = 20.0
CHECKER_TILES = 8
INITIAL_STYLE = {"colors": "deepskyblue", "linestyles": "dashed"}
FINAL_STYLE = {"colors": "orange", "linestyles": "solid"}


def target_volume(labels: sitk.Image, target: int, spacing: Optional[float] = None) -> Volume:
    """The target's mask (1 inside) on its bounding box with a voxel of margin, resampled to ``spacing`` mm where
    the label map is finer: the volume whose DRR is the target's silhouette."""
    inside = sitk.Cast(labels == int(target), sitk.sitkUInt8)
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.Execute(inside)
    box = statistics.GetBoundingBox(1)  # (x, y, z, sx, sy, sz)
    low = [max(0, start - 1) for start in box[:3]]
    high = [min(n, start + size + 1) for n, start, size in zip(inside.GetSize(), box[:3], box[3:])]
    mask = sitk.Cast(sitk.RegionOfInterest(inside, [h - l for l, h in zip(low, high)], low), sitk.sitkFloat32)
    finer = spacing is not None and min(mask.GetSpacing()) < spacing
    return Volume.from_image(mask, spacing=spacing if finer else None, hounsfield=False)


def silhouette(volume: Volume, carm, ct_to_source: np.ndarray) -> np.ndarray:
    """Each pixel's path length (mm) through ``volume`` (a ``target_volume``) at a pose, on ``carm``'s grid."""
    pose = torch.as_tensor(np.asarray(ct_to_source), dtype=volume.mu.dtype, device=volume.mu.device)
    with torch.no_grad():
        return render_by_planes(volume, carm, pose).cpu().numpy()


@dataclass
class OverlayView:
    """What one view's overlay shows. ``xray``: the X-ray as given (rows, columns); ``xray_on_grid``: it on the
    registration's grid (area-averaged, as the search compared it: the checkerboards set it beside the DRR at the
    same resolution, its noise averaged as the search averaged it); ``bone_bright``: its polarity (as the search
    read it); ``drr_initial``, ``drr_final``: the DRRs on the registration's grid; ``outline_initial``,
    ``outline_final``: the target's silhouettes (``silhouette``) on a grid of the same field, or None without a
    target; ``title``: the figure's title, ``caption``: the first panel's; ``pixel_spacing_mm``: the X-ray's
    (column, row) spacing."""

    xray: np.ndarray
    xray_on_grid: np.ndarray
    bone_bright: bool
    drr_initial: np.ndarray
    drr_final: np.ndarray
    outline_initial: Optional[np.ndarray]
    outline_final: Optional[np.ndarray]
    title: str
    caption: str
    pixel_spacing_mm: Sequence[float]


def write_overlay(view: OverlayView, path: str) -> None:
    """The figure (module docstring), or the plain image where matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        write_plain_overlay(view, path)
        return
    write_figure(view, path)


def windowed(image: np.ndarray, region: Optional[np.ndarray] = None) -> np.ndarray:
    """``image`` scaled to [0, 1] between the 1st and 99th percentiles of its pixels (of ``region``'s where given)
    that are not its extreme values: a displayed X-ray's clipped air and shutters would take the window's range."""
    values = np.asarray(image, dtype=np.float64)
    chosen = values if region is None or not region.any() else values[region]
    inner = chosen[(chosen > values.min()) & (chosen < values.max())]
    low, high = np.percentile(inner if inner.size >= 16 else chosen, (1, 99))
    return np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)


def on_grid(image: np.ndarray, shape) -> np.ndarray:
    """``image`` on a grid of ``shape`` (rows, columns) over the same field: each pixel the nearest one's value."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * image.shape[0]) // shape[0], image.shape[0] - 1).astype(int)
    columns = np.minimum(((np.arange(shape[1]) + 0.5) * image.shape[1]) // shape[1], image.shape[1] - 1).astype(int)
    return image[np.ix_(rows, columns)]


def interpolated(image: np.ndarray, shape) -> np.ndarray:
    """``image`` on a grid of ``shape`` (rows, columns) over the same field, bilinearly: a coarse DRR beside the
    X-ray at the X-ray's resolution."""
    values = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(values, size=tuple(shape), mode="bilinear",
                                           align_corners=False)[0, 0].numpy()


def target_box(view: OverlayView):
    """The region the checkerboards show, in the X-ray's pixels (first column, last column, first row, last row):
    both outlines with ``CHECKER_MARGIN_MM`` around them, within the image; the whole image without a target."""
    rows, columns = view.xray.shape
    if view.outline_final is None:
        return 0, columns - 1, 0, rows - 1
    inside = (view.outline_initial >= SILHOUETTE_MM) | (view.outline_final >= SILHOUETTE_MM)
    if not inside.any():  # the target off the detector at both poses
        return 0, columns - 1, 0, rows - 1
    grid_rows, grid_columns = np.nonzero(inside)
    scale_r, scale_c = rows / inside.shape[0], columns / inside.shape[1]
    margin_c, margin_r = (CHECKER_MARGIN_MM / s for s in view.pixel_spacing_mm)
    return (max(0, int(grid_columns.min() * scale_c - margin_c)),
            min(columns - 1, int((grid_columns.max() + 1) * scale_c + margin_c)),
            max(0, int(grid_rows.min() * scale_r - margin_r)),
            min(rows - 1, int((grid_rows.max() + 1) * scale_r + margin_r)))


def checkerboard(view: OverlayView, drr: np.ndarray, box) -> np.ndarray:
    """The X-ray and ``drr`` on the registration's grid, both brought to the X-ray's, in alternate tiles, each
    windowed over ``box``, the DRR shown in the X-ray's polarity, ``CHECKER_TILES`` tiles across the box's wider
    side."""
    shape = view.xray.shape
    c0, c1, r0, r1 = box
    region = np.zeros(shape, dtype=bool)
    region[r0:r1 + 1, c0:c1 + 1] = True
    xray = windowed(interpolated(view.xray_on_grid, shape), region)
    drr = windowed(interpolated(drr if view.bone_bright else -drr, shape), region)
    tile = max(2, max(c1 - c0, r1 - r0) // CHECKER_TILES)
    rows, columns = np.mgrid[0:shape[0], 0:shape[1]]
    return np.where(((rows - r0) // tile + (columns - c0) // tile) % 2 == 0, xray, drr)


def write_figure(view: OverlayView, path: str, dpi: float = 100) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    figure = Figure(figsize=(15, 5.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    rows, columns = view.xray.shape
    extent = (-0.5, columns - 0.5, rows - 0.5, -0.5)  # every image and outline in the X-ray's pixels
    box = target_box(view)
    axes[0].imshow(windowed(view.xray), cmap="gray", extent=extent, interpolation="antialiased")
    axes[0].set_title(view.caption, fontsize=10)
    for ax, drr, when in ((axes[1], view.drr_initial, "initial"), (axes[2], view.drr_final, "final")):
        ax.imshow(checkerboard(view, drr, box), cmap="gray", extent=extent, interpolation="nearest")
        ax.set_xlim(box[0] - 0.5, box[1] + 0.5)
        ax.set_ylim(box[3] + 0.5, box[2] - 0.5)
        ax.set_title(f"X-ray | DRR at the {when} pose (checkerboard)", fontsize=10)
    handles = []
    if view.outline_final is not None:
        for outline, style, name in ((view.outline_initial, INITIAL_STYLE, "initial"),
                                     (view.outline_final, FINAL_STYLE, "final")):
            for ax in (axes[0], axes[1] if name == "initial" else axes[2]):
                if outline.max() >= SILHOUETTE_MM:
                    ax.contour(outline, levels=[SILHOUETTE_MM], origin="upper", extent=extent, linewidths=1.2,
                               **style)
            handles.append(Line2D([], [], color=style["colors"], linestyle=style["linestyles"],
                                  label=f"target at the {name} pose"))
        axes[0].legend(handles=handles, loc="lower right", fontsize=9, framealpha=0.8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(view.title, fontsize=11)
    figure.text(0.5, 0.02, "Checkerboards: tiles alternate between the X-ray and the DRR (both windowed around the "
                           "target); where the pose is right, the bone's edges run on across the tiles.",
                ha="center", fontsize=9)
    figure.tight_layout(rect=(0, 0.05, 1, 0.93))
    write_atomically(lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"), path)


def boundary(inside: np.ndarray) -> np.ndarray:
    """The pixels of a mask with a 4-neighbour outside it."""
    padded = np.pad(inside, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inside & ~interior


def write_plain_overlay(view: OverlayView, path: str) -> None:
    """The X-ray in grey with the target's outline at the initial pose (blue) and the final one (orange); without a
    target, the final DRR's strongest edges (its top tenth: where the CT's bone lands) in orange. An RGB PNG
    written with SimpleITK: no figure library."""
    grey = windowed(view.xray)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    shape = grey.shape
    if view.outline_final is not None:
        marks = [(boundary(on_grid(view.outline_initial, shape) >= SILHOUETTE_MM), INITIAL_STYLE["colors"]),
                 (boundary(on_grid(view.outline_final, shape) >= SILHOUETTE_MM), FINAL_STYLE["colors"])]
    else:
        gy, gx = np.gradient(view.drr_final.astype(np.float64))
        edges = on_grid(np.hypot(gx, gy), shape)
        marks = [(edges >= np.percentile(edges, 90), FINAL_STYLE["colors"])]
    colours = {"deepskyblue": (0.0, 0.75, 1.0), "orange": (1.0, 0.55, 0.0)}
    for where, colour in marks:
        rgb[where] = 0.3 * rgb[where] + 0.7 * np.array(colours[colour])
    write_image(sitk.GetImageFromArray(np.round(255 * rgb).astype(np.uint8), isVector=True), path)
