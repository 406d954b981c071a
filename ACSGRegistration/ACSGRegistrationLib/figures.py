"""Figures like the paper's: a registration result (Figure 6) and training loss curves (Figure 5).

matplotlib is imported inside the functions, so the rest of the backend works without it. The figures
are drawn on matplotlib's Agg canvas directly (a ``Figure`` object, no pyplot): nothing changes the
process-wide backend, which matters inside Slicer or a notebook. PNGs are written atomically.

Orientation: the crops have an identity direction in LPS (x -> left, y -> posterior, z -> superior) and
arrays in (z, y, x) order. Transversal panels are shown in the radiological convention (anterior up,
the patient's right on the left of the image), sagittal panels with superior up and anterior on the
left. Axis directions are read from each image's direction matrix, so flipped grids are shown the same
way, and the panels carry orientation letters. Distances are millimetres, pixels keep their physical
aspect.
"""

import csv
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from . import geometry

ROWS = ("transversal", "sagittal")
COLUMNS = ("moving", "fixed", "affine", "final", "field_rgb", "field_grid", "jacobian")
_COLUMN_TITLES = {
    "moving": "moving",
    "fixed": "fixed",
    "affine": "moving, affinely warped",
    "final": "moving, finally warped",
    "field_rgb": "field φ (RGB: x y z)",
    "field_grid": "deformed grid",
    "jacobian": "Jacobian det Jφ",
}
# In-plane index axes (array order) of each row: (horizontal, vertical), and the LPS direction that
# should point right and down on the screen (+1 L / +1 P / -1: superior up).
_PLANES = {
    "transversal": {"normal": 0, "axes": (2, 1), "screen": ((0, +1), (1, +1))},  # right = L, down = P
    "sagittal": {"normal": 2, "axes": (1, 0), "screen": ((1, +1), (2, -1))},  # right = P, down = I
}
_LETTERS = {(0, +1): "L", (0, -1): "R", (1, +1): "P", (1, -1): "A", (2, +1): "S", (2, -1): "I"}
FOLD_COLOUR = (0.0, 0.0, 0.0)
FIXED_COLOUR = "red"
WARPED_COLOUR = "cyan"
MAX_FOLD_RINGS = 40


# --- shared helpers ----------------------------------------------------------------------------------

def _new_figure(width, height, dpi):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str, dpi: float):
    geometry.write_atomically(lambda tmp: fig.savefig(tmp, format="png", dpi=dpi), path)


# --- Figure 6: one registration ----------------------------------------------------------------------

def deformable_field(result) -> np.ndarray:
    """The deformable part of the forward field, (z, y, x, 3) LPS mm on the fixed grid (the affine part
    alone would swamp the colour coding; see ``RegistrationResult.deformable_field``)."""
    return sitk.GetArrayFromImage(result.deformable_field()).astype(np.float64)


def _direction(image: sitk.Image) -> np.ndarray:
    return np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)


def _index_axis(image: sitk.Image, array_axis: int) -> Tuple[int, int]:
    """(LPS component, sign) that an array axis (z, y, x order) of ``image`` mostly points along."""
    column = _direction(image)[:, 2 - array_axis]
    k = int(np.argmax(np.abs(column)))
    return k, (1 if column[k] > 0 else -1)


def _slice(array: np.ndarray, image_shape, row: str, index: Optional[int] = None) -> np.ndarray:
    """2D plane (vertical, horizontal) of an array whose first three axes are (z, y, x)."""
    plane = _PLANES[row]
    normal = plane["normal"]
    if index is None:
        index = image_shape[normal] // 2
    taken = np.take(array, index, axis=normal)
    # Remaining axes keep their order: (y, x) for transversal, (z, y) for sagittal.
    return taken


