"""Physical-space geometry: voxel coordinate maps to ITK displacement fields (mm, LPS) and back.

The network works in voxel positions of its crops, in array order (z, y, x). Everything that leaves the
backend is physical: a displacement field on the fixed image's grid whose vectors are millimetres in
ITK's LPS world, so that ITK, SimpleITK, ANTs and Slicer apply it identically (a fixed-space point p is
mapped to the moving-space point p + u(p): ITK's resampling convention).
"""

import csv
import os
import struct
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor

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


# The step (mm) exported displacement fields are rounded to, about a micrometre: the transform files store them
# so (``write_transform``), in float32 (which holds such values exactly up to 16 m) and compressed, 2-3 bytes a
# voxel instead of SimpleITK's 24. A field so rounded is within half a step of the exact one.
FIELD_STEP = 2.0 ** -10


def rounded_to_field_step(values: np.ndarray) -> np.ndarray:
    return np.round(values / FIELD_STEP) * FIELD_STEP


def tapered_field(field: sitk.Image, max_band: int = 32) -> sitk.Image:
    """``field`` extended beyond its grid by a band over which it falls linearly to zero, rounded to FIELD_STEP.

    Outside a displacement field's grid ITK, SimpleITK and ANTs apply the identity while Slicer continues the
    edge displacement; with a field that is zero at its own edge, every tool applies the same map everywhere.
    The band is as wide as needed for the field to fall by at most half a voxel per voxel (no folding in it),
    at least one voxel and at most ``max_band``; inside the original grid the field is unchanged but for the
    rounding (within FIELD_STEP / 2), which makes it the very field the transform files hold.
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
    padded = rounded_to_field_step(padded)
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
    """An ITK transform file (.h5, .tfm, ...), as ITK, SimpleITK, ANTs and Slicer read it. A .h5 file of an
    affine and displacement fields (``composite_transform``) is written lean (see below: 5-10x smaller, the
    map within a micrometre); anything else as SimpleITK writes it."""
    parts = _lean_parts(transform) if path.lower().endswith((".h5", ".hdf5")) else None
    if parts is None:
        write_atomically(lambda tmp: sitk.WriteTransform(transform, tmp), path)
    else:
        write_atomically(lambda tmp: _write_hdf5(parts, tmp), path)


# --- Lean ITK transform files --------------------------------------------------------------------------------
# SimpleITK writes a displacement field transform's parameters as uncompressed doubles: 24 bytes a voxel, 46 MB
# for a registration's forward_transform.h5. ITK's HDF5 transform reader (in SimpleITK, ANTs and Slicer alike)
# reads parameters stored as float32 as well as doubles (it converts them) and decompresses what HDF5's built-in
# filters compressed. So the same ITK transform file (the same groups, the same ..._double_3_3 type names) is
# written here with the fields' values rounded to FIELD_STEP (exported fields already are: ``tapered_field``),
# in float32 (which holds them exactly), byte-shuffled and deflated: 2-3 bytes a voxel. The affine and every
# fixed parameter stay doubles. HDF5 itself is written directly (``_write_hdf5``: no h5py, which Slicer's Python
# does not bundle).

FIELD_DEFLATE_LEVEL = 4  # zlib level: 6-9 save a few per cent more in 1.5-5x the time
_LEAN_TYPES = ("AffineTransform", "DisplacementFieldTransform")


def _lean_parts(transform):
    """The file's tree as ITK's HDF5 transform writer lays it out (/TransformGroup/N/TransformType, ...
    FixedParameters, ...Parameters, a composite first as itself, then its transforms in order), the fields'
    values rounded and in float32; None where ``transform`` holds no displacement field or anything else."""
    dim = transform.GetDimension()
    suffix = f"_double_{dim}_{dim}"
    groups = []
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        transforms = [composite.GetNthTransform(i) for i in range(composite.GetNumberOfTransforms())]
        groups.append({"TransformType": "CompositeTransform" + suffix})
    else:
        transforms = [transform]
    names = [t.GetName() for t in transforms]
    if "DisplacementFieldTransform" not in names or any(name not in _LEAN_TYPES for name in names) \
            or len(names) + 1 > 2 * _GROUP_LEAF_K:  # a group this writer lays out holds up to 8 members
        return None
    for t, name in zip(transforms, names):
        fixed = np.asarray(t.GetFixedParameters(), dtype=np.float64)
        if name == "DisplacementFieldTransform":
            # ITK's parameters are the field's buffer: x fastest, the components of each voxel together.
            field = sitk.DisplacementFieldTransform(t).GetDisplacementField()  # kept alive while viewed
            params = rounded_to_field_step(sitk.GetArrayViewFromImage(field).reshape(-1)).astype(np.float32)
        else:
            params = np.asarray(t.GetParameters(), dtype=np.float64)
        groups.append({"TransformType": name + suffix, "TransformFixedParameters": fixed,
                       "TransformParameters": params})
    return {"TransformGroup": {str(i): group for i, group in enumerate(groups)}}


_UNDEFINED = 0xFFFFFFFFFFFFFFFF  # HDF5's undefined address
_GROUP_LEAF_K, _GROUP_NODE_K, _CHUNK_NODE_K = 4, 16, 32  # B-tree widths (HDF5's defaults, in the superblock)
_CHUNK = 1 << 20  # values a chunk (as ITK's own compressed writer)


def _write_hdf5(tree, path: str, level: int = FIELD_DEFLATE_LEVEL):
    """Just enough of the HDF5 file format for an ITK transform file, in its oldest, most widely read form
    (version 0 superblock, version 1 object headers, groups as symbol tables: HDF5 1.6 and later read it).
    ``tree``: a dict of groups (dicts) and datasets: a str (a variable-length string, as ITK writes them), a
    1-D float64 array (stored as it is) or a 1-D float32 array (chunked, byte-shuffled and deflated)."""
    out = bytearray(96)  # the superblock, filled in last

    def put(data) -> int:
        out.extend(bytes(-len(out) % 8))
        address = len(out)
        out.extend(data)
        return address

    def header(*messages) -> int:  # a version 1 object header: messages of (type, body)
        body = b"".join(struct.pack("<HHB3x", kind, len(data) + (-len(data) % 8), 0) + data + bytes(-len(data) % 8)
                        for kind, data in messages)
        return put(struct.pack("<BBHII4x", 1, 0, len(messages), 1, len(body)) + body)

    # Every string in one global heap collection (at least 4 KiB, as HDF5 reads one).
    strings, index = [], {}

    def collect(node):
        for value in node.values():
            if isinstance(value, dict):
                collect(value)
            elif isinstance(value, str) and value not in index:
                index[value] = len(strings) + 1
                strings.append(value.encode("ascii"))
    collect(tree)
    objects = b"".join(struct.pack("<HH4xQ", i, 0, len(s)) + s + bytes(-len(s) % 8)
                       for i, s in enumerate(strings, 1))
    size = max(4096, 16 + len(objects) + 16)
    heap = put(b"GCOL" + struct.pack("<B3xQ", 1, size) + objects
               + struct.pack("<HH4xQ", 0, 0, size - 16 - len(objects)) + bytes(size - 32 - len(objects)))

    def dataset(value) -> int:
        if isinstance(value, str):  # one variable-length ASCII string, its bytes in the global heap
            n = 1
            dtype = (struct.pack("<BBBBI", 0x19, 0x01, 0, 0, 16)  # vlen string, null-terminated, ASCII
                     + struct.pack("<BBBBIHH", 0x10, 0, 0, 0, 1, 0, 8))  # of unsigned bytes
            fill = 1  # allocated early (compact)
            layout = struct.pack("<BBH", 3, 0, 16) + struct.pack("<IQI", len(value), heap, index[value])
            messages = []
        else:
            value = np.ascontiguousarray(value)
            n, itemsize = value.size, value.dtype.itemsize
            if value.dtype not in (np.float32, np.float64) or value.ndim != 1:
                raise ValueError("datasets are 1-D float32 or float64 arrays")
            little = value.astype(value.dtype.newbyteorder("<"), copy=False)
            sign, exponent, mantissa, bias = (31, 8, 23, 127) if itemsize == 4 else (63, 11, 52, 1023)
            dtype = (struct.pack("<BBBBI", 0x11, 0x20, sign, 0, itemsize)  # IEEE float, little-endian
                     + struct.pack("<HHBBBBI", 0, 8 * itemsize, mantissa, exponent, 0, mantissa, bias))
            if value.dtype == np.float64:
                fill = 2  # allocated late (contiguous)
                layout = struct.pack("<BBQQ", 3, 1, put(little.tobytes()), n * itemsize)
                messages = []
            else:
                # Chunks of _CHUNK values (more for a longer array: one B-tree node holds them all), the last
                # one padded, each byte-shuffled (HDF5 filter 2) then deflated (filter 1, zlib).
                chunk = max(_CHUNK, -(-n // (2 * _CHUNK_NODE_K)))
                count = -(-n // chunk)
                padded = np.zeros(count * chunk, little.dtype)
                padded[:n] = little

                def compress(i):  # zlib lets go of the GIL: the chunks are compressed side by side
                    raw = padded[i * chunk:(i + 1) * chunk].view(np.uint8).reshape(-1, itemsize).T.tobytes()
                    return zlib.compress(raw, level)
                with ThreadPoolExecutor(max_workers=min(count, os.cpu_count() or 1)) as pool:
                    compressed = list(pool.map(compress, range(count)))
                children = [put(data) for data in compressed]
                keys = [struct.pack("<IIQQ", len(data), 0, i * chunk, 0) for i, data in enumerate(compressed)]
                keys.append(struct.pack("<IIQQ", 0, 0, count * chunk, itemsize))
                node = (b"TREE" + struct.pack("<BBHQQ", 1, 0, count, _UNDEFINED, _UNDEFINED)
                        + b"".join(k + struct.pack("<Q", c) for k, c in zip(keys, children)) + keys[-1])
                node += bytes(24 + 2 * _CHUNK_NODE_K * 8 + (2 * _CHUNK_NODE_K + 1) * 24 - len(node))
                fill = 3  # allocated incrementally (chunked)
                layout = struct.pack("<BBBQII", 3, 2, 2, put(node), chunk, itemsize)
                messages = [(0x000B, struct.pack("<BB6x", 1, 2)  # filter pipeline: shuffle, deflate
                             + struct.pack("<HHHHI4x", 2, 0, 1, 1, itemsize)
                             + struct.pack("<HHHHI4x", 1, 0, 1, 1, level))]
        return header((0x0001, struct.pack("<BBBB4xQ", 1, 1, 0, 0, n)),  # dataspace: 1-D, n
                      (0x0003, dtype), (0x0005, struct.pack("<BBBB", 2, fill, 2, 0)),  # fill value: none
                      (0x0008, layout), *messages)

    def group(node):
        """A group: its object header, B-tree and local heap (addresses), the links in one symbol-table
        node, sorted by name (as HDF5 looks them up)."""
        names = sorted(node)
        if not 0 < len(names) <= 2 * _GROUP_LEAF_K:
            raise ValueError(f"a group of {len(names)} members: 1 to {2 * _GROUP_LEAF_K} here")
        names_heap, offsets, entries = bytearray(8), [], b""  # offset 0: the empty name
        for name in names:
            offsets.append(len(names_heap))
            encoded = name.encode("ascii") + b"\0"
            names_heap += encoded + bytes(-len(encoded) % 8)
            child = node[name]
            if isinstance(child, dict):
                address, btree, local = group(child)
                entries += struct.pack("<QQIIQQ", offsets[-1], address, 1, 0, btree, local)
            else:
                entries += struct.pack("<QQII16x", offsets[-1], dataset(child), 0, 0)
        snod = b"SNOD" + struct.pack("<BBH", 1, 0, len(names)) + entries
        snod += bytes(8 + 2 * _GROUP_LEAF_K * 40 - len(snod))
        # One child (the symbol-table node) between the keys "" and its last name.
        node_bytes = (b"TREE" + struct.pack("<BBHQQ", 0, 0, 1, _UNDEFINED, _UNDEFINED)
                      + struct.pack("<QQQ", 0, put(snod), offsets[-1]))
        btree = put(node_bytes + bytes(24 + 2 * _GROUP_NODE_K * 8 + (2 * _GROUP_NODE_K + 1) * 8 - len(node_bytes)))
        segment = put(bytes(names_heap))
        local = put(b"HEAP" + struct.pack("<B3xQQQ", 0, len(names_heap), 1, segment))  # 1: no free block
        return header((0x0011, struct.pack("<QQ", btree, local))), btree, local

    root, btree, local = group(tree)
    # The superblock (version 0): 8-byte addresses and lengths, the B-tree widths, no free-space manager, the
    # file's end, no driver block; then the root group's symbol-table entry (its B-tree and heap cached).
    out[:96] = (b"\x89HDF\r\n\x1a\n" + struct.pack("<8BHHI", 0, 0, 0, 0, 0, 8, 8, 0, _GROUP_LEAF_K, _GROUP_NODE_K, 0)
                + struct.pack("<QQQQ", 0, _UNDEFINED, len(out), _UNDEFINED)
                + struct.pack("<QQII", 0, root, 1, 0) + struct.pack("<QQ", btree, local))
    with open(path, "wb") as fh:
        fh.write(out)
