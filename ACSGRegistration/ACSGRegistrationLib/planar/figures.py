"""A figure of one 2D registration: fixed, moving, warped (the structure's outlines, its Dice before -> after and
the error against a true map where one was given), the deformed grid and the Jacobian map (drawn on
matplotlib's Agg canvas, no pyplot).

Each image is shown as the project's views are laid out (``data.VIEW_AXES``: sagittal and coronal slices head
up, a sagittal one anterior to the right; coronal and axial ones the patient's right on the left, axial ones
anterior up): its array turned and flipped by where its axes point in the body, not taken in the order it was
stored. Where the image was a one-slice volume (``register.plane_axes``), the sides carry orientation letters
(LPS: L/R, P/A, S/I). An image that came as 2D (a PNG, a radiograph) says nothing about the body: it is shown
by its 2D frame's axes (x to the right, y down: as stored, for the usual identity direction), without letters.
"""

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import SimpleITK as sitk

# The letter of each LPS axis's positive and negative direction.
_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))


def _letter(direction: np.ndarray) -> str:
    """The letter of the LPS axis nearest ``direction`` (a slice at an angle: its main direction)."""
    axis = int(np.argmax(np.abs(direction)))
    return _LETTERS[axis][0 if direction[axis] > 0 else 1]


@dataclass
class Display:
    """How an image's array is shown: transposed first (where its columns run up and down the screen), then
    flipped; the letter at each side (``left``, ``right``, ``top``, ``bottom``) where the plane is known."""

    transpose: bool
    flip_rows: bool
    flip_columns: bool
    shape: tuple  # the array's (rows, columns)
    pixel_aspect: float  # a shown pixel's height over its width
    letters: Optional[Dict[str, str]] = None

    def array(self, values: np.ndarray) -> np.ndarray:
        """``values`` (rows, columns[, ...]) as shown."""
        shown = np.swapaxes(values, 0, 1) if self.transpose else values
        if self.flip_rows:
            shown = shown[::-1]
        if self.flip_columns:
            shown = shown[:, ::-1]
        return shown

    def points(self, x: np.ndarray, y: np.ndarray):
        """Continuous index positions (x: column, y: row) of the array -> where they are shown (x, y)."""
        rows, columns = self.shape
        if self.transpose:
            x, y, rows, columns = y, x, columns, rows
        return (columns - 1 - x if self.flip_columns else x), (rows - 1 - y if self.flip_rows else y)


def display_of(image: sitk.Image) -> Display:
    """How the figure shows a 2D image (the module's rule)."""
    from .data import SLICES, VIEW_AXES
    from .register import plane_axes
    axes = plane_axes(image)
    known = axes is not None
    if axes is None:  # a 2D image's own frame: x, y (the ITK convention for 2D, LPS's first two axes)
        axes = np.eye(3)[:, :2]
    direction = axes @ np.asarray(image.GetDirection()).reshape(2, 2)  # (3, 2): where columns, rows run
    column, row = direction[:, 0], direction[:, 1]
    normal = np.cross(column, row)
    kind = max(SLICES, key=lambda k: abs(np.dot(VIEW_AXES[k][2], normal)))
    right, down = (np.asarray(a, dtype=float) for a in VIEW_AXES[kind][:2])
    transpose = abs(row @ right) > abs(column @ right)
    across, along = (row, column) if transpose else (column, row)  # the shown x and y before flips
    flip_columns, flip_rows = bool(across @ right < 0), bool(along @ down < 0)
    across, along = (-across if flip_columns else across), (-along if flip_rows else along)
    spacing = np.asarray(image.GetSpacing(), dtype=float)[::-1] if transpose else \
        np.asarray(image.GetSpacing(), dtype=float)
    letters = {"right": _letter(across), "left": _letter(-across), "bottom": _letter(along),
               "top": _letter(-along)} if known else None
    size = image.GetSize()
    return Display(transpose, flip_rows, flip_columns, (size[1], size[0]), float(spacing[1] / spacing[0]), letters)


def _show(ax, image: sitk.Image, display: Display, **style):
    return ax.imshow(display.array(sitk.GetArrayFromImage(image).astype(np.float64)), aspect=display.pixel_aspect,
                     interpolation="nearest", **style)


def _outline(ax, mask: Optional[sitk.Image], display: Display, colour: str) -> None:
    if mask is not None and sitk.GetArrayViewFromImage(mask).any():
        ax.contour(display.array(sitk.GetArrayFromImage(mask) > 0).astype(float), levels=[0.5], colors=colour,
                   linewidths=0.8)


