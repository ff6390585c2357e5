"""Hugging Face `datasets` as a shard source (shards/hf_source.py, scripts/make_hf_shards.py):
datasets built here with Dataset.from_dict / DatasetDict and save_to_disk, or a CSV of image
paths, written to shards and read back through the reader; every row written or rejected."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import nibabel as nib
import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Nifti, Value
from datasets import Image as ImageFeature
from PIL import Image
from shard_fixtures import read_samples

from shards.cxr_labels import LabelPolicyConfig, labels_to_array
from shards.formats.image_multilabel import ImageMultilabel
from shards.formats.volume_class import VolumeClass
from shards.hf_source import label_spec, value_dims, volume_cube, write_hf_shards
from shards.reader import DataConfig, ShardSet, build_eval_loader
from shards.volume import load_volume, to_cube
from shards.xray_images import load_square, square_resize

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # 2-D side
SIDE = 16  # 3-D side
SPLITS = ("train", "val", "test")


def gray(seed: int, height: int, width: int) -> np.ndarray:
    """A uint8 image with structure (a gradient and a disc) and noise, so a resize shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    disc = ((y - height / 3) ** 2 + (x - width / 2) ** 2 < (min(height, width) / 4) ** 2) * 90
    noise = rng.integers(0, 40, (height, width))
    return np.clip(x * 150 / width + disc + noise, 0, 255).astype(np.uint8)


