"""CheXpert-v1.0 as published -> one record per image row -> tar shards (medalign-cxr-v1).

Input, exactly as downloaded (CheXpert-v1.0 or CheXpert-v1.0-small)::

    <root>/train.csv    Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,
    <root>/valid.csv    Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,
                        Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,
                        Support Devices
    <root>/train/patient00001/study1/view1_frontal.jpg
    <root>/valid/patient64541/study1/view1_frontal.jpg

A Path cell reads ``CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg``: its first
component is the name of the download's folder (``CheXpert-v1.0-small`` for the small release),
so the rest is resolved against ``root`` whatever the local folder is called; a Path without that
prefix (``train/patient00001/...``) is read the same way. Label cells are 1.0, 0.0, -1.0
(uncertain) or blank (not mentioned); valid.csv has only 1.0 and 0.0. CheXpert has no reports.

Every row of the two tables is one record in: it is written, rejected (with its table:line or
file and a reason), or filtered out (by view, or because its patient went to the 5x200 split).
  records_in == written + rejected + filtered

Splits: valid.csv (the 200 studies that CheXpert papers evaluate on) is the ``test`` split;
train.csv is split by patient into ``train`` and ``val`` (``val_fraction`` of the patients, seeded,
shards.splits.assign_splits), so no patient is in both.

Optional GLoRIA CheXpert 5x200 zero-shot split (``zero_shot_5x200=N``, N=200 for the protocol),
as GLoRIA's public preprocessing builds it (Huang et al. 2021, ICCV, preprocess_chexpert_5x200_data:
``fillna(0)``, frontal rows, a one-hot over the 13 labels other than No Finding, 200 per class):

  1. candidates come from train.csv only, frontal rows only (Frontal/Lateral == "Frontal",
     whatever ``views`` says), rows that passed every table check (path, labels, age, image
     file present, no duplicate); a blank label cell counts as 0.0;
  2. for each of the 5 CheXpert competition tasks, in the order Atelectasis, Cardiomegaly,
     Consolidation, Edema, Pleural Effusion (class index 0..4), a row is a candidate of that
     class when that task is 1.0 and each of the other 12 labels except No Finding is 0.0
     (so a -1.0 anywhere, or a second positive, excludes the row; No Finding is not looked at).
     The classes are therefore disjoint;
  3. fewer than N candidates in a class is an error naming the class and the count found;
  4. a class's candidates are sorted by key and shuffled with random.Random("<seed>|5x200|<class>");
     the first N whose image decodes are the sample (an image that does not decode is rejected
     with its reason and the next candidate takes its place; running out is an error).

GLoRIA draws with pandas ``DataFrame.sample(n=200)`` at a fixed random state; this writer's seed and generator
differ, so the 1000 images differ from GLoRIA's list, but the rule and the counts are the same.
The chosen images are written to the split folder ``5x200`` (manifest key "classes": the 5 names;
each sample's json "class": its index into them), and every other train.csv row of their patients
is filtered out (GLoRIA removes only the 1000 images from training; removing the patients keeps
their other images, the same anatomy, out of train and val too).

Shard format medalign-cxr-v1 (shards/formats/image_multilabel.py):
  __key__   <patient>_<study>_<view file stem>, e.g. patient00001_study1_view1_frontal
  img.png   grayscale S x S PNG, 8-bit (mode L)
  txt       "" (the manifest says "texts": false)
  json      subject (patient00001), study (patient00001/study1, the group), view (Frontal /
            Lateral), ap_pa (AP, PA, LL, RL or ""), sex, age (int or null), split (train / val
            / test / 5x200), labels (14 raw values: 1.0, 0.0, -1.0 or null for blank, in
            shards.cxr_labels.LABEL_NAMES order, MIMIC-CXR's, so a head or a zero-shot prompt
            trained on MIMIC-CXR lines up), label_names, path (the CSV's Path cell), table
            (train.csv / valid.csv), source_path (the image file), class (5x200 samples only)
Output: <out>/{train,val,test[,5x200]}/<split>-NNNNNN.tar + manifest.json, <out>/rejects.jsonl,
<out>/report.json.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from shards.common import (
    Reject,
    ShardSink,
    clear_old_shards,
    parallel_map,
    read_table,
    safe_key,
    seeded_order,
    write_manifest,
    write_rejects,
)
from shards.cxr_labels import LABEL_NAMES, parse_label_cell
from shards.formats.image_multilabel import ImageMultilabel
from shards.splits import SPLITS, assign_splits
from shards.xray_images import png_job

log = logging.getLogger(__name__)

FORMAT = ImageMultilabel.name
SOURCE = "chexpert"
TABLES = {"train.csv": "train", "valid.csv": "test"}  # table -> the split its rows feed
VIEWS = ("frontal", "all")
FRONTAL, LATERAL = "Frontal", "Lateral"
# The published column order of train.csv and valid.csv.
COLUMNS = (
    "Path",
    "Sex",
    "Age",
    "Frontal/Lateral",
    "AP/PA",
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
CSV_LABELS = COLUMNS[5:]  # the 14 label columns in the CSV's order (LABEL_NAMES reordered)
# The five CheXpert competition tasks, in GLoRIA's order: the classes of the 5x200 split.
COMPETITION_TASKS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
ZERO_SHOT_SPLIT = "5x200"
ZERO_SHOT_LABELS = tuple(n for n in LABEL_NAMES if n != "No Finding")  # the one-hot's 13
AGE_RANGE = (0, 120)
PROGRESS_MIN = 200  # show a progress bar from this many images per split
SOURCES_FILE = "chexpert_sources.json"

# [<download folder>/]{train,valid}/patientNNNNN/studyN/<view file>
_PATH = re.compile(
    r"(?:(?P<prefix>[^/]+)/)?(?P<rel>(?P<part>train|valid|test)/(?P<patient>patient\d+)/"
    r"(?P<study>study\d+)/(?P<view>[^/]+)\.(?:jpe?g|png))",
    re.IGNORECASE,
)

assert sorted(CSV_LABELS) == sorted(LABEL_NAMES)
assert set(COMPETITION_TASKS) <= set(LABEL_NAMES)


@dataclass(frozen=True)
class ChexpertRecord:
    """One image row of train.csv or valid.csv, its labels in LABEL_NAMES order."""

    patient: str  # patient00001
    study: str  # patient00001/study1 (images of one study share its labels)
    view_file: str  # view1_frontal (the file name without its suffix)
    view: str  # Frontal / Lateral
    ap_pa: str  # AP, PA, LL, RL, or "" (lateral rows)
    sex: str
    age: int | None
    labels: tuple[float | None, ...]  # raw values in LABEL_NAMES order, None = blank
    table: str  # train.csv / valid.csv
    where: str  # <table>:<line>
    csv_path: str  # the Path cell as written
    image_path: Path
    split: str  # train / val / test / 5x200 (train.csv rows are "train" until split)

    @property
    def key(self) -> str:
        """The shard key <patient>_<studyN>_<view file>."""
        return chexpert_key(self.study, self.view_file)


@dataclass
class ChexpertScan:
    """What reading a CheXpert root gave: records, rejects, counts of view-filtered rows."""

    records: list[ChexpertRecord]
    rejects: list[Reject]
    filtered: Counter[str]  # Frontal/Lateral value -> rows left out by the view filter
    records_in: int
    stats: dict[str, int] = field(default_factory=dict)


def chexpert_key(study: str, view_file: str) -> str:
    """The shard key of an image: patient, study and view file joined by "_" (no dots/slashes)."""
    return safe_key(f"{study.replace('/', '_')}_{view_file}")


def parse_path(cell: str) -> tuple[str, str, str, str] | None:
    """A Path cell -> (path below the root, patient, study "patientN/studyN", view file stem),
    or None when it is not [<folder>/]{train,valid}/patientN/studyN/<view>.jpg."""
    text = cell.strip().replace("\\", "/")
    match = _PATH.fullmatch(text)
    if match is None or ".." in PurePosixPath(text).parts:
        return None
    patient = match["patient"]
    return match["rel"], patient, f"{patient}/{match['study']}", match["view"]


def parse_age(cell: str) -> int | None:
    """An Age cell -> whole years, None when blank; ValueError for anything else."""
    text = cell.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"Age {cell!r} is not a number") from None
    if not value.is_integer() or not AGE_RANGE[0] <= value <= AGE_RANGE[1]:
        raise ValueError(f"Age {cell!r}: expected whole years in {AGE_RANGE[0]}..{AGE_RANGE[1]}")
    return int(value)


def zero_shot_class(labels: tuple[float | None, ...]) -> int | None:
    """The 5x200 class index (into COMPETITION_TASKS) of a row's labels (LABEL_NAMES order),
    or None: exactly one competition task is 1.0 and the other 12 non-No-Finding labels are 0.0
    or blank (GLoRIA's fillna(0) one-hot; see the module docstring)."""
    value = {name: (0.0 if v is None else v) for name, v in zip(LABEL_NAMES, labels, strict=True)}
    for index, task in enumerate(COMPETITION_TASKS):
        if value[task] == 1.0 and all(value[n] == 0.0 for n in ZERO_SHOT_LABELS if n != task):
            return index
    return None


def find_tables(root: str | Path) -> dict[str, Path]:
    """train.csv and valid.csv under ``root``; FileNotFoundError naming what is missing."""
    root = Path(root)
    missing = [name for name in TABLES if not (root / name).is_file()]
    if missing:
        found = sorted(p.name for p in root.glob("*.csv")) if root.is_dir() else []
        raise FileNotFoundError(
            f"{root}: no {' or '.join(missing)}; expected the CheXpert-v1.0 folder (train.csv, "
            f"valid.csv, train/, valid/){f', found {found}' if found else ''}"
        )
    return {name: root / name for name in TABLES}


def read_chexpert(root: str | Path, views: str = "frontal") -> ChexpertScan:
    """Read train.csv and valid.csv into one record per image row.

    ``views``: "frontal" keeps Frontal/Lateral == "Frontal" rows (the others are counted as
    filtered), "all" keeps every row. Rows of valid.csv get split "test", of train.csv "train"
    (write_chexpert_shards splits them into train / val). Reject reasons: bad_path (empty or
    not [<folder>/]{train,valid}/patientN/studyN/<view>.jpg), duplicate_key, bad_view (not
    Frontal or Lateral), invalid_label, bad_age, missing_image. Images are not decoded here;
    the writer does it and rejects truncated_image, unreadable_image or preprocess_error.
    """
    if views not in VIEWS:
        raise ValueError(f"views {views!r}: expected one of {VIEWS}")
    root = Path(root)
    tables = find_tables(root)
    records: list[ChexpertRecord] = []
    rejects: list[Reject] = []
    filtered: Counter[str] = Counter()
    known: dict[str, str] = {}  # key -> where it was first seen
    stats: dict[str, int] = {}
    records_in = 0
    for name, path in tables.items():
        header, rows = read_table(path)
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path}: missing required columns {missing}; expected {list(COLUMNS)}, "
                f"found {header}"
            )
        count = 0
        for line, row in rows:
            count += 1
            where = f"{path}:{line}"
            parsed = parse_path(row["Path"])
            if parsed is None:
                rejects.append(
                    Reject(
                        where,
                        "bad_path",
                        f"Path {row['Path']!r}: expected [CheXpert-v1.0/]train/patientN/studyN/"
                        "viewN_frontal.jpg (or valid/...)",
                    )
                )
                continue
            rel, patient, study, view_file = parsed
            key = chexpert_key(study, view_file)
            if key in known:
                rejects.append(Reject(where, "duplicate_key", f"key {key} already on {known[key]}"))
                continue
            known[key] = where
            view = row["Frontal/Lateral"].strip()
            if view.lower() not in ("frontal", "lateral"):
                rejects.append(
                    Reject(
                        where, "bad_view", f"Frontal/Lateral {view!r}: expected Frontal or Lateral"
                    )
                )
                continue
            view = FRONTAL if view.lower() == "frontal" else LATERAL
            if views == "frontal" and view != FRONTAL:
                filtered[view] += 1
                continue
            labels = _parse_labels(row, where)
            if isinstance(labels, Reject):
                rejects.append(labels)
                continue
            try:
                age = parse_age(row["Age"])
            except ValueError as exc:
                rejects.append(Reject(where, "bad_age", str(exc)))
                continue
            image = root / rel
            if not image.is_file():
                rejects.append(
                    Reject(
                        str(image), "missing_image", f"named by {where}; the file does not exist"
                    )
                )
                continue
            records.append(
                ChexpertRecord(
                    patient=patient,
                    study=study,
                    view_file=view_file,
                    view=view,
                    ap_pa=row["AP/PA"].strip(),
                    sex=row["Sex"].strip(),
                    age=age,
                    labels=labels,
                    table=name,
                    where=where,
                    csv_path=row["Path"].strip(),
                    image_path=image,
                    split=TABLES[name],
                )
            )
        records_in += count
        stats[f"{name}_rows"] = count
    stats["patients"] = len({r.patient for r in records})
    stats["studies"] = len({r.study for r in records})
    return ChexpertScan(records, rejects, filtered, records_in, stats)


