"""Registering two 2D images with the 2D network, in physical space.

- **Inputs**: any 2D image SimpleITK reads, or a volume one slice thick (``read_planar``: a 2D image in its
  slice's plane, whatever the slice's orientation, the plane's axes kept: ``plane_axes``); intensities by the
  2D rule (``data.to_unit``); label maps on their image's grid, the structure chosen by its label value.
- **Grids**: the network sees the fixed image's extent at the model's spacing (its direction kept), and the
  moving image on a grid of the same size centred where the moving structure is (its label's centroid, else
  the image's centre): a start that lines the two structures up, as the 3D crops do.
- **Result**: the map fixed point p -> moving point T(p) = p + u(p) on the fixed image's grid, u holding the
  centring and the network's field (``forward_field``, LPS-style physical vectors of the image's 2D frame),
  written as an ITK 2D displacement-field transform that SimpleITK and Slicer apply as the network did; the
  moving image and label resampled through it; det of T's Jacobian; Dice and ASSD of the structure, before
  (centred) and after; folding; given a true map (example2d's), the map's end-point error against it.
"""

import json
from functools import cached_property
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..geometry import write_atomically, write_image, write_text
from ..metrics import assd, folding, overlap
from ..resources import shipped_planar_model_path
from .data import to_unit
from .model_file import load_planar
from .network import PlanarNet, jacobian_determinant_2d
from .refinement import PlanarRefineConfig, refine_field

PLANAR_OUTPUTS = {
    "warped": "warped.nii.gz: the moving image on the fixed image's grid",
    "warped_label": "warped_label.nii.gz: the moving label map warped (with --moving-seg)",
    "transform": "transform.h5: the 2D displacement-field transform, fixed point -> moving point",
    "field": "field.nii: its displacement field (float32 vectors, mm)",
    "jacobian": "jacobian.nii: det of the map's Jacobian",
    "metrics": "metrics.json: Dice and ASSD before and after, folding (both labels given); the error against "
               "--true-field",
    "figure": "figure.png: fixed, moving, warped, grid, Jacobian",
}
DEFAULT_PLANAR_OUTPUTS = ("warped", "warped_label", "transform", "jacobian", "metrics")


def read_planar(path: str, what: str) -> sitk.Image:
    """A 2D scalar image from any file SimpleITK reads; a volume one slice thick becomes that slice."""
    from ..io import read_whole
    return as_planar(read_whole(path, what), f"{what} {path}")


def as_planar(image: sitk.Image, name: str) -> sitk.Image:
    channels = image.GetNumberOfComponentsPerPixel()
    if channels > 1:
        if channels in (3, 4) and image.GetPixelID() in (sitk.sitkVectorUInt8, sitk.sitkVectorUInt16):
            rgb = [sitk.GetArrayFromImage(sitk.VectorIndexSelectionCast(image, k)) for k in range(3)]
            if not (np.array_equal(rgb[0], rgb[1]) and np.array_equal(rgb[0], rgb[2])):
                raise InputError(f"{name} is a colour image (its red, green and blue differ): the registration "
                                 "reads grey levels; convert it to grey first (which channel, or what mix, is "
                                 "yours to choose)")
            image = sitk.VectorIndexSelectionCast(image, 0)  # a grey picture stored as RGB(A)
        else:
            raise InputError(f"{name} has {image.GetNumberOfComponentsPerPixel()} values per pixel; a scalar "
                             "image is needed")
    if image.GetDimension() == 3:
        size = list(image.GetSize())
        thin = [k for k, n in enumerate(size) if n == 1]
        if not thin:
            raise InputError(f"{name} is a volume of {size[0]} x {size[1]} x {size[2]} voxels: give one slice "
                             "(a 2D image, or a volume one slice thick)")
        image = _in_its_plane(image, thin[-1])
    elif image.GetDimension() != 2:
        raise InputError(f"{name} is {image.GetDimension()}D; a 2D image is needed")
    if min(image.GetSize()) < 8:
        raise InputError(f"{name} is {image.GetSize()[0]} x {image.GetSize()[1]} pixels: too small to register")
    return image


# Where a 2D image was a one-slice volume: the LPS directions of its 2D frame's x and y axes (six numbers),
# kept on the image (SimpleITK metadata) for the figure's orientation letters and Slicer's lift back to 3D.
PLANE_AXES_KEY = "ACSG_plane_axes_LPS"


