"""CheXpert-v1.0 ingestion: the published tables read into records (labels re-ordered to
MIMIC-CXR's order), splits (valid.csv is test, train / val by patient), the view filter, every
injected corruption rejected with its reason, GLoRIA's 5x200 zero-shot split, the shards read back
through the reader, and the command line."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from shards.chexpert import (
    COLUMNS,
    COMPETITION_TASKS,
    FORMAT,
    parse_age,
    parse_path,
    read_chexpert,
    read_sources_file,
    write_chexpert_shards,
    zero_shot_candidates,
    zero_shot_class,
)
from shards.cxr_labels import LABEL_NAMES, LabelPolicyConfig, labels_to_array, parse_label_cell
from shards.reader import DataConfig, ShardSet, build_eval_loader
from shards.synthetic.chexpert import CORRUPTIONS, generate_chexpert

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
PER_CLASS = 3
SPLITS = ("train", "val", "test", "5x200")
# train.csv's header as CheXpert-v1.0 publishes it.
PUBLISHED_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
    "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
    "Pleural Effusion,Pleural Other,Fracture,Support Devices"
)
ONE_HOT = [n for n in LABEL_NAMES if n != "No Finding"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """The synthetic download's folder holding chexpert_sources.json and corruptions.json."""
    raw = tmp_path_factory.mktemp("chexpert") / "raw"
    generate_chexpert(raw, patients=40, valid_patients=8, size=48, seed=3, corrupt=6)
    return raw


