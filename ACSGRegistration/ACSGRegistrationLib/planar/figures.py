"""A figure of one 2D registration: fixed, moving, warped (with the structure's outline), the deformed grid
and the Jacobian map (drawn on matplotlib's Agg canvas, no pyplot)."""

import numpy as np
import SimpleITK as sitk


def planar_figure(result, path: str, grid_step: int = 6, dpi: float = 110) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from ..geometry import write_atomically
    fixed = sitk.GetArrayFromImage(result.fixed).astype(np.float64)
    moving = None if result.moving is None else sitk.GetArrayFromImage(result.moving).astype(np.float64)
    warped = sitk.GetArrayFromImage(result.warped).astype(np.float64)
    jac = sitk.GetArrayFromImage(result.jacobian).astype(np.float64)
    field = sitk.GetArrayFromImage(result.forward_field).astype(np.float64)  # (rows, columns, (x, y)) mm
    spacing = np.asarray(result.fixed.GetSpacing())
    figure = Figure(figsize=(15, 3.4))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 5)
    for ax, image, title in zip(axes[:3], (fixed, moving, warped), ("fixed", "moving", "warped")):
        if image is not None:
            ax.imshow(image, cmap="gray")
        ax.set_title(title)
    if result.warped_label is not None:
        outline = sitk.GetArrayFromImage(result.warped_label) > 0
        for ax in (axes[0], axes[2]):
            ax.contour(outline, levels=[0.5], colors="c", linewidths=0.7)
    rows, columns = fixed.shape
    # The deformed grid: lines of the fixed grid moved by the field (minus its mean: the centring offset).
    shift = field - field.reshape(-1, 2).mean(0)
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float64)
    gx, gy = xx + shift[..., 0] / spacing[0], yy + shift[..., 1] / spacing[1]
    ax = axes[3]
    for r in range(0, rows, grid_step):
        ax.plot(gx[r], gy[r], "k-", linewidth=0.5)
    for c in range(0, columns, grid_step):
        ax.plot(gx[:, c], gy[:, c], "k-", linewidth=0.5)
    ax.set_xlim(0, columns - 1)
    ax.set_ylim(rows - 1, 0)
    ax.set_aspect("equal")
    ax.set_title("deformed grid")
    shown = axes[4].imshow(np.clip(jac, 0, 2), cmap="RdBu_r", vmin=0, vmax=2)
    axes[4].contour(jac <= 0, levels=[0.5], colors="k", linewidths=0.7)
    axes[4].set_title(f"Jacobian ({int((jac <= 0).sum())} px <= 0)")
    figure.colorbar(shown, ax=axes[4], fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    write_atomically(lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"), path)
    return path
