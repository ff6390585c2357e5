"""What every shard writer shares: rejects and their log, tables, keys, the tar sink, the
manifest, and a process pool.

A writer (shards/ad_writer.py, shards/mimic_cxr.py, shards/chexpert.py, shards/hf_source.py)
turns records of its source into samples of a shard format (shards/formats/) with these; every
record read is written or rejected with a reason, and the report says how many of each.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import multiprocessing
import random
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reject:
    """An input that produced no sample: where it came from, a reason code and a readable detail."""

    source: str
    reason: str
    detail: str


class RecordError(Exception):
    """A record that cannot be used; ``reason`` is a short machine-friendly code.

    The message names the file and what was expected, so a reject log is actionable.
    """

    def __init__(self, reason: str, path: str | Path, detail: str = "") -> None:
        self.reason = reason
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{reason}: {self.path}: {detail}" if detail else f"{reason}: {self.path}")

    def __reduce__(self) -> tuple:
        # Default exception pickling passes only str(self) back to __init__; keep all fields
        # so the error survives a multiprocessing round trip.
        return (RecordError, (self.reason, self.path, self.detail))


def _open_text(path: Path) -> io.TextIOWrapper:
    raw = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    # utf-8-sig: spreadsheet exports often start with a byte-order mark.
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def read_table(path: str | Path) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """Open a .csv or .csv.gz table: (stripped header, lazy iterator of (line number, row))."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: table not found")
    with _open_text(path) as text:
        header = [h.strip() for h in next(csv.reader(text), [])]
    if not any(header):
        raise ValueError(f"{path}: empty table, expected a header row")

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        # Reopened here so that a caller who only checks the header leaves no file open.
        with _open_text(path) as text:
            reader = csv.reader(text)
            next(reader)
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue
                cells = cells + [""] * (len(header) - len(cells))
                yield reader.line_num, dict(zip(header, cells, strict=False))

    return header, rows()


def safe_key(text: str) -> str:
    """A shard key: characters outside [A-Za-z0-9_-] become "_" (webdataset splits a member
    name into key and extension at the first dot, and a slash would make a folder)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _init_worker() -> None:
    # Each process already has a core; intra-op threads would only oversubscribe.
    torch.set_num_threads(1)


def parallel_map(
    fn: Callable[[Any], Any],
    jobs: list[Any],
    workers: int,
    initializer: Callable[[], None] | None = _init_worker,
) -> Iterator[Any]:
    """``map(fn, jobs)`` in input order, over ``workers`` spawned processes when > 1.

    ``fn`` must be a module-level function (it is pickled by name for the workers).
    """
    if workers <= 1:
        yield from map(fn, jobs)
        return
    # spawn: forking a parent that already ran OpenMP (torch) can hang the children.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=initializer) as pool:
        yield from pool.imap(fn, jobs, chunksize=1)


class ShardSink:
    """Writes numbered tar shards <split>-NNNNNN.tar of at most ``per_shard`` samples each.

    ``close`` returns one entry per shard: name, num_samples, bytes, sha256.
    """

    def __init__(self, folder: Path, split: str, per_shard: int) -> None:
        self.folder, self.split, self.per_shard = folder, split, per_shard
        self.shards: list[dict[str, Any]] = []
        self._writer: wds.TarWriter | None = None
        self._path: Path | None = None
        self._count = 0

    def write(self, sample: dict[str, Any]) -> None:
        if self._writer is None or self._count >= self.per_shard:
            self._finish()
            self._path = self.folder / f"{self.split}-{len(self.shards):06d}.tar"
            # Fixed mtime: the same inputs and seed give byte-identical shards.
            self._writer = wds.TarWriter(str(self._path), mtime=0.0, encoder=False)
            self._count = 0
        self._writer.write(sample)
        self._count += 1

    def _finish(self) -> None:
        if self._writer is None or self._path is None:
            return
        self._writer.close()
        digest = hashlib.sha256()
        with open(self._path, "rb") as fh:  # in chunks: a 128^3 shard is about 1 GB
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        self.shards.append(
            {
                "name": self._path.name,
                "num_samples": self._count,
                "bytes": self._path.stat().st_size,
                "sha256": digest.hexdigest(),
            }
        )
        self._writer = None

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.shards


def clear_old_shards(folder: Path, split: str) -> None:
    """Delete <split>-NNNNNN.tar files an earlier run left, so the manifest lists all there is."""
    stale = sorted(folder.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    if stale:
        log.warning("removing %d shards of an earlier run in %s", len(stale), folder)
    for path in stale:
        path.unlink()


def write_rejects(path: Path, rejects: Iterable[Reject]) -> None:
    """One JSON object per line: source (file or table:line), reason code, detail."""
    with open(path, "w") as fh:
        for rej in rejects:
            fh.write(
                json.dumps({"source": rej.source, "reason": rej.reason, "detail": rej.detail})
                + "\n"
            )


def write_manifest(
    folder: Path, fmt: str, split: str, shards: list[dict[str, Any]], extra: dict[str, Any]
) -> dict[str, Any]:
    """Writes <folder>/manifest.json for a split of format `fmt` (a name in
    shards.formats.FORMATS): split, num_samples (the sum over shards), the shard entries
    (ShardSink.close), the format, then `extra` (the format's size key, label_names, ...)."""
    from shards.formats import get_format  # here, not on top: the formats import this module

    spec = get_format(fmt)
    if spec.size_key not in extra:
        raise ValueError(f"{folder}: a {fmt} manifest needs {spec.size_key!r}")
    manifest = {
        "split": split,
        "num_samples": sum(int(s["num_samples"]) for s in shards),
        "shards": shards,
        "format": fmt,
        **extra,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as the bytes of a .npy file (no pickled objects)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def seeded_order(records: list[Any], split: str, seed: int) -> list[Any]:
    """A split's records in the order its shards hold them: sorted by key, then shuffled once
    with (seed, split), so neighbouring records (one study, one subject) spread over shards and
    the order depends on the seed only, not on the order the sources were read in."""
    records = sorted(records, key=lambda r: r.key)
    random.Random(f"{seed}|{split}").shuffle(records)
    return records


def empty_run_error(report: dict[str, Any], rejects_path: Path) -> str | None:
    """The error a shard command exits with when it wrote no sample at all (None otherwise)."""
    if report["written"]["total"] > 0:
        return None
    reasons = ", ".join(f"{k}: {v}" for k, v in report["rejected"]["by_reason"].items())
    return (
        f"no sample written: {report['records_in']} records in, "
        f"{report['rejected']['total']} rejected ({reasons or 'none'}); the reasons per record "
        f"are in {rejects_path}"
    )


def run_writer(prog: str, write: Callable[[], dict[str, Any]], out: Path) -> int:
    """A shard command's exit code: `write()` (-> the writer's report) ends in 2 with the error
    for bad input (ValueError, FileNotFoundError), 1 when it wrote no sample, else 0 after
    naming the report and the rejects."""
    try:
        report = write()
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    error = empty_run_error(report, Path(out) / "rejects.jsonl")
    if error is not None:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    print(f"report: {Path(out) / 'report.json'}  rejects: {Path(out) / 'rejects.jsonl'}")
    return 0