def _plane_geometry(image: sitk.Image, row: str):
    """Extent (l, r, b, t) with row i at coordinate i * spacing, and the x and y limits that put the
    patient the conventional way round on the screen."""
    plane = _PLANES[row]
    shape = image.GetSize()[::-1]
    spacing = image.GetSpacing()[::-1]
    h_axis, v_axis = plane["axes"]
    nh, nv = shape[h_axis], shape[v_axis]
    sh, sv = spacing[h_axis], spacing[v_axis]
    extent = (-0.5 * sh, (nh - 0.5) * sh, (nv - 0.5) * sv, -0.5 * sv)
    limits = []
    letters = []
    for axis, (want_k, want_sign), n, s in ((h_axis, plane["screen"][0], nh, sh), (v_axis, plane["screen"][1], nv, sv)):
        k, sign = _index_axis(image, axis)
        lo, hi = -0.5 * s, (n - 0.5) * s
        # The index axis points along LPS component k with ``sign``; the screen's right (or down)
        # should point along ``want_sign`` of component ``want_k`` when the axes match.
        forward = sign == want_sign if k == want_k else sign > 0
        limits.append((lo, hi) if forward else (hi, lo))
        towards_hi = (k, sign)
        towards_lo = (k, -sign)
        letters.append((_LETTERS[towards_lo], _LETTERS[towards_hi]) if forward
                       else (_LETTERS[towards_hi], _LETTERS[towards_lo]))
    (xlim, ylim), (h_letters, v_letters) = limits, letters
    # Matplotlib's ylim is (bottom, top); ``limits`` holds (top, bottom) of the screen.
    return {"extent": extent, "xlim": xlim, "ylim": (ylim[1], ylim[0]), "letters": (h_letters, v_letters),
            "coords": (np.arange(nh) * sh, np.arange(nv) * sv), "size_mm": (nh * sh, nv * sv),
            "axes": (h_axis, v_axis)}


def _in_plane_components(field: np.ndarray, image: sitk.Image, row: str) -> Tuple[np.ndarray, np.ndarray]:
    """Displacement (mm) along the plane's horizontal and vertical index axes."""
    direction = _direction(image)
    h_axis, v_axis = _PLANES[row]["axes"]
    # Array axis a is index axis 2 - a, whose LPS unit vector is the direction's column 2 - a.
    return field @ direction[:, 2 - h_axis], field @ direction[:, 2 - v_axis]


def _display_range(*arrays) -> Tuple[float, float]:
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo = min(0.0, float(np.percentile(values, 0.5)))
    nonzero = values[values > lo]
    hi = float(np.percentile(nonzero, 99.5)) if nonzero.size else lo + 1.0
    return lo, hi if hi > lo else lo + 1.0


def _contour(ax, mask2d, geo, colour, linewidth=1.0, alpha=1.0):
    if mask2d is None or not np.any(mask2d) or np.all(mask2d):
        return
    xs, ys = geo["coords"]
    ax.contour(xs, ys, mask2d.astype(np.float32), levels=[0.5], colors=[colour], linewidths=linewidth,
               alpha=alpha)


def _finish_axes(ax, geo, letters=False):
    ax.set_xlim(*geo["xlim"])
    ax.set_ylim(*geo["ylim"])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if letters:
        (left, right), (top, bottom) = geo["letters"]
        style = dict(transform=ax.transAxes, fontsize=8, color="gold", fontweight="bold")
        ax.text(0.02, 0.5, left, ha="left", va="center", **style)
        ax.text(0.98, 0.5, right, ha="right", va="center", **style)
        ax.text(0.5, 0.98, top, ha="center", va="top", **style)
        ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def _array(image) -> Optional[np.ndarray]:
    if image is None or isinstance(image, np.ndarray):
        return image
    return sitk.GetArrayFromImage(image)


def _summary_line(result, folds_total: int, voxels: int) -> str:
    parts = []
    metrics = result.metrics or {}
    for stage, name in (("initial", "initial"), ("affine", "affine"), ("final", "final")):
        if "dice" in metrics.get(stage, {}):
            parts.append(f"{name} {metrics[stage]['dice']:.3f}")
    text = ("Dice " + " / ".join(parts) + ";  ") if parts else ""
    return text + f"|J|\u22640: {folds_total} voxels ({100.0 * folds_total / max(voxels, 1):.2f} %)"


