"""The training pairs drawn from crops folders (``crops``: their index and files)."""

import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import Dataset

from .errors import InputError
from .io import read_image
from .preprocessing import to_network_grid
from .crops import CropRecord

PAIR_MODES = ("inter-subject", "mixed", "all")


def make_pairs(records: Sequence[CropRecord], mixed_levels: bool = False,
               max_per_moving: Optional[int] = None, seed: int = 0,
               mode: Optional[str] = None) -> List[Tuple[int, int]]:
    """Ordered (fixed, moving) index pairs.

    Modes: "inter-subject" (different subjects, same level; the paper's study I), "mixed" (different
    subjects, any levels; study II), "all" (any two different crops, inter-level pairs of one subject
    included). ``mixed_levels=True`` is the same as mode "mixed". ``max_per_moving`` keeps that many
    random fixed partners per moving crop (study II samples 10 per sample).
    """
    mode = mode or ("mixed" if mixed_levels else "inter-subject")
    if mode not in PAIR_MODES:
        raise InputError(f"unknown pair mode {mode!r}; choose one of {', '.join(PAIR_MODES)}")

    def keep(a: CropRecord, b: CropRecord) -> bool:
        if mode == "all":
            return True
        return a.subject != b.subject and (mode == "mixed" or a.level == b.level)
    pairs = [(i, j) for i, j in itertools.permutations(range(len(records)), 2) if keep(records[i], records[j])]
    if max_per_moving:
        rng = np.random.default_rng(seed)
        by_moving: Dict[int, List[Tuple[int, int]]] = {}
        for p in pairs:
            by_moving.setdefault(p[1], []).append(p)
        pairs = []
        for j in sorted(by_moving):
            group = by_moving[j]
            keep = rng.permutation(len(group))[:max_per_moving]
            pairs += [group[k] for k in sorted(keep)]
    return pairs


def split_by_subject(records: Sequence[CropRecord], test_fraction: float = 0.2,
                     seed: int = 0) -> Tuple[List[int], List[int]]:
    """Train/test crop indices such that no subject is in both."""
    subjects = sorted({r.subject for r in records})
    if len(subjects) < 2:
        raise InputError("a train/test split needs crops of at least two subjects")
    rng = np.random.default_rng(seed)
    order = [subjects[k] for k in rng.permutation(len(subjects))]
    n_test = min(len(subjects) - 1, max(1, round(test_fraction * len(subjects))))
    test_subjects = set(order[:n_test])
    train = [i for i, r in enumerate(records) if r.subject not in test_subjects]
    test = [i for i, r in enumerate(records) if r.subject in test_subjects]
    return train, test


NetworkGrid = Tuple[Sequence[int], float]  # a network's input shape (z, y, x) and voxel size (mm)


def read_crop_array(path: str, what: str, grid: Optional[NetworkGrid] = None) -> np.ndarray:
    """A crop file as a float32 (z, y, x) array, resampled onto ``grid`` when given (any crop spacing)."""
    image = read_image(path, what)
    if grid is not None:
        return to_network_grid(image, grid[0], grid[1], label=what == "label")
    return sitk.GetArrayFromImage(image).astype(np.float32)


class PairDataset(Dataset):
    """(fixed, moving) crop pairs as tensors (1, D, H, W); crops are read once and kept in memory.

    With ``grid`` (a model's ``(input_shape, input_spacing)``) crops of any size and spacing are resampled
    onto the network's grid as they are read, so that training takes the crops ``prepare`` writes at any
    ``--spacing``.
    """

    def __init__(self, records: Sequence[CropRecord], pairs: Sequence[Tuple[int, int]], with_labels: bool = True,
                 grid: Optional[NetworkGrid] = None):
        if not pairs:
            raise InputError("no training pairs: need crops of at least two subjects (of the same level, "
                             "unless mixed levels are allowed)")
        self.records = list(records)
        self.pairs = list(pairs)
        self.with_labels = with_labels and all(r.label for r in self.records)
        self.grid = grid
        self._cache: Dict[str, np.ndarray] = {}

    def _array(self, path, what):
        if path not in self._cache:
            self._cache[path] = read_crop_array(path, what, self.grid)
        return self._cache[path]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        i, j = self.pairs[index]
        item = {"fixed": torch.from_numpy(self._array(self.records[i].image, "image"))[None],
                "moving": torch.from_numpy(self._array(self.records[j].image, "image"))[None]}
        if self.with_labels:
            item["fixed_label"] = torch.from_numpy(self._array(self.records[i].label, "label"))[None]
            item["moving_label"] = torch.from_numpy(self._array(self.records[j].label, "label"))[None]
        return item


class ArrayPairDataset(Dataset):
    """Pairs given directly as arrays (tests, the Slicer scene, synthetic data)."""

    def __init__(self, items: Sequence[Dict[str, np.ndarray]]):
        self.items = [{k: torch.as_tensor(np.asarray(v, dtype=np.float32))[None] for k, v in it.items()}
                      for it in items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]
