"""VoxelMorph's U-Net (Balakrishnan et al. 2019): the deformable half of the AVoxelMorph baseline."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VoxelMorphConfig
from ..layers import ConvBlock, flow_head


class VoxelMorphNet(nn.Module):
    """Concatenated pair in, 3-channel field (voxels, array order) out."""

    def __init__(self, cfg: VoxelMorphConfig):
        super().__init__()
        levels = len(cfg.encoder_channels)
        if len(cfg.decoder_channels) < levels:
            raise ValueError("VoxelMorph needs at least as many decoder as encoder channels")
        self.encoder = nn.ModuleList()
        skips = [2]
        in_ch = 2
        for ch in cfg.encoder_channels:
            self.encoder.append(ConvBlock(in_ch, ch, stride=2, norm=False))
            skips.append(ch)
            in_ch = ch
        self.decoder = nn.ModuleList()
        self.upsample_stages = levels
        for i, ch in enumerate(cfg.decoder_channels):
            skip = skips[levels - 1 - i] if i < levels else 0
            self.decoder.append(ConvBlock(in_ch + skip, ch, norm=False))
            in_ch = ch
        self.head = flow_head(in_ch)
        self.divisor = 2 ** levels

    def forward(self, fixed, moving):
        x = torch.cat([fixed, moving], dim=1)
        features = [x]
        for block in self.encoder:
            x = block(x)
            features.append(x)
        for i, block in enumerate(self.decoder):
            if i < self.upsample_stages:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
                x = torch.cat([x, features[self.upsample_stages - 1 - i]], dim=1)
            x = block(x)
        return self.head(x)