def _in_its_plane(volume: sitk.Image, thin: int) -> sitk.Image:
    """A one-slice volume as a 2D image in its slice's plane. The 2D frame's axes are the two LPS axes nearest
    the plane (made orthonormal within it): a slice along the scan's axes keeps its coordinates (an axial slice
    x, y; a sagittal one y, z; a coronal one x, z), whatever the order of its array's axes; an oblique slice gets
    the nearest such frame. (Keeping the volume's direction's 2 x 2 corner instead fails for a sagittal slice
    whose third index axis is the thin one: that corner is singular.)"""
    direction = np.asarray(volume.GetDirection()).reshape(3, 3)
    in_plane = direction[:, [k for k in range(3) if k != thin]]
    normal = np.cross(in_plane[:, 0], in_plane[:, 1])
    normal /= np.linalg.norm(normal)
    axes = []
    for k in (k for k in range(3) if k != int(np.argmax(np.abs(normal)))):
        axis = np.eye(3)[k] - normal * normal[k]
        for other in axes:
            axis -= other * (other @ axis)
        axes.append(axis / np.linalg.norm(axis))
    axes = np.stack(axes, axis=1)  # (3, 2): the 2D frame's x and y in LPS
    size = list(volume.GetSize())
    size[thin] = 0
    image = sitk.Extract(volume, size, [0, 0, 0], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOIDENTITY)
    image.SetDirection((axes.T @ in_plane).ravel().tolist())
    image.SetOrigin((axes.T @ np.asarray(volume.GetOrigin())).tolist())
    image.SetMetaData(PLANE_AXES_KEY, " ".join(f"{v:.9g}" for v in axes.T.ravel()))
    return image


def plane_axes(image: sitk.Image) -> Optional[np.ndarray]:
    """(3, 2): the LPS directions of a 2D image's x and y axes where it was a one-slice volume (``as_planar``);
    None for an image that came as 2D (a PNG, a radiograph: nothing says which plane of the body it shows)."""
    if not image.HasMetaDataKey(PLANE_AXES_KEY):
        return None
    return np.asarray([float(v) for v in image.GetMetaData(PLANE_AXES_KEY).split()]).reshape(2, 3).T


def structure_mask(labels: sitk.Image, image: sitk.Image, label: Optional[int], name: str) -> sitk.Image:
    """The chosen structure's mask on its image's grid (label value ``label``; None: every non-zero pixel)."""
    from ..validation import check_label_values, check_same_grid
    check_label_values(labels, name)
    check_same_grid(labels, image, name)
    values = sitk.GetArrayViewFromImage(labels)
    present = sorted(int(v) for v in np.unique(values) if v != 0)
    if not present:
        raise InputError(f"{name} is empty")
    if label is not None and label not in present:
        raise InputError(f"{name} has no label {label}: it has {', '.join(map(str, present[:20]))}")
    mask = sitk.GetImageFromArray(((values == label) if label is not None else (values != 0)).astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def _centre(image: sitk.Image, mask: Optional[sitk.Image]) -> np.ndarray:
    if mask is not None:
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(mask)
        return np.asarray(stats.GetCentroid(1))
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()]))


def network_grid(fixed: sitk.Image, spacing: float, centre: Optional[np.ndarray] = None) -> sitk.Image:
    """The fixed image's extent and direction at ``spacing``, centred on ``centre`` (default: the fixed's)."""
    extent = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
    size = [max(8, int(round(e / spacing))) for e in extent]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing([spacing, spacing])
    grid.SetDirection(fixed.GetDirection())
    middle = _centre(fixed, None) if centre is None else centre
    half = np.asarray(fixed.GetDirection()).reshape(2, 2) @ (spacing * (np.asarray(size) - 1) / 2.0)
    grid.SetOrigin((middle - half).tolist())
    return grid


def check_true_field(true_field: sitk.Image, fixed: sitk.Image, name: str) -> None:
    """A true map must be a 2D displacement field on the fixed image's grid, in its frame (a PNG's frame is not
    a slice's: the same pixels, other axes)."""
    from ..validation import check_same_grid
    if true_field.GetDimension() != 2 or true_field.GetNumberOfComponentsPerPixel() != 2:
        raise InputError(f"{name} is not a 2D displacement field (2D, two values per pixel)")
    check_same_grid(true_field, fixed, name)


