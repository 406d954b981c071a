"""Classical baseline: ANTs SyN (through the optional package ``antspyx``) on the networks' crops and metrics.

``register_ants_syn`` takes the same inputs as ``Registrar.register`` (SimpleITK crops with full geometry and
their uint8 vertebra masks) and reports the same table: Dice, precision, recall and ASSD at the stages
``initial`` / ``affine`` / ``final``, plus folding of the deformable part, and the wall time.

antspyx is optional (``pip install antspyx``): this module imports without it, and ``register_ants_syn``
raises a ``DependencyError`` (an ``ImportError``) that says so. Note that antspyx 0.6.3 pins ``numpy<2.4`` and
``scipy<1.16``.
"""

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk

from .maps import field_jacobian
from .metrics import STAGES, folding, stage_metrics
from .errors import DependencyError, InputError
from .validation import check_label, check_pair, check_volume

ANTS_MISSING = "ANTs SyN needs the optional package antspyx: pip install antspyx"
THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
SEED_ENV = "ANTS_RANDOM_SEED"
_itk_threads = None  # the thread count ITK took at this process's first ANTs call (it never re-reads it)


def _ants():
    try:
        import ants  # noqa: F401  (antspyx)
    except ImportError as err:
        raise DependencyError(ANTS_MISSING) from err
    return ants


# -- SimpleITK <-> ANTs ---------------------------------------------------------------------------------
# Both are ITK images in the same LPS physical space: origin, spacing and the direction matrix carry over
# unchanged. Only the array layout differs: SimpleITK's GetArrayFromImage is (z, y, x), ANTsPy's
# ``numpy()``/``from_numpy`` is (x, y, z) (with vector components last in both).

def sitk_to_ants(image: sitk.Image):
    """An ANTsImage with ``image``'s voxels, origin, spacing and direction (scalar images)."""
    ants = _ants()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("only scalar images convert to ANTs here")
    array = sitk.GetArrayFromImage(image)
    dim = image.GetDimension()
    return ants.from_numpy(np.ascontiguousarray(array.transpose(tuple(range(dim))[::-1])),
                           origin=tuple(image.GetOrigin()), spacing=tuple(image.GetSpacing()),
                           direction=np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim))


def ants_to_sitk(image) -> sitk.Image:
    """A SimpleITK image with the ANTsImage's voxels and geometry (vector images become vector images)."""
    array = image.numpy()
    dim = image.dimension
    if image.has_components:
        out = sitk.GetImageFromArray(np.ascontiguousarray(
            array.transpose(tuple(range(dim))[::-1] + (dim,))), isVector=True)
    else:
        out = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(tuple(range(dim))[::-1])))
    out.SetOrigin(tuple(float(v) for v in image.origin))
    out.SetSpacing(tuple(float(v) for v in image.spacing))
    out.SetDirection(tuple(float(v) for v in np.asarray(image.direction).ravel()))
    return out


