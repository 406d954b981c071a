"""Training losses (paper, Sec. 2.2): local NCC, diffusion regulariser, soft Dice, and their weighted sum."""

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LossConfig
from .layers import identity_grid, sample


def box_mean(volume: torch.Tensor, window: int) -> torch.Tensor:
    """Local mean over a window^3 box (shrunk at the borders), as three 1D passes.

    Average pooling runs on any device (VoxelMorph's CUDA-only box filter does not); splitting it by
    axis is exact for a box and costs 3 w instead of w^3 operations per voxel (13x faster at w = 9).
    """
    p = window // 2
    passes = (((window, 1, 1), (p, 0, 0)), ((1, window, 1), (0, p, 0)), ((1, 1, window), (0, 0, p)))
    for axis, (kernel, pad) in enumerate(passes):
        if volume.shape[2 + axis] > 1:  # a box along a one-voxel axis (a 2D image as one slice) changes nothing
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


def _differences(tensor: torch.Tensor, axis: int, order: int) -> torch.Tensor:
    """Forward differences of ``order`` (1 or 2) along ``axis``."""
    n = tensor.shape[axis]
    if order == 1:
        return tensor.narrow(axis, 1, n - 1) - tensor.narrow(axis, 0, n - 1)
    return tensor.narrow(axis, 2, n - 2) - 2 * tensor.narrow(axis, 1, n - 2) + tensor.narrow(axis, 0, n - 2)


def edge_aware_smoothness(displacement: torch.Tensor, image: Optional[torch.Tensor] = None, alpha: float = 0.0,
                          order: int = 1) -> torch.Tensor:
    """Smoothness that lets a field change where the image has an edge (Shan et al. 2017, after Godard et al.):
    the mean over axes of mean(exp(-alpha |d_a I|) |d_a^order u|^2), for fields (B, C, *spatial) in 2D or 3D.

    ``image`` (B, 1, *spatial; the fixed image, intensities in [0, 1]) weights each difference by how flat the
    image is there: a vertebra may slide against the soft tissue at its outline, and stays smooth elsewhere.
    ``order`` 1 penalises stretching (diffusion), 2 bending. With alpha = 0 (or no image) and order 1 this is
    the diffusion regulariser (``diffusion_regulariser``). Axes of length <= order (a 2D image as one slice)
    are skipped."""
    if order not in (1, 2):
        raise ValueError(f"the smoothness's derivative order must be 1 or 2, got {order}")
    terms = []
    for axis in range(2, displacement.dim()):
        if displacement.shape[axis] <= order:
            continue
        squared = _differences(displacement, axis, order).pow(2)
        if image is not None and alpha > 0:
            edges = _differences(image.float(), axis, 1).abs()
            if order == 2:  # the image's edge between the three samples: the larger of its two steps
                n = edges.shape[axis]
                edges = torch.maximum(edges.narrow(axis, 0, n - 1), edges.narrow(axis, 1, n - 1))
            squared = squared * torch.exp(-alpha * edges)
        terms.append(squared.mean())
    if not terms:
        raise ValueError(f"a field of shape {tuple(displacement.shape)} has no axis to differentiate along")
    return torch.stack(terms).mean()