def registration_figure(result, path: str, title: Optional[str] = None, fixed_label: Optional[sitk.Image] = None,
                        field: str = "deformable", grid_step: int = 4, dpi: float = 150,
                        slices: Optional[Mapping[str, int]] = None) -> Dict:
    """Write a PNG like the paper's Figure 6 for a ``RegistrationResult`` and return what it shows.

    Columns: moving m, fixed f, affinely warped m_a, finally warped m_d, the deformation field colour
    coded (R, G, B = its L, P, S components over a symmetric range, grey = no displacement), the fixed
    grid deformed by the field's in-plane components (a line every ``grid_step`` voxels), and the
    Jacobian determinant (blue < 1 < red; voxels with |J| <= 0 in black). Rows: the middle transversal
    and sagittal planes (``slices`` may pick others: {"transversal": z, "sagittal": x}, fixed-grid
    indices; the moving image is cut at the same relative position of its own grid).

    ``fixed_label`` (on the fixed grid, e.g. the crop's label; an image or a (z, y, x) array) is drawn in red on
    f, m_a and m_d; the warped moving labels of the result, if any, in cyan on m_a and m_d. ``field`` is
    "deformable" (the deformable stage, after the affine; what the Jacobian describes) or "total" (the exported
    forward field, affine included).

    Returns a dict: ``path``; ``panels``, {(row, column): (left, top, right, bottom)} pixel boxes of the
    image panels in the PNG; ``slices``; ``folds``, {row: voxels with |J| <= 0 in that plane};
    ``folds_total``; ``field_range_mm`` (the displacement shown at full colour saturation).
    """
    if field not in ("deformable", "total"):
        raise ValueError(f"field must be 'deformable' or 'total', got {field!r}")
    grid_step = max(1, int(grid_step))
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    fixed, moving = result.fixed, result.moving
    f_arr, m_arr = _array(fixed), _array(moving)
    ma_arr, md_arr = _array(result.warped_affine), _array(result.warped)
    jac = _array(result.jacobian).astype(np.float64)
    u = deformable_field(result) if field == "deformable" else \
        sitk.GetArrayFromImage(result.forward_field).astype(np.float64)
    fl_arr = None if fixed_label is None else _array(fixed_label)
    if fl_arr is not None and fl_arr.shape != f_arr.shape:
        raise ValueError(f"fixed_label has shape {fl_arr.shape}, the fixed image {f_arr.shape}")
    wla, wl = _array(result.warped_label_affine), _array(result.warped_label)

    f_shape, m_shape = f_arr.shape, m_arr.shape
    index = {}
    for row in ROWS:
        normal = _PLANES[row]["normal"]
        i = f_shape[normal] // 2 if not slices or row not in slices else int(slices[row])
        if not 0 <= i < f_shape[normal]:
            raise ValueError(f"{row} slice {i} is outside the fixed image (0..{f_shape[normal] - 1})")
        mi = min(m_shape[normal] - 1, int(round(i * (m_shape[normal] - 1) / max(f_shape[normal] - 1, 1))))
        index[row] = (i, mi)

    vmin, vmax = _display_range(f_arr, m_arr)
    planes_u = [_slice(u, f_shape, row, index[row][0]) for row in ROWS]
    u_range = float(max(np.abs(p).max() for p in planes_u))
    # A floor of a tenth of a voxel keeps an (almost) identity field grey instead of amplifying noise.
    u_range = max(u_range, 0.1 * min(fixed.GetSpacing()))
    folds = {row: int((_slice(jac, f_shape, row, index[row][0]) <= 0).sum()) for row in ROWS}
    folds_total = int((jac <= 0).sum())

    f_geo = {row: _plane_geometry(fixed, row) for row in ROWS}
    m_geo = {row: _plane_geometry(moving, row) for row in ROWS}
    widths = [max(f_geo[r]["size_mm"][0] for r in ROWS)] * len(COLUMNS)
    heights = [f_geo[r]["size_mm"][1] for r in ROWS]
    panel_w = 2.0
    scale = panel_w / widths[0]
    fig_w = panel_w * len(COLUMNS) + 1.6
    fig_h = scale * sum(heights) + 1.75
    fig = _new_figure(fig_w, fig_h, dpi)
    left, right = 0.75 / fig_w, 1 - 0.85 / fig_w
    top, bottom = 1 - 0.75 / fig_h, 0.7 / fig_h
    gs = fig.add_gridspec(2, len(COLUMNS), height_ratios=heights, left=left, right=right, top=top,
                          bottom=bottom, wspace=0.1, hspace=0.12)
    gray = colormaps["gray"]
    rdbu = colormaps["RdBu_r"]
    fold_cmap = ListedColormap([FOLD_COLOUR])
    axes = {}
    jac_image = None
    for r, row in enumerate(ROWS):
        fi, mi = index[row]
        fg, mg = f_geo[row], m_geo[row]
        cut = lambda a: None if a is None else _slice(a, f_shape, row, fi)  # noqa: E731
        for c, col in enumerate(COLUMNS):
            ax = fig.add_subplot(gs[r, c])
            axes[(row, col)] = ax
            geo = mg if col == "moving" else fg
            if col == "moving":
                ax.imshow(_slice(m_arr, m_shape, row, mi), cmap=gray, vmin=vmin, vmax=vmax, extent=geo["extent"],
                          origin="upper", interpolation="nearest")
            elif col in ("fixed", "affine", "final"):
                data = {"fixed": f_arr, "affine": ma_arr, "final": md_arr}[col]
                ax.imshow(cut(data), cmap=gray, vmin=vmin, vmax=vmax, extent=geo["extent"], origin="upper",
                          interpolation="nearest")
                _contour(ax, cut(fl_arr), geo, FIXED_COLOUR, 0.9)
                warped = {"affine": wla, "final": wl}.get(col)
                _contour(ax, cut(warped), geo, WARPED_COLOUR, 0.9)
            elif col == "field_rgb":
                rgb = np.clip(0.5 + 0.5 * planes_u[r] / u_range, 0.0, 1.0)
                ax.imshow(rgb, extent=geo["extent"], origin="upper", interpolation="nearest")
            elif col == "field_grid":
                ax.set_facecolor("white")
                du, dv = _in_plane_components(planes_u[r], fixed, row)
                xs, ys = geo["coords"]
                gx, gy = np.meshgrid(xs, ys)
                px, py = gx + du, gy + dv
                style = dict(color="0.15", linewidth=0.55)
                for j in range(0, len(ys), grid_step):
                    ax.plot(px[j, :], py[j, :], **style)
                for i in range(0, len(xs), grid_step):
                    ax.plot(px[:, i], py[:, i], **style)
                _contour(ax, cut(fl_arr), geo, FIXED_COLOUR, 0.7, alpha=0.6)
            elif col == "jacobian":
                plane = cut(jac)
                jac_image = ax.imshow(plane, cmap=rdbu, vmin=0.0, vmax=2.0, extent=geo["extent"], origin="upper",
                                      interpolation="nearest")
                fold = plane <= 0
                if fold.any():
                    ax.imshow(np.ma.masked_where(~fold, np.ones_like(plane)), cmap=fold_cmap, vmin=0, vmax=1,
                              extent=geo["extent"], origin="upper", interpolation="nearest")
                    _contour(ax, fold, geo, FOLD_COLOUR, 1.0)
                    if fold.sum() <= MAX_FOLD_RINGS:
                        # Single folded voxels are a few pixels: ring each one so it cannot be missed.
                        vy, vx = np.nonzero(fold)
                        xs, ys = geo["coords"]
                        ax.scatter(xs[vx], ys[vy], s=70, facecolors="none", edgecolors=[FOLD_COLOUR],
                                   linewidths=1.3)
                ax.text(0.03, 0.03, f"|J|\u22640: {folds[row]}", transform=ax.transAxes, fontsize=7,
                        ha="left", va="bottom", color="0.35",
                        bbox=dict(facecolor="white", alpha=0.75, edgecolor="none", pad=1.5))
            _finish_axes(ax, geo, letters=col in ("moving", "fixed"))
            if r == 0:
                ax.set_title(_COLUMN_TITLES[col], fontsize=10, pad=12)
        n_normal = f_shape[_PLANES[row]["normal"]]
        where = "z" if row == "transversal" else "x"
        first = axes[(row, "moving")]
        first.text(-0.2, 0.5, f"{row}\n{where} = {fi} / {n_normal}", transform=first.transAxes, rotation=90,
                   ha="center", va="center", fontsize=9)

    # Colour bar of the Jacobian, beside its two panels.
    for row in ROWS:
        axes[(row, "jacobian")].apply_aspect()
    top_box = axes[(ROWS[0], "jacobian")].get_position()
    bottom_box = axes[(ROWS[-1], "jacobian")].get_position()
    cax = fig.add_axes([right + 0.12 / fig_w, bottom_box.y0, 0.12 / fig_w, top_box.y1 - bottom_box.y0])
    bar = fig.colorbar(jac_image, cax=cax, extend="both")
    bar.set_ticks([0, 0.5, 1, 1.5, 2])
    bar.ax.tick_params(labelsize=7)
    bar.set_label("det Jφ (black: ≤ 0)", fontsize=8)

    # Key of the colour coding, under the RGB column: the colour of a full displacement each way.
    axes[(ROWS[-1], "field_rgb")].apply_aspect()
    rgb_box = axes[(ROWS[-1], "field_rgb")].get_position()
    key = fig.add_axes([rgb_box.x0, 0.38 / fig_h, rgb_box.width, 0.16 / fig_h])
    swatches = [("+L", (1, .5, .5)), ("−L", (0, .5, .5)), ("+P", (.5, 1, .5)), ("−P", (.5, 0, .5)),
                ("+S", (.5, .5, 1)), ("−S", (.5, .5, 0))]
    key.imshow(np.array([[c for _, c in swatches]]), aspect="auto", extent=(0, len(swatches), 0, 1))
    for i, (name, colour) in enumerate(swatches):
        key.text(i + 0.5, 0.5, name, ha="center", va="center", fontsize=7,
                 color="white" if sum(colour) < 1.6 else "black")
    key.set_axis_off()

    what = "deformable stage" if field == "deformable" else "total forward field, affine included"
    notes = [f"\u03c6: {what}; RGB = displacement towards L, P, S (grey = none, full colour at "
             f"\u00b1{u_range:.2g} mm); grid every {grid_step} voxels, in-plane components"]
    contours = []
    if fl_arr is not None:
        contours.append("red: fixed label")
    if wla is not None or wl is not None:
        contours.append("cyan: warped moving label")
    if contours:
        notes.append(", ".join(contours))
    fig.text(0.5, 0.12 / fig_h, ";  ".join(notes), ha="center", va="bottom", fontsize=7.5, color="0.2")
    heading = _summary_line(result, folds_total, jac.size)
    fig.text(0.5, 1 - 0.08 / fig_h, (f"{title}\n" if title else "") + heading, ha="center", va="top",
             fontsize=10 if title else 9)

    _save_png(fig, path, dpi)
    fig.canvas.draw()
    height = fig.canvas.get_width_height()[1]
    panels = {}
    for key, ax in axes.items():
        box = ax.get_window_extent()
        panels[key] = (int(math.ceil(box.x0)), int(math.ceil(height - box.y1)),
                       int(math.floor(box.x1)), int(math.floor(height - box.y0)))
    return {"path": path, "panels": panels, "slices": {row: index[row][0] for row in ROWS}, "folds": folds,
            "folds_total": folds_total, "field_range_mm": u_range}