def _parse_labels(row: dict[str, str], where: str) -> tuple[float | None, ...] | Reject:
    """The 14 label cells of a row in LABEL_NAMES order (not the CSV's), or an invalid_label
    Reject naming the first bad column."""
    values = []
    for name in LABEL_NAMES:
        try:
            values.append(parse_label_cell(row[name]))
        except ValueError as exc:
            return Reject(where, "invalid_label", f"column {name}: {exc}")
    return tuple(values)


def _sample(rec: ChexpertRecord, png: bytes, class_index: int | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "subject": rec.patient,
        "study": rec.study,
        "view": rec.view,
        "ap_pa": rec.ap_pa,
        "sex": rec.sex,
        "age": rec.age,
        "split": rec.split,
        "labels": list(rec.labels),
        "label_names": list(LABEL_NAMES),
        "path": rec.csv_path,
        "table": rec.table,
        "source_path": str(rec.image_path),
    }
    if class_index is not None:
        meta["class"] = class_index
    return ImageMultilabel.encode(rec.key, png, "", meta)


def zero_shot_candidates(records: list[ChexpertRecord]) -> dict[str, list[ChexpertRecord]]:
    """Competition task -> its 5x200 candidates: train.csv frontal records whose labels are
    that task's one-hot (zero_shot_class), in input order."""
    candidates: dict[str, list[ChexpertRecord]] = {task: [] for task in COMPETITION_TASKS}
    for rec in records:
        if rec.table != "train.csv" or rec.view != FRONTAL:
            continue
        index = zero_shot_class(rec.labels)
        if index is not None:
            candidates[COMPETITION_TASKS[index]].append(rec)
    return candidates


