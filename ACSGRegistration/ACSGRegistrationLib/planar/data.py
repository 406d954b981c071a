"""2D images of the lumbar spine from CTs, and pairs of them: slices, projections and known deformations.

- **Views** (``spine_view``): sagittal, coronal and axial slices through a vertebra's centroid (or beside it),
  and parallel projections of the CT (``lateral`` and ``ap``: DRR-like line integrals over the body), on a
  128 x 128 grid at 1 mm, with the vertebrae's labels (sliced, or projected: the label seen along the ray).
  A view is a 2D SimpleITK image whose physical frame is the view's own (mm, centred on the vertebra);
  ``View.placed`` puts it back where it lies in the CT, as a one-slice volume (what ``acsgreg example2d`` writes).
- **Intensities** (``to_unit``): every 2D image, CT slice or radiograph, is stretched to [0, 1] between its
  0.5th and 99.5th percentiles: the one rule for training, registration and evaluation.
- **Known deformations** (``known_deformation``): each vertebra moved rigidly (a few degrees and
  millimetres, as between flexion and extension radiographs), the soft tissue by a smooth random field, the
  two blended over a band of a few millimetres at the vertebra's outline (where the motion changes sharply:
  what the edge-aware smoothness allows), with intensity realism (gamma, contrast, noise). The band is as
  narrow as it can be without the known map folding (sigma 1 mm folded 0.9 % of the pixels, 2 mm 0.06 %, 3 mm
  none, on views of the chest CT's L1).
"""

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..preprocessing import label_centroids, stretch_to_unit
from . import PROJECTIONS, SLICES
from .network import warp_planar

VIEW_SIZE = (128, 128)  # (rows, columns)
VIEWS = SLICES + PROJECTIONS
# The views' in-plane axes (column direction, row direction) and normal, in LPS: also how the figures show any
# slice, whatever its array's order (``figures.display_of``).
VIEW_AXES = {
    "sagittal": ((0, -1, 0), (0, 0, -1), (1, 0, 0)),  # anterior to the right, head up
    "coronal": ((1, 0, 0), (0, 0, -1), (0, 1, 0)),  # patient's right on the left, head up
    "axial": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),  # radiological: patient's right on the left, anterior up
}
VIEW_AXES["lateral"], VIEW_AXES["ap"] = VIEW_AXES["sagittal"], VIEW_AXES["coronal"]
BLEND_MM = 3.0  # the width (Gaussian sigma) over which a vertebra's rigid motion gives way to the soft tissue's
PROJECTION_DEPTH_MM = 160.0  # the slab a projection integrates (the body around the spine)


@dataclass
class View:
    """A 2D view: the image in [0, 1] and the vertebrae's label map (label values as in the CT's)."""

    image: sitk.Image
    labels: sitk.Image
    kind: str
    label: int  # the vertebra it is centred on
    subject: str = ""
    frame: Optional[sitk.Image] = None  # where the view lies in the CT: a one-slice grid (LPS), see ``placed``

    def placed(self, image: sitk.Image) -> sitk.Image:
        """A 2D image on this view's grid (the view, a deformation of it) as a one-slice volume where the view
        lies in the CT (a projection: its mid-plane): what a viewer overlays on the CT, orientation included."""
        volume = sitk.JoinSeries(image)
        volume.CopyInformation(self.frame)
        return volume


