"""The backend's Python packages inside Slicer: PyTorch through the PyTorch extension (the build that suits the
GPU driver, at least ``TORCH_MINIMUM``), the others through pip, each only after the user agrees."""

import importlib.util
from typing import List

import slicer

from ACSGRegistrationLib.errors import DependencyError

# Packages the backend needs besides PyTorch (import name -> pip requirement). Slicer ships numpy and
# SimpleITK; scipy and cmaes (CT to X-ray pose search) are installed on demand. matplotlib is only used for
# the backend's figures.
REQUIRED_PACKAGES = {"numpy": "numpy", "SimpleITK": "SimpleITK", "scipy": "scipy", "cmaes": "cmaes"}
# Checkpoints are read with torch.load(weights_only=True) and attention uses scaled_dot_product_attention:
# both arrived in PyTorch 2.0.
TORCH_MINIMUM = "2.0"


def hasGui() -> bool:
    app = getattr(slicer, "app", None)
    return app is not None and hasattr(app, "processEvents")


def missingPackages() -> List[str]:
    """pip requirements of the backend's packages that cannot be imported (PyTorch excluded)."""
    return [req for name, req in REQUIRED_PACKAGES.items() if importlib.util.find_spec(name) is None]


def torchAvailable() -> bool:
    return importlib.util.find_spec("torch") is not None


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


def ensureDependencies(askConfirmation: bool = True) -> bool:
    """Make PyTorch (through the PyTorch extension) and the other packages importable.

    Returns False when the user declines an installation; raises DependencyError with instructions when
    a package cannot be installed from here.
    """
    old = torchTooOld()
    if not torchAvailable() or old:
        try:
            import PyTorchUtils  # provided by the PyTorch extension
        except ImportError:
            raise DependencyError(
                f"PyTorch {TORCH_MINIMUM} or newer is needed{f' (found {old})' if old else ''}. Install the "
                "'PyTorch' extension with the Extensions Manager, restart Slicer, then run again (it installs "
                "the PyTorch build that suits your GPU driver).") from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if old or not torchLogic.torchInstalled():
            if hasGui():
                slicer.util.showStatusMessage(f"Installing PyTorch >= {TORCH_MINIMUM} (this can take minutes)...")
            torch = torchLogic.installTorch(askConfirmation=askConfirmation,
                                            torchVersionRequirement=f">={TORCH_MINIMUM}")
            if torch is None:
                return False
    missing = missingPackages()
    if missing:
        message = ("ACSG Registration needs these Python packages: " + ", ".join(missing)
                   + ". Install them now with pip? (This may take a few minutes.)")
        if askConfirmation and hasGui() and not slicer.util.confirmOkCancelDisplay(message):
            return False
        if not hasattr(slicer.util, "pip_install"):
            raise DependencyError("missing Python packages: " + ", ".join(missing))
        slicer.util.pip_install(" ".join(missing))
        still = missingPackages()
        if still:
            raise DependencyError("could not install: " + ", ".join(still) + "; see the Python console")
    return True
