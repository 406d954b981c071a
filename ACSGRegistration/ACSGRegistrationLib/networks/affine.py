"""Affine registration network (paper, Fig. 2): 12 parameters from the concatenated pair."""

import math

import torch
import torch.nn as nn

from ..config import AffineNetConfig
from ..layers import ConvBlock


class AffineNet(nn.Module):
    """Stride-2 ConvBlocks, each followed by stride-1 ConvBlocks, then a fully connected layer.

    Outputs a (B, 3, 4) voxel-space matrix [A | t] (see ``layers.affine_coordinates``), initialised to
    the identity.
    """

    def __init__(self, cfg: AffineNetConfig, input_shape):
        super().__init__()
        layers = []
        in_ch = 2
        for ch in cfg.channels:
            layers.append(ConvBlock(in_ch, ch, stride=2))
            layers += [ConvBlock(ch, ch) for _ in range(cfg.blocks_per_level)]
            in_ch = ch
        self.features = nn.Sequential(*layers)
        # At the configured input size this pooling is the identity; other sizes still give a vector
        # of the same length, so the fully connected layer accepts them.
        factor = 2 ** len(cfg.channels)
        self.grid = tuple(max(1, math.ceil(n / factor)) for n in input_shape)
        self.pool = nn.AdaptiveAvgPool3d(self.grid)
        self.fc = nn.Linear(in_ch * math.prod(self.grid), 12)
        nn.init.zeros_(self.fc.weight)
        with torch.no_grad():
            self.fc.bias.copy_(torch.eye(3, 4).flatten())

    def forward(self, fixed, moving):
        x = self.features(torch.cat([fixed, moving], dim=1))
        return self.fc(torch.flatten(self.pool(x), 1)).view(-1, 3, 4)
