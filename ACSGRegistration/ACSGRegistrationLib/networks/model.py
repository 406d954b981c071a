"""The end-to-end registration network: affine stage, then a deformable stage (ACSGRegNet or VoxelMorph)."""

import contextlib
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import InputError
from ..layers import (affine_coordinates, full_precision, identity_grid, integrate_velocity, invert_affine,
                      resize_field, sample, warp)
from .acsgregnet import ACSGDeformableNet
from .affine import AffineNet
from .voxelmorph import VoxelMorphNet


# The deformable network of each method of ``config.METHODS``.
DEFORMABLE_NETWORKS = {
    "acsgregnet": lambda cfg: ACSGDeformableNet(cfg.acsg, cfg.input_shape),
    "avoxelmorph": lambda cfg: VoxelMorphNet(cfg.voxelmorph),
}


class RegistrationNet(nn.Module):
    """fixed, moving (B, 1, D, H, W) -> affine matrix, fields and warped images.

    The final warp samples the moving image once through the composed map
    phi(x) = Affine(x + u(x)), so it equals what any tool gets by applying the exported field.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.affine = AffineNet(cfg.affine, cfg.input_shape)
        self.deformable = DEFORMABLE_NETWORKS[cfg.method](cfg)
        self.integration_steps = cfg.steps_for_method
        self.symmetric = bool(cfg.symmetric)
        # Dtype the deformable network runs in (autocast); None leaves any autocast the caller opened.
        # The affine network and the geometry (affine map, integration, resampling) run in fp32 at
        # inference: an error in the matrix grows with the distance from the volume's centre (bf16's
        # 3 digits would move the crop's corners by a quarter voxel), and they cost little.
        self.compute_dtype: Optional[torch.dtype] = None

    def _affine_precision(self, device: torch.device):
        return contextlib.nullcontext() if self.compute_dtype is None else full_precision(device)

    def _networks_precision(self, device: torch.device):
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.compute_dtype,
                              enabled=self.compute_dtype != torch.float32)

    def check_inputs(self, fixed: torch.Tensor, moving: torch.Tensor):
        for name, t in (("fixed", fixed), ("moving", moving)):
            if t.dim() != 5 or t.shape[1] != 1:
                raise ValueError(f"{name} image must be a (batch, 1, D, H, W) tensor, got shape {tuple(t.shape)}")
        if fixed.shape != moving.shape:
            raise InputError(f"fixed and moving shapes differ: {tuple(fixed.shape)} vs {tuple(moving.shape)}")
        if tuple(fixed.shape[2:]) != tuple(self.config.input_shape):
            raise InputError(f"the model takes {tuple(self.config.input_shape)} (z, y, x) volumes, got "
                             f"{tuple(fixed.shape[2:])}; crop or resample the pair to that size first")

    def deformable_displacement(self, velocity: torch.Tensor, shape, inverse: bool = False) -> torch.Tensor:
        """Integrate a (possibly half-resolution) velocity field to a full-resolution displacement."""
        if inverse:
            if self.integration_steps > 0:
                velocity = -velocity
            else:
                return invert_displacement(resize_field(velocity, shape))
        return resize_field(integrate_velocity(velocity, self.integration_steps), shape)

    def affine_matrix(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """(B, 3, 4) voxel-space affine; symmetric models take exp of the antisymmetrised logarithm."""
        if not self.symmetric:
            return self.affine(fixed, moving).float()
        both = self.affine(torch.cat([fixed, moving]), torch.cat([moving, fixed])).float()
        forward, backward = both.split(fixed.shape[0])
        return affine_exp((forward - backward) / 2)

    def velocity(self, fixed: torch.Tensor, warped_affine: torch.Tensor) -> torch.Tensor:
        """Velocity field (voxels); symmetric models antisymmetrise it: v(F, W) = -v(W, F)."""
        if not self.symmetric:
            return self.deformable(fixed, warped_affine).float()
        both = self.deformable(torch.cat([fixed, warped_affine]), torch.cat([warped_affine, fixed])).float()
        forward, backward = both.split(fixed.shape[0])
        return (forward - backward) / 2

    def forward(self, fixed, moving, moving_label: Optional[torch.Tensor] = None,
                with_inverse: bool = False) -> Dict[str, torch.Tensor]:
        return self.forward_from_affine(fixed, moving, self.affine_stage(fixed, moving), moving_label, with_inverse)

    def affine_stage(self, fixed, moving) -> torch.Tensor:
        """The affine network's (B, 3, 4) matrix, in its precision (fp32 at inference)."""
        self.check_inputs(fixed, moving)
        with self._affine_precision(fixed.device):
            return self.affine_matrix(fixed, moving)

    def forward_from_affine(self, fixed, moving, matrix, moving_label: Optional[torch.Tensor] = None,
                            with_inverse: bool = False) -> Dict[str, torch.Tensor]:
        """The deformable stage and every output, after the affine stage gave ``matrix`` (B, 3, 4)."""
        shape = fixed.shape[2:]
        fp32 = full_precision(fixed.device)
        with fp32:
            affine_map = affine_coordinates(matrix, shape, shape)
            warped_affine = sample(moving, affine_map)
        with self._networks_precision(fixed.device):
            velocity = self.velocity(fixed, warped_affine)
        with fp32:
            return self.outputs(fixed, moving, moving_label, matrix, velocity, with_inverse,
                                affine_map=affine_map, warped_affine=warped_affine)

    def outputs(self, fixed, moving, moving_label, matrix, velocity, with_inverse: bool = False,
                affine_map=None, warped_affine=None) -> Dict[str, torch.Tensor]:
        """Maps and warped images from an affine matrix and a velocity field (the geometry alone, fp32):
        what ``forward`` returns for the networks' answers, and what refinement optimises through."""
        shape = fixed.shape[2:]
        if affine_map is None:
            affine_map = affine_coordinates(matrix, shape, shape)
            warped_affine = sample(moving, affine_map)
        displacement = self.deformable_displacement(velocity, shape)
        grid = identity_grid(shape, fixed.device, displacement.dtype)
        total_map = affine_coordinates(matrix, shape, shape, grid + displacement)
        out = {
            "affine": matrix,
            "velocity": velocity,
            "displacement": displacement,
            "affine_map": affine_map,
            "total_map": total_map,
            "warped_affine": warped_affine,
            "warped": sample(moving, total_map),
        }
        if moving_label is not None:
            out["warped_label_affine"] = sample(moving_label, affine_map)
            out["warped_label"] = sample(moving_label, total_map)
        if with_inverse:
            out["inverse_map"] = self.inverse_map(matrix, velocity, shape)
        return out

    def inverse_map(self, matrix: torch.Tensor, velocity: torch.Tensor, shape) -> torch.Tensor:
        """Coordinate map of the inverse transform on the moving grid (see ``inverse_coordinates``)."""
        return inverse_coordinates(matrix, self.deformable_displacement(velocity, shape, inverse=True))


def affine_exp(log_matrix: torch.Tensor) -> torch.Tensor:
    """(B, 3, 4) affine [A | t] = exp of the homogeneous (B, 3, 4) logarithm [L | l] (bottom row zero)."""
    b = log_matrix.shape[0]
    square = torch.cat([log_matrix, log_matrix.new_zeros(b, 1, 4)], dim=1)
    return torch.linalg.matrix_exp(square)[:, :3]


def invert_displacement(displacement: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Fixed-point inverse of a plain displacement field: w(y) = -u(y + w(y))."""
    inverse = -displacement
    for _ in range(iterations):
        inverse = -warp(displacement, inverse, padding_mode="border")
    return inverse


def inverse_coordinates(matrix: torch.Tensor, inverse_displacement: torch.Tensor) -> torch.Tensor:
    """Coordinate map on the moving grid of phi^-1(y) = psi^-1(A^-1 y), in fixed voxel positions."""
    shape = inverse_displacement.shape[2:]
    z = affine_coordinates(invert_affine(matrix.to(inverse_displacement.dtype)), shape, shape)
    return z + sample(inverse_displacement, z, padding_mode="border")
