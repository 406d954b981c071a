"""The model the module registers with: the shipped one (referenced by name, so that a saved scene or the
settings never hold this installation's path) or a checkpoint file the user chose."""

import os

from ACSGRegistrationLib.errors import InputError
from ACSGRegistrationLib.resources import DEFAULT_MODEL

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL_PATH = os.path.join(MODULE_DIR, "Resources", "Models", DEFAULT_MODEL)


def isUnset(path) -> bool:
    """An empty path parameter ("" or ".": what an unset pathlib.Path reads as)."""
    return path is None or str(path).strip() in ("", ".")


def isShipped(checkpoint) -> bool:
    """Whether ``checkpoint`` means the shipped model: unset, its file name alone (what the panel stores, so
    that a saved scene means the shipped model wherever it is opened), or its installed path."""
    if isUnset(checkpoint):
        return True
    text = str(checkpoint).strip()
    return text == DEFAULT_MODEL or os.path.abspath(os.path.expanduser(text)) == os.path.abspath(DEFAULT_MODEL_PATH)


def resolveCheckpoint(checkpoint=None, check: bool = True) -> str:
    """The checkpoint file to use; the shipped model when none is given. Raises when there is none."""
    path = DEFAULT_MODEL_PATH if isShipped(checkpoint) else os.path.expanduser(str(checkpoint))
    if check and not os.path.isfile(path):
        if path == DEFAULT_MODEL_PATH:
            raise InputError(f"the shipped model is not installed ({DEFAULT_MODEL_PATH}): choose a "
                             "checkpoint file (.pt) under Model")
        raise InputError(f"checkpoint not found: {path}")
    return path


def describeModel(checkpoint=None) -> str:
    """One line for the panel about the chosen model (no file is loaded)."""
    path = resolveCheckpoint(checkpoint, check=False)
    if not os.path.isfile(path):
        if isShipped(checkpoint):
            return "The shipped model is not installed: choose a checkpoint file (.pt)."
        return "File not found: choose a checkpoint file (.pt)."
    what = "shipped model" if isShipped(checkpoint) else os.path.basename(path)
    return f"{what} ({os.path.getsize(path) / 1e6:.1f} MB)"
