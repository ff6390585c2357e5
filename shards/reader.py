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

Every shard format goes through this one pipeline; the manifest's "format" names it (a
manifest without one is read as medalign-ad-v1) and the reader looks it up in shards/formats/,
which decodes a sample and adds the format's own batch keys. Sampling, rank and worker split,
resume skipping, resampling and eval padding work on raw tar samples and are the same for all.
Every batch holds:

  image (B, 1, S, S, S) or (B, 1, S, S), input_ids (B, L) long, attention_mask (B, L) long,
  text_tokens (B,) long, valid (B,) bool, key / text (lists of str), worker, skipped, read,
  pool_pos, retries

and the format's keys (shards/formats/volume_class.py: label, binary, subject, cohort, split;
shards/formats/image_multilabel.py: labels, label_mask, split, group). The label names come
from the split's manifest (ShardSet.label_names).

Texts are right-padded to the batch's longest text, rounded up to a multiple of 8 (at most
the tower's max length; `data.pad_to: max_length` pads every batch to it), so L varies from
batch to batch; text_tokens (B,) holds each text's real token count. With
`data.bucket_batches: K` the training stream takes K batches' worth of samples from the shuffle
buffer at a time, sorts them by text length, cuts them into batches and yields those in a
seeded order, so a batch's texts are of similar length (padded / real tokens near 1). With a
text cache (frozen text towers, trainer/text_cache.py) a batch carries the stored text states
(text_pooled (B, H), or text_hidden (B, L, H) with attention_mask) instead of input_ids.

worker, skipped, read and pool_pos: the loader stream a batch came from, the samples that
stream lost or rejected so far, the raw samples it read so far, and (length bucketing) which
batch of its pool it is; with bucketing, read and skipped are counted where its pool began.
A checkpoint records them per stream. Eval padding rows (valid=False) repeat the rank's last
sample, key and group included.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import mmap
import os
import random
import tarfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from shards.cxr_labels import LabelPolicyConfig
from shards.formats import DEFAULT_FORMAT, ShardFormat, get_format
from shards.formats.volume_class import ClinicalTextConfig
from shards.remote import CountingReader, is_remote, open_stream
from shards.remote import basename as remote_basename
from shards.remote import join as remote_join
from shards.remote import read_bytes as remote_read_bytes
from shards.splits import label_fraction_indices

log = logging.getLogger(__name__)

