"""The backend's Python packages inside Slicer, asked for per section: PyTorch through the PyTorch extension (the
build that suits the GPU driver, at least ``TORCH_MINIMUM``), the others through pip, each only after the user
agrees. A PyTorch upgraded while an older one is loaded in Slicer's process takes effect after a restart: the user
is asked to restart then."""

import importlib.util
import sys
from typing import List

import slicer

from ACSGRegistrationLib.errors import DependencyError

# Packages each section needs besides PyTorch (import name -> pip requirement). Slicer bundles numpy, scipy and
# SimpleITK; the CT to X-ray pose search needs cmaes. No section needs a figure library in Slicer (the backend's
# figures are written only on the command line, on request).
BASE_PACKAGES = {"numpy": "numpy", "SimpleITK": "SimpleITK", "scipy": "scipy"}
SECTION_PACKAGES = {"registration": BASE_PACKAGES, "planar": BASE_PACKAGES, "finetune": BASE_PACKAGES,
                    "xray": {**BASE_PACKAGES, "cmaes": "cmaes"}}
# Checkpoints are read with torch.load(weights_only=True) and attention uses scaled_dot_product_attention:
# both arrived in PyTorch 2.0.
TORCH_MINIMUM = "2.0"


def hasGui() -> bool:
    app = getattr(slicer, "app", None)
    return app is not None and hasattr(app, "processEvents")


def canAsk() -> bool:
    """Whether a question can be put to the user: Slicer's main window is up (not a script in PythonSlicer)."""
    return hasGui() and hasattr(slicer.app, "topLevelWidgets") and slicer.util.mainWindow() is not None


def missingPackages(section: str = "registration") -> List[str]:
    """pip requirements of a section's packages that cannot be imported (PyTorch excluded)."""
    return [req for name, req in SECTION_PACKAGES[section].items() if importlib.util.find_spec(name) is None]


def torchAvailable() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except ValueError:  # sys.modules["torch"] is None: PyTorch was made unimportable
        return False


def _version(text: str):
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in text.split("+")[0].split(".")[:2])


def torchTooOld() -> str:
    """The installed PyTorch version when it is older than ``TORCH_MINIMUM``, else ''."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        installed = version("torch")
    except PackageNotFoundError:
        return ""
    return installed if _version(installed) < _version(TORCH_MINIMUM) else ""


def _installTorch(old: str, askConfirmation: bool) -> bool:
    """PyTorch through the PyTorch extension; False when the user declines."""
    try:
        import PyTorchUtils  # provided by the PyTorch extension
    except ImportError:
        raise DependencyError(
            f"PyTorch {TORCH_MINIMUM} or newer is needed{f' (found {old})' if old else ''}. Install the "
            "'PyTorch' extension with the Extensions Manager, restart Slicer, then run again (it installs "
            "the PyTorch build that suits your GPU driver).") from None
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if old or not torchLogic.torchInstalled():
        loaded = "torch" in sys.modules  # an older PyTorch already imported in Slicer's process
        if hasGui():
            slicer.util.showStatusMessage(f"Installing PyTorch >= {TORCH_MINIMUM} (this can take minutes)...")
        if torchLogic.installTorch(askConfirmation=askConfirmation,
                                   torchVersionRequirement=f">={TORCH_MINIMUM}") is None:
            return False
        if loaded and hasGui():
            if slicer.util.confirmYesNoDisplay(
                    "PyTorch was upgraded. Slicer has the older version loaded: restart Slicer now to use the new "
                    "one? (Background runs use the new one already; the 2D mode and scripts in Slicer's own "
                    "process need the restart.)"):
                slicer.util.restart()
                return False
    return True


def ensureDependencies(askConfirmation: bool = True, section: str = "registration") -> bool:
    """Make PyTorch (through the PyTorch extension) and the section's other packages importable.

    Returns False when the user declines an installation (or restarts Slicer); raises DependencyError with
    instructions when a package cannot be installed from here.
    """
    old = torchTooOld()
    if (not torchAvailable() or old) and not _installTorch(old, askConfirmation):
        return False
    missing = missingPackages(section)
    if missing:
        message = ("ACSG Registration needs these Python packages: " + ", ".join(missing)
                   + ". Install them now with pip? (This may take a few minutes.)")
        if askConfirmation and hasGui() and not slicer.util.confirmOkCancelDisplay(message):
            return False
        if not hasattr(slicer.util, "pip_install"):
            raise DependencyError("missing Python packages: " + ", ".join(missing))
        slicer.util.pip_install(" ".join(missing))
        importlib.invalidate_caches()
        still = missingPackages(section)
        if still:
            raise DependencyError("could not install: " + ", ".join(still) + "; see the Python console")
    return True
