"""Reading images with errors that name the file."""

import os

import SimpleITK as sitk

from .errors import InputError


def read_image(path: str, what: str = "image") -> sitk.Image:
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path}")
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise InputError(f"cannot read {what} {path}: {lines[-1] if lines else 'unknown format'}") from exc
    if image.GetDimension() != 3:
        raise InputError(f"{what} {path} is {image.GetDimension()}D; a 3D volume is needed")
    return image