def volume(seed: int, shape: tuple[int, int, int] = (18, 20, 14)) -> np.ndarray:
    """A float32 volume with an off-centre blob (orientation and padding show in the cube)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    blob = ((z - shape[0] / 3) ** 2 + (y - shape[1] / 2) ** 2 + (x - shape[2] / 4) ** 2) < 20
    return (blob * 50.0 + rng.normal(100.0, 10.0, shape)).astype(np.float32)


def eval_batches(folder: Path, batch_size: int = 64) -> list[dict]:
    """A split as the evaluation loader batches it (no tokenizer: images, labels, keys)."""
    cfg = DataConfig(eval_batch_size=batch_size)
    return list(build_eval_loader(str(folder), cfg, None, 16, 0, 1))


def by_key(batches: list[dict], name: str) -> dict[str, object]:
    return {k: v for b in batches for k, v in zip(b["key"], b[name], strict=True)}


def rejects_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def metas(out: Path) -> dict[str, list[dict]]:
    """Split -> the json members of its samples."""
    return {s: [json.loads(r["json"]) for r in rows] for s, rows in read_samples(out).items()}


def check_accounting(report: dict, out: Path) -> None:
    saved = json.loads((out / "report.json").read_text())
    assert saved["records_in"] == saved["written"]["total"] + saved["rejected"]["total"]
    assert saved == report
    assert len(rejects_of(out)) == report["rejected"]["total"]


# --- 2-D: a datasets Image column, text, three binary label columns, a split column ----------

LABELS_A = [1, 0, None, 1, 0, -1, 1, 0, 1, 0, 1, 0]
LABELS_B = ["1.0", "0.0", "", "-1", "0", "1", "1", "0", "1.0", "0", "1", "-1.0"]
LABELS_C = [True, False, True, True, False, False, None, True, False, True, False, True]
SPLIT_CELLS = ["train", "train", "validation", "train", "test", "TRAIN"] * 2
SHAPES = [(40, 56), (56, 40), (48, 48), (36, 60)]


def test_image_feature_text_labels_and_split_column_read_back(tmp_path: Path) -> None:
    n = len(LABELS_A)
    arrays = [gray(i, *SHAPES[i % len(SHAPES)]) for i in range(n)]
    ds = Dataset.from_dict(
        {
            "image": [Image.fromarray(a) for a in arrays],
            "report": [f"Report of case {i}." for i in range(n)],
            "effusion": LABELS_A,
            "nodule": LABELS_B,
            "edema": LABELS_C,
            "split": SPLIT_CELLS,
        },
        features=Features(
            {
                "image": ImageFeature(),
                "report": Value("string"),
                "effusion": Value("int64"),
                "nodule": Value("string"),
                "edema": Value("bool"),
                "split": Value("string"),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "shards"
    report = write_hf_shards(
        tmp_path / "ds",
        out,
        image_column="image",
        label_columns=["effusion", "nodule", "edema"],
        text_column="report",
        split_column="split",
        size=SIZE,
        samples_per_shard=3,
    )
    check_accounting(report, out)
    assert report["rejected"]["total"] == 0 and report["records_in"] == n
    assert {s: report["written"][s] for s in SPLITS} == {"train": 8, "val": 2, "test": 2}
    assert report["splits_from"] == "split_column" and report["format"] == ImageMultilabel.name

    policy = LabelPolicyConfig()
    for split in SPLITS:
        shards = ShardSet.load(str(out / split))
        assert shards.label_names == ["effusion", "nodule", "edema"]
        assert (shards.format, shards.size, shards.texts) == (ImageMultilabel.name, SIZE, True)
        batches = eval_batches(out / split)
        assert all(b["labels"].shape[1:] == (3,) for b in batches)
        images, labels, masks = (by_key(batches, k) for k in ("image", "labels", "label_mask"))
        texts, groups = by_key(batches, "text"), by_key(batches, "group")
        assert len(images) == report["written"][split]
        for key, image in images.items():
            prefix, index = key.rsplit("_", 1)
            i = int(index)
            assert prefix == split
            assert {"train": "train", "validation": "val", "test": "test"}[
                SPLIT_CELLS[i].lower()
            ] == split
            assert image.shape == (1, SIZE, SIZE) and image.dtype == torch.float32
            expected = np.asarray(square_resize(Image.fromarray(arrays[i]), SIZE)) / 255.0
            np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-6)
            raw = [
                None if LABELS_A[i] is None else float(LABELS_A[i]),
                None if not LABELS_B[i] else float(LABELS_B[i]),
                None if LABELS_C[i] is None else float(LABELS_C[i]),
            ]
            target, mask = policy.apply(labels_to_array(raw))
            assert labels[key].tolist() == target.tolist()
            assert masks[key].tolist() == mask.tolist()
            assert texts[key] == f"Report of case {i}." and groups[key] == key


# --- 2-D: a CSV of JPEG paths, a subject column, split ratios ---------------------------------


def write_jpeg_csv(folder: Path, subjects: int = 10, per_subject: int = 2) -> Path:
    """<folder>/images/<subject>_<n>.jpg and <folder>/table.csv naming them relatively."""
    (folder / "images").mkdir(parents=True)
    lines = ["path,patient,finding,report"]
    for s in range(subjects):
        for k in range(per_subject):
            name = f"images/p{s:02d}_{k}.jpg"
            Image.fromarray(gray(10 * s + k, 50, 70)).save(folder / name, quality=95)
            lines.append(f"{name},P{s:02d},{(s + k) % 2},Study {s}-{k} is unremarkable.")
    (folder / "table.csv").write_text("\n".join(lines) + "\n")
    return folder / "table.csv"


def test_csv_of_jpeg_paths_splits_by_subject_with_any_worker_count(tmp_path: Path) -> None:
    table = write_jpeg_csv(tmp_path / "raw")
    kwargs = dict(
        image_column="path",
        label_columns=["finding"],
        text_column="report",
        subject_column="patient",
        split_ratios=(0.6, 0.2, 0.2),
        size=SIZE,
        samples_per_shard=4,
        seed=3,
    )
    report = write_hf_shards(table, tmp_path / "one", workers=1, **kwargs)
    check_accounting(report, tmp_path / "one")
    assert report["records_in"] == 20 and report["written"]["total"] == 20
    assert report["splits_from"] == "ratios" and report["subjects_in_several_splits"] == 0
    assert report["bit_depths"] == {"8": 20}

    found = metas(tmp_path / "one")
    sides: dict[str, set[str]] = {}
    for split, rows in found.items():
        assert rows, f"split {split} is empty"
        for meta in rows:
            assert meta["split"] == split and meta["subject"].startswith("P")
            assert meta["study"] == f"{split}_{meta['id']}"  # its own report: its own group
            sides.setdefault(meta["subject"], set()).add(split)
    assert len(sides) == 10 and all(len(s) == 1 for s in sides.values())
    assert sum(report["subjects"].values()) == 10

    batches = eval_batches(tmp_path / "one" / "train")
    rows = {m["id"]: m for m in found["train"]}
    for key, image in by_key(batches, "image").items():
        row = rows[key.split("_", 1)[1]]["row"]
        s, k = divmod(row, 2)
        expected, bits = load_square(tmp_path / "raw" / f"images/p{s:02d}_{k}.jpg", SIZE)
        assert bits == 8
        np.testing.assert_allclose(image[0].numpy(), expected / 255.0, atol=1e-6)
    assert ShardSet.load(str(tmp_path / "one" / "train")).label_names == ["finding"]

    # Two worker processes read their rows from the dataset themselves: the same shards.
    again = write_hf_shards(table, tmp_path / "two", workers=2, **kwargs)
    assert again["written"] == report["written"]
    for split in SPLITS:
        one = json.loads((tmp_path / "one" / split / "manifest.json").read_text())
        two = json.loads((tmp_path / "two" / split / "manifest.json").read_text())
        assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]


# --- 3-D: numpy arrays and NIfTI bytes with a ClassLabel column ------------------------------

CLASSES = ["CN", "MCI", "AD"]


def test_volume_arrays_with_a_classlabel_become_volume_class_shards(tmp_path: Path) -> None:
    n = 9
    arrays = [volume(i) for i in range(n)]
    arrays[7] = arrays[7][:1]  # one slice: a 2-D image in a 3-D dataset
    labels = [i % 3 for i in range(n)]
    labels[8] = -1  # ClassLabel's "no label"
    ds = Dataset.from_dict(
        {
            "scan": arrays,
            "note": [f"Visit note {i}." for i in range(n)],
            "dx": labels,
            "subject": [f"S{i // 2}" for i in range(n)],
        },
        features=Features(
            {
                "scan": datasets.List(datasets.List(datasets.List(Value("float32")))),
                "note": Value("string"),
                "dx": ClassLabel(names=CLASSES),
                "subject": Value("string"),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "mri"))
    out = tmp_path / "shards"
    report = write_hf_shards(
        tmp_path / "mri",
        out,
        image_column="scan",
        label_columns=["dx"],
        text_column="note",
        subject_column="subject",
        split_ratios=(0.5, 0.25, 0.25),
        size=SIDE,
    )
    check_accounting(report, out)
    assert report["dims"] == 3 and report["format"] == VolumeClass.name
    assert report["rejected"]["by_reason"] == {"not_3d": 1, "missing_label": 1}
    by_source = {r["source"]: r for r in rejects_of(out)}
    slice_reject = by_source[f"{tmp_path / 'mri'} row 7"]
    assert slice_reject["reason"] == "not_3d" and "(20, 14)" in slice_reject["detail"]
    assert by_source[f"{tmp_path / 'mri'} row 8"]["reason"] == "missing_label"

    seen = 0
    for split in SPLITS:
        if report["written"][split] == 0:
            continue
        shards = ShardSet.load(str(out / split))
        assert shards.label_names == CLASSES and shards.volume_size == SIDE
        batches = eval_batches(out / split)
        keys = [k for b in batches for k in b["key"]]
        rows = {m["id"]: m for m in metas(out)[split]}
        for b in batches:
            assert b["image"].shape[1:] == (1, SIDE, SIDE, SIDE)
            for key, image, label, cohort in zip(
                b["key"], b["image"], b["label"], b["cohort"], strict=True
            ):
                i = rows[key.split("_", 1)[1]]["row"]
                expected = to_cube(arrays[i], (1.0, 1.0, 1.0), SIDE).astype(np.float16)
                np.testing.assert_array_equal(image[0].numpy(), expected)
                assert int(label) == labels[i] and cohort == "mri"
                seen += 1
        assert len(keys) == report["written"][split]
    assert seen == 7


def nifti_bytes(data: np.ndarray, affine: np.ndarray, gz: bool) -> bytes:
    raw = nib.Nifti1Image(data, affine).to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


@pytest.mark.parametrize("column", ["nifti", "binary"])
def test_nifti_bytes_with_a_classlabel_match_the_volume_reader(tmp_path: Path, column) -> None:
    n = 6
    # Not RAS (x flipped, anisotropic): the writer must reorient and resample as load_volume.
    affine = np.diag([-1.5, 1.0, 1.2, 1.0])
    payloads = [nifti_bytes(volume(i, (12, 16, 14)), affine, gz=i % 2 == 0) for i in range(n)]
    ds = Dataset.from_dict(
        {
            "mri": payloads,
            "text": [f"Scan {i}." for i in range(n)],
            "label": [i % 3 for i in range(n)],
            "split": ["train", "train", "valid", "val", "test", "test"],
        },
        features=Features(
            {
                "mri": Nifti() if column == "nifti" else Value("binary"),
                "text": Value("string"),
                "label": ClassLabel(names=CLASSES),
                "split": Value("string"),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "shards"
    report = write_hf_shards(
        tmp_path / "ds",
        out,
        image_column="mri",
        label_columns=["label"],
        text_column="text",
        split_column="split",
        size=SIDE,
    )
    check_accounting(report, out)
    assert report["rejected"]["total"] == 0 and report["dims"] == 3
    assert {s: report["written"][s] for s in SPLITS} == {"train": 2, "val": 2, "test": 2}
    for split in SPLITS:
        assert ShardSet.load(str(out / split)).label_names == CLASSES
        for b in eval_batches(out / split):
            for key, image, label in zip(b["key"], b["image"], b["label"], strict=True):
                i = int(key.rsplit("_", 1)[1])
                suffix = ".nii.gz" if i % 2 == 0 else ".nii"
                path = tmp_path / f"v{i}{suffix}"
                path.write_bytes(payloads[i])
                expected = load_volume(path, SIDE).astype(np.float16)
                np.testing.assert_array_equal(image[0].numpy(), expected)
                assert int(label) == i % 3


def test_a_2d_array_is_not_a_volume() -> None:
    with pytest.raises(Exception, match="not_3d: row 3: expected a 3-D volume.*\\(8, 9\\)"):
        volume_cube(np.ones((8, 9), dtype=np.float32), SIDE, where="row 3")


# --- label modes and dims, without writing -----------------------------------------------------


def test_label_modes_and_names() -> None:
    features = Features(
        {
            "view": Value("string"),
            "flag": Value("string"),
            "grade": Value("int64"),
            "dx": ClassLabel(names=CLASSES),
            "pair": ClassLabel(names=["absent", "present"]),
        }
    )
    cells = {
        "view": ["PA", "AP", None, "LAT", "AP"],
        "flag": ["1", "0", "maybe", "", "-1"],
        "grade": [0, 2, 1, None, 2],
        "dx": [0, 1, 2, -1, 1],
        "pair": [0, 1, -1, 1, 0],
    }

    def spec(dims, columns, names=None):
        return label_spec(dims, columns, features, cells, names)

    # 2-D: a string column with no label cell is one-hot over its sorted values (or the given).
    onehot = spec(2, ["view"])
    assert (onehot.mode, onehot.names) == ("onehot", ["AP", "LAT", "PA"])
    assert onehot.parse({"view": "PA"}) == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="'view': value 'LAT' is not one of the classes"):
        spec(2, ["view"], ["PA", "AP"]).parse({"view": "LAT"})
    # ... but a column of label cells stays binary, its bad values rejected by name.
    binary = spec(2, ["flag", "pair"])
    assert (binary.mode, binary.names) == ("binary", ["flag", "pair"])
    assert binary.parse({"flag": "-1", "pair": -1}) == [-1.0, None]  # ClassLabel -1: no label
    with pytest.raises(ValueError, match="column 'flag': label value 'maybe'"):
        binary.parse({"flag": "maybe", "pair": 1})
    with pytest.raises(ValueError, match="3 names for 2 label columns"):
        spec(2, ["flag", "pair"], ["a", "b", "c"])
    # a two-class ClassLabel whose names do not say which class is positive
    unclear = Features({"pair": ClassLabel(names=["positive", "negative"])})
    with pytest.raises(ValueError, match=r"'pair' is a ClassLabel of \['positive', 'negative'\]"):
        label_spec(2, ["pair"], unclear, {"pair": [0, 1]}, None)
    assert spec(2, ["dx"]).names == CLASSES and spec(2, ["dx"]).mode == "onehot"
    # 3-D: one class index; ClassLabel names (renamed by label_names), strings, integers.
    assert spec(3, ["dx"], ["nc", "mci", "ad"]).names == ["nc", "mci", "ad"]
    assert spec(3, ["view"]).parse({"view": "LAT"}) == 1
    assert spec(3, ["view"], ["PA", "AP", "LAT"]).parse({"view": "LAT"}) == 2
    grades = spec(3, ["grade"])
    assert grades.names == ["0", "1", "2"] and grades.parse({"grade": 2.0}) == 2
    with pytest.raises(ValueError, match=r"value 3 is not a class index in 0..2"):
        grades.parse({"grade": 3})
    with pytest.raises(ValueError, match="a 3-D dataset has one class column"):
        spec(3, ["dx", "grade"])


def test_dims_from_the_first_value() -> None:
    assert value_dims("scans/a.nii.gz") == 3 and value_dims("x/b.JPG") == 2
    assert value_dims({"bytes": None, "path": "c.dcm"}) == 2
    assert value_dims(gzip.compress(b"anything")) == 3
    assert value_dims(np.zeros((1, 8, 9))) == 2 and value_dims(np.zeros((8, 9, 7))) == 3
    assert value_dims("notes.txt") is None and value_dims(np.zeros(5)) is None


# --- bad rows, missing columns ----------------------------------------------------------------


def test_bad_rows_are_rejected_with_reasons_and_counted(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "img").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(gray(i, 40, 40)).save(raw / "img" / f"{i}.png")
    rows = [
        "id,image,finding,other,split",
        "a,img/0.png,1,0,train",
        "b,img/1.png,maybe,0,train",  # bad label value
        "c,img/missing.png,0,1,train",  # no such file
        "a,img/2.png,0,0,train",  # duplicate id
        "d,img/3.png,1,-1,holdout",  # unknown split
        "e,,0,1,val",  # empty image cell
        "f,img/4.png,1,,test",
        "g,img/5.png,0,1,val",
    ]
    (raw / "rows.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "shards"
    report = write_hf_shards(
        raw / "rows.csv",
        out,
        image_column="image",
        label_columns=["finding", "other"],
        split_column="split",
        size=SIZE,
    )
    check_accounting(report, out)
    assert report["records_in"] == 8 and report["written"]["total"] == 3
    assert report["rejected"]["by_reason"] == {
        "invalid_label": 1,
        "missing_image": 2,
        "duplicate_key": 1,
        "unknown_split": 1,
    }
    assert report["columns"]["key"] == "id"
    found = {r["source"]: r for r in rejects_of(out)}
    where = f"{raw / 'rows.csv'} row"
    assert found[f"{where} 1"]["reason"] == "invalid_label"
    assert found[f"{where} 1"]["detail"] == (
        "column 'finding': label value 'maybe' is not one of 1.0, 0.0, -1.0 (or 1, 0, -1) or blank"
    )
    assert found[f"{where} 2"]["reason"] == "missing_image"
    assert str(raw / "img" / "missing.png") in found[f"{where} 2"]["detail"]
    assert found[f"{where} 3"]["reason"] == "duplicate_key"
    assert f"{where} 0" in found[f"{where} 3"]["detail"]
    assert found[f"{where} 4"]["reason"] == "unknown_split"
    assert "'holdout'" in found[f"{where} 4"]["detail"]
    assert found[f"{where} 5"]["reason"] == "missing_image"
    keys = {s: sorted(r["__key__"] for r in rows) for s, rows in read_samples(out).items()}
    assert keys == {"train": ["train_a"], "val": ["val_g"], "test": ["test_f"]}
    # No text column: the manifest says so, and the reader gives empty texts.
    assert ShardSet.load(str(out / "test")).texts is False
    (batch,) = eval_batches(out / "test")
    assert batch["text"] == [""] and batch["labels"].shape == (1, 2)


def test_missing_column_and_contradictions_are_clear_errors(tmp_path: Path) -> None:
    ds = Dataset.from_dict({"img": [np.zeros((4, 4), np.uint8)], "y": [1]})
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match=r"no column 'finding' \(the label column\).*'img', 'y'"):
        write_hf_shards(tmp_path / "ds", tmp_path / "out", "img", ["finding"])
    with pytest.raises(ValueError, match=r"no column 'report' \(the text column\)"):
        write_hf_shards(tmp_path / "ds", tmp_path / "out", "img", ["y"], text_column="report")
    with pytest.raises(ValueError, match="a 3-D dataset needs a text column"):
        write_hf_shards(tmp_path / "ds", tmp_path / "out", "img", ["y"], dims=3)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        write_hf_shards(tmp_path / "nothing", tmp_path / "out", "img", ["y"])
    assert not (tmp_path / "out").exists()


# --- a DatasetDict of train / validation / test, a one-hot ClassLabel, 16-bit arrays ----------

FINDINGS = ["normal", "effusion", "nodule", "mass"]


def test_dataset_dict_splits_onehot_classlabel_and_16_bit_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    parts, pixels = {}, {}
    for name, n in (("train", 5), ("validation", 3), ("test", 2)):
        arrays = [rng.integers(0, 65536, (24 + i, 40), dtype=np.uint16) for i in range(n)]
        pixels[name] = arrays
        parts[name] = Dataset.from_dict(
            {"pixels": arrays, "finding": [i % 4 for i in range(n)]},
            features=Features(
                {
                    "pixels": datasets.List(datasets.List(Value("uint16"))),
                    "finding": ClassLabel(names=FINDINGS),
                }
            ),
        )
    DatasetDict(parts).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="the dataset's own splits are used"):
        write_hf_shards(tmp_path / "dd", tmp_path / "x", "pixels", ["finding"], split_column="s")
    out = tmp_path / "shards"
    report = write_hf_shards(tmp_path / "dd", out, "pixels", ["finding"], size=SIZE)
    check_accounting(report, out)
    assert report["splits_from"] == "dataset_dict" and report["label_mode"] == "onehot"
    assert {s: report["written"][s] for s in SPLITS} == {"train": 5, "val": 3, "test": 2}
    assert report["bit_depths"] == {"16": 10}
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        shards = ShardSet.load(str(out / split))
        assert shards.label_names == FINDINGS and shards.texts is False
        manifest = json.loads((out / split / "manifest.json").read_text())
        assert manifest["bit_depth"] == 16 and manifest["source"] == "huggingface"
        (batch,) = eval_batches(out / split)
        assert batch["labels"].shape == (len(pixels[name]), 4)
        for key, image, labels in zip(batch["key"], batch["image"], batch["labels"], strict=True):
            prefix, index = key.rsplit("_", 1)
            i = int(index)
            assert prefix == name
            assert labels.tolist() == [float(c == i % 4) for c in range(4)]
            unit = Image.fromarray(pixels[name][i].astype(np.float32) / 65535.0)
            small = np.clip(np.asarray(square_resize(unit, SIZE)), 0.0, 1.0)
            expected = np.rint(small * 65535.0) / 65535.0
            np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-6)


# --- the command ------------------------------------------------------------------------------


def test_make_shards_hf_command(tmp_path: Path) -> None:
    table = write_jpeg_csv(tmp_path / "raw", subjects=5)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "scripts" / "make_shards.py"), "hf", str(table)]
    unknown = subprocess.run(
        [*command[:2], "hdf5", str(table)], capture_output=True, text=True, env=env
    )
    assert unknown.returncode == 2
    assert "unknown source 'hdf5'; expected one of ad, mimic-cxr, chexpert, hf" in unknown.stderr
    options = ["--image-column", "path", "--text-column", "report", "--size", "16"]
    done = subprocess.run(
        [
            *command,
            *options,
            "--label-columns",
            "finding",
            "--label-names",
            "Finding",
            "--subject-column",
            "patient",
            "--split-ratios",
            "0.6",
            "0.2",
            "0.2",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "HF shards (medalign-cxr-v1): 10 records in -> 10 written" in done.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["label_names"] == ["Finding"] and report["image_size"] == 16
    assert ShardSet.load(str(tmp_path / "out" / "train")).label_names == ["Finding"]

    failed = subprocess.run(
        [*command, *options, "--label-columns", "nope", "--out", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert failed.returncode == 2
    assert "make_hf_shards: error:" in failed.stderr and "no column 'nope'" in failed.stderr
