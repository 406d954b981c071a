"""Model, loss and training configuration.

Every size of every network comes from here, so that tests can build tiny models and checkpoints can
record exactly what they contain. ``paper_config()`` is the default: the sizes of Gao & Zheng (2022),
completed where the paper is silent by the public ViT-V-Net that the design resembles (noted per field).

Shapes follow NumPy/SimpleITK array order: ``input_shape = (depth, height, width) = (z, y, x)``; the
paper's 128x128x64 crop (x, y, z) is therefore ``(64, 128, 128)`` here.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from .errors import InputError

# The registry of methods: name (as in configurations, checkpoints and --method) -> name shown in tables. A new
# network adds its entry here, its configuration section to ModelConfig and its builder to
# networks.model.DEFORMABLE_NETWORKS; every command, table and check reads the methods from these.
METHODS = {"acsgregnet": "ACSGRegNet", "avoxelmorph": "AVoxelMorph"}
# Inference precision: "auto" is bf16 where the hardware computes it natively, else fp32 (inference.py).
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class AffineNetConfig:
    # Five stride-2 ConvBlocks, each followed by two stride-1 ConvBlocks (paper, Fig. 2).
    channels: Tuple[int, ...] = (16, 32, 64, 128, 256)
    blocks_per_level: int = 2


@dataclass
class ACSGNetConfig:
    # Shared 3D U-Net encoder: one level per entry; every level after the first halves the resolution.
    encoder_channels: Tuple[int, ...] = (16, 32, 32)
    # Token embedding size. The paper's "k = 252"; ViT-V-Net uses the same hidden size.
    embed_dim: int = 252
    # Not in the paper; ViT-V-Net's values.
    num_heads: int = 12
    mlp_dim: int = 3072
    # Paper: 12 transformer encoder layers in each self-attention and in the cross-attention module.
    num_layers: int = 12
    # Not in the paper; ViT-V-Net embeds 1/4-resolution CNN features with patches of 8.
    patch_size: int = 8
    dropout: float = 0.1
    # Decoder widths, one per x2 upsampling from the token grid to full resolution, so there are
    # (len(encoder_channels) - 1) + log2(patch_size) of them (ViT-V-Net's decoder channels).
    decoder_channels: Tuple[int, ...] = (96, 48, 32, 32, 16)
    # 1: velocity at full resolution (paper); 2: half resolution, upsampled before integration (faster).
    velocity_downsample: int = 1


@dataclass
class VoxelMorphConfig:
    # VoxelMorph (Balakrishnan et al. 2019), "vm2" widths: stride-2 encoder convolutions; the first
    # len(encoder_channels) decoder convolutions each follow a x2 upsampling and a skip connection,
    # the rest run at full resolution.
    encoder_channels: Tuple[int, ...] = (16, 32, 32, 32)
    decoder_channels: Tuple[int, ...] = (32, 32, 32, 32, 32, 16, 16)


@dataclass
class ModelConfig:
    method: str = "acsgregnet"
    input_shape: Tuple[int, int, int] = (64, 128, 128)
    # Voxel size (mm) the network works at. Crops of another spacing are resampled to this grid (same
    # centre and extent) and the results resampled back, so a 2 mm model still returns 1 mm outputs.
    input_spacing: float = 1.0
    affine: AffineNetConfig = field(default_factory=AffineNetConfig)
    acsg: ACSGNetConfig = field(default_factory=ACSGNetConfig)
    voxelmorph: VoxelMorphConfig = field(default_factory=VoxelMorphConfig)
    # Scaling-and-squaring steps; 0 makes the deformable output a plain displacement field
    # (the original, non-diffeomorphic VoxelMorph of the paper's baseline).
    integration_steps: int = 7
    # The baseline of the paper is the plain VoxelMorph; ACSGRegNet always integrates a velocity field.
    avoxelmorph_integration_steps: int = 0
    # Not in the paper. Symmetric by construction: each network sees the pair in both orders and its two
    # answers are subtracted, the affine as a matrix logarithm, L = (g(F, M) - g(M, F)) / 2, A = exp(L), and
    # the velocity v = (f(F, W) - f(W, F)) / 2 with W the affinely warped moving image. A scan registered
    # to itself then gets exactly the identity, and the inverse is exp(-v) after A^-1 (the networks run
    # twice, as one batch). False is the paper's one-way networks.
    symmetric: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise InputError(f"input_shape must be three positive sizes (z, y, x), got {self.input_shape}")

    @property
    def steps_for_method(self) -> int:
        return self.integration_steps if self.method == "acsgregnet" else self.avoxelmorph_integration_steps


@dataclass
class LossConfig:
    # Paper, eq. (9): lambda_1..lambda_5.
    affine_similarity: float = 0.3
    deformable_similarity: float = 0.7
    smoothness: float = 0.001
    affine_dice: float = 0.01
    deformable_dice: float = 0.1
    ncc_window: int = 9
    # Not in the paper (0 there): see ``map_loss_config``.
    # Known-deformation pairs: mean end-point error (mm) of the final / affine map inside the vertebra.
    known_map: float = 0.0
    affine_known_map: float = 0.0
    # Penalty on folding, mean(relu(jacobian_floor - det J)) of the deformable displacement.
    folding: float = 0.0
    jacobian_floor: float = 0.2
    # Mean squared log-Jacobian of the deformable displacement (volume change, either way).
    log_jacobian: float = 0.0
    # Variance of the log-Jacobian inside the fixed vertebra (where a fixed label is given): bone may change
    # its size between subjects, but not unevenly across its inside (see ``refinement_loss_config``).
    vertebra_log_jacobian_variance: float = 0.0
    # Edge-aware smoothness (Shan et al. 2017, in 3D): the diffusion term's differences weighted by
    # exp(-alpha |grad fixed|), so that the field may change where the fixed image has an edge. 0: the paper's
    # plain diffusion, the default: with equal training, alpha = 10 gave the same maps within noise and no
    # better Dice or TRE on the shared cases (model card, "Edge-aware smoothness").
    smoothness_edge_alpha: float = 0.0


LOSS_PRESETS = ("maps", "paper")


def paper_loss_config() -> LossConfig:
    """The paper's eq. (9) with its weights, exactly."""
    return LossConfig()