def _planar_image(array: np.ndarray, spacing: float) -> sitk.Image:
    """A 2D image in the view's own frame: identity direction, its centre at (0, 0)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing, spacing))
    rows, columns = array.shape
    image.SetOrigin((-spacing * (columns - 1) / 2.0, -spacing * (rows - 1) / 2.0))
    return image


def to_unit(image: sitk.Image) -> sitk.Image:
    """The 2D intensity rule: float32 in [0, 1] between the 0.5th and 99.5th percentiles."""
    return stretch_to_unit(image)


def match_histogram(moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """The moving image's intensities mapped to the fixed image's histogram (SimpleITK, 256 bins, 7 points,
    threshold at the mean: the background left out), float32: how Demons and the refinement compare two
    exposures of the same anatomy."""
    images = [sitk.GetImageFromArray(np.asarray(a, dtype=np.float32)) for a in (moving, fixed)]
    return sitk.GetArrayFromImage(sitk.HistogramMatching(images[0], images[1], 256, 7, True))


def _reference(centre, kind: str, size=VIEW_SIZE, spacing: float = 1.0, depth: int = 1) -> sitk.Image:
    column, row, normal = (np.asarray(a, dtype=float) for a in VIEW_AXES[kind])
    reference = sitk.Image([size[1], size[0], depth], sitk.sitkUInt8)
    reference.SetSpacing([spacing] * 3)
    reference.SetDirection(np.stack([column, row, normal], axis=1).ravel().tolist())
    origin = (np.asarray(centre) - column * spacing * (size[1] - 1) / 2 - row * spacing * (size[0] - 1) / 2
              - normal * spacing * (depth - 1) / 2)
    reference.SetOrigin(origin.tolist())
    return reference


def spine_view(ct: sitk.Image, labels: sitk.Image, label: int, kind: str, offset_mm: float = 0.0,
               size=VIEW_SIZE, spacing: float = 1.0, subject: str = "",
               vertebrae: Optional[Sequence[int]] = None) -> View:
    """A ``kind`` view (``VIEWS``) of the CT centred on vertebra ``label``; slices ``offset_mm`` off its centroid
    along their normal. ``vertebrae``: the label values that are vertebrae (the others, organs, are dropped)."""
    if kind not in VIEWS:
        raise ValueError(f"unknown view {kind!r}: choose from {', '.join(VIEWS)}")
    centroids = label_centroids(labels)
    if label not in centroids:
        raise ValueError(f"label {label} is not in the label map")
    normal = np.asarray(VIEW_AXES[kind][2], dtype=float)
    centre = np.asarray(centroids[label]) + normal * offset_mm
    depth = 1 if kind in SLICES else int(PROJECTION_DEPTH_MM / spacing)
    reference = _reference(centre, kind, size, spacing, depth)
    hu = sitk.GetArrayFromImage(sitk.Resample(ct, reference, sitk.Transform(), sitk.sitkLinear, -1000.0,
                                              sitk.sitkFloat32))
    seg = sitk.GetArrayFromImage(sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                               labels.GetPixelID()))
    if vertebrae is not None:
        seg = np.where(np.isin(seg, list(vertebrae)), seg, 0)
    if kind in SLICES:
        image, label_map = hu[0], seg[0]
    else:
        # Line integrals of attenuation (water 0.02 / mm, air 0), as a radiograph's log image, bone bright;
        # then the edge enhancement (unsharp masking) radiographs get: the body's thickness varies far more
        # than the spine adds to it.
        integral = sitk.GetImageFromArray((np.clip(hu + 1000.0, 0, None) * (0.02 / 1000.0) * spacing).sum(0))
        image = sitk.GetArrayFromImage(integral - 0.8 * sitk.SmoothingRecursiveGaussian(integral, 15.0 / spacing))
        label_map = _projected_labels(seg)
    image = to_unit(_planar_image(image.astype(np.float32), spacing))
    return View(image, _planar_image(label_map.astype(np.int16), spacing), kind, int(label), subject,
                _reference(centre, kind, size, spacing))


def _projected_labels(seg: np.ndarray) -> np.ndarray:
    """Along each ray, the label with the most voxels on it (0 where none)."""
    values = [v for v in np.unique(seg) if v != 0]
    if not values:
        return np.zeros(seg.shape[1:], np.int16)
    counts = np.stack([(seg == v).sum(0) for v in values])
    best = np.asarray(values)[counts.argmax(0)]
    return np.where(counts.max(0) > 0, best, 0)


def vertebra_values(labels_path: str, labels: sitk.Image) -> Dict[int, str]:
    """Label value -> level of the vertebrae in a label map (``readers.label_map_names``)."""
    from ..readers import label_map_names
    from ..vertebrae import level_of
    return {v: name for v, name in label_map_names(labels_path, labels).items() if name and level_of(name)}


def views_of(ct: sitk.Image, labels: sitk.Image, centres: Sequence[int], vertebrae: Sequence[int],
             kinds: Sequence[str] = VIEWS, offsets: Sequence[float] = (0.0,), subject: str = "") -> List[View]:
    """Every view centred on each of ``centres`` (slices at each offset; projections once)."""
    out = []
    for label in centres:
        for kind in kinds:
            for offset in (offsets if kind in SLICES else (0.0,)):
                out.append(spine_view(ct, labels, label, kind, offset, subject=subject, vertebrae=vertebrae))
    return out


def image_tensor(image: sitk.Image) -> torch.Tensor:
    return torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))[None, None]


def gaussian_smooth(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (separable) of (B, C, H, W), sigma in pixels."""
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=field.dtype, device=field.device)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels = field.shape[1]
    out = F.conv2d(F.pad(field, (radius, radius, 0, 0), mode="replicate"),
                   kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"),
                    kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


@dataclass
class KnownDeformation:
    """``moving(q) = fixed(q + backward(q))``: (2, H, W) pixel displacements (y, x) on the moving grid."""

    backward: torch.Tensor
    moving: torch.Tensor  # (1, 1, H, W)
    moving_labels: torch.Tensor  # (1, 1, H, W), label values


def known_deformation(image: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator,
                      rotation_deg: float = 5.0, translation_mm: float = 3.0, soft_mm: float = 4.0,
                      spacing: float = 1.0, realism: bool = True) -> KnownDeformation:
    """A known deformation of a view (``image``, ``labels``: (1, 1, H, W)): each vertebra rigid (rotation up
    to ``rotation_deg`` about its centre, translation up to ``translation_mm``), the rest a smooth random field
    of up to ``soft_mm``; blended by the vertebrae's masks softened over ~2 mm."""
    height, width = image.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    coarse = torch.from_numpy(rng.uniform(-1, 1, size=(1, 2, 6, 6)).astype(np.float32))
    soft = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
    soft = soft / soft.abs().max().clamp_min(1e-6) * (soft_mm / spacing) * rng.uniform(0.3, 1.0)
    backward = soft[0].clone()
    weight_sum = torch.zeros(height, width)
    blend = []
    for value in [int(v) for v in torch.unique(labels) if v != 0]:
        mask = (labels[0, 0] == value).float()
        if mask.sum() < 20:
            continue
        weight = gaussian_smooth(mask[None, None], BLEND_MM / spacing)[0, 0]
        cy, cx = (float((grid * mask).sum() / mask.sum()) for grid in (yy, xx))
        angle = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg))
        ty, tx = rng.uniform(-translation_mm, translation_mm, size=2) / spacing
        cos, sin = np.cos(angle), np.sin(angle)
        rigid_y = cos * (yy - cy) - sin * (xx - cx) + cy + ty - yy
        rigid_x = sin * (yy - cy) + cos * (xx - cx) + cx + tx - xx
        blend.append((weight, torch.stack([rigid_y, rigid_x])))
        weight_sum = weight_sum + weight
    scale = torch.where(weight_sum > 1, 1 / weight_sum.clamp_min(1e-6), torch.ones_like(weight_sum))
    backward = backward * (1 - weight_sum * scale)
    for weight, rigid in blend:
        backward = backward + weight * scale * rigid
    moving = warp_planar(image, backward[None])
    moving_labels = warp_planar(labels.float(), backward[None], mode="nearest")
    if realism:
        moving = intensity_realism(moving, rng)
    return KnownDeformation(backward, moving, moving_labels)


