"""ProST's learned similarity (Gao et al., IEEE TMI 2024): a 3D branch turns the CT into feature volumes, the
projective spatial transformer integrates them along the X-ray's rays at a pose (``drr.render``: the same rays
as the DRR, differentiable twice), two 2D encoders map the projected features and the X-ray to feature maps, and
the learned distance is one minus the cosine between those maps. It is trained so that its gradient with
respect to the pose points towards the true pose (``prost_training``); registration descends it from far away
and an intensity method refines the answer (``register``).

Our choices where the paper's network is not this problem's: smooth activations (ELU) rather than ReLU, because
the training differentiates the pose gradient again and ReLU's second derivative is zero; a crop of the CT
around the target vertebra at a coarse spacing, so that every CT gives the network the same field and a step
costs a fraction of a second on a CPU; each projected channel and the X-ray standardised per image, so that the
X-ray's exposure and display window do not matter; the X-ray encoder sees both polarities in training.
"""

from dataclasses import asdict, dataclass
from typing import Dict, Optional

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..geometry import write_atomically
from ..preprocessing import crop_grid
from .drr import MU_WATER, Volume, render, resample_isotropic

FORMAT = "acsgregistration-prost"


@dataclass
class ProSTConfig:
    features: int = 4  # projected channels: the attenuation itself and ``features - 1`` learned ones
    width: int = 16  # channels of the encoders' first level (doubled at each of three levels)
    spacing_mm: float = 4.0  # the network's CT grid
    crop_mm: float = 192.0  # the cube around the target vertebra the network sees
    detector_pixels: int = 64  # the longest side of the network's detector


def encoder(channels_in: int, width: int) -> nn.Sequential:
    """Three levels of two convolutions and a halving: a feature map 1/8 of the detector."""
    layers, channels = [], channels_in
    for level in range(3):
        out = width * 2 ** level
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ELU(), nn.Conv2d(out, out, 3, padding=1), nn.ELU(),
                   nn.AvgPool2d(2)]
        channels = out
    layers.append(nn.Conv2d(channels, width * 2, 1))
    return nn.Sequential(*layers)


def standardise(images: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit deviation over each image's last two dimensions."""
    centred = images - images.mean(dim=(-2, -1), keepdim=True)
    return centred / torch.sqrt((centred * centred).mean(dim=(-2, -1), keepdim=True) + 1e-8)


class ProSTNet(nn.Module):
    def __init__(self, config: Optional[ProSTConfig] = None):
        super().__init__()
        self.config = config or ProSTConfig()
        c = self.config
        self.volume_branch = nn.Sequential(
            nn.Conv3d(1, 8, 3, padding=1), nn.ELU(), nn.Conv3d(8, 8, 3, padding=1), nn.ELU(),
            nn.Conv3d(8, c.features - 1, 3, padding=1))
        self.projection_encoder = encoder(c.features, c.width)
        self.xray_encoder = encoder(1, c.width)

    def volume_features(self, mu: torch.Tensor) -> torch.Tensor:
        """(C, D, H, W): the attenuation (in units of water's) and the learned channels."""
        x = (mu / MU_WATER)[None, None]
        return torch.cat([x, self.volume_branch(x)], dim=1)[0]

    def project(self, volume: Volume, features: torch.Tensor, carm, poses: torch.Tensor,
                second_order: bool = False) -> torch.Tensor:
        """The features integrated along the rays of each pose: (B, C, rows, columns), standardised.
        ``second_order``: the training differentiates the pose gradient (``drr.render``)."""
        return standardise(render(volume, carm, poses, channels=features, second_order=second_order))

    def distance(self, projections: torch.Tensor, xray: torch.Tensor) -> torch.Tensor:
        """1 - cos between the encoded projections (B, C, rows, columns) and the X-ray (rows, columns; or one
        per projection, (B, rows, columns)): (B,)."""
        a = self.projection_encoder(projections).flatten(1)
        xrays = xray if xray.dim() == 3 else xray[None]
        b = self.xray_encoder(standardise(xrays)[:, None]).flatten(1)
        return 1.0 - torch.nn.functional.cosine_similarity(a, b.expand_as(a), dim=1)


def network_volume(ct: sitk.Image, centre_lps, config: ProSTConfig, device=None) -> Volume:
    """The CT on the network's grid: a cube of ``crop_mm`` about the target at ``spacing_mm`` (blurred first
    where the CT is finer; air outside the scan)."""
    spacing = config.spacing_mm
    if min(ct.GetSpacing()) < spacing:
        ct = resample_isotropic(ct, spacing)
    size = max(8, int(round(config.crop_mm / spacing)))
    reference = crop_grid(centre_lps, (size, size, size), spacing)
    cropped = sitk.Resample(ct, reference, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    return Volume.from_image(cropped, device=device)


class LearnedSimilarity:
    """A trained ProSTNet bound to one problem: the CT's features (computed once), the network's detector and
    the X-ray on it. ``distance(poses)`` is differentiable in the poses."""

    def __init__(self, net: ProSTNet, ct: sitk.Image, centre_lps, carm, xray_pixels: np.ndarray, device=None):
        from .register import prepare_xray
        self.net = net.eval()
        for parameter in net.parameters():  # registration differentiates the poses only
            parameter.requires_grad_(False)
        config = net.config
        self.carm = carm.at_most(config.detector_pixels)
        self.volume = network_volume(ct, centre_lps, config, device=device)
        with torch.no_grad():
            self.features = net.volume_features(self.volume.mu)
        self.xray = prepare_xray(xray_pixels, self.carm.size, device=device)

    def distance(self, poses: torch.Tensor) -> torch.Tensor:
        return self.net.distance(self.net.project(self.volume, self.features, self.carm, poses), self.xray)


# -- files ------------------------------------------------------------------------------------------------------

def save_prost(path: str, net: ProSTNet, **extra) -> str:
    """Weights, configuration and ``extra`` (training state), written atomically."""
    from ..checkpoint import content_hash, versions
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    config = asdict(net.config)
    payload = {"format": FORMAT, "config": config, "state_dict": state, "content_sha256": content_hash(config, state),
               "versions": versions()}
    payload.update(extra)
    write_atomically(lambda tmp: torch.save(payload, tmp), path)
    return path


def load_prost(path: str, map_location="cpu") -> Dict:
    """The checkpoint's dictionary with ``net`` (a ProSTNet with its weights); errors name the file."""
    from ..checkpoint import content_hash
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"ProST model not found: {path}") from None
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"{path} is not a readable ProST model: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ProST model (format {FORMAT!r} expected)")
    if content_hash(payload["config"], payload["state_dict"]) != payload.get("content_sha256"):
        raise CheckpointError(f"{path}: weights or configuration do not match their checksum (corrupt file?)")
    try:
        net = ProSTNet(ProSTConfig(**payload["config"]))
        net.load_state_dict(payload["state_dict"])
    except (TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: the weights do not fit this version's ProST network: {exc}") from None
    payload["net"] = net
    return payload
