"""Shard writer round trip: every record written once or rejected with its reason, manifests
that match the files, subject-wise splits, the exact sample format the reader depends on."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from shard_fixtures import read_samples

from shards.ad_tables import AdRecord, read_source
from shards.ad_writer import sample_key, write_ad_shards
from shards.synthetic.ad import generate_ad_cohort

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
SIZE = 16


@pytest.fixture(scope="module")
def corrupt_cohort(tmp_path_factory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("ad_raw")
    sources = generate_ad_cohort(
        root, subjects_per_cohort=6, shape=(24, 28, 24), seed=2, corrupt=5, template="phantom"
    )
    return root, sources


@pytest.fixture(scope="module")
def written(corrupt_cohort, tmp_path_factory) -> tuple[Path, dict]:
    _, sources = corrupt_cohort
    out = tmp_path_factory.mktemp("ad_shards")
    report = write_ad_shards(sources, out, size=SIZE, samples_per_shard=7, seed=0)
    return out, report


def test_every_record_is_written_once_or_rejected(corrupt_cohort, written) -> None:
    _, sources = corrupt_cohort
    out, report = written
    expected = {}
    for fmt, table, images in sources:
        for item in read_source(fmt, table, images):
            if isinstance(item, AdRecord):
                expected[sample_key(item.cohort, item.subject, item.image_id)] = item
    samples = read_samples(out)
    keys = [s["__key__"] for split in SPLITS for s in samples[split]]
    assert len(keys) == len(set(keys)) == report["written"]["total"]
    rejected_paths = {
        json.loads(line)["source"] for line in (out / "rejects.jsonl").read_text().splitlines()
    }
    for key, rec in expected.items():
        assert (key in keys) != (str(rec.image_path) in rejected_paths), key
    assert report["records_in"] == report["written"]["total"] + report["rejected"]["total"]
    assert report["written"]["total"] == sum(report["written"][s] for s in SPLITS)


def test_rejects_match_the_injected_corruptions(corrupt_cohort, written) -> None:
    root, _ = corrupt_cohort
    out, report = written
    corruptions = json.loads((root / "corruptions.json").read_text())
    assert len(corruptions) == 5
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert Counter(r["reason"] for r in rejects) == Counter(c["reason"] for c in corruptions)
    assert report["rejected"]["by_reason"] == dict(Counter(c["reason"] for c in corruptions))
    assert set(report["rejected"]["by_reason"]) == {
        "truncated_nifti",
        "unreadable_nifti",
        "non_finite_voxels",
        "missing_image",
        "unknown_diagnosis",
    }
    for c in corruptions:
        match = [r for r in rejects if r["reason"] == c["reason"]]
        # Image rejects name the file; table rejects name the table line and the value.
        names = " ".join(r["source"] + " " + r["detail"] for r in match)
        if c["reason"] == "unknown_diagnosis":
            assert "is not one of" in names
        else:
            assert Path(c["image_path"]).name in names or c["image_id"] in names, c


def test_sample_format(written) -> None:
    out, _ = written
    labels = {"NC": 0, "MCI": 1, "AD": 2}
    for split, rows in read_samples(out).items():
        for s in rows:
            assert set(s) == {"__key__", "__shard__", "vol.npy", "txt", "json"}
            assert re.fullmatch(r"[A-Za-z0-9_-]+", s["__key__"])
            vol = np.load(io.BytesIO(s["vol.npy"]), allow_pickle=False)
            assert vol.dtype == np.float16 and vol.shape == (SIZE, SIZE, SIZE)
            assert float(vol.min()) >= 0.0 and float(vol.max()) <= 1.0 and float(vol.max()) > 0.5
            meta = json.loads(s["json"])
            assert set(meta) == {
                "subject",
                "cohort",
                "image_id",
                "visit",
                "split",
                "diagnosis",
                "label",
                "binary",
                "source_path",
                "fields",
            }
            assert meta["split"] == split and meta["label"] == labels[meta["diagnosis"]]
            assert meta["binary"] == (meta["cohort"] in ("OASIS-2", "MIRIAD"))
            assert s["__key__"] == sample_key(meta["cohort"], meta["subject"], meta["image_id"])
            assert Path(meta["source_path"]).is_file()
            assert all(v is not None and v == v for v in meta["fields"].values())
            text = s["txt"].decode("utf-8")
            assert text and not re.search(r"\bnan\b|-1\b", text, flags=re.IGNORECASE)
            assert meta["diagnosis"] not in text.split() and "Dementia" not in text


def test_webdataset_reads_the_shards(written) -> None:
    out, report = written
    urls = [str(p) for p in sorted((out / "train").glob("*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    samples = list(dataset)
    assert len(samples) == report["written"]["train"]
    assert samples[0]["vol.npy"].shape == (SIZE, SIZE, SIZE)
    assert isinstance(samples[0]["json"], dict) and isinstance(samples[0]["txt"], str)


def test_manifests_match_the_files(written) -> None:
    out, report = written
    for split in SPLITS:
        manifest = json.loads((out / split / "manifest.json").read_text())
        assert manifest["split"] == split and manifest["format"] == "medalign-ad-v1"
        assert manifest["volume_size"] == SIZE
        assert manifest["num_samples"] == report["written"][split]
        assert sum(s["num_samples"] for s in manifest["shards"]) == manifest["num_samples"]
        names = [s["name"] for s in manifest["shards"]]
        assert names == sorted(p.name for p in (out / split).glob("*.tar"))
        assert names == [f"{split}-{i:06d}.tar" for i in range(len(names))]
        per_shard = Counter(s["__shard__"] for s in read_samples(out)[split])
        for shard in manifest["shards"]:
            data = (out / split / shard["name"]).read_bytes()
            assert shard["bytes"] == len(data)
            assert shard["sha256"] == hashlib.sha256(data).hexdigest()
            assert shard["num_samples"] == per_shard[shard["name"]] <= 7
    assert report["written"]["train"] > 7  # several shards were exercised


def test_subjects_never_cross_splits(written) -> None:
    out, report = written
    owner: dict[tuple[str, str], str] = {}
    for split, rows in read_samples(out).items():
        for s in rows:
            meta = json.loads(s["json"])
            subject = (meta["cohort"], meta["subject"])
            assert owner.setdefault(subject, split) == split, subject
    assert {split for split in owner.values()} == set(SPLITS)
    assert sum(report["subjects"].values()) >= len(owner)


def test_same_inputs_give_identical_shards_with_any_worker_count(corrupt_cohort, written, tmp_path):
    _, sources = corrupt_cohort
    out, _ = written
    again = write_ad_shards(sources, tmp_path, size=SIZE, samples_per_shard=7, seed=0, workers=2)
    for split in SPLITS:
        first = json.loads((out / split / "manifest.json").read_text())
        second = json.loads((tmp_path / split / "manifest.json").read_text())
        assert first["shards"] == second["shards"]
    assert again["rejected"] == json.loads((out / "report.json").read_text())["rejected"]


def test_shuffle_mixes_cohorts_across_shards(written) -> None:
    out, _ = written
    train = read_samples(out)["train"]  # in shard order, then tar order
    cohorts = [json.loads(s["json"])["cohort"] for s in train]
    keys = [s["__key__"] for s in train]
    changes = sum(a != b for a, b in zip(cohorts, cohorts[1:], strict=False))
    # Sorted (unshuffled) input would change cohort only len(set) - 1 times.
    assert keys != sorted(keys) and changes > 2 * len(set(cohorts))


def test_rewrite_removes_stale_shards(corrupt_cohort, tmp_path: Path) -> None:
    _, sources = corrupt_cohort
    write_ad_shards(sources, tmp_path, size=8, samples_per_shard=2, seed=0)
    many = len(list((tmp_path / "train").glob("*.tar")))
    write_ad_shards(sources, tmp_path, size=8, samples_per_shard=1000, seed=0)
    assert many > 1 and [p.name for p in (tmp_path / "train").glob("*.tar")] == ["train-000000.tar"]


def test_empty_text_and_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    import nibabel as nib

    data = np.random.default_rng(0).random((10, 10, 10)).astype(np.float32)
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    table = tmp_path / "clinical.csv"
    table.write_text(
        "subject_id,image_path,cohort,diagnosis,mmse,image_id\n"
        "s1,a.nii.gz,AIBL,CN,29,scan1\n"
        "s2,b.nii.gz,AIBL,AD,,scan1\n"
        "s1,b.nii.gz,AIBL,CN,28,scan1\n"
    )
    report = write_ad_shards([("generic", table, tmp_path)], tmp_path / "out", size=8, seed=0)
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["empty_text", "duplicate_key"]
    assert rejects[0]["source"].endswith("b.nii.gz") and "AIBL_s1_scan1" in rejects[1]["detail"]
    assert report["written"]["total"] == 1 and report["records_in"] == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": 1}, "size must be >= 2"),
        ({"samples_per_shard": 0}, "samples_per_shard must be >= 1"),
        ({"split_ratios": (0.5, 0.1, 0.1)}, "summing to 1"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        write_ad_shards([], tmp_path, **kwargs)


def test_key_has_no_dots_or_slashes() -> None:
    assert sample_key("OASIS-2", "OAS2_0001", "OAS2_0001_MR1") == "OASIS-2_OAS2_0001_OAS2_0001_MR1"
    assert sample_key("AIBL", "a.b/c", "x y.nii") == "AIBL_a_b_c_x_y_nii"


def test_command_line_round_trip(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "shards"
    gen = [sys.executable, str(REPO / "scripts" / "make_synthetic_ad.py"), "--root", str(raw)]
    gen += ["--subjects-per-cohort", "2", "--shape", "16", "18", "16", "--template", "phantom"]
    gen += ["--corrupt", "1", "--seed", "4"]
    subprocess.run(gen, check=True, capture_output=True, text=True, cwd=tmp_path)
    make = [sys.executable, str(REPO / "scripts" / "make_ad_shards.py"), "--synthetic-root"]
    make += [str(raw), "--out", str(out), "--size", "8", "--samples-per-shard", "4"]
    done = subprocess.run(make, check=True, capture_output=True, text=True, cwd=tmp_path)
    report = json.loads((out / "report.json").read_text())
    assert (
        f"{report['records_in']} records in -> {report['written']['total']} written" in done.stdout
    )
    assert report["rejected"]["total"] == 1
    bad = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_ad_shards.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "--synthetic-root" in bad.stderr


def test_a_random_split_by_scan_is_counted_where_subjects_cross(corrupt_cohort, written, tmp_path):
    _, sources = corrupt_cohort
    _, by_subject = written
    assert by_subject["split_by"] == "subject" and by_subject["subjects_in_several_splits"] == 0
    report = write_ad_shards(
        sources,
        tmp_path,
        size=SIZE,
        samples_per_shard=7,
        seed=0,
        split_ratios=(0.7, 0.15, 0.15),
        split_by="scan",
    )
    assert report["split_by"] == "scan"
    assert report["written"]["total"] == by_subject["written"]["total"]  # same records
    sides: dict[tuple[str, str], set[str]] = {}
    for split, rows in read_samples(tmp_path).items():
        for s in rows:
            meta = json.loads(s["json"])
            sides.setdefault((meta["cohort"], meta["subject"]), set()).add(split)
    crossing = sum(1 for s in sides.values() if len(s) > 1)
    assert crossing == report["subjects_in_several_splits"] > 0  # visits on both sides
    with pytest.raises(ValueError, match="split_by='visit'"):
        write_ad_shards(sources, tmp_path / "x", size=SIZE, split_by="visit")


def test_a_shard_command_exits_by_what_its_writer_did(tmp_path, capsys) -> None:
    from shards.common import run_writer

    def bad_input() -> dict:
        raise FileNotFoundError("/data/train.csv: table not found")

    assert run_writer("make_x_shards", bad_input, tmp_path) == 2
    assert "make_x_shards: error: /data/train.csv: table not found" in capsys.readouterr().err
    empty = {
        "records_in": 3,
        "written": {"total": 0},
        "rejected": {"total": 3, "by_reason": {"missing_image": 3}},
    }
    assert run_writer("make_x_shards", lambda: empty, tmp_path) == 1
    err = capsys.readouterr().err
    assert "no sample written: 3 records in, 3 rejected (missing_image: 3)" in err
    assert str(tmp_path / "rejects.jsonl") in err
    done = {**empty, "written": {"total": 2}}
    assert run_writer("make_x_shards", lambda: done, tmp_path) == 0
    assert f"report: {tmp_path / 'report.json'}" in capsys.readouterr().out