def map_loss_config() -> LossConfig:
    """The default loss: the paper's terms plus what makes the map follow the anatomy (issue: maps).

    With the paper's weights, inter-subject pairs of vertebrae whose interiors share nothing train a map
    that matches the outline (Dice) and crushes and folds the inside (SDlogJ ~4, 4-9 % folding inside the
    vertebra; Dice cannot see it). Departures, each measured in the model card:
    - known-deformation pairs (a vertebra and a known random warp of itself) with the end-point error of
      the final map (weight 1 per mm) and of the affine map (0.2): the interior now carries signal;
    - diffusion 0.001 -> 0.5 (voxel units of the model's grid), a folding penalty (1.0, below det J = 0.2)
      and a log-Jacobian penalty (0.3);
    - Dice 0.01 -> 0.3 (affine), so that the affine stage does its share on inter-subject pairs, and
      0.1 -> 1.0 (deformable), to hold the outline against the stronger regularisers.
    """
    return LossConfig(smoothness=0.5, affine_dice=0.3, deformable_dice=1.0, known_map=1.0, affine_known_map=0.2,
                      folding=1.0, log_jacobian=0.3)


def refinement_loss_config() -> LossConfig:
    """The loss of test-time refinement (``Registrar.refine_pair``): the default loss without its
    known-map terms (a user's pair has no known map) and without the deformable Dice term, with the
    log-Jacobian weight 0.3 -> 1.0 and the variance of log J inside the fixed vertebra (weight 1).

    Measured on the shared vertebrae (model card, "Refinement"): with the default loss, 20 steps bought Dice
    with the vertebra's interior (SDlogJ inside it ~0.15 -> ~0.30, twice ANTs SyN's, and known-deformation
    TRE up by 0.1-0.3 mm). The crops are masked by their labels, so LNCC already sees the outline; the soft
    Dice of labels resampled on the model's 2 mm grid fits their interpolation noise (known deformations:
    lower Dice at 1 mm and higher TRE with it than without it)."""
    return dataclasses.replace(map_loss_config(), known_map=0.0, affine_known_map=0.0, deformable_dice=0.0,
                               log_jacobian=1.0, vertebra_log_jacobian_variance=1.0)


def loss_config(preset: str) -> LossConfig:
    if preset not in LOSS_PRESETS:
        raise InputError(f"unknown loss preset {preset!r}; choose one of {', '.join(LOSS_PRESETS)}")
    return map_loss_config() if preset == "maps" else paper_loss_config()


@dataclass
class TrainConfig:
    learning_rate: float = 1e-5
    batch_size: int = 8
    max_steps: int = 1000
    checkpoint_every: int = 100
    use_labels: bool = True
    mixed_precision: bool = True  # used on CUDA only
    seed: int = 0
    num_workers: int = 0
    loss: LossConfig = field(default_factory=LossConfig)


def paper_config(method: str = "acsgregnet") -> ModelConfig:
    return ModelConfig(method=method)


def compact_config(method: str = "acsgregnet") -> ModelConfig:
    """The same architecture, narrower and shallower (4 layers per attention module, k = 96), working on
    the paper's 128 x 128 x 64 mm crop at 2 mm (64 x 64 x 32 voxels): the configuration of the shipped
    model, which had to be trained on a CPU (see its model card). Outputs are still returned at the
    crop's own resolution."""
    return ModelConfig(
        method=method,
        input_shape=(32, 64, 64),
        input_spacing=2.0,
        affine=AffineNetConfig(channels=(8, 16, 32, 64, 64), blocks_per_level=1),
        acsg=ACSGNetConfig(encoder_channels=(8, 16, 32), embed_dim=96, num_heads=4, mlp_dim=384, num_layers=4,
                           patch_size=4, dropout=0.0, decoder_channels=(32, 32, 16, 8)),
    )


def tiny_config(method: str = "acsgregnet", input_shape=(16, 32, 32), input_spacing: float = 1.0) -> ModelConfig:
    """A model of the same structure with ~70k parameters, for tests and quick experiments."""
    return ModelConfig(
        method=method,
        input_shape=tuple(input_shape),
        input_spacing=float(input_spacing),
        affine=AffineNetConfig(channels=(4, 8, 8, 8, 8), blocks_per_level=1),
        acsg=ACSGNetConfig(encoder_channels=(4, 8, 8), embed_dim=12, num_heads=2, mlp_dim=24, num_layers=1,
                           patch_size=2, dropout=0.0, decoder_channels=(8, 8, 8)),
        voxelmorph=VoxelMorphConfig(encoder_channels=(4, 8, 8), decoder_channels=(8, 8, 8, 8)),
    )


# --- (de)serialisation: checkpoints store plain dicts so they load without pickled classes ---------

def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def _build(cls, data: Optional[Dict[str, Any]]):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise InputError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    kwargs = {}
    nested = {"affine": AffineNetConfig, "acsg": ACSGNetConfig, "voxelmorph": VoxelMorphConfig, "loss": LossConfig}
    for name, value in data.items():
        if name in nested and isinstance(value, dict):
            value = _build(nested[name], value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def model_config_from_dict(data) -> ModelConfig:
    return _build(ModelConfig, data)


def train_config_from_dict(data) -> TrainConfig:
    return _build(TrainConfig, data)
