"""Intensity-based CT to X-ray pose registration: the baselines ProST is measured against and the refinement
that follows it. The similarity is gradient NCC (the mean normalised cross-correlation of the images'
horizontal and vertical gradients: insensitive to the X-ray's exposure and to soft-tissue offsets); the search
is CMA-ES (the ``cmaes`` package) over the six pose parameters, scoring the whole images' similarity plus the
target vertebra's, then gradient ascent through the differentiable renderer. The pose's parameters are those of
``camera.pose_from_parameters``: a rotation about the target vertebra's centre and a translation, on the left of
the initial pose.

The X-ray's polarity (bone bright, as radiographs are displayed, or dark, as raw intensities are) is read at
the initial pose (and at ProST's answer), from the sign of the images' intensity correlation: where it is
negative, raw intensities are turned into line integrals (-log, Beer-Lambert) and an inverted display is flipped.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import Cancelled
from ..optimiser import Adam
from . import POSE_SEARCH_METHODS
from .camera import placed, pose_from_parameters
from .drr import Volume, render_by_planes

# Scale of the six parameters in the search (rad, rad, rad, mm, mm, mm): CMA-ES's unit step.
PARAMETER_SCALE = np.array([0.1, 0.1, 0.1, 10.0, 10.0, 30.0])  # depth (z) is the least determined
# A prior on the change of depth (along the principal ray) from the initial pose: the similarity loses
# DEPTH_PRIOR_WEIGHT · (Δz / DEPTH_PRIOR_MM)² (one view; more views see each other's depth). One view sees depth only
# through magnification (10 mm at 750 mm is 1.3 %). Compared over every pixel, gradient NCC over the whole image
# peaked up to 17.5 mm along the ray from the truth even on noise-free simulated X-rays (up to 30 mm on realistic
# ones), and a prior of 15 mm held the initial depth against that: right where the start's depth was, wrong from far
# starts (one view, seeds 6-7 of ``xray-evaluate``: from 20-60 mm 1 of 16 for ProST + refinement). The peak was the
# display window's clipped pixels and the shutters' shadow, now left out (``compared_pixels``;
# ``benchmarks/xray_depth_study.py``). Without them the similarity finds depth, and the prior need only stop drift
# where the rest of the pose is still wrong: on the same cases, from 20-60 mm ProST + refinement succeeded in 1 / 7 /
# 11 of 16 with 15 / 30 / 60 mm (CMA-ES alone 0 / 5 / 6), from < 10 mm every method in 8 of 8 but CMA-ES alone with 60
# mm (7 of 8, a case ending 12.6 mm along the ray). 60 mm, the few centimetres by which a C-arm's source-to-patient
# distance is known, is the default; ``PoseSearch.depth_prior_mm`` (``xray-register --depth-prior-mm``) narrows it
# where that distance is known better.
DEPTH_PRIOR_MM = 60.0
DEPTH_PRIOR_WEIGHT = 0.02
# With the target vertebra known (the per-vertebra mode), the final gradient ascent compares the images only over
# the bounding box of its projection at each pose, widened by this margin (mm on the detector). The global search
# (CMA-ES) scores the sum of both (``PoseSearch.preference``). Over the whole image the neighbouring vertebrae tell
# the levels apart, but it has second peaks near the right pose (two views of the TotalSegmentator CT: from starts
# 2.6 and 4.0 mm off CMA-ES alone ended 17 and 15 mm along the AP ray; on the sum, 1.1 and 1.9 mm off); over the box
# alone CMA-ES ended further from the truth (2.1 mm off at the start: 4.2 mm, against 1.3 over the whole image).
TARGET_MARGIN_MM = 20.0
# An extreme value held by this fraction of the X-ray's pixels marks where its display window clipped
# (``compared_pixels``).
CLIPPED_FRACTION = 0.001


def image_gradients(images: torch.Tensor):
    """Central differences along columns and rows of (B, rows, columns) images (the inner pixels)."""
    gx = images[..., 1:-1, 2:] - images[..., 1:-1, :-2]
    gy = images[..., 2:, 1:-1] - images[..., :-2, 1:-1]
    return gx, gy


def ncc(a: torch.Tensor, b: torch.Tensor, region: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalised cross-correlation over the last two dimensions, batched; weighted by ``region`` (weights in
    [0, 1] broadcastable to ``a``: weighted means, covariance and variances) where given, else over every pixel."""
    dims = (-2, -1)
    if region is None:
        region = torch.ones((), dtype=a.dtype, device=a.device)
    region = region.to(a.dtype)
    total = region.expand_as(a).sum(dim=dims, keepdim=True).clamp(min=1e-12)
    a = a - (region * a).sum(dim=dims, keepdim=True) / total
    b = b - (region * b).sum(dim=dims, keepdim=True) / total
    denominator = torch.sqrt((region * a * a).sum(dim=dims) * (region * b * b).sum(dim=dims) + 1e-12)
    return (region * a * b).sum(dim=dims) / denominator