def _select_zero_shot(
    records: list[ChexpertRecord], per_class: int, size: int, workers: int, seed: int
) -> tuple[list[tuple[ChexpertRecord, bytes, int]], list[tuple[ChexpertRecord, Reject]], dict]:
    """The 5x200 sample (see the module docstring): (record, PNG, class index) per chosen image,
    the candidates whose image did not decode with their Reject, and a summary for the report."""
    candidates = zero_shot_candidates(records)
    counts = {task: len(found) for task, found in candidates.items()}
    short = [f"{task} ({n})" for task, n in counts.items() if n < per_class]
    if short:
        raise ValueError(
            f"zero_shot_5x200={per_class}: too few candidate rows for {', '.join(short)}; each "
            f"class needs {per_class} (a candidate is a train.csv frontal row with that finding "
            "1.0 and the other 12 labels except No Finding 0.0 or blank); candidates per class: "
            + ", ".join(f"{task} {n}" for task, n in counts.items())
        )
    orders: list[list[ChexpertRecord]] = []
    for task in COMPETITION_TASKS:
        order = sorted(candidates[task], key=lambda r: r.key)
        random.Random(f"{seed}|{ZERO_SHOT_SPLIT}|{task}").shuffle(order)
        orders.append(order)
    taken: list[list[tuple[ChexpertRecord, bytes]]] = [[] for _ in COMPETITION_TASKS]
    pos = [0] * len(COMPETITION_TASKS)
    failed: list[tuple[ChexpertRecord, Reject]] = []
    while True:  # one round decodes every class's next draws; more only if an image fails
        batch: list[tuple[int, ChexpertRecord]] = []
        for index, order in enumerate(orders):
            need = per_class - len(taken[index])
            if need and pos[index] >= len(order):
                raise ValueError(
                    f"zero_shot_5x200={per_class}: class {COMPETITION_TASKS[index]} has "
                    f"{len(order)} candidates but only {len(taken[index])} of them decode "
                    "(the others are in the rejects)"
                )
            batch += [(index, rec) for rec in order[pos[index] : pos[index] + need]]
            pos[index] += need
        if not batch:
            break
        jobs = [(str(rec.image_path), size) for _, rec in batch]
        for (index, rec), (path, png, reason, detail) in zip(
            batch, parallel_map(png_job, jobs, workers), strict=True
        ):
            if png is None:
                log.warning("reject %s: %s (%s)", path, reason, detail)
                failed.append((rec, Reject(path, reason, detail)))
            else:
                taken[index].append((rec, png))
    chosen = [
        (replace(rec, split=ZERO_SHOT_SPLIT), png, index)
        for index, pairs in enumerate(taken)
        for rec, png in pairs
    ]
    summary = {
        "classes": list(COMPETITION_TASKS),
        "per_class": per_class,
        "candidates": counts,
        "undecodable": len(failed),
        "patients": len({rec.patient for rec, _, _ in chosen}),
    }
    return chosen, failed, summary


