"""Pairs and splits as in the paper's studies, and crops folders."""

import numpy as np
import pytest
import SimpleITK as sitk

from ACSGRegistrationLib.crops import CropRecord, read_index, write_crop, write_index
from ACSGRegistrationLib.datasets import PairDataset, make_pairs, split_by_subject
from ACSGRegistrationLib.errors import InputError


def records(subjects=6, levels=("L1", "L2", "L3")):
    return [CropRecord(f"s{s}_{lv}", f"s{s}", lv, f"/x/s{s}_{lv}.nii.gz", "") for s in range(subjects) for lv in levels]


def test_split_keeps_every_subject_on_one_side():
    recs = records(10)
    train, test = split_by_subject(recs, test_fraction=0.2, seed=3)
    assert sorted(train + test) == list(range(len(recs)))
    train_subjects = {recs[i].subject for i in train}
    test_subjects = {recs[i].subject for i in test}
    assert not train_subjects & test_subjects
    assert len(test_subjects) == 2
    assert split_by_subject(recs, 0.2, seed=3) == (train, test)  # reproducible
    assert split_by_subject(recs, 0.2, seed=4) != (train, test)
    with pytest.raises(InputError, match="two subjects"):
        split_by_subject(records(1))


def test_pair_modes():
    recs = records(3, ("L1", "L2"))
    per_level = make_pairs(recs)  # study I: inter-subject, same level
    assert len(per_level) == 2 * 3 * 2  # per level: 3 subjects -> 6 ordered pairs
    assert all(recs[i].level == recs[j].level and recs[i].subject != recs[j].subject for i, j in per_level)
    mixed = make_pairs(recs, mode="mixed")  # study II: any level, different subjects
    assert len(mixed) == 6 * 5 - 3 * 2
    everything = make_pairs(recs, mode="all")  # evaluation: inter-level pairs of one subject too
    assert len(everything) == 6 * 5
    sampled = make_pairs(recs, mode="mixed", max_per_moving=2, seed=0)
    assert all(sum(1 for p in sampled if p[1] == j) == 2 for j in range(len(recs)))
    with pytest.raises(InputError, match="unknown pair mode"):
        make_pairs(recs, mode="intra")


def test_crops_folder_round_trip(tmp_path):
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((4, 5, 6)).astype(np.float32))
    label = sitk.GetImageFromArray((np.arange(120).reshape(4, 5, 6) % 2).astype(np.uint8))
    recs = []
    for s in ("a", "b"):
        paths = write_crop(str(tmp_path), f"{s}_L1", image, label)
        recs.append(CropRecord(f"{s}_L1", s, "L1", *paths))
    mask_only = write_crop(str(tmp_path), "c_L1", label, None)[0]
    recs.append(CropRecord("c_L1", "c", "L1", "", mask_only))
    write_index(str(tmp_path), recs)
    again = read_index(str(tmp_path))
    assert [(r.name, r.subject, r.level, r.image, r.label) for r in again] == \
        [(r.name, r.subject, r.level, r.image, r.label) for r in recs]
    images = [r for r in again if r.image]
    ds = PairDataset(images, make_pairs(images))
    item = ds[0]
    assert item["fixed"].shape == (1, 4, 5, 6) and "moving_label" in item
    with pytest.raises(InputError, match="no crops.csv"):
        read_index(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="no training pairs"):
        PairDataset(images[:1], [])
