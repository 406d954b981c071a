"""One-shot registration of vertebra crops with a trained network, results in physical space."""

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from . import geometry
from .checkpoint import build_model, load_checkpoint
from .metrics import STAGES, folding, jacobian_determinant, stage_metrics
from .networks import RegistrationNet
from .validation import InputError, check_label, check_pair, check_volume

ImageLike = Union[sitk.Image, np.ndarray]


def choose_device(device: str = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device in ("gpu", "cuda") and not torch.cuda.is_available():
        raise InputError("a GPU was asked for but PyTorch sees none (use device 'auto' or 'cpu')")
    return torch.device("cuda" if device == "gpu" else device)


def as_image(data: ImageLike, name: str) -> sitk.Image:
    """A SimpleITK image; plain arrays are taken as (z, y, x) volumes on a 1 mm identity grid."""
    if isinstance(data, sitk.Image):
        if data.GetDimension() != 3:
            raise InputError(f"{name} must be a 3D image, got {data.GetDimension()}D")
        if data.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{name} must be a scalar image, got {data.GetNumberOfComponentsPerPixel()} components")
        check_volume(sitk.GetArrayViewFromImage(data), name)
        return data
    image = sitk.GetImageFromArray(check_volume(data, name))
    return image


def fit_to_grid(image: sitk.Image, shape_zyx: Sequence[int], nearest: bool = False) -> sitk.Image:
    """Centre-crop or pad ``image`` (same spacing and direction) to the model's input size."""
    size = tuple(int(n) for n in shape_zyx[::-1])
    if image.GetSize() == size:
        return image
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()])
    reference = sitk.Image(size, sitk.sitkUInt8)
    reference.SetSpacing(image.GetSpacing())
    reference.SetDirection(image.GetDirection())
    offset = np.asarray(image.GetDirection()).reshape(3, 3) @ (np.asarray(image.GetSpacing()) * (np.asarray(size) - 1) / 2.0)
    reference.SetOrigin(tuple(np.asarray(centre) - offset))
    return geometry.resample(image, reference, sitk.Transform(), nearest=nearest)


@dataclass
class RegistrationResult:
    """Everything one registration produces; images live on the fixed grid, the inverse on the moving one."""

    fixed: sitk.Image
    moving: sitk.Image
    affine_voxel: np.ndarray  # (3, 4) network affine, centred voxel coordinates (array order)
    affine_lps: np.ndarray  # 4x4, fixed LPS point -> moving LPS point
    warped_affine: sitk.Image
    warped: sitk.Image
    forward_field: sitk.Image  # displacement (mm, LPS) on the fixed grid
    inverse_field: sitk.Image  # displacement (mm, LPS) on the moving grid
    jacobian: sitk.Image  # det of the deformable part's Jacobian, on the fixed grid
    warped_label_affine: Optional[sitk.Image] = None
    warped_label: Optional[sitk.Image] = None
    metrics: Optional[Dict] = None
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)

    def forward_transform(self) -> sitk.DisplacementFieldTransform:
        return geometry.displacement_transform(self.forward_field)

    def inverse_transform(self) -> sitk.DisplacementFieldTransform:
        return geometry.displacement_transform(self.inverse_field)

    def save(self, out_dir: str) -> Dict[str, str]:
        """Write every output (atomically, file by file) and return their paths."""
        os.makedirs(out_dir, exist_ok=True)
        paths = {}

        def put(key, name, writer, obj):
            if obj is not None:
                paths[key] = os.path.join(out_dir, name)
                writer(obj, paths[key])

        put("warped", "warped.nii.gz", geometry.write_image, self.warped)
        put("warped_affine", "warped_affine.nii.gz", geometry.write_image, self.warped_affine)
        put("warped_label", "warped_label.nii.gz", geometry.write_image, self.warped_label)
        put("jacobian", "jacobian.nii.gz", geometry.write_image, self.jacobian)
        put("forward_field", "forward_field.nii.gz", geometry.write_image, self.forward_field)
        put("inverse_field", "inverse_field.nii.gz", geometry.write_image, self.inverse_field)
        put("forward_transform", "forward_transform.h5", geometry.write_transform, self.forward_transform())
        put("inverse_transform", "inverse_transform.h5", geometry.write_transform, self.inverse_transform())
        put("affine_transform", "affine_transform.tfm", geometry.write_transform,
            geometry.affine_transform(self.affine_lps))
        summary = {"affine_lps": self.affine_lps.tolist(), "seconds": self.seconds, "notes": self.notes,
                   "folding": folding(sitk.GetArrayViewFromImage(self.jacobian))}
        if self.metrics is not None:
            summary["metrics"] = self.metrics
            put("metrics", "metrics.json", _write_json, self.metrics)
        put("summary", "summary.json", _write_json, summary)
        return paths


def _write_json(data, path):
    geometry.write_atomically(lambda tmp: open(tmp, "w").write(json.dumps(data, indent=2)), path)