def _write_split(
    split: str,
    items: Iterator[tuple[ChexpertRecord, bytes | None, str, str, int | None]],
    total: int,
    out: Path,
    manifest_extra: dict[str, Any],
    samples_per_shard: int,
    rejects: list[Reject],
) -> dict[str, Any]:
    """Write one split from (record, PNG or None, reason, detail, class index) items."""
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    clear_old_shards(folder, split)
    sink = ShardSink(folder, split, samples_per_shard)
    bar = tqdm(total=total, desc=f"{split} images", unit="img", disable=total < PROGRESS_MIN)
    written = 0
    for rec, png, reason, detail, class_index in items:
        bar.update()
        if png is None:
            log.warning("reject %s: %s (%s)", rec.image_path, reason, detail)
            rejects.append(Reject(str(rec.image_path), reason, detail))
            continue
        sink.write(_sample(rec, png, class_index))
        written += 1
    bar.close()
    manifest = write_manifest(folder, FORMAT, split, sink.close(), manifest_extra)
    assert manifest["num_samples"] == written
    return manifest


def summary_line(report: dict[str, Any]) -> str:
    """One line: records in, written per split, rejected by reason, filtered by reason."""
    w, r, f = report["written"], report["rejected"], report["filtered"]
    splits = " ".join(f"{s}={n}" for s, n in w.items() if s != "total")
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(r["by_reason"].items())) or "none"
    why = ", ".join(f"{k}={v}" for k, v in sorted(f["by_reason"].items()) if v) or "none"
    return (
        f"CheXpert shards: {report['records_in']} records in -> {w['total']} written ({splits}), "
        f"{r['total']} rejected ({reasons}), {f['total']} filtered ({why}) "
        f"in {report['seconds']:.1f}s -> {report['out_dir']}"
    )