def physical_field(displacement: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """(2 (y, x), rows, columns) pixel displacements on ``grid`` as a 2D vector image of physical vectors (mm, in
    ``grid``'s frame: D diag(spacing) (dx, dy)), float64 on ``grid``."""
    steps = np.stack([displacement[1], displacement[0]], axis=-1) * np.asarray(grid.GetSpacing())
    vectors = sitk.GetImageFromArray(steps @ np.asarray(grid.GetDirection()).reshape(2, 2).T, isVector=True)
    vectors.CopyInformation(grid)
    return vectors


@dataclass
class PlanarResult:
    fixed: sitk.Image
    warped: sitk.Image
    forward_field: sitk.Image  # physical displacement on the fixed grid: p -> p + u(p)
    jacobian: sitk.Image
    warped_label: Optional[sitk.Image] = None
    metrics: Optional[Dict] = None
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)
    moving: Optional[sitk.Image] = None  # as given (the figure shows it)
    # The structure's masks (with both label maps): the fixed's, the moving's as given, the moving's warped.
    fixed_mask: Optional[sitk.Image] = None
    moving_mask: Optional[sitk.Image] = None
    warped_mask: Optional[sitk.Image] = None

    @cached_property
    def folding_stats(self) -> Dict[str, float]:
        """Where det J <= 0: count and share of the pixels (computed once, with or without labels)."""
        return folding(sitk.GetArrayViewFromImage(self.jacobian))

    def compare_with_true_map(self, true_field: sitk.Image, name: str) -> Dict[str, float]:
        """How far the map lands from a true one (``true_field``: a 2D displacement field on the fixed image's
        grid, fixed point p -> moving point p + u(p), mm, as ``field.nii``; example2d's true_field.nii):
        |u(p) - u_true(p)| over the fixed structure (else the whole image), beside the identity's |u_true(p)|.
        Added to ``metrics`` as "true_map"."""
        check_true_field(true_field, self.fixed, name)
        truth = sitk.GetArrayFromImage(true_field).astype(np.float64)
        inside = np.ones(truth.shape[:2], bool) if self.fixed_mask is None else \
            sitk.GetArrayFromImage(self.fixed_mask) > 0
        error = np.linalg.norm(sitk.GetArrayFromImage(self.forward_field) - truth, axis=-1)[inside]
        row = {"where": "the fixed structure" if self.fixed_mask is not None else "the whole image",
               "epe_mean_mm": float(error.mean()), "epe_p95_mm": float(np.percentile(error, 95)),
               "epe_max_mm": float(error.max()),
               "identity_epe_mean_mm": float(np.linalg.norm(truth, axis=-1)[inside].mean())}
        self.metrics = dict(self.metrics or {}, true_map=row)
        return row

    def transform(self) -> sitk.DisplacementFieldTransform:
        return sitk.DisplacementFieldTransform(sitk.Cast(self.forward_field, sitk.sitkVectorFloat64))

    def write_files(self, folder: str, outputs: Sequence[str] = DEFAULT_PLANAR_OUTPUTS) -> Dict[str, str]:
        unknown = sorted(set(outputs) - set(PLANAR_OUTPUTS))
        if unknown:
            raise InputError(f"--outputs: unknown {', '.join(unknown)}; choose from {', '.join(PLANAR_OUTPUTS)}")
        paths = {}

        def put(key, name, writer, obj):
            if key in outputs and obj is not None:
                paths[key] = os.path.join(folder, name)
                writer(obj, paths[key])
        put("warped", "warped.nii.gz", write_image, self.warped)
        put("warped_label", "warped_label.nii.gz", write_image, self.warped_label)
        put("transform", "transform.h5", lambda t, p: write_atomically(lambda tmp: sitk.WriteTransform(t, tmp), p),
            self.transform())
        put("field", "field.nii", write_image, sitk.Cast(self.forward_field, sitk.sitkVectorFloat32))
        put("jacobian", "jacobian.nii", write_image, self.jacobian)
        if self.metrics is not None:
            put("metrics", "metrics.json", lambda m, p: write_text(json.dumps(m, indent=2), p), self.metrics)
        if "figure" in outputs:
            from .figures import planar_figure
            paths["figure"] = os.path.join(folder, "figure.png")
            planar_figure(self, paths["figure"])
        summary = {"seconds": self.seconds, "notes": self.notes,
                   "folding": self.folding_stats}
        paths["summary"] = os.path.join(folder, "summary.json")
        write_text(json.dumps(summary, indent=2), paths["summary"])
        return paths


def field_jacobian_2d(field: sitk.Image) -> np.ndarray:
    """det(I + du/dp) of a 2D physical displacement field (rows, columns): ``jacobian_determinant_2d`` of the
    field in index steps, (D diag(spacing))^-1 u, whose determinant is the same (det(I + A^-1 G) = det(I + G A^-1))."""
    u = sitk.GetArrayFromImage(field).astype(np.float64)  # (rows, columns, 2) vectors (x, y)
    to_index = np.linalg.inv(np.asarray(field.GetDirection()).reshape(2, 2) @ np.diag(field.GetSpacing()))
    steps = u @ to_index.T  # (rows, columns, (column step, row step))
    in_pixels = torch.from_numpy(np.stack([steps[..., 1], steps[..., 0]]))[None]  # (1, (y, x), rows, columns)
    return jacobian_determinant_2d(in_pixels)[0].numpy()


