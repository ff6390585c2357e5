"""Streaming reader: WebDataset shards -> decoded, tokenized, fixed-key batches.

Training stream, per rank and per loader worker (open_clip's `get_wds_dataset` shape):

    manifest shards -> epoch-seeded shard order -> split by rank -> split by worker
    -> read tar members (corrupt members skipped and counted) -> seeded shuffle buffer
    -> skip already-consumed samples (exact resume) -> decode -> batch + tokenize

The stream never ends: epoch e+1 follows epoch e with a new shard order, so every rank
yields the same number of batches and the loop stops by step count. Everything random is
seeded by (seed, epoch, rank, worker), so the same run replays the same samples and a resumed
run can skip exactly the samples it already consumed before decoding anything.

Evaluation stream: every rank reads the split in a fixed order and keeps the samples whose
index modulo world size is its rank, then pads with `valid=False` copies so that all ranks
run the same number of batches (ZeRO-3 needs every rank in every forward).

Batch keys (fixed): image (B, 1, S, S, S) float32, input_ids (B, L), attention_mask (B, L),
label (B,), valid (B,) bool, key / cohort / split (lists of str), worker and skipped
(the worker id and its cumulative count of skipped samples, for logging).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger(__name__)

LABEL_NAMES = {"three_class": ["NC", "MCI", "AD"], "binary": ["NC", "impaired"]}


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed. Batch sizes are per process."""

    train: str = "data/ad_shards/train"  # a split folder holding manifest.json and its tars
    val: str = "data/ad_shards/val"
    test: str = "data/ad_shards/test"
    batch_size: int = 8
    eval_batch_size: int = 16
    num_workers: int = 0
    shuffle_buffer: int = 256
    resampled: bool = False  # draw shards with replacement per rank instead of splitting them
    label_mode: Literal["three_class", "binary"] = "three_class"

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers}: expected >= 0")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer={self.shuffle_buffer}: expected >= 1")