@pytest.fixture(scope="module")
def written(tree, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("chexpert_shards")
    report = write_chexpert_shards(
        read_sources_file(tree),
        out,
        size=SIZE,
        samples_per_shard=16,
        val_fraction=0.2,
        zero_shot_5x200=PER_CLASS,
        seed=0,
    )
    return out, report


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, [dict(zip(header, cells, strict=True)) for cells in reader]


def read_samples(out: Path) -> dict[str, list[dict]]:
    """Every split's samples: the json members, each with its key and its PNG bytes."""
    samples: dict[str, list[dict]] = {}
    for split in SPLITS:
        members: dict[str, dict] = {}
        for tar in sorted((out / split).glob("*.tar")):
            with tarfile.open(tar) as tf:
                for member in tf.getmembers():
                    key, ext = member.name.split(".", 1)
                    members.setdefault(key, {})[ext] = tf.extractfile(member).read()
        samples[split] = [
            {**json.loads(m["json"]), "__key__": key, "txt": m["txt"], "png": m["img.png"]}
            for key, m in members.items()
        ]
    return samples


def corruptions(tree: Path) -> list[dict]:
    return json.loads((tree / "corruptions.json").read_text())


def corrupt_lines(tree: Path, table: str) -> set[int]:
    return {c["line"] for c in corruptions(tree) if c["table"] == table}


# --------------------------------------------------------------------------- the tables


def test_tables_have_the_published_columns_and_values(tree) -> None:
    root = read_sources_file(tree)
    assert root.name == "CheXpert-v1.0"
    assert ",".join(COLUMNS) == PUBLISHED_HEADER
    for table in ("train.csv", "valid.csv"):
        header, rows = read_csv(root / table)
        assert ",".join(header) == PUBLISHED_HEADER
        assert (root / table).read_text().splitlines()[0] == PUBLISHED_HEADER
        part = table.removesuffix(".csv")
        bad = corrupt_lines(tree, table)
        cells: Counter[str] = Counter()
        for line, row in enumerate(rows, start=2):
            if line in bad:
                continue
            rel = row["Path"].removeprefix("CheXpert-v1.0/")
            assert (
                row["Path"].startswith(f"CheXpert-v1.0/{part}/patient") and (root / rel).is_file()
            )
            view = rel.rsplit("_", 1)[1]
            assert (
                row["Frontal/Lateral"] == {"frontal.jpg": "Frontal", "lateral.jpg": "Lateral"}[view]
            )
            assert row["AP/PA"] in (("AP", "PA") if view == "frontal.jpg" else ("",))
            assert row["Sex"] in ("Male", "Female") and 0 < int(row["Age"]) <= 90
            cells.update(row[name] for name in LABEL_NAMES)
        if table == "train.csv":  # uncertain and blank cells, as in the real train.csv
            assert {"1.0", "0.0", "-1.0", ""} <= set(cells) and cells["-1.0"] > 3
        else:  # radiologist consensus: 1.0 and 0.0 only
            assert set(cells) == {"1.0", "0.0"}
    _, train = read_csv(root / "train.csv")
    _, valid = read_csv(root / "valid.csv")
    patients = [{r["Path"].split("/")[2] for r in rows} for rows in (train, valid)]
    assert patients[0] and patients[1] and not patients[0] & patients[1]


def test_a_small_tree_has_enough_rows_for_a_scaled_down_5x200(tmp_path: Path) -> None:
    generate_chexpert(tmp_path, patients=300, valid_patients=2, size=32, seed=0)
    scan = read_chexpert(read_sources_file(tmp_path))
    counts = {task: len(found) for task, found in zero_shot_candidates(scan.records).items()}
    assert list(counts) == list(COMPETITION_TASKS)
    assert min(counts.values()) >= 20, counts


@pytest.mark.parametrize(
    "cell, expected",
    [
        ("CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg", "train"),
        ("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "train"),
        ("train/patient00001/study1/view1_frontal.jpg", "train"),
        ("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "valid"),
    ],
)
def test_path_cells_with_and_without_the_folder_prefix(cell: str, expected: str) -> None:
    parsed = parse_path(cell)
    assert parsed is not None
    rel, patient, study, view = parsed
    assert rel.startswith(f"{expected}/patient") and rel.endswith("/study1/view1_frontal.jpg")
    assert (patient, study, view) == (
        rel.split("/")[1],
        f"{rel.split('/')[1]}/study1",
        "view1_frontal",
    )


@pytest.mark.parametrize(
    "cell",
    [
        "",
        "CheXpert-v1.0/train/patient00001/view1_frontal.jpg",
        "CheXpert-v1.0/train/patient00001/study1/view1_frontal.txt",
        "/abs/CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg",
        "a/b/train/patient00001/study1/view1_frontal.jpg",
    ],
)
def test_bad_path_cells_are_not_parsed(cell: str) -> None:
    assert parse_path(cell) is None


@pytest.mark.parametrize("cell, age", [("68", 68), ("68.0", 68), (" 90 ", 90), ("", None)])
def test_age_cells(cell: str, age) -> None:
    assert parse_age(cell) == age


@pytest.mark.parametrize("cell", ["unknown", "-3", "68.5", "200", "nan"])
def test_bad_age_cells_raise(cell: str) -> None:
    with pytest.raises(ValueError, match="Age"):
        parse_age(cell)


def test_a_small_download_and_unprefixed_paths_read_the_same(tmp_path: Path) -> None:
    generate_chexpert(
        tmp_path / "small", patients=6, valid_patients=2, size=32, folder="CheXpert-v1.0-small"
    )
    root = read_sources_file(tmp_path / "small")
    assert root.name == "CheXpert-v1.0-small"
    before = read_chexpert(root, views="all")
    for table in ("train.csv", "valid.csv"):
        text = (root / table).read_text()
        assert "\nCheXpert-v1.0-small/" in text
        (root / table).write_text(text.replace("\nCheXpert-v1.0-small/", "\n"))
    after = read_chexpert(root, views="all")
    assert len(before.records) > 10 and not before.rejects
    assert [r.image_path for r in after.records] == [r.image_path for r in before.records]
    assert [r.key for r in after.records] == [r.key for r in before.records]
    assert all(r.image_path.is_relative_to(root) for r in after.records)


def test_missing_tables_and_columns_fail_at_start(tree, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no train\.csv or valid\.csv"):
        read_chexpert(tmp_path)
    root = read_sources_file(tree)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(root / "train.csv", copy / "train.csv")
    header, rows = read_csv(root / "valid.csv")
    with open(copy / "valid.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([h for h in header if h != "Edema"])
        writer.writerows([[v for k, v in r.items() if k != "Edema"] for r in rows])
    with pytest.raises(ValueError, match=r"valid\.csv: missing required columns \['Edema'\]"):
        read_chexpert(copy)
    with pytest.raises(ValueError, match="views 'lateral'"):
        read_chexpert(root, views="lateral")


# --------------------------------------------------------------------------- labels


def test_labels_are_stored_in_mimic_order_cell_by_cell(tree, written) -> None:
    out, _ = written
    root = read_sources_file(tree)
    _, rows = read_csv(root / "train.csv")
    by_path = {s["path"]: s for split in SPLITS for s in read_samples(out)[split]}
    checked = 0
    for row in rows:
        sample = by_path.get(row["Path"])
        if sample is None:
            continue
        csv_order = [parse_label_cell(row[name]) for name in COLUMNS[5:]]
        mimic_order = [parse_label_cell(row[name]) for name in LABEL_NAMES]
        if csv_order == mimic_order:  # only rows where the two orders differ tell them apart
            continue
        assert sample["label_names"] == list(LABEL_NAMES)
        assert len(sample["labels"]) == 14
        for i, name in enumerate(LABEL_NAMES):
            assert sample["labels"][i] == parse_label_cell(row[name]), (row["Path"], name)
        assert sample["labels"] != csv_order
        checked += 1
    assert checked > 10
    values = {v for split in SPLITS for s in read_samples(out)[split] for v in s["labels"]}
    assert values == {1.0, 0.0, -1.0, None}


def test_zero_shot_class_rule() -> None:
    def labels(**values: float | None) -> tuple[float | None, ...]:
        named = {name.replace(" ", "_"): None for name in LABEL_NAMES} | values
        return tuple(named[name.replace(" ", "_")] for name in LABEL_NAMES)

    assert zero_shot_class(labels(Atelectasis=1.0)) == 0
    assert zero_shot_class(labels(Pleural_Effusion=1.0, Edema=0.0, Fracture=0.0)) == 4
    assert zero_shot_class(labels(Edema=1.0, No_Finding=1.0)) == 3  # No Finding is not looked at
    assert zero_shot_class(labels(Edema=1.0, Pneumonia=-1.0)) is None  # uncertain anywhere
    assert zero_shot_class(labels(Edema=-1.0)) is None
    assert zero_shot_class(labels(Edema=1.0, Cardiomegaly=1.0)) is None  # two positives
    assert zero_shot_class(labels(Edema=1.0, Support_Devices=1.0)) is None
    assert zero_shot_class(labels(Pneumonia=1.0)) is None  # not a competition task
    assert zero_shot_class(labels()) is None


# --------------------------------------------------------------------------- the shards


def test_valid_csv_becomes_the_test_split(tree, written) -> None:
    out, report = written
    samples = read_samples(out)
    root = read_sources_file(tree)
    _, valid = read_csv(root / "valid.csv")
    bad = corrupt_lines(tree, "valid.csv")
    expected = {
        r["Path"]
        for line, r in enumerate(valid, start=2)
        if r["Frontal/Lateral"] == "Frontal" and line not in bad
    }
    assert {s["path"] for s in samples["test"]} == expected and expected
    assert {s["table"] for s in samples["test"]} == {"valid.csv"}
    assert {s["split"] for s in samples["test"]} == {"test"}
    for split in ("train", "val", "5x200"):
        assert samples[split] and {s["table"] for s in samples[split]} == {"train.csv"}
        assert {s["split"] for s in samples[split]} == {split}
    assert report["written"] == {s: len(samples[s]) for s in SPLITS} | {
        "total": sum(len(v) for v in samples.values())
    }


def test_train_and_val_are_disjoint_by_patient(written) -> None:
    out, report = written
    samples = read_samples(out)
    patients = {split: {s["subject"] for s in samples[split]} for split in SPLITS}
    assert patients["train"] and patients["val"]
    assert not patients["train"] & patients["val"]
    assert not (patients["train"] | patients["val"]) & patients["test"]
    for split in ("train", "val"):
        for s in samples[split]:
            assert s["study"].startswith(s["subject"] + "/study") and s["view"] == "Frontal"
            assert s["__key__"] == s["study"].replace("/", "_") + "_" + Path(s["path"]).stem
    assert report["patients"]["val"] == len(patients["val"])


def test_frontal_filter_is_counted(tree, written, tmp_path: Path) -> None:
    out, report = written
    root = read_sources_file(tree)
    laterals = sum(
        r["Frontal/Lateral"] == "Lateral"
        for table in ("train.csv", "valid.csv")
        for r in read_csv(root / table)[1]
    )
    assert laterals > 5
    assert report["views"] == "frontal"
    assert report["filtered"]["by_view"] == {"Lateral": laterals}
    assert report["filtered"]["by_reason"]["view"] == laterals
    every = write_chexpert_shards(root, tmp_path, size=SIZE, views="all")
    assert every["filtered"]["total"] == 0 and every["views"] == "all"
    # The same rows rejected; every row the first run filtered is written.
    assert every["rejected"] == report["rejected"]
    assert every["written"]["total"] == report["written"]["total"] + report["filtered"]["total"]
    views = Counter(s["view"] for split in SPLITS for s in read_samples(tmp_path)[split])
    assert views["Lateral"] == laterals and not (tmp_path / "5x200").exists()


def test_every_corruption_is_rejected_with_its_reason(tree, written) -> None:
    out, report = written
    root = read_sources_file(tree)
    injected = corruptions(tree)
    assert sorted(c["kind"] for c in injected) == sorted(CORRUPTIONS)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    found = {(r["source"], r["reason"]) for r in rejects}
    for c in injected:
        assert (str(root / c["source"]), c["reason"]) in found, c
    assert len(rejects) == len(injected) == report["rejected"]["total"]
    assert report["rejected"]["by_reason"] == dict(Counter(c["reason"] for c in injected))
    rows = sum(len(read_csv(root / t)[1]) for t in ("train.csv", "valid.csv"))
    assert report["records_in"] == rows
    total = report["written"]["total"] + report["rejected"]["total"] + report["filtered"]["total"]
    assert report["records_in"] == total
    assert json.loads((out / "report.json").read_text())["records_in"] == total


def test_the_5x200_split_obeys_the_rule(tree, written) -> None:
    out, report = written
    samples = read_samples(out)
    chosen = samples["5x200"]
    manifest = json.loads((out / "5x200" / "manifest.json").read_text())
    assert manifest["classes"] == list(COMPETITION_TASKS) and manifest["split"] == "5x200"
    assert Counter(s["class"] for s in chosen) == {i: PER_CLASS for i in range(5)}
    _, train = read_csv(read_sources_file(tree) / "train.csv")
    by_path = {r["Path"]: r for r in train}
    for s in chosen:
        task = COMPETITION_TASKS[s["class"]]
        named = dict(zip(LABEL_NAMES, s["labels"], strict=True))
        assert named[task] == 1.0, s["path"]
        assert all(named[n] in (0.0, None) for n in ONE_HOT if n != task), s["path"]
        row = by_path[s["path"]]  # the rule again, on the CSV row itself (fillna(0))
        assert row["Frontal/Lateral"] == "Frontal" and row[task] == "1.0"
        assert all(float(row[n] or 0) == 0.0 for n in ONE_HOT if n != task)
    held_out = {s["subject"] for s in chosen}
    trained = {s["subject"] for split in ("train", "val") for s in samples[split]}
    assert held_out and not held_out & trained
    assert report["filtered"]["by_reason"]["zero_shot_patient"] > 0
    assert report["zero_shot"]["patients"] == len(held_out)
    # Candidates left over (not drawn, patient not held out) still train.
    scan = read_chexpert(read_sources_file(tree))
    spare = {
        r.patient for found in zero_shot_candidates(scan.records).values() for r in found
    } - held_out
    assert spare and spare <= trained


def test_too_few_candidate_rows_is_a_clear_error(tree, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"zero_shot_5x200=500: too few candidate rows for "
        r"Atelectasis \(\d+\), .*each class needs 500",
    ):
        write_chexpert_shards(read_sources_file(tree), tmp_path / "out", zero_shot_5x200=500)
    assert not (tmp_path / "out").exists()  # nothing written before the error


def test_an_undecodable_candidate_is_rejected_and_replaced(tree, written, tmp_path: Path) -> None:
    out, _ = written
    copy = tmp_path / "raw"
    shutil.copytree(tree, copy)
    first = read_samples(out)["5x200"][0]
    path = read_sources_file(copy) / Path(first["path"]).relative_to("CheXpert-v1.0")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 5])
    report = write_chexpert_shards(
        read_sources_file(copy),
        tmp_path / "out",
        size=SIZE,
        val_fraction=0.2,
        zero_shot_5x200=PER_CLASS,
        seed=0,
    )
    again = read_samples(tmp_path / "out")["5x200"]
    assert Counter(s["class"] for s in again) == {i: PER_CLASS for i in range(5)}
    assert first["path"] not in {s["path"] for s in again}
    assert report["rejected"]["by_reason"].get("truncated_image", 0) == 2  # injected + this one
    assert report["zero_shot"]["undecodable"] == 1
    before = {(s["class"], s["path"]) for s in read_samples(out)["5x200"]}
    assert len(before - {(s["class"], s["path"]) for s in again}) == 1  # the rest drawn alike


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": 4}, "size must be >= 8"),
        ({"samples_per_shard": 0}, "samples_per_shard must be >= 1"),
        ({"views": "lateral"}, "views 'lateral'"),
        ({"val_fraction": 1.0}, r"val_fraction must lie in \[0, 1\)"),
        ({"zero_shot_5x200": -1}, "zero_shot_5x200 must be >= 0"),
    ],
)
def test_bad_arguments_raise(tree, tmp_path: Path, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        write_chexpert_shards(read_sources_file(tree), tmp_path, **kwargs)


# --------------------------------------------------------------------------- the reader


def test_shards_read_back_through_the_reader(written) -> None:
    out, _ = written
    for split in SPLITS:
        shards = ShardSet.load(str(out / split))
        assert shards.format == FORMAT and shards.size == SIZE and shards.name == split
        assert shards.label_names == list(LABEL_NAMES) and shards.texts is False
    raw = {s["__key__"]: s for s in read_samples(out)["test"]}
    assert all(s["txt"] == b"" for s in raw.values())
    policy = LabelPolicyConfig(uncertain="zeros", blank="masked")
    cfg = DataConfig(eval_batch_size=4, labels=policy)
    loader = build_eval_loader(str(out / "test"), cfg, None, 16, 0, 1)
    seen = 0
    for batch in loader:
        size = len(batch["key"])
        assert batch["image"].shape == (size, 1, SIZE, SIZE) and batch["image"].std() > 0
        assert batch["labels"].shape == batch["label_mask"].shape == (size, 14)
        assert "input_ids" not in batch and batch["text"] == [""] * size
        for i, key in enumerate(batch["key"]):
            if not batch["valid"][i]:
                continue
            targets, mask = policy.apply(labels_to_array(raw[key]["labels"]))
            assert torch.equal(batch["labels"][i], torch.from_numpy(targets))
            assert torch.equal(batch["label_mask"][i], torch.from_numpy(mask))
            assert batch["group"][i] == raw[key]["study"]
            seen += 1
    assert seen == len(raw) > 0


# --------------------------------------------------------------------------- command line


def test_command_line_round_trip(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "shards"
    gen = [sys.executable, str(REPO / "scripts" / "make_synthetic_chexpert.py"), "--root", str(raw)]
    gen += ["--patients", "30", "--valid-patients", "3", "--size", "40", "--corrupt", "2"]
    subprocess.run(gen, check=True, capture_output=True, text=True, cwd=tmp_path)
    assert (raw / "CheXpert-v1.0" / "train.csv").is_file()
    make = [sys.executable, str(REPO / "scripts" / "make_shards.py"), "chexpert"]
    make += ["--synthetic-root", str(raw), "--out", str(out), "--size", "16", "--views", "all"]
    make += ["--zero-shot-5x200", "2", "--val-fraction", "0.1"]
    done = subprocess.run(make, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert f"{report['records_in']} records in -> {report['written']['total']} written" in (
        done.stdout
    )
    assert report["written"]["5x200"] == 10 and report["views"] == "all"
    assert report["val_fraction"] == 0.1 and report["image_size"] == 16
    assert report["rejected"]["by_reason"] == {"missing_image": 1, "truncated_image": 1}
    few = make[:-4] + ["--zero-shot-5x200", "400"]
    bad = subprocess.run(few, capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2
    assert "make_chexpert_shards: error: zero_shot_5x200=400: too few" in bad.stderr
    assert "Atelectasis (" in bad.stderr
    neither = subprocess.run(make[:3] + ["--out", str(out)], capture_output=True, text=True)
    assert neither.returncode == 2 and "make_chexpert_shards: error:" in neither.stderr
    assert "--synthetic-root" in neither.stderr
