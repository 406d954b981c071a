"""Label-driven synthetic pairs: CT-like images that stay aligned with their deformed labels."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from ACSGRegistrationLib.synthesis import SynthesisConfig, SyntheticPairDataset, synthesise
from conftest import arr


@pytest.fixture(scope="module")
def mask(real_pair_2mm):
    return arr(real_pair_2mm[1].label)


def test_image_is_drawn_exactly_inside_its_deformed_label(mask):
    image, label = synthesise(mask, seed=1, spacing=2.0)
    assert image.shape == label.shape == mask.shape
    assert set(np.unique(label)) <= {0.0, 1.0}
    assert np.all(image[label == 0] == 0)  # masked like the paper's crops
    inside = image[label == 1]
    assert (inside > 0.2).mean() > 0.98  # bone intensities, not background
    # The label moved: the deformation is real...
    assert 0.5 < (2 * (label * mask).sum() / (label.sum() + mask.sum())) < 0.97
    # ...and the shape is kept: the volume changes by less than the allowed scaling.
    assert abs(label.sum() / mask.sum() - 1) < 0.35


def test_cortical_shell_is_brighter_than_the_interior(mask):
    image, label = synthesise(mask, seed=2, cfg=SynthesisConfig(noise=(0.0, 0.0), blur_sigma=(0.0, 0.0),
                                                                 texture=0.0, shell_mm=(4.0, 4.0)), spacing=2.0)
    interior = ndimage.binary_erosion(label > 0, iterations=3)
    shell = (label > 0) & ~ndimage.binary_erosion(label > 0, iterations=1)
    assert image[shell].mean() > image[interior].mean() + 0.01


def test_intensities_resemble_real_crops(real_pair_2mm, mask):
    real = arr(real_pair_2mm[1].image)[mask > 0]  # the 0.7 mm chest CT's L1, cropped at 2 mm
    medians = []
    for seed in range(6):
        image, label = synthesise(mask, seed=seed, spacing=2.0)
        medians.append(np.median(image[label > 0]))
    # Each draw varies (that is the augmentation); on average it sits where real bone does.
    assert all(abs(m - np.median(real)) < 0.07 for m in medians)
    assert abs(np.mean(medians) - np.median(real)) < 0.03


def test_synthesis_is_reproducible_and_varies_with_the_seed(mask):
    a, _ = synthesise(mask, seed=4)
    b, _ = synthesise(mask, seed=4)
    c, _ = synthesise(mask, seed=5)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pair_dataset_pairs_different_subjects(mask):
    shifted = np.roll(mask, 2, axis=2)
    ds = SyntheticPairDataset([mask, shifted, mask], ["s1", "s2", "s1"], ["L1", "L1", "L2"], length=5, seed=0)
    assert len(ds) == 5
    assert all(ds.subjects[i] != ds.subjects[j] for i, j in ds.pairs)
    item = ds[3]
    assert set(item) == {"fixed", "moving", "fixed_label", "moving_label"}
    assert item["fixed"].shape == (1,) + mask.shape
    assert torch.equal(item["fixed"], ds[3]["fixed"])  # a resumed run sees the same data
    assert torch.all(item["moving"][item["moving_label"] == 0] == 0)
    with pytest.raises(ValueError, match="two subjects"):
        SyntheticPairDataset([mask], ["s1"], ["L1"], length=2)
