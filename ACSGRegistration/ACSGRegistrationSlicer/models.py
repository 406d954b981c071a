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


# The shipped ACSGRegNet's weights are CC BY-NC-SA 4.0 (Resources/Models/LICENSE-weights.md): the panel shows that
# once, before their first use, and remembers the answer (QSettings).
WEIGHTS_LICENCE_SETTING = "ACSGRegistration/ShippedWeightsLicenceAccepted"
WEIGHTS_LICENCE_TEXT = (
    "The shipped registration model's weights were trained in part on label maps under share-alike, "
    "non-commercial licences, so they are licensed CC BY-NC-SA 4.0: use them for research and other "
    "non-commercial purposes, credit their sources, and share models fine-tuned from them under the same terms "
    "(Resources/Models/LICENSE-weights.md of the extension; "
    "https://creativecommons.org/licenses/by-nc-sa/4.0/). The code is BSD 3-Clause; for unrestricted weights, "
    "train your own model.\n\nUse the shipped weights on these terms?")


def ensureWeightsLicenceAccepted(checkpoint) -> bool:
    """True when ``checkpoint`` is not the shipped model, or its licence was accepted (now or before). Without
    Slicer's main window (scripts, PythonSlicer) there is nobody to ask: the README and the model card say it."""
    import qt
    import slicer
    from .dependencies import canAsk
    if not isShipped(checkpoint) or not canAsk():
        return True
    stored = qt.QSettings()
    if slicer.util.toBool(stored.value(WEIGHTS_LICENCE_SETTING, "false")):
        return True
    if not slicer.util.confirmOkCancelDisplay(WEIGHTS_LICENCE_TEXT, windowTitle="Licence of the shipped model"):
        return False
    stored.setValue(WEIGHTS_LICENCE_SETTING, "true")
    return True