def intensity_realism(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Another exposure of the same anatomy: gamma, contrast and brightness, Gaussian noise; kept in [0, 1]."""
    out = image.clamp(0, 1) ** float(rng.uniform(0.8, 1.25))
    out = out * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.05, 0.05))
    out = out + torch.from_numpy(rng.normal(0, rng.uniform(0.005, 0.02), size=out.shape).astype(np.float32))
    return out.clamp(0, 1)


def endpoint_error(displacement: torch.Tensor, backward: torch.Tensor, mask: torch.Tensor,
                   spacing: float = 1.0) -> Dict[str, float]:
    """Mean, 95th percentile and max (mm) over ``mask`` (H, W) of how far a predicted map (fixed p -> moving
    p + displacement(p), (1, 2, H, W) pixels) lands from the truth: |q + backward(q) - p| at q = p + u(p)."""
    back_at_q = warp_planar(backward[None], displacement)  # backward sampled at q
    error = torch.linalg.vector_norm(displacement + back_at_q, dim=1)[0] * spacing
    values = error[mask > 0]
    if values.numel() == 0:
        return {"mean": float("nan"), "p95": float("nan"), "max": float("nan")}
    return {"mean": float(values.mean()), "p95": float(torch.quantile(values, 0.95)), "max": float(values.max())}


def identity_error(backward: torch.Tensor, mask: torch.Tensor, spacing: float = 1.0) -> Dict[str, float]:
    """The same error for the identity (no registration)."""
    return endpoint_error(torch.zeros_like(backward)[None], backward, mask, spacing)


def vertebra_masks(labels: torch.Tensor) -> torch.Tensor:
    """(H, W) mask of every vertebra in a view's label map."""
    return (labels[0, 0] > 0).float()




TRAINING_LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5")
TRAINING_OFFSETS = (-6.0, -3.0, 0.0, 3.0, 6.0)


@dataclass
class Spine:
    """A CT file read with its label map: the vertebrae's values -> levels, the subject (the CT's folder)."""

    ct: sitk.Image
    labels: sitk.Image
    names: Dict[int, str]
    subject: str
    seg_path: str
    option: str

    def centres(self, levels: Sequence[str]) -> List[int]:
        """The label values of its vertebrae at ``levels``; InputError (naming the option) where it has none."""
        from ..vertebrae import level_of
        wanted = {level_of(lv) for lv in levels}
        centres = [v for v, name in self.names.items() if level_of(name) in wanted]
        if not centres:
            from ..errors import InputError
            raise InputError(f"{self.option} {self.seg_path} has none of the vertebrae {', '.join(levels)} (it has "
                             f"{', '.join(self.names.values()) or 'no vertebra'})")
        return centres

    def views(self, centres: Sequence[int], kinds: Sequence[str] = VIEWS,
              offsets: Sequence[float] = (0.0,)) -> List[View]:
        return views_of(self.ct, self.labels, centres, list(self.names), kinds, offsets, subject=self.subject)


def read_spine(ct_path: str, seg_path: str, option: str = "--ct") -> Spine:
    from ..io import read_image
    ct, labels = read_image(ct_path, f"{option} CT"), read_image(seg_path, f"{option} label map")
    subject = os.path.basename(os.path.dirname(os.path.abspath(ct_path))) or ct_path
    return Spine(ct, labels, vertebra_values(seg_path, labels), subject, seg_path, option)


def spine_views_of_files(ct_path: str, seg_path: str, levels: Sequence[str] = TRAINING_LEVELS,
                         kinds: Sequence[str] = VIEWS, offsets: Sequence[float] = (0.0,),
                         option: str = "--ct") -> List[View]:
    """Views of a CT file centred on each of its vertebrae at ``levels`` (those it has whole)."""
    spine = read_spine(ct_path, seg_path, option)
    return spine.views(spine.centres(levels), kinds, offsets)
