"""The C-arm's geometry and the CT's pose in front of it (ProST's projective geometry; conventions of the
command line's GEOMETRY.json and POSE.json).

Source frame: origin at the X-ray source, +z along the principal ray towards the detector, +x along increasing
detector column, +y along increasing row; the detector plane at z = source_to_detector_mm. A point (x, y, z) of
the source frame lands on pixel (cx + SDD·x/(z·sx), cy + SDD·y/(z·sy)), pixel centres at integer indices.

A pose ``ct_to_source`` (4×4) maps the CT's physical points (LPS mm, as in its file) into the source frame.
Poses are optimised as a 6-vector (rotation vector in radians, translation in mm) applied on the left of a
reference pose, about a centre (the target vertebra's centroid), so that rotating does not swing the vertebra
out of view: T(p) = Δ(p) · T0 with Δ rotating about T0·centre. Rodrigues' formula keeps every step
differentiable twice (the learned similarity's training differentiates its pose gradient). PyTorch is imported
only by the functions that compute with it: Slicer's process reads and writes poses without it.
"""

from __future__ import annotations  # torch's types in signatures without importing it

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from ..geometry import LPS_TO_RAS, apply_homogeneous

if TYPE_CHECKING:
    import torch


@dataclass
class CArm:
    """The detector and its distance to the source."""

    source_to_detector_mm: float
    pixel_spacing_mm: Tuple[float, float]  # (column spacing sx, row spacing sy)
    size: Tuple[int, int]  # (columns, rows)
    principal_point_px: Optional[Tuple[float, float]] = None  # (cx, cy); the detector's centre when None

    def __post_init__(self):
        self.source_to_detector_mm = float(self.source_to_detector_mm)
        self.pixel_spacing_mm = tuple(float(s) for s in self.pixel_spacing_mm)
        self.size = tuple(int(n) for n in self.size)
        if self.principal_point_px is None:
            self.principal_point_px = ((self.size[0] - 1) / 2.0, (self.size[1] - 1) / 2.0)
        self.principal_point_px = tuple(float(c) for c in self.principal_point_px)
        if not (self.source_to_detector_mm > 0 and min(self.pixel_spacing_mm) > 0 and min(self.size) > 0):
            raise InputError(f"C-arm geometry: source_to_detector_mm, pixel_spacing_mm and size must be positive "
                             f"(got {self.source_to_detector_mm}, {self.pixel_spacing_mm}, {self.size})")

    # -- files --------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, where: str = "geometry") -> "CArm":
        missing = [k for k in ("source_to_detector_mm", "pixel_spacing_mm", "size") if k not in data]
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)}")
        try:
            return cls(data["source_to_detector_mm"], tuple(data["pixel_spacing_mm"]), tuple(data["size"]),
                       tuple(data["principal_point_px"]) if data.get("principal_point_px") is not None else None)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{where}: {exc}") from None

    def to_dict(self) -> dict:
        return {"source_to_detector_mm": self.source_to_detector_mm, "pixel_spacing_mm": list(self.pixel_spacing_mm),
                "size": list(self.size), "principal_point_px": list(self.principal_point_px)}

    def scaled(self, factor: float) -> "CArm":
        """The same detector sampled ``factor`` times coarser (bigger pixels, fewer of them): same field of view."""
        columns, rows = (max(1, int(round(n / factor))) for n in self.size)
        sx, sy = (s * n / m for s, n, m in zip(self.pixel_spacing_mm, self.size, (columns, rows)))
        # The principal point keeps its place on the detector (in mm from the first pixel's outer edge).
        cx, cy = ((c + 0.5) * s / t - 0.5 for c, s, t in zip(self.principal_point_px, self.pixel_spacing_mm,
                                                                (sx, sy)))
        return CArm(self.source_to_detector_mm, (sx, sy), (columns, rows), (cx, cy))

    def at_most(self, pixels: int) -> "CArm":
        """The same detector, sampled coarser so that its longest side has at most ``pixels`` pixels."""
        return self.scaled(max(self.size) / float(pixels)) if max(self.size) > pixels else self

    # -- rays and projections --------------------------------------------------------------------------------
    def detector_points(self, device=None, dtype=None) -> torch.Tensor:
        """Each pixel's centre on the detector, in the source frame: (rows, columns, 3) mm."""
        import torch
        dtype = dtype or torch.float32
        columns, rows = self.size
        u = torch.arange(columns, device=device, dtype=dtype)
        v = torch.arange(rows, device=device, dtype=dtype)
        vv, uu = torch.meshgrid(v, u, indexing="ij")
        (cx, cy), (sx, sy) = self.principal_point_px, self.pixel_spacing_mm
        z = torch.full_like(uu, self.source_to_detector_mm)
        return torch.stack(((uu - cx) * sx, (vv - cy) * sy, z), dim=-1)

    def project(self, points_source: np.ndarray) -> np.ndarray:
        """Pixel coordinates (column, row) of points given in the source frame (N, 3)."""
        p = np.asarray(points_source, dtype=np.float64).reshape(-1, 3)
        (cx, cy), (sx, sy) = self.principal_point_px, self.pixel_spacing_mm
        sdd = self.source_to_detector_mm
        return np.stack((cx + sdd * p[:, 0] / (p[:, 2] * sx), cy + sdd * p[:, 1] / (p[:, 2] * sy)), axis=1)