def gradient_ncc(drr: torch.Tensor, xray: torch.Tensor, region: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gradient NCC between DRRs (B, rows, columns) and one X-ray (rows, columns): in [-1, 1], 1 is best.
    ``region``: (B, rows, columns) weights of the pixels compared (default all equally)."""
    dx, dy = image_gradients(drr)
    xx, xy = image_gradients(xray)
    inner = None if region is None else region[..., 1:-1, 1:-1]
    return 0.5 * (ncc(dx, xx, inner) + ncc(dy, xy, inner))


def target_region(carm, poses: torch.Tensor, points: torch.Tensor, margin_mm: float) -> torch.Tensor:
    """(B, rows, columns) weights in [0, 1]: the bounding box of ``points`` (N, 3, LPS mm) projected at each pose
    (B, 4, 4) onto the detector, widened by ``margin_mm`` on the detector; 1 a pixel or more inside its edges, 0
    beyond them, linear across the pixel on an edge, so that the similarity over it changes continuously with the
    pose. (A 0/1 box made it jump as a column entered the box: one holding a strong edge of the X-ray changed
    gradient NCC around the target by up to 0.06 where 10 mm along the ray changed it by 0.01, and the refinement's
    best pose sat at such a cliff.)"""
    (cx, cy), (sx, sy) = carm.principal_point_px, carm.pixel_spacing_mm
    columns, rows = carm.size
    placed_points = poses[:, None, :3, :3] @ points[None, :, :, None]
    placed_points = placed_points[..., 0] + poses[:, None, :3, 3]  # (B, N, 3) in the source frame
    depth = placed_points[..., 2].clamp(min=1e-6)
    u = cx + carm.source_to_detector_mm * placed_points[..., 0] / (depth * sx)
    v = cy + carm.source_to_detector_mm * placed_points[..., 1] / (depth * sy)
    mu, mv = margin_mm / sx, margin_mm / sy
    grid_u = torch.arange(columns, dtype=poses.dtype, device=poses.device)
    grid_v = torch.arange(rows, dtype=poses.dtype, device=poses.device)

    def inside(grid, low, high):  # (B, n): 1 inside [low, high] by half a pixel or more, 0 outside by as much
        return ((grid - low[:, None] + 0.5).clamp(0, 1) * (high[:, None] - grid + 0.5).clamp(0, 1))

    inside_u = inside(grid_u, u.min(1).values - mu, u.max(1).values + mu)  # (B, columns)
    inside_v = inside(grid_v, v.min(1).values - mv, v.max(1).values + mv)  # (B, rows)
    return inside_v[:, :, None] * inside_u[:, None, :]


def prepare_xray(pixels: np.ndarray, size, device=None, dtype=torch.float32) -> torch.Tensor:
    """The X-ray on the registration's detector grid: area-averaged to ``size`` = (columns, rows)."""
    image = torch.as_tensor(np.asarray(pixels, dtype=np.float64), dtype=dtype, device=device)[None, None]
    return F.adaptive_avg_pool2d(image, (size[1], size[0]))[0, 0]


def prepare_field(field: np.ndarray, size, device=None, dtype=torch.float32) -> torch.Tensor:
    """The X-ray's exposed field (rows, columns: true where the shutters let the beam through) on the registration's
    detector grid (``size`` = (columns, rows)): 1 where every pixel of the X-ray that the grid's pixel averages is
    exposed, else 0."""
    exposed = torch.as_tensor(np.asarray(field, dtype=np.float32), dtype=dtype, device=device)[None, None]
    return -F.adaptive_max_pool2d(-exposed, (size[1], size[0]))[0, 0]


def compared_pixels(xray: torch.Tensor, field: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(rows, columns) 1 where the X-ray's pixel and its eight neighbours are all exposed (``field``, 1/0 on the
    same grid; all where None) and unclipped, else 0: the pixels the similarity compares.

    Shutters: where they block the beam the X-ray shows scatter and noise while the DRR shows anatomy, and their
    borders are edges the DRR lacks. Clipping: a displayed radiograph is windowed, and where it is clipped (air,
    the densest bone) it holds no edges while the DRR does; the clipped regions' borders are edges of the window,
    not of the anatomy. Compared there too, gradient NCC over the whole image at the true rotation and in-plane
    place peaked 8-10 mm along the ray from the truth on average on noise-free simulated X-rays (up to 17.5 mm; 8
    poses per shared CT), 18 mm with all the simulation's realism; without those pixels at the truth in all 16
    noise-free, 3.4 and 5.9 mm from it on the two CTs with the realism (``benchmarks/xray_depth_study.py``).
    Clipped: the image's smallest or largest value where at least ``CLIPPED_FRACTION`` of the pixels (and 4) hold
    it; a lone extreme pixel is anatomy. All ones where fewer than a tenth of the pixels would remain (an image
    mostly clipped or shuttered, or binary)."""
    enough = max(4.0, CLIPPED_FRACTION * xray.numel())
    compared = torch.ones_like(xray) if field is None else field.to(xray.dtype).clone()
    for extreme in (xray.min(), xray.max()):
        if (xray == extreme).sum() >= enough:
            compared[xray == extreme] = 0
    compared = -F.max_pool2d(-compared[None, None], 3, stride=1, padding=1)[0, 0]  # the neighbours too
    return compared if compared.mean() >= 0.1 else torch.ones_like(xray)


@dataclass
class PoseSearch:
    """One CT-to-X-ray problem: the CT's volume, the C-arm (registration resolution), the X-ray on that grid,
    the initial pose and the pivot (the target vertebra's centre, LPS mm). More views of the same patient
    (``add_view``: a lateral beside an AP shot) are searched together: one pose of the CT, each view's similarity
    averaged, and no depth prior, since another view sees the first one's depth in its plane."""

    volume: Volume
    carm: object
    xray: torch.Tensor
    initial: torch.Tensor  # 4x4 ct_to_source
    centre: torch.Tensor  # (3,)
    # Points of the target vertebra (N, 3, LPS mm): the refinement's similarity then compares the DRR and the
    # X-ray only around the target's projection (see ``TARGET_MARGIN_MM``); None: the whole image throughout.
    target_points: Optional[torch.Tensor] = None
    history: List[Dict] = field(default_factory=list)
    evaluations: int = 0
    # A second view's source frame from the first one's (4x4): its poses are frame @ (the first view's pose).
    frame: Optional[torch.Tensor] = None
    others: List["PoseSearch"] = field(default_factory=list)
    depth_prior_mm: float = DEPTH_PRIOR_MM  # the depth prior's width (one view)
    # The X-ray's exposed field on the registration's grid (``prepare_field``; None: all of it): the similarity
    # compares the images only where the shutters let the beam through (``compared_pixels``).
    field: Optional[torch.Tensor] = None

    def __post_init__(self):
        dtype = self.volume.mu.dtype
        self.initial = torch.as_tensor(self.initial, dtype=dtype)
        self.centre = torch.as_tensor(self.centre, dtype=dtype)
        self.given = self.xray.to(dtype)
        if self.field is not None:
            self.field = torch.as_tensor(self.field, dtype=dtype, device=self.given.device)
        self.informative = compared_pixels(self.given, self.field)  # the pixels compared
        if self.target_points is not None:
            self.target_points = torch.as_tensor(np.asarray(self.target_points), dtype=dtype,
                                                 device=self.volume.mu.device).reshape(-1, 3)
        if self.frame is not None:
            self.frame = torch.as_tensor(self.frame, dtype=dtype, device=self.volume.mu.device)
        self.detect_polarity(torch.zeros(6, dtype=dtype))

    def add_view(self, carm, xray: torch.Tensor, initial, field: Optional[torch.Tensor] = None) -> "PoseSearch":
        """Another X-ray of the patient, taken without the patient moving: ``initial`` is its own initial pose
        (4x4 ct_to_source), which with the first view's gives the C-arm's motion between the two shots (from
        the C-arm's angles, or from both views' initial poses found as for one); the search keeps that motion
        fixed and moves the CT. ``field``: its exposed field (as ``PoseSearch.field``)."""
        initial = torch.as_tensor(initial, dtype=self.initial.dtype)
        view = PoseSearch(self.volume, carm, xray, self.initial, self.centre, self.target_points,
                          frame=initial @ torch.linalg.inv(self.initial), field=field)
        self.others.append(view)
        return view

    def detect_polarity(self, parameters: torch.Tensor) -> None:
        """Bone bright or dark, read from the sign of the intensity NCC between the DRRs at the poses given ((k,
        6) or (6,): the initial one, or also the learned similarity's answer) and the X-ray, where its magnitude is
        largest. Intensities, not their gradients: the body's bulk and the spine's column overlap from far off,
        edges need not (``benchmarks/xray_polarity_cues.py``: xray-evaluate's two-view cases, both CTs, seeds
        2-9, at the starting pose: gradient NCC's sign wrong in 6 of the 128 views 20-60 mm off, the intensity
        NCC's in none of all 256, its smallest value +0.18; the two such cases of seed 3 fail read right as read
        wrong, for other reasons). It can still err where the CT ends inside the X-ray's field (1 of 48 other far
        starts, ``Testing``). Bone-dark raw intensities, I0·exp(-line integral) (Beer-Lambert), are linearised
        by the log where they are all positive; an inverted display is flipped."""
        self.xray = self.given
        candidates = torch.as_tensor(parameters, dtype=self.given.dtype).reshape(-1, 6)
        with torch.no_grad():
            values = ncc(self.render(candidates), self.given)
        value = values[int(values.abs().argmax())]
        self.polarity = -1.0 if value < 0 else 1.0
        if self.polarity < 0:
            positive = bool((self.given > 0).all())
            self.xray = -torch.log(self.given / self.given.max()) if positive else -self.given

    def pose(self, parameters: torch.Tensor) -> torch.Tensor:
        pose = pose_from_parameters(parameters, self.initial, self.centre)
        return pose if self.frame is None else self.frame @ pose

    def render(self, parameters: torch.Tensor) -> torch.Tensor:
        return render_by_planes(self.volume, self.carm, self.pose(parameters))

    def image_similarity(self, parameters: torch.Tensor, xray: torch.Tensor, around_target: bool = False
                         ) -> torch.Tensor:
        """Gradient NCC of the DRRs at a batch of parameter vectors (B, 6) with ``xray`` over its unclipped pixels
        (``compared_pixels``); ``around_target`` (where ``target_points`` are given): over those of the target's
        region at each pose (it follows the pose, not differentiated)."""
        poses = self.pose(parameters)
        region = self.target_region_at(poses) if around_target else None
        return gradient_ncc(render_by_planes(self.volume, self.carm, poses), xray,
                            self.informative if region is None else region)

    def image_similarities(self, parameters: torch.Tensor, xray: torch.Tensor):
        """Gradient NCC over the whole images and around the target (None without ``target_points``) of the DRRs
        at a batch of parameter vectors (B, 6) with ``xray``, from one rendering; each over the X-ray's unclipped
        pixels."""
        poses = self.pose(parameters)
        drrs = render_by_planes(self.volume, self.carm, poses)
        region = self.target_region_at(poses)
        return gradient_ncc(drrs, xray, self.informative), None if region is None else gradient_ncc(drrs, xray, region)

    def target_region_at(self, poses: torch.Tensor) -> Optional[torch.Tensor]:
        """The pixels compared around the target at each pose: its region on the detector (``target_region``)
        within the X-ray's compared pixels (``compared_pixels``); None without target points."""
        if self.target_points is None:
            return None
        with torch.no_grad():
            return target_region(self.carm, poses.detach(), self.target_points, TARGET_MARGIN_MM) * self.informative

    def depth_prior(self, parameters: torch.Tensor) -> torch.Tensor:
        """What one view's similarity loses for the change of depth (see ``DEPTH_PRIOR_MM``)."""
        return DEPTH_PRIOR_WEIGHT * (parameters[:, 5] / self.depth_prior_mm) ** 2

    def mean_over_views(self, parameters: torch.Tensor, score: Callable[["PoseSearch"], torch.Tensor]
                        ) -> torch.Tensor:
        """``score(view)`` averaged over this search's views, the evaluations counted."""
        views = [self] + self.others
        self.evaluations += parameters.shape[0] * len(views)
        return sum(score(view) for view in views) / len(views)

    def preference(self, parameters: torch.Tensor) -> torch.Tensor:
        """What the search prefers at a batch of parameter vectors (B, 6): the sum of the similarity over the
        whole images and around the target vertebra (where the search has its points), each less the depth prior
        (one view), each the mean of the views' (more views); one rendering per view. See ``preference``."""
        def both(view):
            whole, target = view.image_similarities(parameters, view.xray)
            return whole if target is None else whole + target
        value = self.mean_over_views(parameters, both)
        if self.others:
            return value
        return value - (1 if self.target_points is None else 2) * self.depth_prior(parameters)

    def similarity(self, parameters: torch.Tensor, around_target: bool = False) -> torch.Tensor:
        """The image similarity at a batch of parameter vectors (B, 6), less the depth prior (one view); with
        more views, the mean of their similarities."""
        value = self.mean_over_views(parameters, lambda view: view.image_similarity(parameters, view.xray,
                                                                                    around_target))
        return value if self.others else value - self.depth_prior(parameters)


def cma_es(search: PoseSearch, start: np.ndarray, evaluations: int = 600, sigma: float = 0.5, seed: int = 0,
           population: Optional[int] = None, should_stop: Optional[Callable[[], bool]] = None,
           progress: Optional[Callable[[int, int, float], None]] = None) -> np.ndarray:
    """CMA-ES on the scaled parameters (one population rendered as a batch), maximising ``PoseSearch.preference``
    (the whole images' similarity plus the target's); the best pose seen."""
    from cmaes import CMA
    optimizer = CMA(mean=np.asarray(start, float) / PARAMETER_SCALE, sigma=sigma, seed=seed,
                    population_size=population)
    best, best_value, used = np.asarray(start, float), -np.inf, 0
    while used < evaluations and not optimizer.should_stop():
        if should_stop is not None and should_stop():
            raise Cancelled("X-ray registration cancelled")
        candidates = np.stack([optimizer.ask() for _ in range(optimizer.population_size)])
        parameters = torch.as_tensor(candidates * PARAMETER_SCALE, dtype=search.volume.mu.dtype)
        with torch.no_grad():
            values = search.preference(parameters).cpu().numpy().astype(np.float64)
        optimizer.tell(list(zip(candidates, -values)))
        used += len(candidates)
        if values.max() > best_value:
            best_value, best = float(values.max()), candidates[int(values.argmax())] * PARAMETER_SCALE
        search.history.append({"stage": "cma-es", "evaluations": search.evaluations, "similarity": best_value})
        if progress is not None:
            progress(used, evaluations, best_value)
    return best


def gradient_ascent(search: PoseSearch, start: np.ndarray, steps: int = 60, learning_rate: float = 0.02,
                    should_stop: Optional[Callable[[], bool]] = None,
                    progress: Optional[Callable[[int, int, float], None]] = None) -> np.ndarray:
    """Adam on the scaled parameters through the differentiable renderer (refinement near the answer), on the
    similarity around the target vertebra where the search has its points (the per-vertebra mode); the best pose
    seen. Every step is taken: Adam's fixed step can cross a stretch of ten or more steps without a gain and climb
    again after it (simulated two-view case 2.3 mm off: stopped after 8 idle steps it ended 1.16 mm off, after all
    100 at 0.30 mm)."""
    dtype = search.volume.mu.dtype
    scale = torch.as_tensor(PARAMETER_SCALE, dtype=dtype)
    scaled = (torch.as_tensor(start, dtype=dtype) / scale).clone().requires_grad_(True)
    optimizer = Adam([scaled], lr=learning_rate)
    best, best_value = np.asarray(start, float), -np.inf
    for step in range(1, steps + 1):
        if should_stop is not None and should_stop():
            raise Cancelled("X-ray registration cancelled")
        value = search.similarity((scaled * scale)[None], around_target=True)[0]
        if value.item() > best_value:
            best_value, best = value.item(), (scaled * scale).detach().cpu().numpy().astype(np.float64)
        optimizer.zero_grad()
        (-value).backward()
        optimizer.step()
        search.history.append({"stage": "gradient", "evaluations": search.evaluations, "similarity": best_value})
        if progress is not None:
            progress(step, steps, best_value)
    return best


def learned_descent(search: PoseSearch, learned, steps: int = 60, step_size: float = 0.3, keep_depth: bool = True,
                    should_stop: Optional[Callable[[], bool]] = None,
                    progress: Optional[Callable[[int, int, float], None]] = None) -> np.ndarray:
    """Descent on ProST's learned distance (``prost.LearnedSimilarity``) in the scaled parameters, along the
    unit direction of its gradient (the direction is what the network was trained to get right, not the size;
    a per-coordinate rule such as Adam's would give the weakly seen depth the same step as the rest), the step
    shrinking from ``step_size`` to a tenth of it (cosine schedule); the last pose. ``keep_depth``: the
    distance along the principal ray is left to the refinement. One view sees depth only through magnification
    (10 mm at 750 mm: 1.3 %, a fraction of a pixel across a vertebra) and the learned gradient's depth part
    proved biased: followed, it carried the pose 70-180 mm away while the in-plane part came within 2-5 mm."""
    dtype = learned.volume.mu.dtype
    scale = torch.as_tensor(PARAMETER_SCALE, dtype=dtype)
    scaled = torch.zeros(6, dtype=dtype, requires_grad=True)
    initial, centre = search.initial.to(dtype), search.centre.to(dtype)
    free = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0 if keep_depth else 1.0], dtype=dtype)
    for step in range(1, steps + 1):
        if should_stop is not None and should_stop():
            raise Cancelled("X-ray registration cancelled")
        distance = learned.distance(pose_from_parameters(scaled * scale, initial, centre)[None])[0]
        gradient, = torch.autograd.grad(distance, scaled)
        gradient = gradient * free
        size = step_size * (0.1 + 0.45 * (1 + np.cos(np.pi * (step - 1) / max(1, steps - 1))))
        with torch.no_grad():
            scaled -= size * gradient / gradient.norm().clamp(min=1e-12)
        search.history.append({"stage": "prost", "step": step, "learned_distance": distance.item()})
        if progress is not None:
            progress(step, steps, -distance.item())
    return (scaled * scale).detach().cpu().numpy().astype(np.float64)