def soft_dice(fixed_label: torch.Tensor, warped_label: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice per batch item, averaged (labels as probabilities in [0, 1])."""
    dims = tuple(range(1, fixed_label.dim()))
    inter = (fixed_label * warped_label).sum(dims)
    return dice_of_sums(inter, fixed_label.sum(dims) + warped_label.sum(dims), eps)


def dice_of_sums(inter: torch.Tensor, total: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice from each batch item's overlap and total sums, averaged."""
    return ((2 * inter + eps) / (total + eps)).mean()


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) of (B, 3, D, H, W) voxel-unit displacements, forward differences (B, D-1, H-1, W-1)."""
    u = displacement.float()
    dz = u[:, :, 1:, :-1, :-1] - u[:, :, :-1, :-1, :-1]
    dy = u[:, :, :-1, 1:, :-1] - u[:, :, :-1, :-1, :-1]
    dx = u[:, :, :-1, :-1, 1:] - u[:, :, :-1, :-1, :-1]
    # Row i of the Jacobian: derivatives of component i (z, y, x) along z, y, x.
    j = [[dz[:, i] + (i == 0), dy[:, i] + (i == 1), dx[:, i] + (i == 2)] for i in range(3)]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def folding_penalty(jacobian: torch.Tensor, floor: float, power: int = 1) -> torch.Tensor:
    """Mean of relu(floor - det J) ** power: zero while no voxel is compressed below ``floor``."""
    shortfall = F.relu(floor - jacobian)
    return (shortfall if power == 1 else shortfall.pow(power)).mean()


def log_jacobian_penalty(jacobian: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    """Mean squared log det J (volume change either way), the determinant clamped at ``floor``."""
    return torch.log(jacobian.clamp_min(floor)).pow(2).mean()


def masked_log_jacobian_variance(jacobian: torch.Tensor, mask: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    """Variance of log det J over ``mask`` (B, 1, D, H, W; the Jacobian's grid is one voxel shorter per
    axis): uneven volume change inside a structure, its overall size change left free."""
    weight = mask[:, 0, :-1, :-1, :-1].float()
    log_j = torch.log(jacobian.clamp_min(floor))
    total = weight.flatten(1).sum(1).clamp_min(1.0)
    mean = (log_j * weight).flatten(1).sum(1) / total
    centred = (log_j - mean.view(-1, 1, 1, 1)).pow(2)
    return ((centred * weight).flatten(1).sum(1) / total).mean()


def known_map_error(true_inverse: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor,
                    spacing: float = 1.0) -> torch.Tensor:
    """Per-item mean end-point error (mm) of a predicted map on known-deformation pairs.

    ``coords`` (B, 3, D, H, W): predicted fixed -> moving map (moving voxel positions).
    ``true_inverse`` (B, 3, D, H, W): the known moving -> fixed map the moving image was made with (fixed
    voxel positions). A perfect map sends each fixed point p to where the truth sends back to p, so the
    error is |true_inverse(coords(p)) - p|, averaged over ``mask`` (B, 1, D, H, W), the fixed vertebra.
    """
    back = sample(true_inverse.float(), coords.float(), padding_mode="border")
    squared = (back - identity_grid(coords.shape[2:], coords.device, torch.float32)).pow(2).sum(1, keepdim=True)
    error = torch.sqrt(squared + 1e-6) * spacing  # the small constant keeps the gradient finite at 0
    weight = mask.float()
    return (error * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)


class RegistrationLoss(nn.Module):
    """L = l1 La + l2 Ld + l3 Lsmooth + l4 La_seg + l5 Ld_seg (paper, eq. 9); Dice terms need labels."""

    def __init__(self, cfg: LossConfig = None):
        super().__init__()
        self.cfg = cfg or LossConfig()

    def forward(self, fixed, outputs: Dict[str, torch.Tensor], fixed_label: Optional[torch.Tensor] = None,
                true_inverse: Optional[torch.Tensor] = None, known: Optional[torch.Tensor] = None,
                spacing: float = 1.0) -> Dict[str, torch.Tensor]:
        """``true_inverse`` and ``known`` (B,): the known maps of known-deformation pairs, and which items
        of the batch have one (see ``known_map_error``); the end-point terms need both and a label."""
        c = self.cfg
        terms = {
            "affine_ncc": -local_ncc(fixed, outputs["warped_affine"], c.ncc_window),
            "deformable_ncc": -local_ncc(fixed, outputs["warped"], c.ncc_window),
            "smoothness": edge_aware_smoothness(outputs["displacement"].float(), fixed, c.smoothness_edge_alpha)
            if c.smoothness_edge_alpha > 0 else diffusion_regulariser(outputs["displacement"].float()),
        }
        total = (c.affine_similarity * terms["affine_ncc"] + c.deformable_similarity * terms["deformable_ncc"]
                 + c.smoothness * terms["smoothness"])
        if c.folding or c.log_jacobian or c.vertebra_log_jacobian_variance:
            jac = jacobian_determinant(outputs["displacement"])
            terms["folding"] = folding_penalty(jac, c.jacobian_floor)
            terms["log_jacobian"] = log_jacobian_penalty(jac)
            total = total + c.folding * terms["folding"] + c.log_jacobian * terms["log_jacobian"]
            if c.vertebra_log_jacobian_variance and fixed_label is not None:
                terms["vertebra_log_jacobian_variance"] = masked_log_jacobian_variance(jac, fixed_label)
                total = total + c.vertebra_log_jacobian_variance * terms["vertebra_log_jacobian_variance"]
        if fixed_label is not None and "warped_label" in outputs:
            terms["affine_dice"] = -soft_dice(fixed_label.float(), outputs["warped_label_affine"].float())
            terms["deformable_dice"] = -soft_dice(fixed_label.float(), outputs["warped_label"].float())
            total = total + c.affine_dice * terms["affine_dice"] + c.deformable_dice * terms["deformable_dice"]
        if (c.known_map or c.affine_known_map) and true_inverse is not None and known is not None \
                and fixed_label is not None and bool((known > 0).any()):
            weight = known.float().view(-1)
            share = lambda e: (e * weight).sum() / weight.sum()  # noqa: E731
            terms["known_map_mm"] = share(known_map_error(true_inverse, outputs["total_map"], fixed_label, spacing))
            terms["affine_known_map_mm"] = share(known_map_error(true_inverse, outputs["affine_map"], fixed_label,
                                                                  spacing))
            total = total + c.known_map * terms["known_map_mm"] + c.affine_known_map * terms["affine_known_map_mm"]
        terms["total"] = total
        return terms