class PlanarRegistrar:
    """``register(fixed, moving, fixed_mask, moving_mask)`` with a 2D model (default: the shipped one).

    ``refine_steps``: the network's field refined on the pair (``refinement.refine_field``) for this many steps
    per level (default ``PlanarRefineConfig.steps``: about 0.5 s on a CPU core for 128 x 128 px, half the
    network's end-point error on known deformations); 0: the network alone (~0.02 s). ``should_stop()`` is
    asked at every step (``Cancelled``), ``progress(step, total)`` told."""

    def __init__(self, model: Optional[str] = None, net: Optional[PlanarNet] = None, device: str = "cpu",
                 refine_steps: Optional[int] = None, should_stop: Optional[Callable[[], bool]] = None,
                 progress: Optional[Callable[[int, int], None]] = None):
        from ..registrar import choose_device
        device = choose_device(device)  # refused clearly where this machine lacks it
        if net is None:
            net = load_planar(model or shipped_planar_model_path())["net"]
        self.net = net.eval().to(device)
        self.device = device
        self.spacing = float(net.config.spacing_mm)
        self.refine = PlanarRefineConfig() if refine_steps is None else PlanarRefineConfig(steps=int(refine_steps))
        self.should_stop, self.progress = should_stop, progress

    def register(self, fixed: sitk.Image, moving: sitk.Image, fixed_mask: Optional[sitk.Image] = None,
                 moving_mask: Optional[sitk.Image] = None, moving_labels: Optional[sitk.Image] = None
                 ) -> PlanarResult:
        """``moving_labels``: a label map to warp (default ``moving_mask``), values kept."""
        from ..validation import check_image_values
        check_image_values(fixed, "the fixed image", "pixel")
        check_image_values(moving, "the moving image", "pixel")
        started = time.perf_counter()
        fixed_grid = network_grid(fixed, self.spacing)
        offset = _centre(moving, moving_mask) - _centre(fixed, fixed_mask)
        moving_grid = network_grid(fixed, self.spacing, _centre(fixed, None) + offset)
        unit_fixed, unit_moving = to_unit(fixed), to_unit(moving)
        f = sitk.Resample(unit_fixed, fixed_grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        m = sitk.Resample(unit_moving, moving_grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        tensors = [torch.from_numpy(sitk.GetArrayFromImage(x))[None, None].to(self.device) for x in (f, m)]
        displacement = refine_field(self.net, *tensors, self.refine, self.should_stop, self.progress)
        displacement = displacement[0].cpu().numpy().astype(np.float64)  # (2 (y, x), rows, columns)
        # Pixels of the network grid -> physical vectors, plus the centring offset.
        physical = sitk.GetArrayFromImage(physical_field(displacement, fixed_grid)) + offset
        on_grid = sitk.GetImageFromArray(physical, isVector=True)
        on_grid.CopyInformation(fixed_grid)
        forward = sitk.Resample(on_grid, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64,
                                True)
        transform = sitk.DisplacementFieldTransform(sitk.Image(forward))
        background = float(sitk.GetArrayViewFromImage(moving).min())
        warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, background, moving.GetPixelID())
        labels = moving_labels if moving_labels is not None else moving_mask
        warped_label = None if labels is None else sitk.Resample(labels, fixed, transform, sitk.sitkNearestNeighbor,
                                                                 0, labels.GetPixelID())
        jac = sitk.GetImageFromArray(field_jacobian_2d(forward).astype(np.float32))
        jac.CopyInformation(fixed)
        result = PlanarResult(fixed, warped, forward, jac, warped_label, seconds=time.perf_counter() - started,
                              moving=moving)
        if self.refine.steps > 0:
            result.notes.append(f"refined on the pair: {self.refine.steps} steps on each of "
                                f"{len(self.refine.coarsen)} grids")
        if fixed_mask is not None and moving_mask is not None:
            centred = sitk.TranslationTransform(2, offset.tolist())
            result.fixed_mask, result.moving_mask = fixed_mask, moving_mask
            result.warped_mask = sitk.Resample(moving_mask, fixed, transform, sitk.sitkNearestNeighbor, 0)
            result.metrics = {
                "initial": structure_metrics(fixed_mask, sitk.Resample(moving_mask, fixed, centred,
                                                                      sitk.sitkNearestNeighbor, 0)),
                "final": structure_metrics(fixed_mask, result.warped_mask)}
            result.metrics["final"].update(result.folding_stats)
        return result


def structure_metrics(fixed_mask: sitk.Image, warped_mask: sitk.Image) -> Dict[str, float]:
    a, b = sitk.GetArrayFromImage(fixed_mask) > 0, sitk.GetArrayFromImage(warped_mask) > 0
    row = overlap(a, b)
    row["assd_mm"] = assd(a, b, fixed_mask.GetSpacing()) if a.any() and b.any() else float("nan")
    return row