# -- poses --------------------------------------------------------------------------------------------------

def rotation_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, smooth at zero (series for small angles), batched over leading dimensions."""
    import torch
    theta2 = (rotvec * rotvec).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    small = theta2 < 1e-8
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = torch.sqrt(theta2_safe)
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2_safe)
    x, y, z = rotvec.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack((zero, -z, y, z, zero, -x, -y, x, zero), dim=-1).reshape(*rotvec.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def pose_from_parameters(parameters: torch.Tensor, reference: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """The pose Δ(p)·T0 (4×4, batched over ``parameters``' leading dimensions): Δ rotates by ``parameters[:3]``
    (rotation vector, rad) about T0·centre, then translates by ``parameters[3:]`` (mm, source frame)."""
    import torch
    rotation = rotation_matrix(parameters[..., :3])
    pivot = reference[:3, :3] @ centre + reference[:3, 3]  # the centre, in the source frame
    translation = pivot - rotation @ pivot + parameters[..., 3:]
    delta = torch.zeros(*parameters.shape[:-1], 4, 4, dtype=parameters.dtype, device=parameters.device)
    delta[..., :3, :3] = rotation
    delta[..., :3, 3] = translation
    delta[..., 3, 3] = 1.0
    return delta @ reference


def moved_pose(reference: np.ndarray, parameters: np.ndarray, centre) -> np.ndarray:
    """``pose_from_parameters`` on numpy arrays (float64): ``reference`` (4x4) moved by ``parameters`` (6,) about
    ``centre`` (LPS mm) — a start pose drawn off a true one."""
    import torch
    return pose_from_parameters(torch.as_tensor(np.asarray(parameters, dtype=np.float64)),
                                torch.as_tensor(np.asarray(reference, dtype=np.float64)),
                                torch.as_tensor(np.asarray(centre, dtype=np.float64))).numpy()


def read_pose(path: str) -> np.ndarray:
    """POSE.json's ``ct_to_source`` (4×4); errors name the file."""
    try:
        with open(path) as fh:
            matrix = np.asarray(json.load(fh)["ct_to_source"], dtype=np.float64)
    except FileNotFoundError:
        raise InputError(f"pose file not found: {path}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path} is not a pose file ({{\"ct_to_source\": 4x4}}): {exc}") from None
    check_pose(matrix, path)
    return matrix


def check_pose(matrix: np.ndarray, where: str) -> None:
    """A rigid 4×4: finite, orthonormal rotation with determinant +1, last row (0, 0, 0, 1)."""
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise InputError(f"{where}: ct_to_source must be a finite 4x4 matrix")
    rotation = matrix[:3, :3]
    if (not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-4) or np.linalg.det(rotation) < 0
            or not np.allclose(matrix[3], [0, 0, 0, 1])):
        raise InputError(f"{where}: ct_to_source is not a rigid transform (rotation and translation only)")


