"""Registration networks: the affine CNN, ACSGRegNet's deformable network and the VoxelMorph baseline."""

from .model import RegistrationNet, invert_displacement

__all__ = ["RegistrationNet", "invert_displacement"]
