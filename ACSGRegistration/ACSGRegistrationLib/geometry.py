"""Physical-space geometry: voxel coordinate maps to ITK displacement fields (mm, LPS) and back.

The network works in voxel positions of its crops, in array order (z, y, x). Everything that leaves the
backend is physical: a displacement field on the fixed image's grid whose vectors are millimetres in
ITK's LPS world, so that ITK, SimpleITK, ANTs and Slicer apply it identically (a fixed-space point p is
mapped to the moving-space point p + u(p): ITK's resampling convention).
"""

import csv
import os
import tempfile

import numpy as np
import SimpleITK as sitk

from .errors import OutputError

_REVERSE = np.eye(4)[[2, 1, 0, 3]]  # (z, y, x, 1) <-> (x, y, z, 1)


def ijk_to_physical_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 matrix taking homogeneous image indices (i, j, k, 1) (SimpleITK's order) to LPS points."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = direction @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return m


def index_to_physical_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 matrix taking homogeneous array-order indices (z, y, x, 1) to LPS points."""
    return ijk_to_physical_matrix(image) @ _REVERSE


def voxel_affine_matrix(matrix: np.ndarray, fixed_shape, moving_shape) -> np.ndarray:
    """The network's centred (3, 4) affine as a 4x4 map of array-order voxel positions."""
    a = np.asarray(matrix, dtype=np.float64)
    c_f = (np.asarray(fixed_shape, dtype=np.float64) - 1) / 2
    c_m = (np.asarray(moving_shape, dtype=np.float64) - 1) / 2
    m = np.eye(4)
    m[:3, :3] = a[:, :3]
    m[:3, 3] = a[:, 3] + c_m - a[:, :3] @ c_f
    return m


def physical_affine(matrix: np.ndarray, fixed: sitk.Image, moving: sitk.Image) -> np.ndarray:
    """4x4 LPS matrix mapping fixed physical points to moving physical points (resampling direction)."""
    fixed_shape = fixed.GetSize()[::-1]
    moving_shape = moving.GetSize()[::-1]
    return (index_to_physical_matrix(moving) @ voxel_affine_matrix(matrix, fixed_shape, moving_shape)
            @ np.linalg.inv(index_to_physical_matrix(fixed)))


# The same physical point in ITK's LPS and Slicer's RAS: x and y negated (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(matrix: np.ndarray) -> np.ndarray:
    return LPS_TO_RAS @ matrix @ LPS_TO_RAS


def affine_transform(matrix4: np.ndarray) -> sitk.AffineTransform:
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(matrix4[:3, :3].ravel()))
    t.SetTranslation(tuple(matrix4[:3, 3]))
    return t