def preference(search: PoseSearch, candidates: Sequence[np.ndarray]) -> np.ndarray:
    """How much the search prefers each candidate parameter vector: the sum of the similarity over the whole
    images and around the target vertebra (where the search has its points). The whole images' alone can prefer
    a wrong pose near the right one: with two views of the TotalSegmentator CT, 20 mm along the AP ray, the
    lateral view's whole-image gradient NCC has a second, higher peak (views' mean 0.452 at the start, 0.469
    there) where the target's own similarity has fallen (0.579 -> 0.49) onto a plateau the refinement, climbing
    it, does not leave."""
    parameters = torch.as_tensor(np.stack(candidates), dtype=search.volume.mu.dtype)
    with torch.no_grad():
        return search.preference(parameters).cpu().numpy().astype(np.float64)


def preferred(search: PoseSearch, candidates: Sequence[np.ndarray]) -> int:
    """Index of the candidate to go on from: the highest ``preference``."""
    return int(np.argmax(preference(search, candidates)))


def refined_best(search: PoseSearch, answers: Sequence[np.ndarray], origins: Sequence[np.ndarray], steps: int,
                 should_stop=None, progress=None) -> np.ndarray:
    """The most preferred of CMA-ES's ``answers`` and the most preferred of the poses its runs started from
    (``origins``) each refined (``gradient_ascent``), and the preferred of the two refined. They are compared
    where each has climbed, not where it stands: an answer sits on a peak of the whole images' similarity, a start
    on none, so unrefined a start can lose to a wrong peak it beats refined (simulated two views of the
    TotalSegmentator CT, a start 2.6 mm off: CMA-ES's answer 17 mm off scored 1.18 against the start's 1.07 and
    the truth's 1.32; refined, 1.20 against 1.32, 0.8 mm off). Both runs can end on the same wrong peak, so the
    two refined are one of each kind, not the two ranked first. ``progress``: gives each ascent its progress
    callback (``SearchProgress.next``)."""
    contenders = [answers[preferred(search, answers)], origins[preferred(search, origins)]]
    climbed = [gradient_ascent(search, c, steps, should_stop=should_stop, progress=progress and progress())
               for c in contenders]
    return climbed[preferred(search, climbed)]