# A rank / worker whose shards hold none of a label-fraction run's samples for this many
# epochs in a row would otherwise spin forever.
_MAX_EMPTY_EPOCHS = 200


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed. Batch sizes are per process."""

    train: str = "data/ad_shards/train"  # a split folder holding manifest.json and its tars
    val: str = "data/ad_shards/val"
    test: str = "data/ad_shards/test"
    # More named splits (name -> folder), evaluated when train.eval_splits names them: e.g. the
    # cohorts the shard writer held out (--holdout), {AIBL: data/ad_shards/AIBL, ...}.
    extra_splits: dict[str, str] = field(default_factory=dict)
    batch_size: int = 8
    eval_batch_size: int = 16
    num_workers: int = 0
    shuffle_buffer: int = 256
    resampled: bool = False  # draw shards with replacement per rank instead of splitting them
    # Keys read by one shard format only (shards/formats/):
    # medalign-ad-v1: the classes (three_class: the manifest's label names; binary: the first
    # against the rest) and the clinical text rendered again from stored fields
    label_mode: Literal["three_class", "binary"] = "three_class"
    clinical: ClinicalTextConfig = field(default_factory=ClinicalTextConfig)
    # medalign-cxr-v1: what uncertain (-1) and blank (not mentioned) labels become
    labels: LabelPolicyConfig = field(default_factory=LabelPolicyConfig)
    # Label-fraction runs: train on this fraction of the training split's samples (e.g. 0.01,
    # 0.1, 1.0), one seeded draw by sample key; a smaller fraction's subset lies inside every
    # larger one's (shards.splits.label_fraction_indices). Validation and test are untouched.
    label_fraction: float = 1.0
    label_fraction_seed: int = 0
    # Text around every report / clinical text before tokenizing, with {text} where the text
    # goes (e.g. "{text} This report in one word:"; the MAE + LLaMA report appends a prompt to
    # every report). "" = the text as stored. Zero-shot label prompts get the same template.
    prompt_template: str = ""
    # Every shard a run reads is checked against its manifest sha256 before training (each
    # rank hashes its share; a result is cached in the run folder by file size and mtime, so a
    # resume re-hashes nothing unchanged); "off" trusts the files. See docs/RELIABILITY.md.
    verify_shards: Literal["start", "off"] = "start"
    # The training stream stops with an error naming the split and the first reasons after
    # this many samples in a row were lost (unreadable tar) or could not be decoded.
    max_failures_in_row: int = 100
    # How a batch's texts are padded: to its longest text, rounded up to a multiple of 8 (and
    # never past the model's max length), or every batch to the model's max length.
    pad_to: Literal["longest", "max_length"] = "longest"
    # Length bucketing of the training stream: this many batches' worth of samples leave the
    # shuffle buffer together, are sorted by text length, cut into batches, and those batches
    # are yielded in a seeded random order (0: off). Batches then hold texts of similar length,
    # so padding to the longest wastes little. Exact resume is kept (see TrainStream).
    bucket_batches: int = 0
    # Frozen text towers: each split's text states computed once and stored (trainer/text_cache.py);
    # the training step then never runs the text tower. "" = beside the shards
    # (<split>/text_cache); a folder = there (for read-only dataset folders).
    text_cache: bool = False
    text_cache_dir: str = ""
    # Remote splits (URLs, pipe: commands; shards/remote.py): a stream that breaks before the
    # shard's recorded size is opened again this many times, after 1x, 2x, 4x, ... this backoff.
    remote_retries: int = 3
    remote_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if self.prompt_template and self.prompt_template.count("{text}") != 1:
            raise ValueError(
                f"prompt_template={self.prompt_template!r}: expected {{text}} exactly once "
                "(where the report goes), or an empty string"
            )
        if self.remote_retries < 0 or self.remote_backoff_s < 0:
            raise ValueError(
                f"remote_retries={self.remote_retries}, remote_backoff_s={self.remote_backoff_s}: "
                "expected >= 0"
            )
        if self.bucket_batches < 0:
            raise ValueError(f"bucket_batches={self.bucket_batches}: expected >= 0 (0: off)")
        if self.max_failures_in_row < 1:
            raise ValueError(f"max_failures_in_row={self.max_failures_in_row}: expected >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers}: expected >= 0")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer={self.shuffle_buffer}: expected >= 1")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"label_fraction={self.label_fraction}: expected a value in (0, 1]")
        for name in self.extra_splits:
            if name in ("train", "val", "test") or not name:
                raise ValueError(
                    f"extra_splits has a split named {name!r}: expected a name other than "
                    "train, val and test (those have keys of their own)"
                )

    def prompted(self, text: str) -> str:
        """The text as tokenized: inside `prompt_template` when one is set."""
        return self.prompt_template.replace("{text}", text) if self.prompt_template else text

    def split_dir(self, name: str) -> str:
        """The folder of a named split: train, val, test or a key of extra_splits."""
        if name in ("train", "val", "test"):
            return getattr(self, name)
        if name not in self.extra_splits:
            known = ["train", "val", "test", *self.extra_splits]
            raise KeyError(f"no split named {name!r}; known: {known} (data.extra_splits adds more)")
        return self.extra_splits[name]


@dataclass
class ShardSet:
    """A split as its manifest describes it (``digests``: shard path -> (bytes, sha256) where
    the manifest records them)."""

    folder: Path | str  # a local folder, or a URL / pipe: command (shards/remote.py)
    shards: list[tuple[str, int]]  # (tar path, samples)
    num_samples: int
    size: int | None  # side length S of every image (the format's size key), if recorded
    format: str = DEFAULT_FORMAT
    name: str = ""  # the split's name (the manifest's "split", else the folder's name)
    word_limit: int = 64  # words the writer kept of a narrative summary (64 before it was recorded)
    digests: dict[str, tuple[int, str]] = field(default_factory=dict)
    label_names: list[str] = field(default_factory=list)  # [] = the format's default names
    texts: bool = True  # False: a dataset without texts (CheXpert); samples' text is ""

    def __post_init__(self) -> None:
        if not self.label_names:
            self.label_names = list(self.spec.default_label_names)

    @property
    def spec(self) -> ShardFormat:
        """The split's shard format (shards/formats/)."""
        return get_format(self.format, str(self.folder))

    @property
    def volume_size(self) -> int | None:
        """The manifest's volume_size (3-D formats); None for 2-D ones."""
        return self.size if self.spec.image_dims == 3 else None

    @classmethod
    def load(cls, folder: str) -> ShardSet:
        """The split at `folder`: a local folder, a URL or a pipe: command (shards/remote.py)."""
        remote = is_remote(folder)
        path = remote_join(folder, "manifest.json") if remote else Path(folder) / "manifest.json"
        if not remote and not path.is_file():
            raise FileNotFoundError(
                f"{path}: no shard manifest; write shards first (scripts/make_shards.py, "
                "docs/DATASETS.md)"
            )
        manifest = json.loads(manifest_bytes(folder))
        fmt = manifest.get("format", DEFAULT_FORMAT)  # manifests before "format" are all AD
        spec = get_format(fmt, str(path))
        label_names = spec.label_names(manifest, str(path))
        where = (
            (lambda name: remote_join(folder, name))
            if remote
            else (lambda name: str(Path(folder) / name))
        )
        shards = [(where(s["name"]), int(s["num_samples"])) for s in manifest["shards"]]
        missing = [] if remote else [p for p, _ in shards if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{path} lists shards that do not exist: {missing[:3]}")
        if not shards:
            raise ValueError(f"{path}: the split has no shards")
        size = manifest.get(spec.size_key)
        return cls(
            folder if remote else Path(folder),
            shards,
            int(manifest["num_samples"]),
            None if size is None else int(size),
            fmt,
            str(manifest.get("split") or remote_basename(str(folder))),
            int(manifest.get("word_limit", 64)),
            {
                where(s["name"]): (int(s["bytes"]), str(s["sha256"]))
                for s in manifest["shards"]
                if "sha256" in s and "bytes" in s
            },
            label_names,
            bool(manifest.get("texts", True)),
        )

    @property
    def remote(self) -> bool:
        return is_remote(str(self.folder))

    @property
    def sizes(self) -> dict[str, int]:
        """Shard path -> its size in bytes, where the manifest records it."""
        return {path: size for path, (size, _) in self.digests.items()}


def manifest_bytes(folder: str) -> bytes:
    """The split's manifest.json as stored (local or remote)."""
    if is_remote(folder):
        return remote_read_bytes(remote_join(folder, "manifest.json"))
    return (Path(folder) / "manifest.json").read_bytes()


class DataError(RuntimeError):
    """A split that cannot feed training: too many samples in a row lost or undecodable."""


class SkipCounter:
    """Counts and logs samples lost or rejected by the reader; the run goes on, unless
    `max_in_row` failures come in a row with no sample decoded between them (then DataError
    names the split and the first reasons).

    `base` is the count carried over from a checkpoint; while `muted` (a resumed stream
    passing over samples it already consumed, whose losses the base holds) nothing counts.
    """

    def __init__(self, where: str = "", max_in_row: int = 0, base: int = 0) -> None:
        self.where, self.max_in_row, self.base = where, max_in_row, base
        self.counts: Counter[str] = Counter()
        self.first: list[str] = []
        self.in_row = 0
        self.muted = False
        self.retries = 0  # remote shards opened again after a broken stream

    def __call__(self, exn: BaseException) -> bool:  # webdataset handler protocol
        log.warning("shard read error: %r", exn)  # the samples it loses are counted per shard
        return True

    def add(self, reason: str, detail: str, n: int = 1) -> None:
        if self.muted or n <= 0:
            return
        self.counts[reason] += n
        self.in_row += 1  # a cut shard is one failure however many samples it loses
        if len(self.first) < 5:
            self.first.append(f"{reason}: {detail}")
        log.warning("skipping %d sample(s) (%s): %s", n, reason, detail)
        if self.max_in_row and self.in_row >= self.max_in_row:
            raise DataError(
                f"{self.where}: {self.in_row} failures in a row (lost or undecodable samples, no "
                f"sample decoded; data.max_failures_in_row={self.max_in_row}); nothing trains on this "
                f"split. First reasons: " + " | ".join(self.first)
            )

    def retry(self, url: str, exn: BaseException, attempt: int, wait: float) -> None:
        """A remote shard's stream broke (transient): it is opened again after `wait` s."""
        self.retries += 1
        log.warning("%s: stream broke (%s); retry %d in %.1f s", url, exn, attempt, wait)

    def ok(self) -> None:
        """A sample decoded: the run of failures is over."""
        self.in_row = 0

    @property
    def total(self) -> int:
        return self.base + sum(self.counts.values())


class _Prompted:
    """A decoder whose samples' text is put inside `DataConfig.prompt_template` (picklable)."""

    def __init__(self, decode: Callable[[dict[str, Any]], dict[str, Any]], cfg: DataConfig):
        self.decode, self.cfg = decode, cfg

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        sample = self.decode(raw)
        sample["text"] = self.cfg.prompted(sample["text"])
        return sample


def sample_decoder(shards: ShardSet, cfg: DataConfig) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """raw tar sample -> decoded sample, for the split's format (picklable for loader workers)."""
    decode = shards.spec.decoder(shards, cfg)
    return _Prompted(decode, cfg) if cfg.prompt_template else decode


def _stack_images(images: list[np.ndarray]) -> torch.Tensor:
    """Stacks decoded images into one tensor: the one copy a sample's pixels make.

    In a loader worker torch's default_collate stacks straight into shared memory, so handing
    the batch to the main process copies nothing more. Elsewhere numpy allocates it (numpy asks
    for huge pages on large arrays: a 32 MB float16 batch stacks about 3x faster than into a
    fresh torch tensor on Linux).
    """
    if get_worker_info() is not None:
        with warnings.catch_warnings():  # read-only inputs (views of bytes) are only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return default_collate([torch.from_numpy(image) for image in images])
    return torch.from_numpy(np.stack(images))


PAD_MULTIPLE = 8  # batches padded to their longest text are rounded up to this many tokens


def padded_width(longest: int, max_length: int) -> int:
    """The width a batch whose longest text has `longest` tokens is padded to: the next
    multiple of PAD_MULTIPLE, never past `max_length` (at least 1)."""
    return max(1, min(max_length, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE))


def tokenize_texts(
    tokenizer: Any, texts: list[str], max_length: int, pad_to: str = "longest"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> input_ids and attention_mask (B, L), truncated to max_length and right-padded
    to the longest text rounded up to a multiple of 8 (`pad_to="longest"`) or to max_length."""
    tokens = tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return trim_padding(tokens["input_ids"], tokens["attention_mask"], max_length, pad_to)


def trim_padding(
    ids: torch.Tensor, mask: torch.Tensor, max_length: int, pad_to: str = "longest"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, L) ids and mask cut to the longest row's padded width (pad_to longest)."""
    if pad_to == "longest":  # right padding: the columns past the longest are padding
        width = padded_width(int(mask.sum(1).max()), max_length)
        ids, mask = ids[:, :width].contiguous(), mask[:, :width].contiguous()
    return ids, mask


class _Batcher:
    """Collates decoded samples and tokenizes their texts, right-padded to the batch's longest
    text (`pad_to="longest"`: a multiple of 8, at most max_length) or to max_length.

    With a `text_cache` (trainer.text_cache.TextCache) the texts are not tokenized: the batch
    carries the frozen tower's stored states for its sample keys instead (`text_pooled`, or
    `text_hidden` with its `attention_mask`), and `text_tokens` (B,) the texts' lengths.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        fmt: str = DEFAULT_FORMAT,
        pad_to: str = "max_length",
        text_cache: Any = None,
    ) -> None:
        self.spec = get_format(fmt)
        side = getattr(tokenizer, "padding_side", "right")
        if tokenizer is not None and side != "right":
            raise ValueError(
                f"the tokenizer pads on the {side}; the reader and the towers expect right "
                "padding (tokenizer.padding_side = 'right')"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to = pad_to
        self.text_cache = text_cache

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> input_ids and attention_mask (B, L), truncated to max_length; L per pad_to."""
        return tokenize_texts(self.tokenizer, texts, self.max_length, self.pad_to)

    def pool_tokens(
        self, samples: list[dict[str, Any]]
    ) -> tuple[list[int], tuple[torch.Tensor, torch.Tensor] | None]:
        """Length bucketing: each sample's text length in tokens, and the pool's texts tokenized
        once at max_length (None when a text cache or no tokenizer supplies the text side);
        its batches take their rows (`__call__`'s `tokens`)."""
        if self.text_cache is not None:
            return self.text_cache.lengths([s["key"] for s in samples]).tolist(), None
        if self.tokenizer is None:
            return [0] * len(samples), None
        texts = [s["text"] for s in samples]
        ids, mask = tokenize_texts(self.tokenizer, texts, self.max_length, "max_length")
        return mask.sum(1).tolist(), (ids, mask)

    def __call__(
        self,
        samples: list[dict[str, Any]],
        valid: list[bool],
        tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """`tokens`: these samples' rows of `pool_tokens`, so their texts are not tokenized again."""
        out = {"image": _stack_images([s["image"] for s in samples])}
        if self.text_cache is not None:
            out.update(self.text_cache.lookup([s["key"] for s in samples]))
        elif self.tokenizer is not None:  # image-only models batch no text
            if tokens is None:
                ids, mask = self.tokenize([s["text"] for s in samples])
            else:
                ids, mask = trim_padding(*tokens, self.max_length, self.pad_to)
            out["input_ids"], out["attention_mask"] = ids, mask
            out["text_tokens"] = mask.sum(1)
        out.update(self.spec.collate(samples))  # the format's labels and ids
        out["valid"] = torch.tensor(valid, dtype=torch.bool)
        out["key"] = [s["key"] for s in samples]
        out["text"] = [s["text"] for s in samples]  # as tokenized (figures, predictions)
        return out


# Members decoded as arrays straight from the mapped shard (no copy); the rest become bytes.
_MAPPED_SUFFIXES = (".npy", ".png")


def _map(file: io.BufferedReader) -> memoryview | None:
    """A copy-on-write map of the whole file, or None where the file system cannot map it."""
    try:
        return memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY))
    except (OSError, ValueError) as exn:
        _warn_unmapped(f"{type(exn).__name__}: {exn}")
        return None


@functools.cache
def _warn_unmapped(reason: str) -> None:
    log.warning("shards cannot be memory-mapped here (%s); reading them with plain reads", reason)


@dataclass(frozen=True)
class RemoteRead:
    """How remote shards are read: their recorded sizes (a stream that ends short of one broke)
    and the retries of a broken stream."""

    sizes: dict[str, int] = field(default_factory=dict)
    retries: int = 3
    backoff_s: float = 1.0


def _remote_members(url: str, counter: SkipCounter, how: RemoteRead) -> Iterator[dict[str, Any]]:
    """The regular members of a remote tar, read as a stream (shards/remote.py). A stream that
    breaks before the shard's recorded size is opened again (`how.retries` times, backoff
    doubling each time) and the members already given are passed over; a shard that is damaged
    where it is stored (or breaks once the retries are spent) is counted and left."""
    size = how.sizes.get(url)
    given, attempt = 0, 0
    while True:
        seen, reader = 0, None
        try:
            with open_stream(url) as stream:
                reader = CountingReader(stream, size)
                with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|") as tar:
                    for member in tar:
                        if not member.isreg() or member.name.startswith("__"):
                            continue
                        data = tar.extractfile(member).read()  # type: ignore[union-attr]
                        if len(data) != member.size:
                            raise tarfile.ReadError(
                                f"member {member.name} has {len(data)} of its {member.size} "
                                "bytes: the stream ends early"
                            )
                        seen += 1
                        if seen > given:  # not given before a retry
                            given += 1
                            yield {"fname": member.name, "data": data, "__url__": url}
            if size is not None and reader.count < size:
                raise EOFError(f"the stream ended after {reader.count} of {size} bytes")
            return
        except Exception as exn:  # noqa: BLE001 - transports raise their own types
            # the stream broke, not the stored file (a missing file will not come back)
            broke = not isinstance(exn, FileNotFoundError) and (reader is None or reader.broke)
            if broke and attempt < how.retries:
                attempt += 1
                wait = how.backoff_s * 2 ** (attempt - 1)
                counter.retry(url, exn, attempt, wait)
                time.sleep(wait)
                continue
            counter(ValueError(f"{url}: {exn}"))
            return


def _tar_members(
    urls: list[str], counter: SkipCounter, remote: RemoteRead | None = None
) -> Iterator[dict[str, Any]]:
    """(name, data) of every regular member of local tar shards, in order, then {} per shard.

    The shards are local files: tarfile reads each header, and the data of image members is a
    view of the memory-mapped shard (copy-on-write, so an array over it is writable without
    touching the file); the batch's stack is then the one copy a volume makes. webdataset's
    reader opens tars as streams and copies every member through 10 KB blocks: reading and
    decoding a 4 MB volume that way took about 6 ms against 1 ms here
    (scripts/bench_loader.py). Where a file cannot be mapped, members are read into bytes.
    A shard that turns out corrupt is counted and left at the first bad header or member; its
    intact members before that point are kept.
    """
    for url in urls:
        if is_remote(url):
            yield from _remote_members(url, counter, remote or RemoteRead())
            yield {"__end__": url}
            continue
        try:
            with open(url, "rb") as file, tarfile.open(fileobj=file, mode="r:") as tar:
                mapped = _map(file)
                while (member := tar.next()) is not None:
                    if member.isreg() and not member.name.startswith("__"):
                        if mapped is None:
                            data = tar.extractfile(member).read()  # type: ignore[union-attr]
                        else:
                            data = mapped[member.offset_data : member.offset_data + member.size]
                            if not member.name.endswith(_MAPPED_SUFFIXES):
                                data = data.tobytes()
                        if len(data) != member.size:
                            raise tarfile.ReadError(
                                f"member {member.name} has {len(data)} of its {member.size} "
                                "bytes: the file ends early"
                            )
                        yield {"fname": member.name, "data": data, "__url__": url}
                    tar.members.clear()  # random-access mode would keep every header
                # tarfile ends quietly at a bad or cut header past the first one; a tar that
                # really ended has only zero blocks after its last member.
                file.seek(tar.offset)
                if any(file.read(1 << 20)):
                    raise tarfile.ReadError(f"unreadable header at byte {tar.offset}")
        except (tarfile.TarError, OSError, EOFError, ValueError) as exn:
            counter(ValueError(f"{url}: {exn}"))
        yield {"__end__": url}  # end of shard: a sample never spans two shards


def _read_tars(
    urls: list[str],
    counter: SkipCounter,
    expected: dict[str, int] | None = None,
    remote: RemoteRead | None = None,
) -> Iterator[dict[str, Any]]:
    """Samples (members grouped by key, as webdataset groups them) of the shards in order.

    With ``expected`` (shard path -> the manifest's sample count) a shard that yields fewer
    samples than its manifest says (a cut file, a bad header) has the difference counted as
    lost, so the counter's total is the number of samples that did not reach training.
    """
    current: dict[str, Any] | None = None
    produced = 0
    for member in _tar_members(urls, counter, remote):
        if "__end__" in member:
            if current is not None:
                produced += 1
                yield current
            current = None
            url = member["__end__"]
            lost = (expected or {}).get(url, produced) - produced
            if lost > 0:
                counter.add(
                    "lost", f"{url}: {lost} of its {expected[url]} samples unreadable", lost
                )
            produced = 0
            continue
        prefix, suffix = wds.tariterators.base_plus_ext(member["fname"])
        if prefix is None:
            continue
        if current is None or current["__key__"] != prefix:
            if current is not None:
                produced += 1
                yield current
            current = {"__key__": prefix, "__url__": member["__url__"]}
        suffix = suffix.lower()
        if suffix in current:  # a second member of one name: the sample is damaged
            counter(ValueError(f"{member['__url__']}: {member['fname']} appears twice"))
            continue
        current[suffix] = member["data"]


def sample_keys(shards: ShardSet) -> list[str]:
    """Every sample key of a split, from the tar headers only (nothing is decoded)."""
    keys: set[str] = set()
    if shards.remote:  # one streamed pass over the split; every rank must see every key
        urls = [path for path, _ in shards.shards]
        counter = SkipCounter(str(shards.folder))
        found = {
            raw["__key__"]
            for raw in _read_tars(urls, counter, dict(shards.shards), RemoteRead(shards.sizes))
        }
        if counter.total:
            raise DataError(
                f"{shards.folder}: {counter.total} samples could not be read while listing the "
                f"split's keys (data.label_fraction needs all of them): {counter.first[:3]}"
            )
        return sorted(found)
    for path, _ in shards.shards:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    base = os.path.basename(member.name)
                    keys.add(os.path.join(os.path.dirname(member.name), base.split(".", 1)[0]))
    return sorted(keys)


def fraction_keys(shards: ShardSet, fraction: float, seed: int) -> frozenset[str] | None:
    """The keys a label-fraction run trains on (None: all of them)."""
    if fraction >= 1.0:
        return None
    keys = sample_keys(shards)
    if not keys:
        raise ValueError(f"{shards.folder}: no samples in the split's shards")
    chosen = frozenset(keys[i] for i in label_fraction_indices(len(keys), fraction, seed))
    log.info(
        "data.label_fraction=%g: training on %d of %d samples of %s",
        fraction,
        len(chosen),
        len(keys),
        shards.folder,
    )
    return chosen


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
        text_cache: Any = None,
    ) -> None:
        super().__init__()
        self.shards, self.cfg, self.rank, self.world_size, self.seed = (
            shards,
            cfg,
            rank,
            world_size,
            seed,
        )
        self.batcher = _Batcher(tokenizer, max_length, shards.format, cfg.pad_to, text_cache)
        self.decode = sample_decoder(shards, cfg)
        self.start_batch = 0
        # worker -> (samples read, lost, batches of a length-bucketing pool consumed)
        self.resume_counts: dict[int, tuple[int, ...]] = {}
        self.counter = SkipCounter()
        self.expected = dict(shards.shards)
        self.remote = RemoteRead(shards.sizes, cfg.remote_retries, cfg.remote_backoff_s)
        self.keep = fraction_keys(shards, cfg.label_fraction, cfg.label_fraction_seed)
        workers = max(1, cfg.num_workers)
        if not cfg.resampled and len(shards.shards) < world_size * workers:
            raise ValueError(
                f"{shards.folder}: {len(shards.shards)} shards cannot be split over "
                f"{world_size} ranks x {workers} loader workers; write more, smaller shards "
                f"(--samples-per-shard), use fewer workers, or set data.resampled=true"
            )

    def set_start(
        self, batches_consumed: int, resume_counts: dict[int, tuple[int, ...]] | None = None
    ) -> None:
        """Resume: the first `batches_consumed` batches of this rank's stream are skipped.

        ``resume_counts``: per stream (a batch's "worker"), what its last consumed batch
        reported: "read" and "skipped" (the raw samples the stream had read and the samples it
        had lost or rejected when the batch was made; with length bucketing, before the batch's
        pool began) and "pool_pos" (how many batches of that pool had been yielded; 0 without
        bucketing). With them the stream passes over exactly the samples it read (rejected ones
        included), rebuilds a pool it was inside of and drops its consumed batches, and its
        loss count goes on from where it was."""
        self.start_batch = batches_consumed
        self.resume_counts = dict(resume_counts or {})

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
        empty_epochs = 0
        for epoch, urls in enumerate(self._urls(worker, num_workers)):
            rng = random.Random(f"samples-{self.seed}-{epoch}-{self.rank}-{worker}")
            raw = _read_tars(urls, self.counter, self.expected, self.remote)
            if self.keep is not None:  # label-fraction run: the other samples are not read on
                raw = (sample for sample in raw if sample.get("__key__") in self.keep)
            count = 0
            for sample in _seeded_shuffle(raw, self.cfg.shuffle_buffer, rng):
                count += 1
                yield sample
            empty_epochs = 0 if count else empty_epochs + 1
            if empty_epochs == _MAX_EMPTY_EPOCHS:
                raise ValueError(
                    f"{self.shards.folder}: rank {self.rank} worker {worker} read no sample in "
                    f"{_MAX_EMPTY_EPOCHS} epochs in a row (data.label_fraction="
                    f"{self.cfg.label_fraction} keeps {len(self.keep or ())} samples); use a "
                    "larger fraction, fewer ranks / workers or data.resampled=true"
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader_worker, num_workers = self._worker()
        bs = self.cfg.batch_size
        # Global batch i comes from worker i % num_workers (the DataLoader's round robin, which
        # restarts at worker 0): a resumed loader's worker w plays the stream of worker
        # (w + start) % num_workers, so batch i of the resumed run is batch start + i of the first.
        worker = (loader_worker + self.start_batch) % num_workers
        skip = len(range(worker, self.start_batch, num_workers)) * bs
        drop = 0
        if worker in self.resume_counts:
            skip, self.counter.base, *rest = self.resume_counts[worker]
            drop = rest[0] if rest else 0
        self.counter.where = f"{self.shards.folder} (rank {self.rank}, stream {worker})"
        self.counter.max_in_row = self.cfg.max_failures_in_row
        self.counter.muted = skip > 0  # what it lost there is in the carried-over count
        pool_size = bs * max(1, self.cfg.bucket_batches)
        read = pool_read = pool_skipped = 0
        pool: list[dict[str, Any]] = []
        for raw, lost_before in self._pulls(self._raw_samples(worker, num_workers)):
            read += 1
            if skip > 0:
                skip -= 1
                self.counter.muted = skip > 0
                continue
            if not pool:  # where a resume into this pool starts reading (and counting) again
                pool_read, pool_skipped = read - 1, lost_before
            try:
                pool.append(self.decode(raw))
            except Exception as err:  # one bad sample never stops a run
                self.counter.add("undecodable", str(err))
                continue
            self.counter.ok()
            if len(pool) < pool_size:
                continue
            if not self.cfg.bucket_batches:
                out = self.batcher(pool, [True] * bs)
                out.update(worker=worker, skipped=self.counter.total, read=read, pool_pos=0)
                out["retries"] = self.counter.retries
                yield out
            else:
                for out in self._buckets(pool, worker, pool_read, pool_skipped):
                    if drop > 0:  # consumed before the checkpoint this run resumed from
                        drop -= 1
                        continue
                    yield out
            pool = []

    def _pulls(self, samples: Iterator[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], int]]:
        """(raw sample, the loss count before it was pulled): losses found while pulling it
        (the end of a short shard) belong after it, as a resumed stream counts them."""
        while True:
            before = self.counter.total
            try:
                raw = next(samples)
            except StopIteration:
                return
            yield raw, before

    def _buckets(
        self, pool: list[dict[str, Any]], worker: int, pool_read: int, pool_skipped: int
    ) -> Iterator[dict[str, Any]]:
        """A length-bucketing pool -> its batches: sorted by text length, cut, seeded order."""
        bs = self.cfg.batch_size
        lengths, tokens = self.batcher.pool_tokens(pool)
        order = sorted(range(len(pool)), key=lambda i: (lengths[i], i))
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        random.Random(f"buckets-{self.seed}-{self.rank}-{worker}-{pool_read}").shuffle(batches)
        for pos, index in enumerate(batches, 1):
            rows = None if tokens is None else (tokens[0][index], tokens[1][index])
            out = self.batcher([pool[i] for i in index], [True] * bs, rows)
            out.update(worker=worker, skipped=pool_skipped, read=pool_read, pool_pos=pos)
            out["retries"] = self.counter.retries
            yield out


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
        text_cache: Any = None,
    ) -> None:
        super().__init__()
        self.shards, self.cfg, self.rank, self.world_size = shards, cfg, rank, world_size
        self.batcher = _Batcher(tokenizer, max_length, shards.format, cfg.pad_to, text_cache)
        self.decode = sample_decoder(shards, cfg)
        self.counter = SkipCounter(str(shards.folder))
        self.per_rank = -(-shards.num_samples // world_size)

    def __len__(self) -> int:
        return -(-self.per_rank // self.cfg.eval_batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        urls = [path for path, _ in self.shards.shards]
        mine: list[dict[str, Any]] = []
        remote = RemoteRead(self.shards.sizes, self.cfg.remote_retries, self.cfg.remote_backoff_s)
        expected = dict(self.shards.shards)
        for index, raw in enumerate(_read_tars(urls, self.counter, expected, remote)):
            if index % self.world_size != self.rank:
                continue
            try:
                sample = self.decode(raw)
            except Exception as err:
                self.counter.add("undecodable", str(err))
                continue
            # A copy, not a view of the mapped shard: the whole split is held until batched,
            # and a view would keep every shard's mapping (and its file descriptor) open.
            sample["image"] = np.array(sample["image"])
            mine.append(sample)
        if not mine:
            raise RuntimeError(f"{self.shards.folder}: rank {self.rank} read no valid sample")
        valid = [True] * len(mine)
        while len(mine) < self.per_rank:  # padding rows are masked out of every metric
            mine.append(mine[-1])
            valid.append(False)
        bs = self.cfg.eval_batch_size
        for i in range(0, self.per_rank, bs):
            out = self.batcher(mine[i : i + bs], valid[i : i + bs])
            out.update(worker=0, skipped=self.counter.total, read=0, pool_pos=0)
            out["retries"] = self.counter.retries
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
    resume_counts: dict[int, tuple[int, ...]] | None = None,
    text_cache: Any = None,
) -> DataLoader:
    """An endless DataLoader over this rank's share of the training split (resumed: see
    `TrainStream.set_start`; `text_cache`: see `_Batcher`)."""
    stream = TrainStream(
        ShardSet.load(split_dir), cfg, tokenizer, max_length, rank, world_size, seed, text_cache
    )
    stream.set_start(start_batch, resume_counts)
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),  # so Mover's non_blocking copies overlap
        # Worker seeds come from this generator, so starting the loader never draws from the
        # global RNG (which the model's masking uses and checkpoints restore).
        generator=torch.Generator().manual_seed(seed),
    )


def build_eval_loader(
    split_dir: str,
    cfg: DataConfig,
    tokenizer: Any,
    max_length: int,
    rank: int,
    world_size: int,
    text_cache: Any = None,
) -> DataLoader:
    stream = EvalStream(
        ShardSet.load(split_dir), cfg, tokenizer, max_length, rank, world_size, text_cache
    )
    return DataLoader(stream, batch_size=None, num_workers=0)
