"""2D models on disk: the network's configuration, weights, training settings and history, with a checksum."""

import hashlib
import io as _io
import os
from typing import Dict

import torch

from ..errors import InputError
from ..geometry import write_atomically
from .network import PlanarConfig, PlanarNet

KIND = "acsgregistration-planar"


def _digest(state: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_planar(path: str, net: PlanarNet, **extra) -> str:
    """Write the model atomically (the file is whole or absent)."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    payload = {"kind": KIND, "config": net.config.to_dict(), "model": state, "sha256": _digest(state), **extra}
    write_atomically(lambda tmp: torch.save(payload, tmp), path)
    return path


def load_planar(path: str, what: str = "2D model") -> Dict:
    """The payload with ``net`` (a PlanarNet in eval mode); InputError naming the file where it is not one."""
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as fh:
            payload = torch.load(_io.BytesIO(fh.read()), map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise InputError(f"{what} {path} is not a readable model ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise InputError(f"{what} {path} is not a 2D model of ACSGRegistration (a 3D or X-ray model?)")
    if _digest(payload["model"]) != payload.get("sha256"):
        raise InputError(f"{what} {path} is damaged (its weights do not match their checksum): copy it again")
    net = PlanarNet(PlanarConfig.from_dict(payload["config"]))
    net.load_state_dict(payload["model"])
    payload["net"] = net.eval()
    return payload