class Registrar:
    """Load a network once, then register pairs of crops (or batches of them) on GPU or CPU."""

    def __init__(self, checkpoint: Optional[str] = None, model: Optional[RegistrationNet] = None,
                 device: str = "auto"):
        if (checkpoint is None) == (model is None):
            raise ValueError("give either a checkpoint path or a model")
        if checkpoint is not None:
            payload = load_checkpoint(checkpoint)
            model = build_model(payload, checkpoint)
            self.checkpoint_info = {k: payload.get(k) for k in ("versions", "summary", "step")}
        else:
            self.checkpoint_info = {}
        self.device = choose_device(device)
        self.model = model.to(self.device).eval()
        self.shape = tuple(model.config.input_shape)

    # -- inputs -----------------------------------------------------------------------------------
    def _prepare(self, fixed, moving, fixed_label, moving_label):
        fixed = fit_to_grid(as_image(fixed, "fixed image"), self.shape)
        moving = fit_to_grid(as_image(moving, "moving image"), self.shape)
        labels = []
        for data, name, ref in ((fixed_label, "fixed label", fixed), (moving_label, "moving label", moving)):
            if data is None:
                labels.append(None)
                continue
            label = as_image(data, name)
            if not isinstance(data, sitk.Image):
                # A bare array shares its image's grid.
                if label.GetSize() != ref.GetSize():
                    raise InputError(f"{name} has shape {np.shape(data)}, its image {ref.GetSize()[::-1]}")
                label.CopyInformation(ref)
            label = fit_to_grid(label, self.shape, nearest=True)
            check_label(sitk.GetArrayViewFromImage(label), name)
            labels.append(label)
        f_arr = sitk.GetArrayFromImage(fixed).astype(np.float32)
        m_arr = sitk.GetArrayFromImage(moving).astype(np.float32)
        check_pair(f_arr, m_arr)
        return fixed, moving, labels[0], labels[1], f_arr, m_arr

    # -- inference --------------------------------------------------------------------------------
    def _run(self, f: np.ndarray, m: np.ndarray, ml: Optional[np.ndarray]):
        def go(device):
            t = lambda a: torch.from_numpy(np.ascontiguousarray(a))[:, None].to(device)  # noqa: E731
            with torch.inference_mode():
                out = self.model.to(device)(t(f), t(m), None if ml is None else t(ml), with_inverse=True)
            return {k: v.float().cpu().numpy() for k, v in out.items()}
        try:
            return go(self.device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            warnings.warn("GPU out of memory: registering on the CPU instead (slower)")
            self.device = torch.device("cpu")
            return go(self.device)

    def register(self, fixed: ImageLike, moving: ImageLike, fixed_label: Optional[ImageLike] = None,
                 moving_label: Optional[ImageLike] = None) -> RegistrationResult:
        return self.register_batch([(fixed, moving, fixed_label, moving_label)], batch_size=1)[0]

    def register_batch(self, pairs: Sequence[tuple], batch_size: int = 4) -> List[RegistrationResult]:
        """Register ``(fixed, moving[, fixed_label, moving_label])`` tuples, ``batch_size`` at a time."""
        prepared = [self._prepare(*(tuple(p) + (None,) * (4 - len(p)))) for p in pairs]
        results = []
        for start in range(0, len(prepared), batch_size):
            chunk = prepared[start:start + batch_size]
            t0 = time.perf_counter()
            with_labels = all(c[3] is not None for c in chunk)
            ml = np.stack([sitk.GetArrayFromImage(c[3]).astype(np.float32) for c in chunk]) if with_labels else None
            out = self._run(np.stack([c[4] for c in chunk]), np.stack([c[5] for c in chunk]), ml)
            per_pair = (time.perf_counter() - t0) / len(chunk)
            for i, c in enumerate(chunk):
                results.append(self._result(c, {k: v[i] for k, v in out.items()}, per_pair))
        return results

    def _result(self, prepared, out, seconds) -> RegistrationResult:
        fixed, moving, fixed_label, moving_label, f_arr, m_arr = prepared
        jac = jacobian_determinant(out["displacement"])
        res = RegistrationResult(
            fixed=fixed, moving=moving, affine_voxel=out["affine"],
            affine_lps=geometry.physical_affine(out["affine"], fixed, moving),
            warped_affine=geometry.image_like(out["warped_affine"][0], fixed),
            warped=geometry.image_like(out["warped"][0], fixed),
            forward_field=geometry.coordinates_to_field(out["total_map"], fixed, moving),
            inverse_field=geometry.coordinates_to_field(out["inverse_map"], moving, fixed),
            jacobian=geometry.image_like(jac.astype(np.float32), fixed),
            seconds=seconds)
        if moving_label is not None:
            res.warped_label_affine = geometry.image_like((out["warped_label_affine"][0] > 0.5).astype(np.uint8), fixed)
            res.warped_label = geometry.image_like((out["warped_label"][0] > 0.5).astype(np.uint8), fixed)
        if fixed_label is not None and moving_label is not None:
            # "initial" compares the crops as they are: both are centred on their vertebra.
            stages = dict(zip(STAGES, (sitk.GetArrayFromImage(moving_label),
                                       sitk.GetArrayFromImage(res.warped_label_affine),
                                       sitk.GetArrayFromImage(res.warped_label))))
            res.metrics = stage_metrics(sitk.GetArrayFromImage(fixed_label), stages, fixed.GetSpacing())
            res.metrics["final"].update(folding(jac))
        return res