def transform_matrix(transform: sitk.Transform) -> np.ndarray:
    """4x4 homogeneous matrix of a linear SimpleITK/ITK transform (any centre), as read from a file."""
    t = transform.GetNthTransform(0) if isinstance(transform, sitk.CompositeTransform) else transform
    t = t.Downcast() if type(t) is sitk.Transform else t
    m = np.eye(4)
    a = np.asarray(t.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(t.GetCenter(), dtype=np.float64)
    m[:3, :3] = a
    m[:3, 3] = np.asarray(t.GetTranslation(), dtype=np.float64) + c - a @ c
    return m


# -- the baseline ----------------------------------------------------------------------------------------

@dataclass
class BaselineResult:
    """One baseline registration; images live on the fixed grid (as in ``RegistrationResult``)."""

    warped: sitk.Image  # moving image through the full transform (linear interpolation)
    warped_affine: sitk.Image  # moving image through the affine stage only
    forward_field: sitk.Image  # composed affine + SyN displacement (mm, LPS): fixed point p -> p + u(p)
    jacobian: np.ndarray  # (z, y, x) det of the deformable (SyN) part's Jacobian on the fixed grid
    inverse_field: Optional[sitk.Image] = None  # composed inverse (mm, LPS) on the moving grid
    affine_lps: Optional[np.ndarray] = None  # 4x4, fixed LPS point -> moving LPS point (the affine stage)
    warped_label_affine: Optional[sitk.Image] = None
    warped_label: Optional[sitk.Image] = None
    metrics: Optional[Dict] = None
    seconds: float = 0.0  # wall time of ants.registration alone (like Registrar's forward-pass time)
    method: str = "ANTs SyN"
    notes: List[str] = field(default_factory=list)

    def forward_transform(self) -> sitk.DisplacementFieldTransform:
        return sitk.DisplacementFieldTransform(sitk.Cast(self.forward_field, sitk.sitkVectorFloat64))


def _label_on(label: Optional[sitk.Image], image: sitk.Image, name: str) -> Optional[sitk.Image]:
    """A uint8 0/1 mask on ``image``'s grid."""
    if label is None:
        return None
    if not isinstance(label, sitk.Image):
        raise InputError(f"{name} must be a SimpleITK image on its image's grid")
    if label.GetSize() != image.GetSize():
        raise InputError(f"{name} has size {label.GetSize()}, its image {image.GetSize()}")
    same = (np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-3)
            and np.allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-5)
            and np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-5))
    if not same:
        raise InputError(f"{name} is not on its image's grid (origin, spacing or direction differ)")
    mask = sitk.GetImageFromArray(check_label(sitk.GetArrayViewFromImage(label), name).astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def register_ants_syn(fixed: sitk.Image, moving: sitk.Image, fixed_label: Optional[sitk.Image] = None,
                      moving_label: Optional[sitk.Image] = None, transform: str = "SyN",
                      threads: Optional[int] = None, random_seed: Optional[int] = None,
                      **kwargs) -> BaselineResult:
    """Register ``moving`` to ``fixed`` with ANTs (``ants.registration``), keeping ANTs' defaults.

    What ANTsPy's default ``type_of_transform="SyN"`` runs (antspyx 0.6.3, one antsRegistration call):

    * initial translation aligning the intensity centres of mass (``-r [fixed,moving,1]``);
    * an **affine** stage (no separate rigid stage: that is ``"SyNRA"``): Mattes mutual information,
      32 bins, regular sampling of 20 % of the voxels, gradient step 0.25, four levels (shrink 4x2x2x1,
      smoothing 3x2x1x0 voxels, 2100x1200x1200x0 iterations: the full-resolution level is skipped);
    * a **SyN** stage ``SyN[0.2, 3, 0]`` (gradient step 0.2, update-field smoothing 3 voxels, no total-field
      smoothing), Mattes mutual information (32 bins, dense), ``reg_iterations=(40, 20, 0)`` at shrink
      4x2x1 / smoothing 2x1x0 voxels: again no iterations at full resolution.

    The result is the affine (``0GenericAffine.mat``, the initial translation folded in) followed by the
    SyN warp (``1Warp.nii.gz``, a displacement field on the fixed grid): a fixed point ``p`` maps to the
    moving point ``A(p + w(p))``.

    Outputs, on the fixed grid: the warped image, the affine-stage image, labels warped with ANTs'
    ``genericLabel`` interpolator (full transform, and the ``.mat`` alone for the ``affine`` stage), the
    composed forward displacement field, and ``jacobian`` = det(I + grad w) of the **SyN warp alone**
    (the deformable part, which is what the paper's folding counts; the composed map's determinant is
    that times det(A), so the sign, and thus folding, agrees whenever A preserves orientation). It is
    computed with the same central differences as the networks' (``field_jacobian``).

    Metrics (with both labels, crops of equal shape): ``stage_metrics`` of the moving label as is
    (``initial``: both crops are centred on their vertebra), after the affine stage and after SyN
    (``final``, plus ``folding(jacobian)``), exactly as ``Registrar`` reports them.

    ``transform`` is ANTsPy's ``type_of_transform`` (e.g. ``"SyN"``, ``"SyNRA"``, ``"SyNCC"``); ``kwargs``
    go to ``ants.registration`` (e.g. ``reg_iterations=(20, 10, 0)``).

    ``threads`` sets ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` (default: the variable's value if it is
    already set, else all cores). ITK reads it once per process, at the first ANTs call: that call's
    value holds for the rest of the process (a later, different ``threads`` is reported in ``notes``).
    ANTs is not reproducible run to run by default (random metric sampling, seeded from the clock, and
    multithreaded sums): ``random_seed`` (``ANTS_RANDOM_SEED``) with ``threads=1`` makes it so.

    ``seconds`` is the wall time of ``ants.registration`` alone (conversions, label warps and metrics
    excluded), like ``Registrar``'s network time.
    """
    global _itk_threads
    ants = _ants()
    for key in ("outprefix", "write_composite_transform"):
        if key in kwargs:
            raise TypeError(f"register_ants_syn manages {key!r} itself")
    for image, name in ((fixed, "fixed image"), (moving, "moving image")):
        if not isinstance(image, sitk.Image) or image.GetDimension() != 3:
            raise InputError(f"{name} must be a 3D SimpleITK image")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{name} must be a scalar image")
        check_volume(sitk.GetArrayViewFromImage(image), name)
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    fixed_label = _label_on(fixed_label, fixed, "fixed label")
    moving_label = _label_on(moving_label, moving, "moving label")
    if fixed_label is not None and moving_label is not None:
        check_pair(sitk.GetArrayViewFromImage(fixed_label), sitk.GetArrayViewFromImage(moving_label),
                   "label maps (crops of the same size are compared voxel by voxel at the initial stage)")

    notes = []
    if threads:
        os.environ[THREADS_ENV] = str(int(threads))
    elif not os.environ.get(THREADS_ENV):
        os.environ[THREADS_ENV] = str(os.cpu_count() or 1)
    if _itk_threads is None:
        _itk_threads = os.environ[THREADS_ENV]
    elif _itk_threads != os.environ[THREADS_ENV]:
        notes.append(f"ITK keeps the thread count of this process's first ANTs call ({_itk_threads}), "
                     f"not {os.environ[THREADS_ENV]}")
    old_seed = os.environ.get(SEED_ENV)
    if random_seed is not None:
        os.environ[SEED_ENV] = str(int(random_seed))
    a_fixed, a_moving = sitk_to_ants(fixed), sitk_to_ants(moving)
    with tempfile.TemporaryDirectory(prefix="acsg-ants-") as tmp:
        t0 = time.perf_counter()
        try:
            reg = ants.registration(a_fixed, a_moving, type_of_transform=transform,
                                    outprefix=os.path.join(tmp, "reg_"), **kwargs)
        except RuntimeError as err:
            raise RuntimeError(
                f"ANTs {transform} failed ({err}). ANTs printed the reason above (rerun with verbose=True "
                "for the whole log); flat or tiny images fail at the coarsest level (shrink 4, smoothing "
                "2-3 voxels)") from err
        finally:
            if random_seed is not None:
                if old_seed is None:
                    os.environ.pop(SEED_ENV, None)
                else:
                    os.environ[SEED_ENV] = old_seed
        seconds = time.perf_counter() - t0
        fwd = list(reg["fwdtransforms"])
        warps = [f for f in fwd if f.endswith("Warp.nii.gz") and not f.endswith("InverseWarp.nii.gz")]
        affines = [f for f in fwd if f.endswith(".mat")]

        def apply(image: sitk.Image, transforms, label: bool) -> sitk.Image:
            """``image`` through ``transforms`` onto the fixed grid (identity when there are none)."""
            if transforms:
                out = ants_to_sitk(ants.apply_transforms(a_fixed, sitk_to_ants(image), transforms,
                                                         interpolator="genericLabel" if label else "linear"))
            else:
                out = sitk.Resample(image, fixed, sitk.Transform(),
                                    sitk.sitkNearestNeighbor if label else sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            out.CopyInformation(fixed)  # the same grid; drop any float rounding of the geometry
            if label:
                out = sitk.Cast(out > 0.5, sitk.sitkUInt8)
            return out

        warped = ants_to_sitk(reg["warpedmovout"])
        warped.CopyInformation(fixed)
        warped_affine = apply(moving, affines, label=False)
        composed = ants.apply_transforms(a_fixed, a_moving, fwd, compose=os.path.join(tmp, "composed_"))
        forward_field = sitk.ReadImage(composed)
        forward_field.CopyInformation(fixed)
        inverse_composed = ants.apply_transforms(a_moving, a_fixed, list(reg["invtransforms"]),
                                                 whichtoinvert=[f.endswith(".mat") for f in reg["invtransforms"]],
                                                 compose=os.path.join(tmp, "inverse_"))
        inverse_field = sitk.ReadImage(inverse_composed)
        inverse_field.CopyInformation(moving)
        affine_lps = transform_matrix(sitk.ReadTransform(affines[0])) if affines else np.eye(4)
        # The deformable part alone: the SyN warp, a displacement field on the fixed grid.
        jac = field_jacobian(sitk.ReadImage(warps[0])) if warps else np.ones(fixed.GetSize()[::-1])
        result = BaselineResult(warped=warped, warped_affine=warped_affine, forward_field=forward_field,
                                jacobian=jac, inverse_field=inverse_field, affine_lps=affine_lps,
                                seconds=seconds, method=f"ANTs {transform}",
                                notes=notes)
        if moving_label is not None:
            result.warped_label = apply(moving_label, fwd, label=True)
            result.warped_label_affine = apply(moving_label, affines, label=True)

    if fixed_label is not None and moving_label is not None:
        stages = dict(zip(STAGES, (sitk.GetArrayFromImage(moving_label),
                                   sitk.GetArrayFromImage(result.warped_label_affine),
                                   sitk.GetArrayFromImage(result.warped_label))))
        result.metrics = stage_metrics(sitk.GetArrayFromImage(fixed_label), stages, fixed.GetSpacing())
        result.metrics["final"].update(folding(jac))
    return result
