"""Training losses (paper, Sec. 2.2): local NCC, diffusion regulariser, soft Dice, and their weighted sum."""

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LossConfig


def box_mean(volume: torch.Tensor, window: int) -> torch.Tensor:
    """Local mean over a window^3 box (shrunk at the borders), as three 1D passes.

    Average pooling runs on any device (VoxelMorph's CUDA-only box filter does not); splitting it by
    axis is exact for a box and costs 3 w instead of w^3 operations per voxel (13x faster at w = 9).
    """
    p = window // 2
    for kernel, pad in (((window, 1, 1), (p, 0, 0)), ((1, window, 1), (0, p, 0)), ((1, 1, window), (0, 0, p))):
        volume = F.avg_pool3d(volume, kernel, stride=1, padding=pad, count_include_pad=False)
    return volume


def local_ncc(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Mean local normalised cross-correlation (squared), in [0, 1]; 1 where the images agree.

    Variances are clamped at zero: rounding can make them slightly negative, and then the ratio explodes.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"the NCC window must be a positive odd size, got {window}")
    fixed = fixed.float()
    warped = warped.float()
    pool = lambda t: box_mean(t, window)  # noqa: E731
    mean_f, mean_w = pool(fixed), pool(warped)
    var_f = (pool(fixed * fixed) - mean_f * mean_f).clamp_min(0)
    var_w = (pool(warped * warped) - mean_w * mean_w).clamp_min(0)
    cov = pool(fixed * warped) - mean_f * mean_w
    return (cov * cov / (var_f * var_w + eps)).mean()


def diffusion_regulariser(displacement: torch.Tensor) -> torch.Tensor:
    """Mean squared forward differences of the displacement along each axis (paper, eq. 7)."""
    dz = displacement[:, :, 1:] - displacement[:, :, :-1]
    dy = displacement[:, :, :, 1:] - displacement[:, :, :, :-1]
    dx = displacement[:, :, :, :, 1:] - displacement[:, :, :, :, :-1]
    return (dz.pow(2).mean() + dy.pow(2).mean() + dx.pow(2).mean()) / 3.0


def soft_dice(fixed_label: torch.Tensor, warped_label: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice per batch item, averaged (labels as probabilities in [0, 1])."""
    dims = tuple(range(1, fixed_label.dim()))
    inter = (fixed_label * warped_label).sum(dims)
    total = fixed_label.sum(dims) + warped_label.sum(dims)
    return ((2 * inter + eps) / (total + eps)).mean()


class RegistrationLoss(nn.Module):
    """L = l1 La + l2 Ld + l3 Lsmooth + l4 La_seg + l5 Ld_seg (paper, eq. 9); Dice terms need labels."""

    def __init__(self, cfg: LossConfig = None):
        super().__init__()
        self.cfg = cfg or LossConfig()

    def forward(self, fixed, outputs: Dict[str, torch.Tensor],
                fixed_label: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        c = self.cfg
        terms = {
            "affine_ncc": -local_ncc(fixed, outputs["warped_affine"], c.ncc_window),
            "deformable_ncc": -local_ncc(fixed, outputs["warped"], c.ncc_window),
            "smoothness": diffusion_regulariser(outputs["displacement"].float()),
        }
        total = (c.affine_similarity * terms["affine_ncc"] + c.deformable_similarity * terms["deformable_ncc"]
                 + c.smoothness * terms["smoothness"])
        if fixed_label is not None and "warped_label" in outputs:
            terms["affine_dice"] = -soft_dice(fixed_label.float(), outputs["warped_label_affine"].float())
            terms["deformable_dice"] = -soft_dice(fixed_label.float(), outputs["warped_label"].float())
            total = total + c.affine_dice * terms["affine_dice"] + c.deformable_dice * terms["deformable_dice"]
        terms["total"] = total
        return terms