def check_initial_pose(ct_to_source: np.ndarray, carm: "CArm", target_lps, where: str) -> None:
    """An initial pose must show the target: in front of the source, nearer than the detector, its shadow on
    the detector. A pose that does not (a sign or unit error, another C-arm's pose) is refused: the search would
    start blind, and end anywhere."""
    point = placed(np.asarray(target_lps, dtype=np.float64)[None], ct_to_source)[0]
    depth, sdd = float(point[2]), carm.source_to_detector_mm
    if depth <= 0:
        raise InputError(f"{where}: the initial pose puts the target {-depth:.0f} mm behind the source, where the "
                         "X-ray cannot see it (the pose maps the CT into the source's frame, the detector along +z)")
    if depth >= sdd:
        raise InputError(f"{where}: the initial pose puts the target {depth:.0f} mm from the source, beyond the "
                         f"detector ({sdd:.0f} mm from it): check the pose's translation and its unit (mm)")
    (cx, cy), (sx, sy) = carm.principal_point_px, carm.pixel_spacing_mm
    columns, rows = carm.size
    u, v = point[0] * sdd / depth, point[1] * sdd / depth
    low = np.array([(-0.5 - cx) * sx, (-0.5 - cy) * sy])
    high = np.array([(columns - 0.5 - cx) * sx, (rows - 0.5 - cy) * sy])
    off = float(np.linalg.norm(np.maximum(0.0, np.maximum(low - (u, v), np.array((u, v)) - high))))
    if off > 0:
        raise InputError(f"{where}: the initial pose projects the target {off:.0f} mm off the detector "
                         f"({high[0] - low[0]:.0f} x {high[1] - low[1]:.0f} mm): the search would start with the "
                         "target out of view; check the pose and the geometry")


def pose_json(matrix: np.ndarray) -> str:
    return json.dumps({"ct_to_source": np.asarray(matrix, dtype=float).tolist()}, indent=2)


def look_at(target_lps: Sequence[float], source_to_target_mm: float, lao_deg: float = 0.0,
            cranial_deg: float = 0.0) -> np.ndarray:
    """A pose with the principal ray through ``target_lps`` at ``source_to_target_mm`` from the source: an
    anteroposterior view (source behind the patient, the ray towards anterior), rows running from head to
    feet, columns towards the patient's right (the image as seen from the source), turned by the C-arm's
    angles (LAO about the head-foot axis, cranial about the left-right axis)."""
    a, c = math.radians(lao_deg), math.radians(cranial_deg)
    about_s = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_l = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    turn = about_s @ about_l
    z_axis = turn @ np.array([0.0, -1.0, 0.0])  # towards anterior (LPS -P)
    y_axis = turn @ np.array([0.0, 0.0, -1.0])  # towards the feet
    x_axis = np.cross(y_axis, z_axis)  # right-handed: towards the patient's right
    rotation = np.stack((x_axis, y_axis, z_axis))  # rows: the source frame's axes in LPS
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = np.array([0.0, 0.0, source_to_target_mm]) - rotation @ np.asarray(target_lps, dtype=float)
    return matrix


def turned_about_long_axis(pose: np.ndarray, centre: Sequence[float], degrees: float = 90.0) -> np.ndarray:
    """The view of ``pose``'s C-arm turned by ``degrees`` about the patient's head-foot axis (LPS z) through
    ``centre``, at the same distance: with 90, the lateral shot beside an AP one (the patient unmoved)."""
    a = math.radians(degrees)
    turn = np.eye(4)
    turn[:3, :3] = [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]]
    turn[:3, 3] = np.asarray(centre, dtype=float) - turn[:3, :3] @ np.asarray(centre, dtype=float)
    return np.asarray(pose, dtype=float) @ turn


