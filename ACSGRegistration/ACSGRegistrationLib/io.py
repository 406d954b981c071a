"""Reading images whole, with errors that name the file; checking that a written file is complete.

ITK reads a truncated NIfTI file (``.nii`` or ``.nii.gz``) without complaint, filling everything after the
cut with zeros (0 HU: a scan that silently ends in water). Other formats (NRRD, MetaImage) fail on their own.
So NIfTI files are checked against their header first: the gzip stream must end properly and hold the
header's offset plus every voxel the header declares (read from the gzip trailer where it says so, else by
decompressing the file: a whole pass, as long as reading it). The same check verifies the files this package
writes before an output folder is published (``outputs.OutputFolder``).

ITK's NIfTI reader also turns NaN and infinite voxels into 0 without a word (NRRD and MetaImage keep them): a
scan with NaN over its vertebra would be read as water there. The voxels of a float NIfTI file are therefore
checked in the file itself (``nonfinite_nifti_voxels``), so that such a file is refused as the others are.
"""

import gzip
import os
import struct
import zlib
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_CHUNK = 1 << 22


def _nifti_header(header: bytes):
    """(byte order, dims, bitpix, datatype code, voxel offset) of a NIfTI-1 or NIfTI-2 header, or None if it is
    not one."""
    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            return (order, struct.unpack(order + "8h", header[40:56]), struct.unpack(order + "h", header[72:74])[0],
                    struct.unpack(order + "h", header[70:72])[0], int(struct.unpack(order + "f", header[108:112])[0]))
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            return (order, struct.unpack(order + "8q", header[16:80]), struct.unpack(order + "h", header[14:16])[0],
                    struct.unpack(order + "h", header[12:14])[0], int(struct.unpack(order + "q", header[168:176])[0]))
    return None


def _nifti_header_size(header: bytes):
    """The expected file length in bytes from a NIfTI header, or None if it is not one."""
    parsed = _nifti_header(header)
    if parsed is None:
        return None
    _, dims, bitpix, _, offset = parsed
    count = 1
    for n in dims[1:1 + max(0, min(int(dims[0]), 7))]:
        count *= max(int(n), 1)
    return int(offset) + count * int(bitpix) // 8


def _decompressed_length(path: str) -> Tuple[int, bytes]:
    """(length, first 540 bytes) of a gzip file's content; raises EOFError/zlib.error where it is cut or damaged."""
    with gzip.open(path, "rb") as fh:
        head = fh.read(540)
        length = len(head)
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                return length, head
            length += len(chunk)


def _trailer_length(path: str) -> int:
    """The length a gzip file's trailer records (ISIZE: the content's length modulo 2**32)."""
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return struct.unpack("<I", fh.read(4))[0]


def _gzip_head(path: str) -> bytes:
    with gzip.open(path, "rb") as fh:
        return fh.read(540)


def incomplete_reason(path: str) -> str:
    """Why a NIfTI file is not whole ('' when it is, or when it is not NIfTI and its reader checks itself)."""
    lower = path.lower()
    if not lower.endswith(NIFTI_SUFFIXES):
        return ""
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty"
    try:
        if lower.endswith(".gz"):
            # Fast path: a whole single-stream file's trailer records the header's length (a cut file's last
            # bytes are compressed data, which match it once in 2**32). Otherwise everything is decompressed:
            # multi-stream files, files with bytes after the voxels, and damaged files (then named exactly).
            expected = _nifti_header_size(_gzip_head(path)) if size > 8 else None
            if expected is not None and _trailer_length(path) == expected % 2 ** 32:
                return ""
            length, head = _decompressed_length(path)
        else:
            length = size
            with open(path, "rb") as fh:
                head = fh.read(540)
    except (EOFError, zlib.error, OSError) as exc:
        return f"its compressed data is cut short or damaged ({exc})"
    expected = _nifti_header_size(head)
    if expected is None:
        return "it has no NIfTI header"
    if length < expected:
        return f"it holds {length} bytes where its header declares {expected} (truncated: copy it again)"
    return ""


# NIfTI datatype codes of real floats -> numpy types.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_float_layout(header: bytes) -> Optional[Tuple[str, int]]:
    """(numpy dtype with byte order, voxel data offset) of a float NIfTI-1/2 file, None for other types."""
    parsed = _nifti_header(header)
    if parsed is None or parsed[3] not in _NIFTI_FLOATS:
        return None
    return parsed[0] + _NIFTI_FLOATS[parsed[3]], parsed[4]


def nonfinite_nifti_voxels(path: str) -> Tuple[int, int]:
    """(NaN or infinite voxels, voxels) in a float NIfTI file's data; (0, 0) for any other file."""
    if not path.lower().endswith(NIFTI_SUFFIXES):
        return 0, 0
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        layout = _nifti_float_layout(fh.read(540))
        if layout is None:
            return 0, 0
        dtype, offset = np.dtype(layout[0]), layout[1]
        fh.seek(offset)
        bad = total = 0
        rest = b""
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            chunk = rest + chunk
            usable = len(chunk) - len(chunk) % dtype.itemsize
            values = np.frombuffer(chunk[:usable], dtype=dtype)
            bad += int(np.count_nonzero(~np.isfinite(values)))
            total += values.size
            rest = chunk[usable:]
    return bad, total


def check_nifti_finite(path: str, what: str) -> None:
    """Refuse a float NIfTI file that holds NaN or infinite voxels (ITK would read them as 0)."""
    bad, total = nonfinite_nifti_voxels(path)
    if bad == total and total:
        raise InputError(f"{what} {path} holds no number: every one of its {total} voxels is NaN or infinite")
    if bad:
        raise InputError(f"{what} {path} has {bad} NaN or infinite voxel(s) ({100.0 * bad / total:.2g} % of "
                         "them): replace them (or crop them away) first")


def read_image(path: str, what: str = "image") -> sitk.Image:
    """A whole 3D scalar image from ``path``; errors name ``what`` and the file."""
    image = read_whole(path, what)
    if image.GetDimension() != 3:
        raise InputError(f"{what} {path} is {image.GetDimension()}D; a 3D volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} {path} has {image.GetNumberOfComponentsPerPixel()} values per voxel "
                         "(a colour or vector image); a scalar volume is needed")
    return image


def read_whole(path: str, what: str = "image") -> sitk.Image:
    """An image of any dimension from ``path``, refused where the file is missing, cut short or unreadable."""
    if os.path.isdir(path):
        raise InputError(f"{what} {path} is a folder: give an image file (NIfTI, NRRD, MetaImage, a DICOM "
                         "file, ...)")
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path}")
    reason = incomplete_reason(path)
    if reason:
        raise InputError(f"cannot read {what} {path}: {reason}")
    check_nifti_finite(path, what)
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise InputError(f"cannot read {what} {path}: {lines[-1] if lines else 'unknown format'}") from exc
    return image