def apply_homogeneous(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """A 4x4 matrix applied to (3, N) points."""
    return matrix[:3, :3] @ points + matrix[:3, 3:4]


def voxel_points(image: sitk.Image) -> np.ndarray:
    """(3, N) LPS points of every voxel of ``image``, in array (z, y, x) order of the voxels."""
    shape = image.GetSize()[::-1]
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    return apply_homogeneous(index_to_physical_matrix(image), index.reshape(3, -1))


def coordinates_to_field(coords: np.ndarray, reference: sitk.Image, target: sitk.Image) -> sitk.Image:
    """Displacement field (LPS mm) on ``reference``'s grid from a (3, D, H, W) map of voxel positions
    (array order) in ``target``: u(p) = target_point(coords) - p."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.shape[1:] != reference.GetSize()[::-1]:
        raise ValueError(f"coordinate map {coords.shape[1:]} does not match the reference grid "
                         f"{reference.GetSize()[::-1]}")
    field = apply_homogeneous(index_to_physical_matrix(target), coords.reshape(3, -1)) - voxel_points(reference)
    return image_like(field.T.reshape(*coords.shape[1:], 3), reference, is_vector=True)


def field_to_coordinates(field: sitk.Image, target: sitk.Image) -> np.ndarray:
    """Inverse of ``coordinates_to_field``: voxel positions (array order) in ``target``."""
    u = sitk.GetArrayFromImage(field).astype(np.float64)  # (D, H, W, 3) LPS
    points = voxel_points(field) + u.reshape(-1, 3).T
    return apply_homogeneous(np.linalg.inv(index_to_physical_matrix(target)), points).reshape(3, *u.shape[:3])


def displacement_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    # The transform takes ownership of the image it is given: hand it a copy.
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def tapered_field(field: sitk.Image, max_band: int = 32) -> sitk.Image:
    """``field`` extended beyond its grid by a band over which it falls linearly to zero.

    Outside a displacement field's grid ITK, SimpleITK and ANTs apply the identity while Slicer continues the
    edge displacement; with a field that is zero at its own edge, every tool applies the same map everywhere.
    The band is as wide as needed for the field to fall by at most half a voxel per voxel (no folding in it),
    at least one voxel and at most ``max_band``; inside the original grid the field is unchanged.
    """
    u = sitk.GetArrayFromImage(field).astype(np.float64)  # (D, H, W, 3)
    faces = np.concatenate([u[[0, -1]].reshape(-1, 3), u[:, [0, -1]].reshape(-1, 3), u[:, :, [0, -1]].reshape(-1, 3)])
    edge = float(np.linalg.norm(faces, axis=1).max()) if faces.size else 0.0
    band = int(min(max_band, max(1, np.ceil(2.0 * edge / min(field.GetSpacing())))))
    padded = np.pad(u, [(band, band)] * 3 + [(0, 0)], mode="edge")
    rise = np.arange(band) / band  # 0 at the band's outer voxel
    for axis, n in enumerate(u.shape[:3]):
        weights = np.concatenate([rise, np.ones(n), rise[::-1]])
        padded *= weights.reshape([-1 if a == axis else 1 for a in range(3)] + [1])
    out = sitk.GetImageFromArray(padded, isVector=True)
    out.SetSpacing(field.GetSpacing())
    out.SetDirection(field.GetDirection())
    out.SetOrigin(field.TransformContinuousIndexToPhysicalPoint([-float(band)] * 3))
    return out


def composite_transform(affine4: np.ndarray, deformable: sitk.Image) -> sitk.CompositeTransform:
    """The map p -> A(p + u(p)) as one ITK transform: the displacement first, then the affine (ITK applies a
    composite transform's last transform first). Written to .h5, ITK, SimpleITK, ANTs and Slicer read it."""
    return sitk.CompositeTransform([affine_transform(affine4), displacement_transform(deformable)])


def inverse_composite_transform(affine4: np.ndarray, inverse_deformable: sitk.Image) -> sitk.CompositeTransform:
    """The inverse map q -> r + w(r), r = A^-1 q, ``inverse_deformable`` w being on the fixed grid."""
    return sitk.CompositeTransform([displacement_transform(inverse_deformable),
                                    affine_transform(np.linalg.inv(affine4))])


def image_like(array: np.ndarray, reference: sitk.Image, is_vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array), isVector=is_vector)
    image.CopyInformation(reference)
    return image


def model_grid(image: sitk.Image, shape_zyx, spacing: float) -> sitk.Image:
    """The network's grid for a crop: the model's size and voxel size, the crop's centre and direction."""
    size = tuple(int(n) for n in shape_zyx[::-1])
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()]))
    reference = sitk.Image(size, sitk.sitkUInt8)
    reference.SetSpacing([float(spacing)] * 3)
    reference.SetDirection(image.GetDirection())
    half_extent = np.asarray(image.GetDirection()).reshape(3, 3) @ (float(spacing) * (np.asarray(size) - 1) / 2.0)
    reference.SetOrigin(tuple(centre - half_extent))
    return reference


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6))


def onto(image: sitk.Image, reference: sitk.Image, transform=None, label: bool = False) -> sitk.Image:
    """Resample onto ``reference`` (identity by default); labels linearly, then thresholded at 0.5."""
    transform = transform if transform is not None else sitk.Transform()
    if label:
        soft = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), reference, transform, sitk.sitkLinear, 0.0)
        return sitk.Cast(soft > 0.5, sitk.sitkUInt8)
    # Nearest-neighbour extrapolation keeps fields defined where the reference reaches past the source.
    return sitk.Resample(image, reference, transform, sitk.sitkLinear, 0.0, image.GetPixelID(), True)


def atomic_path(path: str):
    """A temporary name beside ``path`` that keeps its extension (writers choose the format by it)."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + name, dir=directory)
    os.close(fd)
    return tmp


def write_atomically(write, path: str):
    """Run ``write(tmp_path)`` and move the result over ``path`` only once it is complete."""
    try:
        tmp = atomic_path(path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        write(tmp)
        # mkstemp creates owner-only files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # a full disk, permissions; ITK's writers raise RuntimeError
        _remove(tmp)
        if isinstance(exc, OutputError):
            raise
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (lines[-1] if lines else repr(exc))
        raise OutputError(f"cannot write {path}: {reason}") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


def write_text(text: str, path: str):
    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
    write_atomically(write, path)


def write_csv(rows, path: str, fieldnames=None):
    """Dict rows as CSV, written atomically; columns default to every key, in order of appearance."""
    if fieldnames is None:
        fieldnames = []
        for row in rows:
            fieldnames += [k for k in row if k not in fieldnames]

    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames)
            writer.writeheader()
            writer.writerows(rows)
    write_atomically(write, path)


def write_image(image: sitk.Image, path: str):
    """Compressed where the name ends in .gz: masked images and label maps shrink 10-100x. Maps of floats that
    vary everywhere (displacement fields, Jacobian maps) go to plain .nii: gzip shrinks them by 12-20 % in
    10-16x the time of writing them raw (a registration's 1 s)."""
    write_atomically(lambda tmp: sitk.WriteImage(image, tmp, path.endswith(".gz")), path)


def write_field(field: sitk.Image, path: str):
    """A displacement field in float32 (0.01 um steps at 100 mm: far below any image's precision; half the
    bytes of float64). Readers that need float64, as ITK's displacement transform does, cast it back."""
    write_image(sitk.Cast(field, sitk.sitkVectorFloat32), path)


def write_transform(transform, path: str):
    write_atomically(lambda tmp: sitk.WriteTransform(transform, tmp), path)