def search_phases(method: str, evaluations: int, refine_steps: int, runs: int, learned_steps: int
                  ) -> List[Tuple[str, int]]:
    """What ``register_pose`` does, in order: (what, its steps) of each phase (DRR evaluations per view for
    CMA-ES, steps for the descent and the ascents)."""
    phases = [("ProST's learned descent", learned_steps)] if method.startswith("prost") else []
    if "cmaes" in method:
        phases += [(f"CMA-ES run {run} of {runs}", evaluations) for run in range(1, runs + 1)]
        if "gradient" in method:
            phases += [("refining CMA-ES's best answer", refine_steps), ("refining the best start", refine_steps)]
    elif "gradient" in method:
        phases.append(("refining", refine_steps))
    return phases


class SearchProgress:
    """The progress of a whole search (its ``search_phases``): each phase in turn takes a callback ``(step, steps,
    value)`` of its own (``next``), and ``report`` hears ``(done, total, value, phase)``, the steps counted on from
    the phases before it: one count across the search (the Slicer panel's bar crosses the stage once, not once per
    phase). A phase that stops early (CMA-ES converged) leaves the count to jump to the next one's start."""

    def __init__(self, phases: Sequence[Tuple[str, int]], report: Optional[Callable] = None):
        self.phases, self.report, self.started = list(phases), report, 0
        self.total = sum(steps for _, steps in self.phases)

    def next(self) -> Optional[Callable[[int, int, float], None]]:
        """The next phase's callback (None without ``report``, or once every phase has had one)."""
        if self.report is None or self.started >= len(self.phases):
            return None
        name, steps = self.phases[self.started]
        before = sum(count for _, count in self.phases[:self.started])
        self.started += 1
        return lambda step, _, value: self.report(before + min(step, steps), self.total, value, name)


