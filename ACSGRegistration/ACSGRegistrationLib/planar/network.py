"""The 2D network: a fully convolutional encoder-decoder that maps a (fixed, moving) pair to a dense field.

Shan et al. (2017) describe an FCN that takes the image pair and outputs the deformation field, trained end
to end through a bilinear spatial transformer; their layer counts are not given in the summary this project
has, so the layout here is this project's choice: a U-Net of four 2x poolings (as VoxelMorph's 2D network),
3x3 convolutions with LeakyReLU, skip connections, a last layer initialised near zero (the identity at start).
It accepts any image size (padded to a multiple of 16 and cropped back). The field is a plain displacement as
in the paper, or with ``diffeomorphic`` a stationary velocity integrated by scaling and squaring.

A 2D image is handled by the 3D spatial transformer as a volume one slice deep (``layers.sample``), so the
warping and the integration are the same code in 2D and 3D.
"""

from dataclasses import asdict, dataclass
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import integrate_velocity, warp

MULTIPLE = 16  # four poolings


@dataclass
class PlanarConfig:
    encoder: Tuple[int, ...] = (16, 32, 32, 32)
    decoder: Tuple[int, ...] = (32, 32, 32, 16)
    diffeomorphic: bool = False
    integration_steps: int = 7
    spacing_mm: float = 1.0  # the grid images are resampled to before the network

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict) -> "PlanarConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("encoder", "decoder"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


def _block(channels_in: int, channels_out: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, stride, 1), nn.LeakyReLU(0.2))


class PlanarNet(nn.Module):
    """``forward(fixed, moving)`` on (B, 1, H, W) images in [0, 1]: the displacement (B, 2, H, W, pixels, (y, x)),
    the warped moving image and, given ``moving_label``, the warped label."""

    def __init__(self, config: PlanarConfig = None):
        super().__init__()
        self.config = config or PlanarConfig()
        c = self.config
        if len(c.decoder) != len(c.encoder):
            raise ValueError("the 2D network needs as many decoder as encoder levels")
        self.down = nn.ModuleList()
        previous, skips = 2, []
        for width in c.encoder:
            self.down.append(_block(previous, width, stride=2))
            skips.append(previous)
            previous = width
        self.up = nn.ModuleList()
        for width, skip in zip(c.decoder, reversed(skips)):
            self.up.append(_block(previous + skip, width))
            previous = width
        self.head = nn.Conv2d(previous, 2, 3, 1, 1)
        nn.init.normal_(self.head.weight, std=1e-5)
        nn.init.zeros_(self.head.bias)

    def field(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The displacement (B, 2, H, W) in pixels; any H, W."""
        return self.displacement(self.flow(fixed, moving))

    def flow(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The network's raw output (B, 2, H, W): the displacement, or with ``diffeomorphic`` the velocity."""
        height, width = fixed.shape[-2:]
        pad = [0, -width % MULTIPLE, 0, -height % MULTIPLE]
        x = F.pad(torch.cat([fixed, moving], 1), pad, mode="replicate")
        features = []
        for layer in self.down:
            features.append(x)
            x = layer(x)
        for layer, skip in zip(self.up, reversed(features)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = layer(torch.cat([x, skip], 1))
        return self.head(x)[:, :, :height, :width]

    def displacement(self, flow: torch.Tensor) -> torch.Tensor:
        """The displacement of a raw output (``flow``): itself, or its velocity integrated by scaling and squaring."""
        if self.config.diffeomorphic:
            return integrate_velocity(as_volume_field(flow), self.config.integration_steps)[:, 1:, 0]
        return flow

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, moving_label: torch.Tensor = None
                ) -> Dict[str, torch.Tensor]:
        displacement = self.field(fixed, moving)
        out = {"displacement": displacement, "warped": warp_planar(moving, displacement)}
        if moving_label is not None:
            out["warped_label"] = warp_planar(moving_label, displacement)
        return out


def as_volume_field(displacement: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) (y, x) -> (B, 3, 1, H, W) (z, y, x): a 2D field as the 3D transformer's, one slice deep."""
    return torch.cat([torch.zeros_like(displacement[:, :1]), displacement], 1).unsqueeze(2)


def warp_planar(image: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """image(x + displacement(x)) for (B, C, H, W) images and (B, 2, H, W) pixel displacements."""
    return warp(image.unsqueeze(2), as_volume_field(displacement), mode=mode)[:, :, 0]


def jacobian_determinant_2d(displacement: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) of (B, 2, H, W) pixel displacements, central differences inside, one-sided at the
    border (numpy.gradient's rule), (B, H, W)."""
    dy = torch.gradient(displacement, dim=2)[0]
    dx = torch.gradient(displacement, dim=3)[0]
    return (1 + dy[:, 0]) * (1 + dx[:, 1]) - dx[:, 0] * dy[:, 1]
