"""ACSGRegNet's deformable network (paper, Sec. 2.1): shared CNN encoder, self- and cross-attention
transformer encoders, two CNN decoders and the gated fusion of their velocity fields."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ACSGNetConfig
from ..layers import Conv3d, ConvBlock, flow_head


class SharedEncoder(nn.Module):
    """3D U-Net encoder applied to each image separately; returns features from fine to coarse."""

    def __init__(self, channels):
        super().__init__()
        self.levels = nn.ModuleList()
        in_ch = 1
        for i, ch in enumerate(channels):
            self.levels.append(nn.Sequential(ConvBlock(in_ch, ch, stride=1 if i == 0 else 2), ConvBlock(ch, ch)))
            in_ch = ch

    def forward(self, x):
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


def transformer_encoder(cfg: ACSGNetConfig) -> nn.TransformerEncoder:
    """The paper's transformer encoder module (TEM): pre-norm vanilla encoder layers.

    PyTorch's own layer runs multi-head attention through scaled_dot_product_attention (fused kernels).
    Attention scales by sqrt(head size), as multi-head attention does, where the paper writes sqrt(k).
    """
    layer = nn.TransformerEncoderLayer(cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, cfg.dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, cfg.num_layers, norm=nn.LayerNorm(cfg.embed_dim),
                                 enable_nested_tensor=False)


class VelocityDecoder(nn.Module):
    """CNN decoder from a token grid to a velocity field, with skip connections from both images."""

    def __init__(self, in_channels, encoder_channels, channels, patch_levels, stages):
        super().__init__()
        levels = len(encoder_channels)
        total = (levels - 1) + patch_levels
        self.entry = ConvBlock(in_channels, channels[0])
        self.skip_levels = []
        self.blocks = nn.ModuleList()
        prev = channels[0]
        for i in range(stages):
            level = total - 1 - i  # the encoder level whose resolution this stage reaches
            skip = 2 * encoder_channels[level] if level < levels else 0
            self.skip_levels.append(level if level < levels else None)
            self.blocks.append(ConvBlock(prev + skip, channels[i]))
            prev = channels[i]
        self.head = flow_head(prev)

    def forward(self, tokens_grid, fixed_features, moving_features):
        x = self.entry(tokens_grid)
        for level, block in zip(self.skip_levels, self.blocks):
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
            if level is not None:
                x = torch.cat([x, fixed_features[level], moving_features[level]], dim=1)
            x = block(x)
        return self.head(x)


class GatedFusion(nn.Module):
    """Gated fusion module (paper, Fig. 4): gates from both fields weight each; a convolution fuses them."""

    def __init__(self):
        super().__init__()
        self.gate = Conv3d(6, 6, 3, padding=1)
        self.fuse = Conv3d(6, 3, 3, padding=1)
        # Start as the plain sum of the gated fields (gates ~0.5 at initialisation), so that both
        # decoders receive gradient from the first step.
        with torch.no_grad():
            self.fuse.weight.zero_()
            self.fuse.bias.zero_()
            for c in range(3):
                self.fuse.weight[c, c, 1, 1, 1] = 1.0
                self.fuse.weight[c, c + 3, 1, 1, 1] = 1.0

    def forward(self, v_self, v_cross):
        weights = torch.sigmoid(self.gate(torch.cat([v_self, v_cross], dim=1)))
        return self.fuse(torch.cat([weights[:, :3] * v_self, weights[:, 3:] * v_cross], dim=1))


class ACSGDeformableNet(nn.Module):
    """(fixed, affinely warped moving) -> fused velocity field (voxels, array order)."""

    def __init__(self, cfg: ACSGNetConfig, input_shape):
        super().__init__()
        if cfg.patch_size < 1 or cfg.patch_size & (cfg.patch_size - 1):
            raise ValueError(f"patch_size must be a power of two, got {cfg.patch_size}")
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
        if cfg.velocity_downsample not in (1, 2):
            raise ValueError("velocity_downsample must be 1 (full resolution) or 2 (half)")
        levels = len(cfg.encoder_channels)
        patch_levels = int(math.log2(cfg.patch_size))
        total_up = (levels - 1) + patch_levels
        if len(cfg.decoder_channels) != total_up:
            raise ValueError(f"decoder_channels needs {total_up} entries (one per x2 upsampling), "
                             f"got {len(cfg.decoder_channels)}")
        self.divisor = 2 ** total_up
        for n in input_shape:
            if n % self.divisor:
                raise ValueError(f"input_shape {tuple(input_shape)} must be divisible by {self.divisor}")
        self.token_grid = tuple(n // self.divisor for n in input_shape)
        tokens = math.prod(self.token_grid)

        self.encoder = SharedEncoder(cfg.encoder_channels)
        # The "trainable linear projection" of the deepest features to tokens: one linear map per patch.
        self.embed = Conv3d(cfg.encoder_channels[-1], cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)
        self.position_fixed = nn.Parameter(torch.zeros(1, tokens, cfg.embed_dim))
        self.position_moving = nn.Parameter(torch.zeros(1, tokens, cfg.embed_dim))
        nn.init.trunc_normal_(self.position_fixed, std=0.02)
        nn.init.trunc_normal_(self.position_moving, std=0.02)
        self.self_attention_fixed = transformer_encoder(cfg)
        self.self_attention_moving = transformer_encoder(cfg)
        self.cross_attention = transformer_encoder(cfg)
        stages = total_up - (1 if cfg.velocity_downsample == 2 else 0)
        args = (2 * cfg.embed_dim, cfg.encoder_channels, cfg.decoder_channels, patch_levels, stages)
        self.decoder_self = VelocityDecoder(*args)
        self.decoder_cross = VelocityDecoder(*args)
        self.fusion = GatedFusion()

    def _tokens(self, features, position):
        grid = self.embed(features[-1])
        if tuple(grid.shape[2:]) != self.token_grid:
            raise ValueError(f"token grid {tuple(grid.shape[2:])} differs from the configured "
                             f"{self.token_grid}: the input size does not match the model's input_shape")
        return grid.flatten(2).transpose(1, 2) + position

    def _to_grid(self, tokens_fixed, tokens_moving):
        # Both images' tokens side by side as channels on the token grid.
        b, n, e = tokens_fixed.shape
        pair = torch.cat([tokens_fixed, tokens_moving], dim=2)
        return pair.transpose(1, 2).reshape(b, 2 * e, *self.token_grid)

    def forward(self, fixed, moving):
        f_feat = self.encoder(fixed)
        m_feat = self.encoder(moving)
        e_f = self._tokens(f_feat, self.position_fixed)
        e_m = self._tokens(m_feat, self.position_moving)
        s_f = self.self_attention_fixed(e_f)
        s_m = self.self_attention_moving(e_m)
        cross = self.cross_attention(torch.cat([e_f, e_m], dim=1))
        c_f, c_m = cross.split(e_f.shape[1], dim=1)
        v_self = self.decoder_self(self._to_grid(s_f, s_m), f_feat, m_feat)
        v_cross = self.decoder_cross(self._to_grid(c_f, c_m), f_feat, m_feat)
        return self.fusion(v_self, v_cross)