def lateral_motion(pose: np.ndarray, centre: Sequence[float], degrees: float = 90.0) -> np.ndarray:
    """The C-arm's motion from the shot at ``pose`` to the one turned by ``degrees`` about the patient's head-foot
    axis through ``centre`` (``turned_about_long_axis``; the patient unmoved), source frame to source frame: the
    second view's pose is this motion @ the first's, its initial pose as well as its true one (the C-arm's motion
    between the shots is known)."""
    return turned_about_long_axis(pose, centre, degrees) @ np.linalg.inv(np.asarray(pose, dtype=float))


def placed(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Points (N, 3) mapped by a 4x4 pose (``ct_to_source``, or its inverse): (N, 3)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return apply_homogeneous(np.asarray(matrix, dtype=np.float64), p.T).T


def source_to_ct(ct_to_source: np.ndarray) -> np.ndarray:
    """The inverse pose: source-frame points -> the CT's LPS mm."""
    return np.linalg.inv(np.asarray(ct_to_source, dtype=np.float64))


def source_position(ct_to_source: np.ndarray) -> np.ndarray:
    """The X-ray source in the CT's LPS mm."""
    return source_to_ct(ct_to_source)[:3, 3]


def detector_image(pixels: np.ndarray, carm: CArm, ct_to_source: np.ndarray):
    """An image on the detector (rows, columns), placed where the detector is in the CT's space: a one-slice
    3D SimpleITK image in LPS whose pixel (u, v) sits at the detector point of pixel (u, v). Loaded beside the
    CT (Slicer, ITK-SNAP), the X-ray and its DRR stand where the C-arm's detector stood."""
    import SimpleITK as sitk
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.shape != (carm.size[1], carm.size[0]):
        raise InputError(f"image of {pixels.shape[1]} x {pixels.shape[0]} pixels on a detector of "
                         f"{carm.size[0]} x {carm.size[1]}")
    inverse = source_to_ct(ct_to_source)
    (cx, cy), (sx, sy) = carm.principal_point_px, carm.pixel_spacing_mm
    first = inverse @ np.array([-cx * sx, -cy * sy, carm.source_to_detector_mm, 1.0])
    image = sitk.GetImageFromArray(pixels[None])
    image.SetOrigin(first[:3].tolist())
    image.SetSpacing((sx, sy, 1.0))
    image.SetDirection(inverse[:3, :3].ravel().tolist())  # columns: the source frame's axes in LPS
    return image


def project_to_detector(points_lps: np.ndarray, carm: CArm, ct_to_source: np.ndarray) -> np.ndarray:
    """Where the rays through CT points (N, 3, LPS) meet the detector, in the CT's LPS mm (N, 3): the points'
    shadows on the X-ray placed by ``detector_image``."""
    in_source = placed(points_lps, ct_to_source)
    on_detector = in_source * (carm.source_to_detector_mm / in_source[:, 2:3])
    return placed(on_detector, source_to_ct(ct_to_source))


def detector_corners(carm: CArm, ct_to_source: np.ndarray) -> np.ndarray:
    """The detector's four outer corners in the CT's LPS mm (4, 3), in order around it."""
    (cx, cy), (sx, sy) = carm.principal_point_px, carm.pixel_spacing_mm
    columns, rows = carm.size
    corners = [(u, v) for u, v in ((-0.5, -0.5), (columns - 0.5, -0.5), (columns - 0.5, rows - 0.5),
                                   (-0.5, rows - 0.5))]
    source = np.array([[(u - cx) * sx, (v - cy) * sy, carm.source_to_detector_mm] for u, v in corners])
    return placed(source, source_to_ct(ct_to_source))


def pose_to_slicer(ct_to_source: np.ndarray) -> np.ndarray:
    """The pose as a Slicer linear transform's matrix ("to parent"): a CT point in RAS -> the source frame."""
    return np.asarray(ct_to_source, dtype=np.float64) @ LPS_TO_RAS


def pose_from_slicer(matrix: np.ndarray) -> np.ndarray:
    """``ct_to_source`` (LPS) from a Slicer linear transform's matrix written by ``pose_to_slicer``."""
    return np.asarray(matrix, dtype=np.float64) @ LPS_TO_RAS
