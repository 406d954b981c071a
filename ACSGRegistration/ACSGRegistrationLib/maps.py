"""Judging a registration by its map, not only by its overlap.

Dice sees only the outline: a map can match it while crushing and folding the vertebra's inside and moving
its points further from their true place than no registration at all. Everything here is computed from
the transform the user gets (the exported displacement field, on the fixed crop's grid at its own
resolution, 1 mm for the paper's crops), for any method:

- ``regularity``: det J of the map's deformable part (the exported map's Jacobian divided by the affine's
  determinant) inside the fixed vertebra and over the crop: % det J <= 0, SDlogJ, 1st/50th/99th percentile;
- ``inverse_consistency``: |inverse(forward(p)) - p| for the fixed vertebra's points p (mm);
- known deformations: a real scan warped by a seeded random map of realistic size (``RandomMap``: affine
  about the vertebra plus a smooth field) and registered back; ``target_errors`` = |psi(phi(p)) - p| inside
  the vertebra (mm), beside the identity's. ``known_deformation_case`` builds such a case from a whole scan
  (both crops cut from whole scans, each centred on its own label, as a user's would be) or from a crop.
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .geometry import apply_homogeneous, displacement_transform, index_to_physical_matrix
from .metrics import jacobian_determinant
from .preprocessing import HU_RANGE, crop_vertebra


def field_jacobian(field: sitk.Image) -> np.ndarray:
    """det(I + grad u) of a physical (mm, LPS) displacement field, as a (z, y, x) array on its grid.

    The field is brought to voxel units in array order (through its spacing and direction) and passed to
    ``metrics.jacobian_determinant`` (central differences); the determinant is invariant to that change of
    coordinates. On grids of identity direction it equals SimpleITK's DisplacementFieldJacobianDeterminant.
    """
    u = sitk.GetArrayFromImage(field).astype(np.float64)  # (z, y, x, 3), components (x, y, z) in mm
    m = np.asarray(field.GetDirection(), dtype=np.float64).reshape(3, 3) @ np.diag(field.GetSpacing())
    u_index = np.linalg.solve(m, u.reshape(-1, 3).T)  # (3, N) in index units, (i, j, k) = (x, y, z)
    return jacobian_determinant(u_index[::-1].reshape((3,) + u.shape[:3]))


def _mask(label, shape) -> np.ndarray:
    if label is None:
        return np.ones(shape, dtype=bool)
    a = sitk.GetArrayViewFromImage(label) if isinstance(label, sitk.Image) else np.asarray(label)
    if a.shape != tuple(shape):
        raise ValueError(f"mask of shape {a.shape} is not on the field's grid {tuple(shape)}")
    return a > 0.5


def jacobian_statistics(jacobian: np.ndarray) -> Dict[str, float]:
    j = np.asarray(jacobian, dtype=np.float64).ravel()
    if j.size == 0:
        raise ValueError("no voxel to compute Jacobian statistics over")
    return {
        "nonpositive_percent": 100.0 * float((j <= 0).mean()),
        # log of the determinant floored at 1e-3: folded voxels count as strongly crushed, not as missing.
        "sdlogj": float(np.std(np.log(np.maximum(j, 1e-3)))),
        "p1": float(np.percentile(j, 1)),
        "median": float(np.median(j)),
        "p99": float(np.percentile(j, 99)),
    }


def regularity(forward_field: sitk.Image, affine_lps: Optional[np.ndarray] = None,
               fixed_label=None) -> Dict[str, float]:
    """Jacobian statistics of the deformable part of an exported forward map, inside the fixed vertebra
    (``vertebra_*``) and over the whole crop (``crop_*``).

    For a map p -> A(p + u(p)) the exported field's determinant is det(A) det(I + grad u); dividing by
    det(A) leaves the deformable part's, which is what folding and SDlogJ are about.
    """
    jac = field_jacobian(forward_field)
    if affine_lps is not None:
        jac = jac / float(np.linalg.det(np.asarray(affine_lps, dtype=np.float64)[:3, :3]))
    out = {f"crop_{k}": v for k, v in jacobian_statistics(jac).items()}
    if fixed_label is not None:
        out.update({f"vertebra_{k}": v for k, v in jacobian_statistics(jac[_mask(fixed_label, jac.shape)]).items()})
    return out


def label_points(label: sitk.Image, step: int = 1) -> np.ndarray:
    """(N, 3) LPS points of a label's voxels (every ``step``-th voxel along each axis)."""
    index = np.argwhere(sitk.GetArrayViewFromImage(label)[::step, ::step, ::step] > 0.5) * step  # (z, y, x)
    return apply_homogeneous(index_to_physical_matrix(label), index.T.astype(np.float64)).T