def _write_letters(ax, display: Display) -> None:
    if not display.letters:
        return
    places = {"left": (0.02, 0.5, "left", "center"), "right": (0.98, 0.5, "right", "center"),
              "top": (0.5, 0.98, "center", "top"), "bottom": (0.5, 0.02, "center", "bottom")}
    for side, (x, y, horizontal, vertical) in places.items():
        ax.text(x, y, display.letters[side], transform=ax.transAxes, ha=horizontal, va=vertical, color="yellow",
                fontsize=11, fontweight="bold", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})


FIXED_COLOUR, MOVING_COLOUR = "c", "m"


def planar_figure(result, path: str, grid_step: int = 6, dpi: float = 110) -> str:
    from ..geometry import write_atomically
    figure = draw_planar_figure(result, grid_step)
    write_atomically(lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"), path)
    return path


def draw_planar_figure(result, grid_step: int = 6):
    """The figure of a ``register.PlanarResult`` (a matplotlib Figure on an Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    on_fixed = display_of(result.fixed)
    on_moving = None if result.moving is None else display_of(result.moving)
    metrics, scores = result.metrics or {}, ""
    if "initial" in metrics:  # before: the moving structure centred on the fixed one, as the registration starts
        scores += f"\nDice {metrics['initial']['dice']:.3f} \u2192 {metrics['final']['dice']:.3f}"
    if "true_map" in metrics:  # before: no registration
        scores += (f"\nerror against the truth {metrics['true_map']['identity_epe_mean_mm']:.2f} \u2192 "
                   f"{metrics['true_map']['epe_mean_mm']:.2f} mm")
    figure = Figure(figsize=(15, 4.0))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 5)
    figure.subplots_adjust(left=0.02, right=0.96, top=0.8, bottom=0.1, wspace=0.12)
    _show(axes[0], result.fixed, on_fixed, cmap="gray")
    _outline(axes[0], result.fixed_mask, on_fixed, FIXED_COLOUR)
    axes[0].set_title("fixed")
    if result.moving is not None:
        _show(axes[1], result.moving, on_moving, cmap="gray")
        _outline(axes[1], result.moving_mask, on_moving, MOVING_COLOUR)
    axes[1].set_title("moving")
    _show(axes[2], result.warped, on_fixed, cmap="gray")
    _outline(axes[2], result.fixed_mask, on_fixed, FIXED_COLOUR)
    if result.warped_mask is not None:
        _outline(axes[2], result.warped_mask, on_fixed, MOVING_COLOUR)
    elif result.warped_label is not None:
        _outline(axes[2], result.warped_label, on_fixed, MOVING_COLOUR)
    axes[2].set_title("warped" + scores)
    # The deformed grid: lines of the fixed grid moved by the field (minus its mean: the centring offset), the
    # field's physical vectors taken back to index steps, (D diag(spacing))^-1 u.
    field = sitk.GetArrayFromImage(result.forward_field).astype(np.float64)  # (rows, columns, (x, y)) mm
    to_index = np.linalg.inv(np.asarray(result.fixed.GetDirection()).reshape(2, 2) @
                             np.diag(result.fixed.GetSpacing()))
    steps = (field - field.reshape(-1, 2).mean(0)) @ to_index.T
    rows, columns = field.shape[:2]
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float64)
    gx, gy = on_fixed.points(xx + steps[..., 0], yy + steps[..., 1])
    ax = axes[3]
    for r in range(0, rows, grid_step):
        ax.plot(gx[r], gy[r], "k-", linewidth=0.5)
    for c in range(0, columns, grid_step):
        ax.plot(gx[:, c], gy[:, c], "k-", linewidth=0.5)
    shown_rows, shown_columns = on_fixed.array(field[..., 0]).shape
    ax.set_xlim(-0.5, shown_columns - 0.5)
    ax.set_ylim(shown_rows - 0.5, -0.5)
    ax.set_aspect(on_fixed.pixel_aspect)
    ax.set_title("deformed grid")
    jac = sitk.GetArrayFromImage(result.jacobian).astype(np.float64)
    shown = axes[4].imshow(on_fixed.array(np.clip(jac, 0, 2)), cmap="RdBu_r", vmin=0, vmax=2,
                           aspect=on_fixed.pixel_aspect, interpolation="nearest")
    if (jac <= 0).any():
        axes[4].contour(on_fixed.array(jac <= 0).astype(float), levels=[0.5], colors="k", linewidths=0.7)
    axes[4].set_title(f"Jacobian ({int((jac <= 0).sum())} px <= 0)")
    figure.colorbar(shown, ax=axes[4], fraction=0.046)
    for ax, display in zip(axes, (on_fixed, on_moving, on_fixed, on_fixed, on_fixed)):
        ax.set_xticks([])
        ax.set_yticks([])
        if display is not None:
            _write_letters(ax, display)
    if result.fixed_mask is not None:
        figure.text(0.5, 0.02, "outlines: the structure in the fixed image (cyan) and in the moving one (magenta; "
                    "warped in the third panel)", ha="center", fontsize=9)
    return figure
