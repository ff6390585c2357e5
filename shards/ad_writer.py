"""AD records -> WebDataset tar shards per split, with manifests, a reject log and a report.

Shard format medalign-ad-v1 (shards/formats/volume_class.py), label names NC / MCI / AD:
  __key__   <cohort>_<subject>_<image_id>, characters outside [A-Za-z0-9_-] replaced by "_"
  vol.npy   float16 (S, S, S) RAS volume in [0, 1]
  txt       clinical text (utf-8)
  json      subject, cohort, image_id, visit, split, diagnosis, label, binary, source_path, fields
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shards.ad_tables import DIAGNOSES, LABELS, AdRecord, read_source
from shards.clinical import clean_fields, render_text
from shards.common import (
    RecordError,
    Reject,
    ShardSink,
    clear_old_shards,
    npy_bytes,
    parallel_map,
    safe_key,
    write_manifest,
    write_rejects,
)
from shards.formats.volume_class import VolumeClass
from shards.splits import SPLITS, assign_splits, check_ratios, subject_strata
from shards.volume import load_volume

log = logging.getLogger(__name__)

FORMAT = VolumeClass.name
PROGRESS_MIN = 50  # show a progress bar from this many volumes per split

Source = Sequence[Any]  # (fmt, table, images_root) or (fmt, table, images_root, cohort)


def sample_key(cohort: str, subject: str, image_id: str) -> str:
    """The AD shard key <cohort>_<subject>_<image_id>."""
    return safe_key(f"{cohort}_{subject}_{image_id}")


def _preprocess(job: tuple[str, int]) -> tuple[str, bytes | None, str, str]:
    """Worker: volume path -> (path, npy bytes or None, reject reason, detail)."""
    path, size = job
    try:
        cube = load_volume(path, size=size)
    except RecordError as err:
        return path, None, err.reason, err.detail or str(err)
    except Exception as exc:  # a single odd file must not end a run over thousands
        return path, None, "preprocess_error", f"{type(exc).__name__}: {exc}"
    return path, npy_bytes(cube.astype(np.float16)), "", ""


def _collect(
    sources: Iterable[Source], word_limit: int
) -> tuple[list[tuple[AdRecord, str]], list[Reject], int, dict[str, dict[str, int]]]:
    """Run every adapter and render text: (records with text, rejects, records_in, stats)."""
    kept: list[tuple[AdRecord, str]] = []
    rejects: list[Reject] = []
    stats: dict[str, dict[str, int]] = {}
    seen: dict[str, str] = {}
    records_in = 0
    for source in sources:
        fmt, table, images_root, *rest = source
        cohort = rest[0] if rest else None
        source_stats: dict[str, int] = {}
        stats[f"{fmt}:{table}"] = source_stats
        for item in read_source(fmt, table, images_root, cohort=cohort, stats=source_stats):
            records_in += 1
            if isinstance(item, Reject):
                rejects.append(item)
                continue
            where = str(item.image_path)
            key = sample_key(item.cohort, item.subject, item.image_id)
            if key in seen:
                rejects.append(
                    Reject(where, "duplicate_key", f"key {key} already used by {seen[key]}")
                )
                continue
            try:
                text = render_text(item.fields, word_limit=word_limit, source=where)
            except RecordError as err:
                rejects.append(Reject(where, err.reason, err.detail))
                continue
            seen[key] = where
            kept.append((item, text))
    return kept, rejects, records_in, stats


def _sample(rec: AdRecord, text: str, split: str, volume: bytes) -> dict[str, Any]:
    meta = {
        "subject": rec.subject,
        "cohort": rec.cohort,
        "image_id": rec.image_id,
        "visit": rec.visit,
        "split": split,
        "diagnosis": rec.diagnosis,
        "label": LABELS[rec.diagnosis],
        "binary": rec.binary,
        "source_path": str(rec.image_path),
        "fields": clean_fields(rec.fields),
    }
    return VolumeClass.encode(sample_key(rec.cohort, rec.subject, rec.image_id), volume, text, meta)


def _write_split(
    split: str,
    items: list[tuple[AdRecord, str]],
    out: Path,
    size: int,
    samples_per_shard: int,
    seed: int,
    workers: int,
    rejects: list[Reject],
    extra: dict[str, Any],
) -> dict[str, Any]:
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    clear_old_shards(folder, split)
    # Sort first so the shuffle depends on the seed only, not on the order of the sources.
    items = sorted(items, key=lambda it: sample_key(it[0].cohort, it[0].subject, it[0].image_id))
    random.Random(f"{seed}|{split}").shuffle(items)
    sink = ShardSink(folder, split, samples_per_shard)
    jobs = [(str(rec.image_path), size) for rec, _ in items]
    bar = tqdm(
        total=len(items), desc=f"{split} volumes", unit="vol", disable=len(items) < PROGRESS_MIN
    )
    written = 0
    for (rec, text), (path, volume, reason, detail) in zip(
        items, parallel_map(_preprocess, jobs, workers), strict=True
    ):
        bar.update()
        if volume is None:
            log.warning("reject %s: %s (%s)", path, reason, detail)
            rejects.append(Reject(path, reason, detail))
            continue
        sink.write(_sample(rec, text, split, volume))
        written += 1
    bar.close()
    extra = {"volume_size": size, "label_names": list(DIAGNOSES), **extra}
    manifest = write_manifest(folder, FORMAT, split, sink.close(), extra)
    assert manifest["num_samples"] == written
    return manifest


def _check_holdout(holdout: Sequence[str], cohorts: set[str]) -> tuple[str, ...]:
    """The held-out cohort names, checked against the cohorts read and the split names."""
    clash = [c for c in holdout if c in SPLITS]
    if clash:
        raise ValueError(f"holdout {clash}: {', '.join(SPLITS)} are split names, not cohorts")
    unknown = [c for c in holdout if c not in cohorts]
    if unknown:
        raise ValueError(
            f"holdout {unknown}: no such cohort among the records read; cohorts: {sorted(cohorts)}"
        )
    if len(set(holdout)) != len(holdout):
        raise ValueError(f"holdout {list(holdout)}: a cohort is named twice")
    if cohorts and set(holdout) == cohorts:
        raise ValueError(f"holdout {list(holdout)}: every cohort is held out, nothing to train on")
    return tuple(holdout)


def summary_line(report: dict[str, Any]) -> str:
    """One line: records in, written per split, rejected by reason."""
    w, r = report["written"], report["rejected"]
    splits = " ".join(f"{s}={w[s]}" for s in (*SPLITS, *report.get("holdout", ())))
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(r["by_reason"].items())) or "none"
    return (
        f"AD shards: {report['records_in']} records in -> {w['total']} written ({splits}), "
        f"{r['total']} rejected ({reasons}) in {report['seconds']:.1f}s -> {report['out_dir']}"
    )


def _written_subjects(out: Path, names: Sequence[str]) -> dict[tuple[str, str], set[str]]:
    """(cohort, subject) -> the splits holding any of its written samples (json members only)."""
    sides: dict[tuple[str, str], set[str]] = {}
    for split in names:
        for tar_path in sorted((out / split).glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                for member in tar:
                    if member.name.endswith(".json"):
                        meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                        sides.setdefault((meta["cohort"], meta["subject"]), set()).add(split)
    return sides


def write_ad_shards(
    sources: Iterable[Source],
    out_dir: str | Path,
    size: int = 128,
    samples_per_shard: int = 256,
    seed: int = 0,
    split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
    workers: int = 1,
    word_limit: int = 40,
    holdout: Sequence[str] = (),
    split_by: str = "subject",
) -> dict[str, Any]:
    """Read AD sources, preprocess volumes, split by subject and write WebDataset shards.

    ``sources``: (fmt, table, images_root[, cohort]) with fmt in generic / adnimerge / oasis2.
    Writes <out>/<split>/<split>-NNNNNN.tar and manifest.json per split, <out>/rejects.jsonl
    and <out>/report.json; returns the report. Every input ends up written or rejected.
    ``holdout`` cohorts are kept out of train / val / test whole: each is written as a split
    of its own, <out>/<cohort>/ (the paper's zero-shot cohorts: AIBL, OASIS-2, MIRIAD).
    Narrative summaries are cut to ``word_limit`` words (the paper: 40); the manifests record
    it, so the reader can render the text again from the stored fields.
    ``split_by="scan"`` splits scans at random (stratified by cohort and diagnosis) instead of
    subjects, as a random 70/15/15 split of a dataset does: one subject's visits then land on
    both sides (the report counts them, and a warning says so). Subject-wise is the default.
    """
    if split_by not in ("subject", "scan"):
        raise ValueError(f"split_by={split_by!r}: expected 'subject' or 'scan'")
    if size < 2:
        raise ValueError(f"size must be >= 2, got {size}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    ratios = check_ratios(tuple(split_ratios))
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    kept, rejects, records_in, stats = _collect(sources, word_limit)
    holdout = _check_holdout(holdout, {rec.cohort for rec, _ in kept})
    pooled = [(rec, text) for rec, text in kept if rec.cohort not in holdout]
    if split_by == "scan":
        strata = {
            (rec.cohort, rec.subject, rec.image_id): (rec.cohort, rec.diagnosis)
            for rec, _ in pooled
        }
        by_scan = assign_splits(strata, ratios, seed)
    else:
        by_subject = assign_splits(subject_strata(rec for rec, _ in pooled), ratios, seed)

    def split_of(rec: AdRecord) -> str:
        if rec.cohort in holdout:
            return rec.cohort
        if split_by == "scan":
            return by_scan[(rec.cohort, rec.subject, rec.image_id)]
        return by_subject[(rec.cohort, rec.subject)]

    names = (*SPLITS, *holdout)
    by_split: dict[str, list[tuple[AdRecord, str]]] = {s: [] for s in names}
    for rec, text in kept:
        by_split[split_of(rec)].append((rec, text))
    log.info("%d records in, %d rejected before reading volumes", records_in, len(rejects))

    manifests = {
        split: _write_split(
            split,
            by_split[split],
            out,
            size,
            samples_per_shard,
            seed,
            workers,
            rejects,
            {"word_limit": word_limit, "holdout": split in holdout},
        )
        for split in names
    }
    write_rejects(out / "rejects.jsonl", rejects)

    written = {split: manifests[split]["num_samples"] for split in names}
    written["total"] = sum(written.values())
    sides = _written_subjects(out, names)  # of the samples written (volumes can still fail)
    subjects = Counter(split for s in sides.values() for split in s)
    across = sum(1 for s in sides.values() if len(s) > 1)
    if across:
        log.warning(
            "split_by=%s: %d subjects have scans in more than one split (their visits are "
            "not independent: test scores are optimistic)",
            split_by,
            across,
        )
    report: dict[str, Any] = {
        "format": FORMAT,
        "out_dir": str(out),
        "volume_size": size,
        "seed": seed,
        "split_ratios": list(ratios),
        "records_in": records_in,
        "written": written,
        "rejected": {"total": len(rejects), "by_reason": dict(Counter(r.reason for r in rejects))},
        "subjects": {split: subjects.get(split, 0) for split in names},
        "split_by": split_by,
        "subjects_in_several_splits": across,
        "holdout": list(holdout),
        "word_limit": word_limit,
        "source_stats": stats,
        "seconds": round(time.perf_counter() - started, 3),
    }
    # The promise of this writer: nothing is silently dropped.
    assert records_in == written["total"] + len(rejects), report
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary_line(report))
    return report


def read_sources_file(root: str | Path) -> list[Source]:
    """The sources a synthetic cohort (shards.synthetic.ad) recorded in <root>/sources.json, as absolute paths."""
    root = Path(root)
    path = root / "sources.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; expected a folder written by generate_ad_cohort"
        )
    record = json.loads(path.read_text())
    return [(fmt, root / table, root / images) for fmt, table, images in record["sources"]]