@dataclass
class ShardSet:
    """A split as its manifest describes it."""

    folder: Path
    shards: list[tuple[str, int]]  # (tar path, samples)
    num_samples: int
    volume_size: int | None

    @classmethod
    def load(cls, folder: str) -> ShardSet:
        path = Path(folder) / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no shard manifest; write shards first (scripts/make_ad_shards.py)"
            )
        manifest = json.loads(path.read_text())
        shards = [
            (str(Path(folder) / s["name"]), int(s["num_samples"])) for s in manifest["shards"]
        ]
        missing = [p for p, _ in shards if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{path} lists shards that do not exist: {missing[:3]}")
        if not shards:
            raise ValueError(f"{path}: the split has no shards")
        return cls(Path(folder), shards, int(manifest["num_samples"]), manifest.get("volume_size"))


class SkipCounter:
    """Counts and logs samples dropped by the reader; the run goes on."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, exn: BaseException) -> bool:  # webdataset handler protocol
        self.add("corrupt_tar", repr(exn))
        return True

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        log.warning("skipping sample (%s): %s", reason, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def decode_sample(raw: dict[str, Any], label_mode: str) -> dict[str, Any]:
    """Decodes one tar sample of format medalign-ad-v1; raises ValueError naming what is wrong."""
    key = raw.get("__key__", "?")
    url = raw.get("__url__", "?")
    for field in ("vol.npy", "txt", "json"):
        if field not in raw:
            raise ValueError(f"{url}: sample {key} has no '{field}' member")
    volume = np.load(io.BytesIO(raw["vol.npy"]), allow_pickle=False)
    if volume.ndim != 3:
        raise ValueError(f"{url}: sample {key} volume has shape {volume.shape}, expected 3-D")
    if not np.isfinite(volume).all():
        raise ValueError(f"{url}: sample {key} volume has non-finite voxels")
    text = raw["txt"].decode("utf-8").strip()
    if not text:
        raise ValueError(f"{url}: sample {key} has empty text")
    meta = json.loads(raw["json"])
    label = int(meta["label"])
    if label not in (0, 1, 2):
        raise ValueError(f"{url}: sample {key} label={label}, expected 0, 1 or 2")
    if label_mode == "binary":
        label = int(label > 0)
    return {
        "image": torch.from_numpy(volume.astype(np.float32))[None],  # (1, S, S, S)
        "text": text,
        "label": label,
        "key": key,
        "cohort": meta.get("cohort", ""),
        "split": meta.get("split", ""),
    }


class _Batcher:
    """Collates decoded samples and tokenizes their texts to a fixed length."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: list[dict[str, Any]], valid: list[bool]) -> dict[str, Any]:
        tokens = self.tokenizer(
            [s["text"] for s in samples],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "valid": torch.tensor(valid, dtype=torch.bool),
            "key": [s["key"] for s in samples],
            "cohort": [s["cohort"] for s in samples],
            "split": [s["split"] for s in samples],
        }


def _read_tars(urls: list[str], counter: SkipCounter) -> Iterator[dict[str, Any]]:
    yield from wds.tarfile_to_samples(handler=counter)(iter([{"url": u} for u in urls]))


def _seeded_shuffle(
    samples: Iterator[dict[str, Any]], bufsize: int, rng: random.Random
) -> Iterator[dict[str, Any]]:
    """Reservoir shuffle whose order depends only on the input order and `rng`."""
    buf: list[dict[str, Any]] = []
    for sample in samples:
        buf.append(sample)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class TrainStream(IterableDataset):
    """Endless, deterministic, resumable batch stream for one rank (see module docstring)."""

    def __init__(
        self,
        shards: ShardSet,
        cfg: DataConfig,
        tokenizer: Any,
        max_length: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.shards, self.cfg, self.rank, self.world_size, self.seed = (
            shards,
            cfg,
            rank,
            world_size,
            seed,
        )
        self.batcher = _Batcher(tokenizer, max_length)
        self.start_batch = 0
        self.counter = SkipCounter()
        workers = max(1, cfg.num_workers)
        if not cfg.resampled and len(shards.shards) < world_size * workers:
            raise ValueError(
                f"{shards.folder}: {len(shards.shards)} shards cannot be split over "
                f"{world_size} ranks x {workers} loader workers; write more, smaller shards "
                f"(--samples-per-shard), use fewer workers, or set data.resampled=true"
            )

    def set_start(self, batches_consumed: int) -> None:
        """Resume: the first `batches_consumed` batches of this rank's stream are skipped."""
        self.start_batch = batches_consumed

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _urls(self, worker: int, num_workers: int) -> Iterator[list[str]]:
        """Shard lists for epoch 0, 1, 2, ... of this (rank, worker)."""
        names = [path for path, _ in self.shards.shards]
        epoch = 0
        while True:
            rng = random.Random(
                f"shards-{self.seed}-{epoch}"
            )  # str seeds are stable across processes
            if self.cfg.resampled:
                draw = random.Random(f"draw-{self.seed}-{epoch}-{self.rank}-{worker}")
                per_worker = max(1, len(names) // (self.world_size * num_workers))
                yield [draw.choice(names) for _ in range(per_worker)]
            else:
                order = names[:]
                rng.shuffle(order)
                yield order[self.rank :: self.world_size][worker::num_workers]
            epoch += 1

    def _raw_samples(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        for epoch, urls in enumerate(self._urls(worker, num_workers)):
            rng = random.Random(f"samples-{self.seed}-{epoch}-{self.rank}-{worker}")
            yield from _seeded_shuffle(_read_tars(urls, self.counter), self.cfg.shuffle_buffer, rng)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader_worker, num_workers = self._worker()
        bs = self.cfg.batch_size
        # Global batch i comes from worker i % num_workers (the DataLoader's round robin, which
        # restarts at worker 0): a resumed loader's worker w plays the stream of worker
        # (w + start) % num_workers, so batch i of the resumed run is batch start + i of the first.
        worker = (loader_worker + self.start_batch) % num_workers
        skip = len(range(worker, self.start_batch, num_workers)) * bs
        batch: list[dict[str, Any]] = []
        for raw in self._raw_samples(worker, num_workers):
            if skip > 0:
                skip -= 1
                continue
            try:
                batch.append(decode_sample(raw, self.cfg.label_mode))
            except Exception as err:  # one bad sample never stops a run
                self.counter.add("undecodable", str(err))
                continue
            if len(batch) == bs:
                out = self.batcher(batch, [True] * bs)
                out["worker"], out["skipped"] = worker, self.counter.total
                yield out
                batch = []


class EvalStream(IterableDataset):
    """A split read once in a fixed order; rank r keeps samples r, r+W, ...; padded to equal length."""

    def __init__(
        self,
        shards: ShardSet,
        cfg: DataConfig,
        tokenizer: Any,
        max_length: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.shards, self.cfg, self.rank, self.world_size = shards, cfg, rank, world_size
        self.batcher = _Batcher(tokenizer, max_length)
        self.counter = SkipCounter()
        self.per_rank = -(-shards.num_samples // world_size)

    def __len__(self) -> int:
        return -(-self.per_rank // self.cfg.eval_batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        urls = [path for path, _ in self.shards.shards]
        mine: list[dict[str, Any]] = []
        for index, raw in enumerate(_read_tars(urls, self.counter)):
            if index % self.world_size != self.rank:
                continue
            try:
                mine.append(decode_sample(raw, self.cfg.label_mode))
            except Exception as err:
                self.counter.add("undecodable", str(err))
        if not mine:
            raise RuntimeError(f"{self.shards.folder}: rank {self.rank} read no valid sample")
        valid = [True] * len(mine)
        while len(mine) < self.per_rank:  # padding rows are masked out of every metric
            mine.append(mine[-1])
            valid.append(False)
        bs = self.cfg.eval_batch_size
        for i in range(0, self.per_rank, bs):
            out = self.batcher(mine[i : i + bs], valid[i : i + bs])
            out["worker"], out["skipped"] = 0, self.counter.total
            yield out


def read_texts(split_dir: str) -> list[str]:
    """Every text of a split, in shard order (a tokenizer's training corpus)."""
    texts = []
    for path, _ in ShardSet.load(split_dir).shards:
        for raw in _read_tars([path], SkipCounter()):
            if "txt" in raw:
                texts.append(raw["txt"].decode("utf-8"))
    return texts


def build_train_loader(
    split_dir: str,
    cfg: DataConfig,
    tokenizer: Any,
    max_length: int,
    rank: int,
    world_size: int,
    seed: int,
    start_batch: int = 0,
) -> DataLoader:
    """An endless DataLoader over this rank's share of the training split."""
    stream = TrainStream(
        ShardSet.load(split_dir), cfg, tokenizer, max_length, rank, world_size, seed
    )
    stream.set_start(start_batch)
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        # Worker seeds come from this generator, so starting the loader never draws from the
        # global RNG (which the model's masking uses and checkpoints restore).
        generator=torch.Generator().manual_seed(seed),
    )


def build_eval_loader(
    split_dir: str, cfg: DataConfig, tokenizer: Any, max_length: int, rank: int, world_size: int
) -> DataLoader:
    stream = EvalStream(ShardSet.load(split_dir), cfg, tokenizer, max_length, rank, world_size)
    return DataLoader(stream, batch_size=None, num_workers=0)