def register_pose(search: PoseSearch, method: str = "cmaes+gradient", evaluations: int = 400,
                  refine_steps: int = 60, seed: int = 0, restarts: int = 2, should_stop=None,
                  progress=None, learned=None, learned_steps: int = 60) -> Dict:
    """Search the pose; returns {"ct_to_source" (4x4 numpy), "parameters", "similarity", "initial_similarity",
    "evaluations", "seconds", "polarity"}. CMA-ES runs ``restarts`` times (other seeds, ``evaluations`` each): one
    run often settles in the basin of a neighbouring vertebra. With the refinement, the preferred of its answers
    and the preferred of the poses it started from are each refined and the preferred of those kept
    (``refined_best``); without, the preferred of all of them. Without ProST every run starts from the initial
    pose; with ProST (``learned``: a ``prost.LearnedSimilarity``), its descent comes first and the first run
    starts from its answer, the others from the initial pose. The learned answer alone was the start of the only
    run before, chosen against the initial pose: on simulated single views 10 deg / 20 mm off, a learned answer
    the intensity similarity preferred led CMA-ES to a neighbouring vertebra where a run from the initial pose
    found the right one (chest CT, 16 cases: the target's projection 19-37 mm off in 3, within 2 mm in all 16
    with both runs). ``progress(done, total, value, phase)``: the steps of the whole search (``SearchProgress``)."""
    if method not in POSE_SEARCH_METHODS:
        raise ValueError(f"method must be one of {', '.join(POSE_SEARCH_METHODS)}")
    if method.startswith("prost") and learned is None:
        raise ValueError(f"method {method} needs a ProST model")
    t0 = time.perf_counter()
    dtype = search.volume.mu.dtype
    phases = SearchProgress(search_phases(method, evaluations, refine_steps, max(1, restarts), learned_steps),
                            progress)
    with torch.no_grad():
        initial = search.similarity(torch.zeros(1, 6, dtype=dtype))[0].item()
    origins = [np.zeros(6)]
    if method.startswith("prost"):
        found = learned_descent(search, learned, learned_steps, should_stop=should_stop, progress=phases.next())
        initial_and_found = torch.as_tensor(np.stack([np.zeros(6), found]), dtype=dtype)
        for view in [search] + search.others:  # each view's polarity read again, there as well
            view.detect_polarity(initial_and_found)
        origins = [found] + origins
    starts = (origins + [np.zeros(6)] * restarts)[:max(1, restarts)]
    parameters = origins[0]
    if "cmaes" in method:
        answers = [cma_es(search, start, evaluations, seed=seed + run, should_stop=should_stop,
                          progress=phases.next()) for run, start in enumerate(starts)]
        if "gradient" in method:
            parameters = refined_best(search, answers, origins, refine_steps, should_stop=should_stop,
                                      progress=phases.next)
        else:
            candidates = answers + origins
            parameters = candidates[preferred(search, candidates)]
    elif "gradient" in method:
        parameters = gradient_ascent(search, parameters, refine_steps, should_stop=should_stop,
                                     progress=phases.next())
    final = torch.as_tensor(parameters, dtype=dtype)
    with torch.no_grad():
        similarity = search.similarity(final[None])[0].item()
        pose = search.pose(final).cpu().numpy().astype(np.float64)
    return {"ct_to_source": pose, "parameters": parameters.tolist(), "similarity": similarity,
            "initial_similarity": initial, "evaluations": search.evaluations,
            "seconds": time.perf_counter() - t0, "polarity": "bone bright" if search.polarity > 0 else "bone dark"}


def mean_target_error(pose_a: np.ndarray, pose_b: np.ndarray, points_lps: np.ndarray) -> float:
    """mTRE (mm): the mean distance between the target's points placed by two poses (in the source frame)."""
    return float(np.linalg.norm(placed(points_lps, pose_a) - placed(points_lps, pose_b), axis=1).mean())
