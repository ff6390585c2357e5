"""MIMIC-CXR-JPG (or MIMIC-CXR DICOM) as published -> one record per image -> tar shards.

Input, exactly as downloaded (DATA.md)::

    <root>/files/p10/p10000032/s50414267/<dicom_id>.jpg     (.dcm for MIMIC-CXR, dicom=True)
    <root>/mimic-cxr-2.0.0-{chexpert,negbio,metadata,split}.csv.gz   (or un-gzipped .csv)
    <reports_root>/files/p10/p10000032/s50414267.txt          (mimic-cxr-reports.zip)

Every metadata row, and every image on disk that no metadata row names, is one record in:
it is written, rejected (with its file or table line and a reason), or filtered out by view.
  records_in == written + rejected + filtered

Shard format medalign-cxr-v1 (shards/formats/image_multilabel.py), the 14 CheXpert labels:
  __key__   p<subject>_s<study>_<dicom_id>, characters outside [A-Za-z0-9_-] replaced by "_"
  img.png   grayscale S x S PNG: 8-bit (mode L) from JPEG, 16-bit (mode I;16) from DICOM
  txt       report text (findings + impression, or the fallback that json.report_source names)
  json      subject, study, dicom_id, view, split (train / val / test), labels (14 raw values:
            1.0, 0.0, -1.0, or null for blank, in label_names order), label_names,
            report_source, labeler (chexpert / negbio), source_path (the image file)
Output: <out>/{train,val,test}/<split>-NNNNNN.tar + manifest.json, <out>/rejects.jsonl,
<out>/report.json. The official split "validate" is written to the folder "val".
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shards.common import (
    RecordError,
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
from shards.cxr_reports import read_report
from shards.formats.image_multilabel import ImageMultilabel
from shards.splits import SPLITS
from shards.xray_images import DICOM_SUFFIX, png_job

log = logging.getLogger(__name__)

FORMAT = ImageMultilabel.name
LABELERS = ("chexpert", "negbio")
TABLES = ("chexpert", "negbio", "metadata", "split")
SPLIT_FOLDERS = {"train": "train", "validate": "val", "test": "test"}
FRONTAL = ("PA", "AP")
JPEG_SUFFIX = ".jpg"
PROGRESS_MIN = 200  # show a progress bar from this many images per split

METADATA_REQUIRED = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLIT_REQUIRED = ("dicom_id", "study_id", "subject_id", "split")
LABELS_REQUIRED = ("subject_id", "study_id", *LABEL_NAMES)


@dataclass(frozen=True)
class CxrRecord:
    """One chest X-ray image with its study's report text and labels."""

    subject: str
    study: str
    dicom_id: str
    view: str  # ViewPosition as in the metadata ("" when the DICOM had none)
    split: str  # train / val / test
    labels: tuple[float | None, ...]  # raw labeler values in LABEL_NAMES order, None = blank
    labeler: str
    image_path: Path
    report_path: Path
    text: str
    report_source: str

    @property
    def key(self) -> str:
        """The shard key p<subject>_s<study>_<dicom_id>."""
        return cxr_key(self.subject, self.study, self.dicom_id)


@dataclass
class CxrScan:
    """What reading a MIMIC-CXR root gave: records, rejects, counts of view-filtered rows."""

    records: list[CxrRecord]
    rejects: list[Reject]
    filtered: Counter[str]  # ViewPosition ("" when empty) -> rows left out by the view filter
    records_in: int
    stats: dict[str, int] = field(default_factory=dict)


def cxr_key(subject: str, study: str, dicom_id: str) -> str:
    """The shard key p<subject>_s<study>_<dicom_id> (no dots or slashes)."""
    return safe_key(f"p{subject}_s{study}_{dicom_id}")


def study_folder(root: str | Path, subject: str, study: str) -> Path:
    """<root>/files/p<first two digits>/p<subject>/s<study>."""
    return Path(root) / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"


def image_file(root: str | Path, subject: str, study: str, dicom_id: str, dicom: bool) -> Path:
    """Where MIMIC-CXR-JPG (or MIMIC-CXR with ``dicom``) keeps an image."""
    suffix = DICOM_SUFFIX if dicom else JPEG_SUFFIX
    return study_folder(root, subject, study) / f"{dicom_id}{suffix}"


def report_file(reports_root: str | Path, subject: str, study: str) -> Path:
    """<reports_root>/files/pXX/p<subject>/s<study>.txt."""
    folder = study_folder(reports_root, subject, study)
    return folder.with_name(folder.name + ".txt")


