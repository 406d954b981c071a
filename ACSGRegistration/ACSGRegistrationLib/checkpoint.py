"""Checkpoints: weights with their configuration, versions and training state, written atomically.

A checkpoint is a plain dictionary of tensors, numbers and strings, loaded with ``weights_only=True``
(no code runs on load) and checked before use, so that a corrupt, foreign or incompatible file is
reported as such instead of failing somewhere inside the network: a SHA-256 of the weights and the model
configuration is written with them and checked on load (a flipped byte or an edited setting such as the
voxel size would otherwise load and silently change every result), and every weight must be finite.
"""

import hashlib
import json
import os
import platform
import time
from typing import Any, Dict, Optional

import torch

from . import __version__
from .config import ModelConfig, model_config_from_dict, to_dict
from .errors import CheckpointError
from .geometry import write_atomically
from .networks import RegistrationNet

FORMAT = "acsgregistration-checkpoint"
FORMAT_VERSION = 2  # 2: content_sha256 (files of version 1 have none and are loaded unchecked)


def content_hash(model_config: Dict[str, Any], state: Dict[str, torch.Tensor]) -> str:
    """SHA-256 of a model configuration and its weights (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256(json.dumps(model_config, sort_keys=True).encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def versions() -> Dict[str, str]:
    return {"acsgregistration": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


def save_checkpoint(path: str, model: torch.nn.Module, model_config: ModelConfig, half: bool = False,
                    **extra: Any) -> str:
    """Write a checkpoint; ``extra`` holds training state (optimizer, step, history, summary, ...)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half:
        # Halves the file for shipping; weights are cast back to float32 on load.
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    config = to_dict(model_config)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_config": config, "state_dict": state,
               "content_sha256": content_hash(config, state), "versions": versions(),
               "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    payload.update(extra)
    write_atomically(lambda tmp: torch.save(payload, tmp), path)
    return path


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        text = str(exc)
        if "weights only" in text.lower() or "weights_only" in text:
            # Not torch's advice to load it with weights_only=False: that would run whatever code the file holds.
            reason = ("it is damaged, or holds Python objects besides weights and settings (never loaded: they "
                      "could run code)")
        else:
            reason = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt, truncated or foreign): "
                              f"{reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ACSGRegistration checkpoint (no '{FORMAT}' marker)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {payload.get('format_version')}; this version of "
                              f"ACSGRegistration reads format {FORMAT_VERSION} or older: please update")
    for key in ("model_config", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path} lacks '{key}'")
    verify_content(payload, path)
    try:
        payload["model_config_obj"] = model_config_from_dict(payload["model_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has an invalid model configuration: {exc}") from exc
    return payload


def verify_content(payload: Dict[str, Any], path: str) -> None:
    """The file's checksum matches its weights and configuration, and every weight is finite."""
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: its 'state_dict' is not a set of named tensors")
    expected = payload.get("content_sha256")
    if expected is None and payload.get("format_version", 0) >= 2:
        raise CheckpointError(f"{path} lacks its checksum ('content_sha256'): it was altered after it was written")
    if expected is not None and content_hash(payload["model_config"], state) != expected:
        raise CheckpointError(f"{path} is damaged: its weights or settings differ from those it was written with "
                              "(checksum mismatch); use an intact copy")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path} holds NaN or infinite weights ({name}): the training that wrote it "
                                  "diverged; use an earlier checkpoint")


def build_model(payload: Dict[str, Any], path: str = "checkpoint",
                config: Optional[ModelConfig] = None) -> RegistrationNet:
    """The network described by a loaded checkpoint, with its weights (checked against the config)."""
    cfg = config or payload["model_config_obj"]
    model = RegistrationNet(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        def few(keys):
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        parts = [f"{len(missing)} missing ({few(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({few(unexpected)})" if unexpected else "",
                 f"{len(wrong)} of another shape ({few(wrong)})" if wrong else ""]
        raise CheckpointError(f"{path}: weights do not fit a {cfg.method} network of this configuration: "
                              + "; ".join(p for p in parts if p))
    model.load_state_dict(state)
    return model
