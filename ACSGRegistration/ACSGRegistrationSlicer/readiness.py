"""Whether each of the panel's run buttons would start a valid run, and if not, what is missing, in words the
button's tooltip and status line show: the same rules the runs apply (``inputs.checkInputs``, the vertebra
resolved by ``labels.resolveLabel``), checked before the click rather than after it. Cheap enough for every
change of the panel (a labelmap's vertebra list is read once per change of the labelmap)."""

import os
from typing import Optional, Sequence

from ACSGRegistrationLib.errors import InputError

from .labels import resolveLabel
from .models import isUnset, resolveCheckpoint
from .planarNodes import isSingleSlice

RUNNING = "Running..."


def vertebraProblem(segmentation, label, what: str) -> str:
    """'' when the chosen vertebra resolves in the segmentation, else why not."""
    try:
        resolveLabel(segmentation, label or None, what)
    except InputError as exc:
        return str(exc)[0].upper() + str(exc)[1:]
    return ""


def modelProblem(p) -> str:
    """'' when the chosen model's file is there."""
    if not os.path.isfile(resolveCheckpoint(p.checkpointPath, check=False)):
        return "No model: choose a checkpoint file (.pt) under Model"
    return ""


def isPlanarPair(p) -> bool:
    """Both volumes one slice thick: the 2D mode."""
    return isSingleSlice(p.fixedVolume) and isSingleSlice(p.movingVolume)


def registrationBlocker(p, running: bool) -> str:
    """Why Apply cannot run now ('' when it can)."""
    if running:
        return RUNNING
    if p is None or not p.fixedVolume or not p.movingVolume:
        return "Select the fixed and the moving volume"
    planar = isPlanarPair(p)
    if not planar:
        if (p.fixedSegmentation is None) != (p.movingSegmentation is None):
            missing = "moving" if p.movingSegmentation is None else "fixed"
            return (f"Select the {missing} segmentation too (whole scans: the vertebra is cropped from each), or "
                    "neither (the volumes are vertebra crops)")
    for side in ("fixed", "moving"):
        segmentation = getattr(p, f"{side}Segmentation")
        if segmentation is not None:
            reason = vertebraProblem(segmentation, getattr(p, f"{side}Label"), side)
            if reason:
                return reason
    return "" if planar else modelProblem(p)


def xrayBlocker(p, running: bool) -> str:
    """Why "Register to X-ray" cannot run now ('' when it can)."""
    if running:
        return RUNNING
    if p is None or not p.xrayCt:
        return "Select the CT"
    if isUnset(p.xrayFile):
        return "Choose the X-ray file"
    if not os.path.isfile(str(p.xrayFile)):
        return f"X-ray {p.xrayFile}: no such file"
    if not isUnset(p.xraySecondFile) and not os.path.isfile(str(p.xraySecondFile)):
        return f"Second X-ray {p.xraySecondFile}: no such file (clear the field for one view)"
    if p.xraySegmentation is not None:
        return vertebraProblem(p.xraySegmentation, p.xrayTarget, "target")
    return ""


def fineTuneBlocker(p, running: bool, scenePairs: Optional[Sequence] = None) -> str:
    """Why "Start fine-tuning" cannot run now ('' when it can)."""
    if running:
        return RUNNING
    if p is None or isUnset(p.trainingOutputFolder):
        return "Choose an output folder for the fine-tuned model"
    if isUnset(p.trainingFolder) and not scenePairs:
        return "Choose a training data folder or add pairs from the scene"
    if not isUnset(p.trainingFolder) and not os.path.isdir(os.path.expanduser(str(p.trainingFolder))):
        return f"Training data folder {p.trainingFolder}: no such folder"
    return modelProblem(p)