def find_table(root: str | Path, kind: str) -> Path:
    """mimic-cxr-2.0.0-<kind>.csv.gz, or the un-gzipped .csv, or another release's name."""
    if kind not in TABLES:
        raise ValueError(f"table kind {kind!r}: expected one of {TABLES}")
    root = Path(root)
    for name in (f"mimic-cxr-2.0.0-{kind}.csv.gz", f"mimic-cxr-2.0.0-{kind}.csv"):
        if (root / name).is_file():
            return root / name
    others = sorted(root.glob(f"mimic-cxr-*-{kind}.csv.gz")) + sorted(
        root.glob(f"mimic-cxr-*-{kind}.csv")
    )
    if others:
        return others[0]
    raise FileNotFoundError(
        f"{root}: no mimic-cxr-2.0.0-{kind}.csv.gz (or .csv); expected the MIMIC-CXR-JPG tables"
    )


def _open_checked(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    header, rows = read_table(path)
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(
            f"{path}: missing required columns {missing}; expected {list(required)}, found {header}"
        )
    return rows


def _ids(row: dict[str, str], *names: str) -> tuple[str, ...]:
    return tuple(row[name].strip() for name in names)


class _Labels:
    """The labeler table by study: parsed once per study, bad values kept as a Reject."""

    def __init__(self, path: Path, labeler: str, stats: dict[str, int]) -> None:
        self.path, self.labeler = path, labeler
        # Only the 14 cells are kept: the real table has about 228,000 rows.
        self.rows: dict[str, tuple[int, tuple[str, ...]]] = {}
        for line, row in _open_checked(path, LABELS_REQUIRED):
            study = row["study_id"].strip()
            if study in self.rows:
                stats["duplicate_label_rows"] = stats.get("duplicate_label_rows", 0) + 1
                continue
            self.rows[study] = (line, tuple(row[name] for name in LABEL_NAMES))
        self.used: set[str] = set()
        self._parsed: dict[str, tuple[float | None, ...] | Reject] = {}

    def get(self, study: str, dicom_id: str) -> tuple[float | None, ...] | Reject:
        self.used.add(study)
        if study not in self._parsed:
            self._parsed[study] = self._parse(study)
        found = self._parsed[study]
        if isinstance(found, Reject):  # one study, several images: name this image
            return Reject(found.source, found.reason, f"{found.detail} (image {dicom_id})")
        return found

    def _parse(self, study: str) -> tuple[float | None, ...] | Reject:
        if study not in self.rows:
            return Reject(
                str(self.path), "missing_labels", f"no {self.labeler} row for study {study}"
            )
        line, cells = self.rows[study]
        values = []
        for name, cell in zip(LABEL_NAMES, cells, strict=True):
            try:
                values.append(parse_label_cell(cell))
            except ValueError as exc:
                return Reject(f"{self.path}:{line}", "invalid_label", f"column {name}: {exc}")
        return tuple(values)


def _images_on_disk(root: Path, suffix: str) -> Iterator[Path]:
    """Image files under <root>/files, in sorted order."""
    top = root / "files"
    for folder, dirs, files in os.walk(top):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(suffix):
                yield Path(folder) / name


def read_mimic_cxr(
    root: str | Path,
    reports_root: str | Path | None = None,
    views: Sequence[str] | None = FRONTAL,
    labeler: str = "chexpert",
    dicom: bool = False,
    tables_root: str | Path | None = None,
) -> CxrScan:
    """Join the image tree, the four tables and the reports into one record per image.

    ``reports_root`` defaults to ``root`` (MIMIC-CXR keeps the .txt files beside the study
    folders), ``tables_root`` to ``root`` (the DICOM release has no tables: point this at
    MIMIC-CXR-JPG). ``views``: ViewPosition values kept (case-insensitive); None or empty keeps
    all. Reject reasons: missing_image, image_without_metadata, duplicate_key, bad_metadata_row,
    missing_split, unknown_split, missing_labels, invalid_label, missing_report, empty_report,
    unreadable_report. Images are not decoded here; the writer does it and rejects
    truncated_image, unreadable_image, unreadable_dicom, not_2d, constant_image,
    non_finite_pixels or preprocess_error.
    """
    if labeler not in LABELERS:
        raise ValueError(f"labeler {labeler!r}: expected one of {LABELERS}")
    root = Path(root)
    reports = Path(reports_root) if reports_root is not None else root
    tables = Path(tables_root) if tables_root is not None else root
    if not (root / "files").is_dir():
        raise FileNotFoundError(f"{root / 'files'}: not found; expected the MIMIC-CXR image tree")
    keep = {v.strip().upper() for v in views} if views else None
    stats: dict[str, int] = {}
    metadata = find_table(tables, "metadata")
    split_table = find_table(tables, "split")
    labels = _Labels(find_table(tables, labeler), labeler, stats)
    splits: dict[str, str] = {}
    for _, row in _open_checked(split_table, SPLIT_REQUIRED):
        splits[row["dicom_id"].strip()] = row["split"].strip()
    stats["split_rows"] = len(splits)
    stats["label_rows"] = len(labels.rows)

    records: list[CxrRecord] = []
    rejects: list[Reject] = []
    filtered: Counter[str] = Counter()
    known: dict[str, str] = {}  # dicom_id -> where it was first seen
    report_cache: dict[Path, tuple[str, str] | RecordError] = {}
    records_in = 0
    for line, row in _open_checked(metadata, METADATA_REQUIRED):
        records_in += 1
        where = f"{metadata}:{line}"
        dicom_id, subject, study = _ids(row, "dicom_id", "subject_id", "study_id")
        view = row["ViewPosition"].strip()
        if not (dicom_id and subject.isdigit() and study.isdigit()):
            rejects.append(
                Reject(
                    where,
                    "bad_metadata_row",
                    f"expected a dicom_id and numeric subject_id, study_id; got "
                    f"{dicom_id!r}, {subject!r}, {study!r}",
                )
            )
            continue
        if dicom_id in known:
            rejects.append(
                Reject(where, "duplicate_key", f"dicom_id {dicom_id} already on {known[dicom_id]}")
            )
            continue
        known[dicom_id] = where
        if keep is not None and view.upper() not in keep:
            filtered[view] += 1
            continue
        image = image_file(root, subject, study, dicom_id, dicom)
        if not image.is_file():
            rejects.append(
                Reject(str(image), "missing_image", f"named by {where}; the file does not exist")
            )
            continue
        official = splits.get(dicom_id)
        if official is None:
            rejects.append(Reject(str(image), "missing_split", f"no row in {split_table}"))
            continue
        if official not in SPLIT_FOLDERS:
            rejects.append(
                Reject(
                    str(image),
                    "unknown_split",
                    f"split {official!r} in {split_table}: expected train, validate or test",
                )
            )
            continue
        values = labels.get(study, dicom_id)
        if isinstance(values, Reject):
            rejects.append(values)
            continue
        report = report_file(reports, subject, study)
        if report not in report_cache:
            try:
                report_cache[report] = read_report(report)
            except RecordError as err:
                report_cache[report] = err
        extracted = report_cache[report]
        if isinstance(extracted, RecordError):
            rejects.append(
                Reject(extracted.path, extracted.reason, f"{extracted.detail} (image {dicom_id})")
            )
            continue
        text, source = extracted
        records.append(
            CxrRecord(
                subject=subject,
                study=study,
                dicom_id=dicom_id,
                view=view,
                split=SPLIT_FOLDERS[official],
                labels=values,
                labeler=labeler,
                image_path=image,
                report_path=report,
                text=text,
                report_source=source,
            )
        )
    stats["metadata_rows"] = records_in

    suffix = DICOM_SUFFIX if dicom else JPEG_SUFFIX
    orphans = 0
    for path in _images_on_disk(root, suffix):
        if path.name[: -len(suffix)] in known:
            continue
        orphans += 1
        records_in += 1
        rejects.append(Reject(str(path), "image_without_metadata", f"dicom_id not in {metadata}"))
    stats["images_without_metadata"] = orphans
    stats["label_rows_without_images"] = len(set(labels.rows) - labels.used)
    stats["studies"] = len({(r.subject, r.study) for r in records})
    return CxrScan(records, rejects, filtered, records_in, stats)


def _sample(rec: CxrRecord, png: bytes) -> dict[str, Any]:
    meta = {
        "subject": rec.subject,
        "study": rec.study,
        "dicom_id": rec.dicom_id,
        "view": rec.view,
        "split": rec.split,
        "labels": list(rec.labels),
        "label_names": list(LABEL_NAMES),
        "report_source": rec.report_source,
        "labeler": rec.labeler,
        "source_path": str(rec.image_path),
    }
    return ImageMultilabel.encode(rec.key, png, rec.text, meta)


def _write_split(
    split: str,
    records: list[CxrRecord],
    images: Iterator[tuple[str, bytes | None, str, str]],
    out: Path,
    manifest_extra: dict[str, Any],
    samples_per_shard: int,
    rejects: list[Reject],
) -> tuple[dict[str, Any], Counter[str]]:
    """Write one split from ``records`` and their encoded images, taken in order from
    ``images`` (one iterator shared by the splits, so one worker pool serves them all)."""
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    clear_old_shards(folder, split)
    sink = ShardSink(folder, split, samples_per_shard)
    bar = tqdm(
        total=len(records),
        desc=f"{split} images",
        unit="img",
        disable=len(records) < PROGRESS_MIN,
    )
    sources: Counter[str] = Counter()
    written = 0
    for rec, (path, png, reason, detail) in zip(records, islice(images, len(records)), strict=True):
        bar.update()
        if png is None:
            log.warning("reject %s: %s (%s)", path, reason, detail)
            rejects.append(Reject(path, reason, detail))
            continue
        sink.write(_sample(rec, png))
        sources[rec.report_source] += 1
        written += 1
    bar.close()
    manifest = write_manifest(folder, FORMAT, split, sink.close(), manifest_extra)
    assert manifest["num_samples"] == written
    return manifest, sources


def summary_line(report: dict[str, Any]) -> str:
    """One line: records in, written per split, rejected by reason, filtered by view."""
    w, r, f = report["written"], report["rejected"], report["filtered"]
    splits = " ".join(f"{s}={w[s]}" for s in SPLITS)
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(r["by_reason"].items())) or "none"
    return (
        f"CXR shards: {report['records_in']} records in -> {w['total']} written ({splits}), "
        f"{r['total']} rejected ({reasons}), {f['total']} filtered by view "
        f"in {report['seconds']:.1f}s -> {report['out_dir']}"
    )


