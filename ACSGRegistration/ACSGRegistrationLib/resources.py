"""Where the shipped models are, whether the backend runs from the Slicer module's folder or is installed.

Installed (``pip install``), the models travel inside the package as ``ACSGRegistrationLib/models``; run from
the module's folder (Slicer, or an editable install), they are the module's ``Resources/Models``. Imports
nothing heavy: the Slicer module reads this before its dependencies are checked.
"""

import os

from .errors import InputError

DEFAULT_MODEL = "acsgregnet_default.pt"
BASELINE_MODEL = "avoxelmorph_baseline.pt"
PROST_MODEL = "prost_lumbar.pt"  # CT to X-ray: ProST's learned similarity
PLANAR_MODEL = "planar_lumbar.pt"  # 2D deformable (Shan et al. 2017)
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
MODEL_FOLDERS = (os.path.join(_PACKAGE, "models"),  # installed package
                 os.path.join(os.path.dirname(_PACKAGE), "Resources", "Models"))  # the Slicer module's folder


def shipped_model_path(name: str = DEFAULT_MODEL, must_exist: bool = True) -> str:
    """Path of a shipped model file (the default model unless ``name`` says otherwise)."""
    for folder in MODEL_FOLDERS:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    if must_exist:
        raise InputError(f"the shipped model {name} is not installed (looked in {', '.join(MODEL_FOLDERS)}): "
                         "pass a checkpoint file")
    return os.path.join(MODEL_FOLDERS[-1], name)


def shipped_planar_model_path() -> str:
    """The shipped 2D model."""
    return shipped_model_path(PLANAR_MODEL)


RUN_FILE_NAMES = ("model", "last", "best", "init")  # what training runs call their files


def model_labels(paths) -> list:
    """How tables name each model file: its file name without ``.pt``, or for a training run's generic files
    (``model.pt``, ``last.pt``...) ``run/model``; files that would still share a name get ``#2``, ``#3``... so that
    two models never merge into one row of a table."""
    labels = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in RUN_FILE_NAMES:
            stem = f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{stem}"
        label, n = stem, 1
        while label in labels:
            n += 1
            label = f"{stem} #{n}"
        labels.append(label)
    return labels