# --- Figure 5: loss curves ---------------------------------------------------------------------------

AFFINE_TERMS = ("affine_ncc", "affine_dice")
DEFORMABLE_TERMS = ("deformable_ncc", "deformable_dice")
SMOOTH_TERMS = ("smoothness",)
_TERM_STYLE = {"affine_ncc": "-", "deformable_ncc": "-", "affine_dice": "--", "deformable_dice": "--",
               "smoothness": "-"}
_TERM_NAMES = {"affine_ncc": "\u2212NCC", "deformable_ncc": "\u2212NCC", "affine_dice": "\u2212Dice",
               "deformable_dice": "\u2212Dice", "smoothness": "smoothness"}

Rows = List[Dict[str, float]]
HistoryLike = Union[str, os.PathLike, Sequence[Mapping]]


def read_history(source: HistoryLike) -> Rows:
    """Rows of a training history: a history.csv path, a training folder holding one, or rows."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "history.csv")
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = list(source)
    out = []
    for i, row in enumerate(rows):
        clean = {}
        for k, v in row.items():
            if k is None:
                continue
            try:
                clean[k] = float(v) if v not in (None, "") else float("nan")
            except (TypeError, ValueError):
                clean[k] = float("nan")
        clean.setdefault("step", float(i + 1))
        if not math.isfinite(clean["step"]):
            clean["step"] = float(i + 1)
        out.append(clean)
    return out


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Centred moving average of the finite values; the window shrinks at the ends."""
    v = np.asarray(values, dtype=np.float64)
    window = max(1, int(window))
    if window == 1 or v.size == 0:
        return v.copy()
    ok = np.isfinite(v)
    kernel = np.ones(window)
    sums = np.convolve(np.where(ok, v, 0.0), kernel, mode="same")
    counts = np.convolve(ok.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def smoothing_window(n_steps: int, fraction: float = 0.02) -> int:
    return max(1, int(round(fraction * n_steps)))


def _runs(history) -> Dict[str, Rows]:
    if isinstance(history, Mapping):
        return {str(name): read_history(h) for name, h in history.items()}
    if isinstance(history, (str, os.PathLike)):
        path = os.fspath(history)
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        name = os.path.basename(os.path.normpath(folder))
        return {name or "run": read_history(path)}
    return {"run": read_history(history)}


def loss_curves_figure(history_csv_or_rows, path: str, title: Optional[str] = None, smoothing: float = 0.02,
                       dpi: float = 150) -> Dict:
    """Write a PNG like the paper's Figure 5: training losses of one or several runs against the step.

    ``history_csv_or_rows``: a trainer's history.csv (or its output folder), a list of row dicts, or a
    dict {run name: any of those} to draw several runs (e.g. ACSGRegNet and AVoxelMorph) on the same
    axes, one colour per run. Left: the affine stage's loss (-NCC solid, -Dice dashed); middle: the
    deformable stage's; right, smaller: the smoothness term. Each curve is a centred moving average
    over ``smoothing`` of the run's steps (at least 1 step), the raw values faint behind it.

    Returns a dict: ``path``, ``runs`` {name: steps}, ``windows`` {name: moving average window}, and
    ``terms`` {name: the terms drawn}.
    """
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    runs = _runs(history_csv_or_rows)
    if not runs or all(not rows for rows in runs.values()):
        raise ValueError("no training history to plot")
    fig = _new_figure(12.5, 4.2, dpi)
    gs = fig.add_gridspec(1, 3, width_ratios=[1, 1, 0.62], left=0.06, right=0.985, top=0.86, bottom=0.22,
                          wspace=0.26)
    ax_aff, ax_def, ax_smooth = (fig.add_subplot(gs[0, i]) for i in range(3))
    panels = ((ax_aff, AFFINE_TERMS, "Affine registration loss"),
              (ax_def, DEFORMABLE_TERMS, "Deformable registration loss"),
              (ax_smooth, SMOOTH_TERMS, "Smoothness (deformable)"))
    palette = colormaps["tab10"]
    info = {"path": path, "runs": {}, "windows": {}, "terms": {}}
    used_terms = set()
    for k, (name, rows) in enumerate(runs.items()):
        colour = palette(k % 10)
        steps = np.array([r["step"] for r in rows], dtype=np.float64)
        window = smoothing_window(len(rows), smoothing)
        info["runs"][name], info["windows"][name], info["terms"][name] = len(rows), window, []
        for ax, terms, _ in panels:
            for term in terms:
                values = np.array([r.get(term, np.nan) for r in rows], dtype=np.float64)
                if not np.isfinite(values).any():
                    continue
                ok = np.isfinite(values)
                ax.plot(steps[ok], values[ok], color=colour, alpha=0.18, linewidth=0.6, linestyle="-")
                ax.plot(steps, moving_average(values, window), color=colour, linewidth=1.6,
                        linestyle=_TERM_STYLE[term])
                info["terms"][name].append(term)
                used_terms.add(term)
    for ax, terms, label in panels:
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3, linewidth=0.5)
        ax.tick_params(labelsize=8)
        if not any(t in used_terms for t in terms):
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center", color="0.5")
    ax_aff.set_ylabel("loss")
    ax_smooth.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    handles = [Line2D([], [], color=palette(k % 10), linewidth=2) for k in range(len(runs))]
    labels = [f"{name} ({info['runs'][name]} steps)" for name in runs]
    for term, style in (("ncc", "-"), ("dice", "--")):
        if any(t.endswith(term) for t in used_terms):
            handles.append(Line2D([], [], color="0.3", linestyle=style, linewidth=1.6))
            labels.append("\u2212NCC" if term == "ncc" else "\u2212Dice (labels)")
    handles.append(Line2D([], [], color="0.3", alpha=0.25, linewidth=0.8))
    windows = sorted(set(info["windows"].values()))
    labels.append("raw; curves: moving average over " + "/".join(str(w) for w in windows) + " steps")
    fig.legend(handles, labels, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    _save_png(fig, path, dpi)
    return info