def write_cxr_shards(
    root: str | Path,
    reports_root: str | Path | None,
    out_dir: str | Path,
    size: int = 224,
    samples_per_shard: int = 512,
    views: Sequence[str] | None = FRONTAL,
    labeler: str = "chexpert",
    dicom: bool = False,
    workers: int = 1,
    seed: int = 0,
    tables_root: str | Path | None = None,
) -> dict[str, Any]:
    """Read a MIMIC-CXR(-JPG) root and write WebDataset shards per official split.

    See the module docstring for the layout and sample format, read_mimic_cxr for the
    arguments it passes on. ``workers`` processes decode and resize images; the shards are
    byte-identical for any worker count. Returns the report also saved as report.json.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    started = time.perf_counter()
    out = Path(out_dir)
    scan = read_mimic_cxr(root, reports_root, views, labeler, dicom, tables_root)
    out.mkdir(parents=True, exist_ok=True)
    rejects = list(scan.rejects)
    log.info("%d records in, %d rejected before decoding images", scan.records_in, len(rejects))
    seen: dict[str, Path] = {}
    by_split: dict[str, list[CxrRecord]] = {s: [] for s in SPLITS}
    for rec in scan.records:
        if rec.key in seen:  # distinct dicom_ids that sanitise to one key
            rejects.append(
                Reject(
                    str(rec.image_path), "duplicate_key", f"key {rec.key} used by {seen[rec.key]}"
                )
            )
            continue
        seen[rec.key] = rec.image_path
        by_split[rec.split].append(rec)

    bits = 16 if dicom else 8
    extra = {
        "image_size": size,
        "bit_depth": bits,
        "labeler": labeler,
        "label_names": list(LABEL_NAMES),
    }
    ordered = {split: seeded_order(by_split[split], split, seed) for split in SPLITS}
    jobs = [(str(rec.image_path), size) for split in SPLITS for rec in ordered[split]]
    images = parallel_map(png_job, jobs, workers)
    manifests: dict[str, dict[str, Any]] = {}
    sources: Counter[str] = Counter()
    for split in SPLITS:
        manifests[split], split_sources = _write_split(
            split, ordered[split], images, out, extra, samples_per_shard, rejects
        )
        sources.update(split_sources)
    images.close()  # ends the worker pool
    write_rejects(out / "rejects.jsonl", rejects)

    written = {split: manifests[split]["num_samples"] for split in SPLITS}
    written["total"] = sum(written.values())
    report: dict[str, Any] = {
        "format": FORMAT,
        "out_dir": str(out),
        "root": str(root),
        "reports_root": str(reports_root if reports_root is not None else root),
        "image_size": size,
        "bit_depth": bits,
        "labeler": labeler,
        "views": sorted(v.upper() for v in views) if views else None,
        "dicom": dicom,
        "seed": seed,
        "records_in": scan.records_in,
        "written": written,
        "rejected": {"total": len(rejects), "by_reason": dict(Counter(r.reason for r in rejects))},
        "filtered": {"total": sum(scan.filtered.values()), "by_view": dict(scan.filtered)},
        "report_sources": dict(sources),
        "source_stats": scan.stats,
        "seconds": round(time.perf_counter() - started, 3),
    }
    # The promise of this writer: nothing is silently dropped.
    total = written["total"] + len(rejects) + report["filtered"]["total"]
    assert scan.records_in == total, report
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary_line(report))
    return report


def read_sources_file(root: str | Path) -> tuple[Path, Path]:
    """(images root, reports root) that a synthetic tree (shards.synthetic.cxr) recorded in <root>/cxr_sources.json."""
    root = Path(root)
    path = root / "cxr_sources.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; expected a folder written by generate_mimic_cxr"
        )
    record = json.loads(path.read_text())
    return root / record["root"], root / record["reports_root"]