def field_at_voxels(field: sitk.Image, label: sitk.Image, step: int = 1) -> np.ndarray:
    """(N, 3) displacements of a field at the voxels of ``label`` (on the field's grid)."""
    a = sitk.GetArrayViewFromImage(label)[::step, ::step, ::step] > 0.5
    return sitk.GetArrayViewFromImage(field)[::step, ::step, ::step][a].astype(np.float64)


def transform_points(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.array([transform.TransformPoint(tuple(float(c) for c in p)) for p in points])


def inverse_consistency(forward_field: sitk.Image, inverse_field: sitk.Image, fixed_label: sitk.Image,
                        step: int = 2) -> Dict[str, float]:
    """|inverse(forward(p)) - p| (mm) over the fixed vertebra's voxels (every ``step``-th per axis).

    The inverse is a field on the moving crop: points the forward map sends outside it (a vertebra cut by
    its crop's edge) have no inverse there and are left out; ``inverse_outside_percent`` says how many."""
    points = label_points(fixed_label, step)
    moved = points + field_at_voxels(forward_field, fixed_label, step)
    direction = np.asarray(inverse_field.GetDirection(), dtype=np.float64).reshape(3, 3)
    index = np.linalg.solve(direction @ np.diag(inverse_field.GetSpacing()),
                            (moved - np.asarray(inverse_field.GetOrigin())).T).T
    inside = np.all((index >= 0) & (index <= np.asarray(inverse_field.GetSize()) - 1), axis=1)
    out = {"inverse_outside_percent": 100.0 * float(1 - inside.mean())}
    if not inside.any():
        return dict(out, inverse_mean_mm=float("nan"), inverse_p95_mm=float("nan"), inverse_max_mm=float("nan"))
    back = transform_points(displacement_transform(inverse_field), moved[inside])
    residual = np.linalg.norm(back - points[inside], axis=1)
    out.update(inverse_mean_mm=float(residual.mean()), inverse_p95_mm=float(np.percentile(residual, 95)),
               inverse_max_mm=float(residual.max()))
    return out


# -- known deformations ---------------------------------------------------------------------------------

@dataclass
class RandomMapConfig:
    """The size of the known deformations (the issue's "realistic size")."""
    rotation_degrees: float = 6.0
    scaling: float = 0.05
    translation_mm: float = 3.0
    field_mm: float = 4.5  # largest displacement of the smooth field
    field_width_mm: float = 18.0  # Gaussian width of its bumps
    bumps: int = 6
    spread_mm: float = 25.0  # bump centres within this distance of the vertebra's centre
    field_spacing_mm: float = 2.0  # grid the smooth field is sampled on for resampling images


class RandomMap:
    """psi: moving point -> fixed point, an affine about ``centre`` composed with a smooth field,
    psi(y) = A(y + s(y)) with s a sum of Gaussian bumps (zero far from the vertebra), reproducible from
    ``seed``. The moving scan is the fixed scan resampled through psi, so the true registration is psi^-1."""

    def __init__(self, centre: Sequence[float], seed: int, cfg: Optional[RandomMapConfig] = None):
        self.cfg = cfg = cfg or RandomMapConfig()
        rng = np.random.default_rng(int(seed))
        self.centre = np.asarray(centre, dtype=np.float64)
        angles = np.radians(rng.uniform(-cfg.rotation_degrees, cfg.rotation_degrees, 3))
        rot = np.eye(3)
        for axis, a in enumerate(angles):
            i, j = [k for k in range(3) if k != axis]
            r = np.eye(3)
            r[i, i], r[i, j], r[j, i], r[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
            rot = rot @ r
        self.linear = rot @ np.diag(1 + rng.uniform(-cfg.scaling, cfg.scaling, 3))
        self.translation = rng.uniform(-cfg.translation_mm, cfg.translation_mm, 3)
        self.bump_centres = self.centre + rng.uniform(-cfg.spread_mm, cfg.spread_mm, (cfg.bumps, 3))
        self.bump_weights = rng.normal(size=(cfg.bumps, 3))
        # Scale the field so that its largest displacement over the region is field_mm.
        probe = self.centre + rng.uniform(-2 * cfg.spread_mm, 2 * cfg.spread_mm, (4000, 3))
        probe = np.concatenate([probe, self.bump_centres])
        self.bump_weights *= cfg.field_mm / np.linalg.norm(self._smooth(probe), axis=1).max()

    def _smooth(self, points: np.ndarray) -> np.ndarray:
        d2 = ((points[:, None, :] - self.bump_centres[None]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * self.cfg.field_width_mm ** 2)) @ self.bump_weights

    def affine(self, points: np.ndarray) -> np.ndarray:
        return (points - self.centre) @ self.linear.T + self.centre + self.translation

    def __call__(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return self.affine(points + self._smooth(points))

    def transform(self, reference: sitk.Image) -> sitk.Transform:
        """psi as a SimpleITK transform, its smooth part sampled on a grid covering ``reference``."""
        spacing = self.cfg.field_spacing_mm
        last = np.asarray(reference.GetSize()) - 1
        corners = np.array([reference.TransformIndexToPhysicalPoint([int(v) for v in np.asarray(c) * last])
                            for c in np.ndindex(2, 2, 2)])
        lo, hi = corners.min(0) - 2 * spacing, corners.max(0) + 2 * spacing
        size = [int(math.ceil((h - l) / spacing)) + 1 for l, h in zip(lo, hi)]
        axes = [lo[i] + spacing * np.arange(size[i]) for i in range(3)]
        z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
        points = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
        field = sitk.GetImageFromArray(self._smooth(points).reshape(size[2], size[1], size[0], 3), isVector=True)
        field.SetOrigin(tuple(lo))
        field.SetSpacing((spacing,) * 3)
        smooth = displacement_transform(field)
        affine = sitk.AffineTransform(3)
        affine.SetCenter(tuple(self.centre))
        affine.SetMatrix(tuple(self.linear.ravel()))
        affine.SetTranslation(tuple(self.translation))
        # SimpleITK applies a composite's transforms last-added first: smooth, then affine.
        return sitk.CompositeTransform([affine, smooth])


def warp_scan(scan: sitk.Image, segmentation: sitk.Image, psi: RandomMap):
    """The scan and its label map resampled through psi on their own grid (outside: air, background)."""
    t = psi.transform(scan)
    moved = sitk.Resample(scan, scan, t, sitk.sitkLinear, float(HU_RANGE[0]), sitk.sitkFloat32)
    labels = sitk.Resample(segmentation, scan, t, sitk.sitkNearestNeighbor, 0, segmentation.GetPixelID())
    return moved, labels


@dataclass
class KnownCase:
    fixed: sitk.Image
    fixed_label: sitk.Image
    moving: sitk.Image
    moving_label: sitk.Image
    psi: RandomMap


def known_deformation_case(scan: sitk.Image, segmentation: sitk.Image, label_id: int, seed: int,
                           whole_scan: bool = True, cfg: Optional[RandomMapConfig] = None,
                           fixed_crop=None) -> KnownCase:
    """One known-deformation case of vertebra ``label_id``: crops of the scan and of its warped copy.

    ``whole_scan``: the whole scan (and its labels) is warped and both crops are cut from whole scans, each
    centred on its own label; else the fixed crop itself is warped on its own grid (crop-level case).
    ``fixed_crop``: the vertebra's crop (``preprocessing.crop_vertebra``) if the caller already has it.
    """
    fixed_crop = fixed_crop or crop_vertebra(scan, segmentation, label_id)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(fixed_crop.label)
    psi = RandomMap(stats.GetCentroid(1), seed, cfg)
    if whole_scan:
        moved, labels = warp_scan(scan, segmentation, psi)
        moving_crop = crop_vertebra(moved, labels, label_id)
        return KnownCase(fixed_crop.image, fixed_crop.label, moving_crop.image, moving_crop.label, psi)
    t = psi.transform(fixed_crop.image)
    moving = sitk.Resample(fixed_crop.image, fixed_crop.image, t, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    soft = sitk.Resample(sitk.Cast(fixed_crop.label, sitk.sitkFloat32), fixed_crop.label, t, sitk.sitkLinear, 0.0)
    return KnownCase(fixed_crop.image, fixed_crop.label, moving, sitk.Cast(soft > 0.5, sitk.sitkUInt8), psi)


def target_errors(forward_field: sitk.Image, fixed_label: sitk.Image, psi: Callable[[np.ndarray], np.ndarray],
                  step: int = 2) -> Dict[str, float]:
    """TRE |psi(phi(p)) - p| (mm) over the fixed vertebra, for phi = p + field(p) and for the identity."""
    points = label_points(fixed_label, step)
    moved = points + field_at_voxels(forward_field, fixed_label, step)
    err = np.linalg.norm(psi(moved) - points, axis=1)
    ident = np.linalg.norm(psi(points) - points, axis=1)
    return {"tre_mean_mm": float(err.mean()), "tre_p95_mm": float(np.percentile(err, 95)),
            "tre_max_mm": float(err.max()), "identity_tre_mean_mm": float(ident.mean()),
            "identity_tre_p95_mm": float(np.percentile(ident, 95))}


def displacement_inside(forward_field: sitk.Image, fixed_label: sitk.Image, step: int = 1) -> float:
    """Mean |u(p)| (mm) over the fixed vertebra: the motion a self-registration should not have."""
    return float(np.linalg.norm(field_at_voxels(forward_field, fixed_label, step), axis=1).mean())