def write_chexpert_shards(
    root: str | Path,
    out: str | Path,
    size: int = 224,
    samples_per_shard: int = 512,
    views: str = "frontal",
    val_fraction: float = 0.05,
    zero_shot_5x200: int = 0,
    workers: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Read a CheXpert-v1.0 root (the folder of train.csv) and write WebDataset shards.

    See the module docstring for the layout, the splits, the 5x200 rule and the sample format;
    read_chexpert for ``views`` and the reject reasons. ``val_fraction`` of train.csv's patients
    (seeded by ``seed``) form val; ``zero_shot_5x200`` > 0 writes that many images per class to
    the 5x200 split. ``workers`` processes decode and resize images; the shards are
    byte-identical for any worker count. Returns the report also saved as report.json.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if zero_shot_5x200 < 0:
        raise ValueError(f"zero_shot_5x200 must be >= 0 (0: no 5x200 split), got {zero_shot_5x200}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    started = time.perf_counter()
    out_dir = Path(out)
    scan = read_chexpert(root, views)
    rejects = list(scan.rejects)
    log.info("%d records in, %d rejected before decoding images", scan.records_in, len(rejects))

    zero_shot: list[tuple[ChexpertRecord, bytes, int]] = []
    zero_shot_info: dict[str, Any] | None = None
    held_out: set[str] = set()  # patients of the 5x200 images
    used: set[str] = set()  # keys already written to 5x200 or rejected there
    if zero_shot_5x200:
        zero_shot, failed, zero_shot_info = _select_zero_shot(
            scan.records, zero_shot_5x200, size, workers, seed
        )
        rejects.extend(rej for _, rej in failed)
        used = {rec.key for rec, _, _ in zero_shot} | {rec.key for rec, _ in failed}
        held_out = {rec.patient for rec, _, _ in zero_shot}
    out_dir.mkdir(parents=True, exist_ok=True)

    removed = 0  # train.csv rows of 5x200 patients
    by_split: dict[str, list[ChexpertRecord]] = {s: [] for s in SPLITS}
    train_rows: list[ChexpertRecord] = []
    for rec in scan.records:
        if rec.key in used:
            continue
        if rec.split == "test":
            by_split["test"].append(rec)
        elif rec.patient in held_out:
            removed += 1
        else:
            train_rows.append(rec)
    assignment = assign_splits(
        {(SOURCE, patient): SOURCE for patient in sorted({r.patient for r in train_rows})},
        (1.0 - val_fraction, val_fraction, 0.0),
        seed,
    )
    for rec in train_rows:
        split = assignment[(SOURCE, rec.patient)]
        by_split[split].append(replace(rec, split=split))

    extra = {
        "image_size": size,
        "bit_depth": 8,
        "label_names": list(LABEL_NAMES),
        "texts": False,
        "source": SOURCE,
    }
    ordered = {split: seeded_order(by_split[split], split, seed) for split in SPLITS}
    jobs = [(str(rec.image_path), size) for split in SPLITS for rec in ordered[split]]
    images = parallel_map(png_job, jobs, workers)
    manifests: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        items = (
            (rec, png, reason, detail, None)
            for rec, (_, png, reason, detail) in zip(
                ordered[split], islice(images, len(ordered[split])), strict=True
            )
        )
        manifests[split] = _write_split(
            split, items, len(ordered[split]), out_dir, extra, samples_per_shard, rejects
        )
    images.close()  # ends the worker pool
    stale = out_dir / ZERO_SHOT_SPLIT / "manifest.json"
    if not zero_shot_5x200 and stale.is_file():  # an earlier run's 5x200 would look current
        log.warning("removing the 5x200 split of an earlier run in %s", stale.parent)
        clear_old_shards(stale.parent, ZERO_SHOT_SPLIT)
        stale.unlink()
    if zero_shot_5x200:
        by_key = {rec.key: (rec, png, index) for rec, png, index in zero_shot}
        order = seeded_order([rec for rec, _, _ in zero_shot], ZERO_SHOT_SPLIT, seed)
        items = ((rec, by_key[rec.key][1], "", "", by_key[rec.key][2]) for rec in order)
        manifests[ZERO_SHOT_SPLIT] = _write_split(
            ZERO_SHOT_SPLIT,
            items,
            len(order),
            out_dir,
            {**extra, "classes": list(COMPETITION_TASKS)},
            samples_per_shard,
            rejects,
        )
    write_rejects(out_dir / "rejects.jsonl", rejects)

    written = {split: manifests[split]["num_samples"] for split in manifests}
    written["total"] = sum(written.values())
    filtered_total = sum(scan.filtered.values()) + removed
    report: dict[str, Any] = {
        "format": FORMAT,
        "source": SOURCE,
        "out_dir": str(out_dir),
        "root": str(root),
        "image_size": size,
        "bit_depth": 8,
        "views": views,
        "val_fraction": val_fraction,
        "zero_shot_5x200": zero_shot_5x200,
        "seed": seed,
        "records_in": scan.records_in,
        "written": written,
        "rejected": {"total": len(rejects), "by_reason": dict(Counter(r.reason for r in rejects))},
        "filtered": {
            "total": filtered_total,
            "by_reason": {"view": sum(scan.filtered.values()), "zero_shot_patient": removed},
            "by_view": dict(scan.filtered),
        },
        "patients": {split: len({r.patient for r in by_split[split]}) for split in SPLITS},
        "zero_shot": zero_shot_info,
        "source_stats": scan.stats,
        "seconds": round(time.perf_counter() - started, 3),
    }
    # The promise of this writer: nothing is silently dropped.
    assert scan.records_in == written["total"] + len(rejects) + filtered_total, report
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary_line(report))
    return report


def read_sources_file(root: str | Path) -> Path:
    """The CheXpert-v1.0 folder that a synthetic tree (shards.synthetic.chexpert) recorded in
    <root>/chexpert_sources.json."""
    root = Path(root)
    path = root / SOURCES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; expected a folder written by generate_chexpert"
        )
    record = json.loads(path.read_text())
    return root / record["root"]
