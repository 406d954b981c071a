"""Classical 2D baselines run beside the network on the same images: SimpleITK's Demons and B-spline.

Both take (fixed, moving) arrays on one pixel grid (1 mm, values in [0, 1]) and return the map as a pixel
displacement (2, rows, columns) in (y, x) order, fixed pixel -> moving pixel, as the network's.
- **Demons**: SimpleITK's fast symmetric forces Demons (200 iterations, field smoothed with sigma 1.5 px) after
  histogram matching of the moving image to the fixed (Demons compares intensities directly).
- **B-spline**: a free-form deformation on an 8 x 8 control grid, correlation metric (insensitive to the
  exposure changes), L-BFGS-B, two levels (shrink 2, 1; smoothing 1, 0 px).
"""

import numpy as np
import SimpleITK as sitk

from .data import match_histogram

PLANAR_BASELINES = ("demons", "bspline")


def _image(array: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))


def _as_pixels(field: sitk.Image) -> np.ndarray:
    vectors = sitk.GetArrayFromImage(field)  # (rows, columns, (x, y)) on a unit-spacing, identity grid
    return np.stack([vectors[..., 1], vectors[..., 0]]).astype(np.float32)


def demons(fixed: np.ndarray, moving: np.ndarray, iterations: int = 200, sigma: float = 1.5) -> np.ndarray:
    f, m = _image(fixed), _image(match_histogram(moving, fixed))
    method = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    method.SetNumberOfIterations(iterations)
    method.SetStandardDeviations(sigma)
    return _as_pixels(method.Execute(f, m))


def bspline(fixed: np.ndarray, moving: np.ndarray, mesh: int = 8, iterations: int = 100) -> np.ndarray:
    f, m = _image(fixed), _image(moving)
    initial = sitk.BSplineTransformInitializer(f, [mesh, mesh])
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsCorrelation()
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-6, numberOfIterations=iterations)
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    method.SetInitialTransform(initial, inPlace=True)
    method.Execute(f, m)
    field = sitk.TransformToDisplacementField(initial, sitk.sitkVectorFloat64, f.GetSize(), f.GetOrigin(),
                                              f.GetSpacing(), f.GetDirection())
    return _as_pixels(field)


def run_baseline(name: str, fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    if name == "demons":
        return demons(fixed, moving)
    if name == "bspline":
        return bspline(fixed, moving)
    raise ValueError(f"unknown 2D baseline {name!r}: choose from {', '.join(PLANAR_BASELINES)}")
