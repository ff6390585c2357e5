"""Text states of a frozen text tower, computed once per shard split and stored.

A frozen tower maps a report to the same states every epoch, so a run with
`data.text_cache: true` computes them once per split and then never runs the tower in a
training step: batches carry the stored states (shards.reader._Batcher) and the model reads
them in place of the tower's output (models/alifuse.py). What is stored depends on what the
model reads:

    pooled   (N, H) float16: the tower's pooled vector per report (its `pool`: CLS, last
             token or mean), when the model only needs that (ITC, unimodal fusion features)
    hidden   the token states of every real token, float16, ragged ((sum of lengths, H) with
             offsets): with attention pooling or text-grounded image layers, which read tokens

Where: `<split folder>/text_cache/<fingerprint>/` (or under `data.text_cache_dir`), memory-mapped
when read. The fingerprint is a sha256 of the tower's weights (every tensor of its state dict,
quantization state included), the tokenizer (its serialized form), max_length, pooling, what
is stored, the data's prompt template and clinical-text rendering, and the split's manifest;
a change of any of them gives another folder, so a stale cache is never read.

Building: each rank embeds every world-size-th sample of the split (in the split's fixed
order), writes its part (`part-R-of-W.*`, the keys file last), and the main process writes
`meta.json` after a barrier; a cache whose meta.json exists is reused as it is, by any world
size. Bytes per report: pooled 2 H (8 KB at H = 4096); hidden 2 H per real token (LLaMA-2-7B:
8 KB per token, about 350 KB for a 43-token report).

When it applies (else `data.text_cache: true` is an error naming why): the text tower is
frozen (no parameter trains: text.mode frozen, llama.mode frozen or frozen_4bit), no masked-LM
objective runs it on masked text, and it has no image-grounded layers. Zero-shot prompts at
evaluation still go through the tower.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn

from shards.reader import (
    DataConfig,
    DataError,
    RemoteRead,
    ShardSet,
    SkipCounter,
    _read_tars,
    padded_width,
    sample_decoder,
    tokenize_texts,
)
from shards.remote import is_remote
from trainer.distributed import sum_over_ranks, zero_stage
from trainer.run_state import manifest_sha256
from trainer.schema import to_dict

log = logging.getLogger("medalign")

CACHE_VERSION = 1
META = "meta.json"


def why_not_cached(model: nn.Module) -> str | None:
    """None when the model's text tower can be cached, else the reason it cannot."""
    text = getattr(model, "text", None)
    if not hasattr(model, "use_mlm") or text is None:
        return "the model has no text tower (or is not an Alifuse model)"
    if any(p.requires_grad for p in text.parameters()):
        return f"the text tower trains (mode {text.mode}); only a frozen tower's states are fixed"
    if model.use_mlm:
        return "mlm_weight > 0 runs the tower on masked text every step; set model.mlm_weight=0"
    if len(model.text_cross):
        return "the text tower has image-grounded layers (model.cross_layers_text > 0)"
    return None


def cache_kind(model: nn.Module) -> str:
    """hidden when the model reads text tokens (attention pool, text-grounded image layers,
    grounded fusion features), else pooled."""
    grounded_fusion = model.use_cls and model.cfg.fusion_features == "grounded"
    reads_tokens = (
        model.attention_pool is not None
        or (model.use_mae and len(model.image_cross))
        or grounded_fusion
    )
    return "hidden" if reads_tokens else "pooled"


def _tokenizer_bytes(tokenizer: Any) -> bytes:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the serialized tokenizer: vocabulary, normalizer, post-processor
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # the last call's settings, not the tokenizer's
        spec.pop("padding", None)
        return json.dumps(spec, sort_keys=True).encode()
    return json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()


def tower_digest(tower: nn.Module) -> str:
    """sha256 over every tensor of the tower's state dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(
    model: nn.Module, data: DataConfig, split_dir: str, max_length: int, tower: str | None = None
) -> str:
    text = model.text
    parts = {
        "version": CACHE_VERSION,
        "tower": tower or tower_digest(text),
        "tokenizer": hashlib.sha256(_tokenizer_bytes(text.tokenizer)).hexdigest(),
        "max_length": max_length,
        "pooling": text.pooling,
        "kind": cache_kind(model),
        "prompt_template": data.prompt_template,
        "clinical": to_dict(data.clinical),
        "label_mode": data.label_mode,
        "manifest": manifest_sha256(split_dir),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_folder(data: DataConfig, split_dir: str, split_name: str, digest: str) -> Path:
    if data.text_cache_dir:
        return Path(data.text_cache_dir) / split_name / digest[:20]
    if is_remote(split_dir):
        raise ValueError(
            f"data.text_cache=true with the remote split {split_dir}: set data.text_cache_dir "
            "to a local folder for the cache"
        )
    return Path(split_dir) / "text_cache" / digest[:20]


class TextCache:
    """A built cache, opened lazily (memory-mapped) in whichever process reads it; picklable
    for loader workers. `lookup(keys)` -> the batch entries; `lengths(keys)` -> token counts."""

    def __init__(self, folder: Path, pad_to: str, max_length: int) -> None:
        self.folder, self.pad_to, self.max_length = Path(folder), pad_to, max_length
        meta = json.loads((self.folder / META).read_text())
        self.kind: str = meta["kind"]
        self.parts: list[str] = meta["parts"]
        self._open: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": None}  # each process maps the files itself

    def _arrays(self) -> dict[str, Any]:
        if self._open is None:
            index: dict[str, tuple[int, int]] = {}
            parts = []
            for p, prefix in enumerate(self.parts):
                keys = json.loads((self.folder / f"{prefix}.keys.json").read_text())
                index.update({k: (p, i) for i, k in enumerate(keys)})
                parts.append(
                    {
                        name: np.load(self.folder / f"{prefix}.{name}.npy", mmap_mode="r")
                        for name in ("states", "lengths", "offsets")
                    }
                )
            self._open = {"index": index, "parts": parts}
        return self._open

    def _rows(self, keys: list[str]) -> list[tuple[int, int]]:
        index = self._arrays()["index"]
        missing = [k for k in keys if k not in index]
        if missing:
            raise KeyError(
                f"{self.folder}: no cached text states for samples {missing[:3]}; delete the "
                "folder to rebuild it"
            )
        return [index[k] for k in keys]

    def lengths(self, keys: list[str]) -> torch.Tensor:
        parts = self._arrays()["parts"]
        return torch.tensor(
            [int(parts[p]["lengths"][i]) for p, i in self._rows(keys)], dtype=torch.long
        )

    def lookup(self, keys: list[str]) -> dict[str, torch.Tensor]:
        parts = self._arrays()["parts"]
        rows = self._rows(keys)
        lengths = torch.tensor([int(parts[p]["lengths"][i]) for p, i in rows], dtype=torch.long)
        if self.kind == "pooled":
            states = np.stack([parts[p]["states"][i] for p, i in rows])
            return {"text_pooled": torch.from_numpy(states), "text_tokens": lengths}
        width = self.max_length
        if self.pad_to == "longest":
            width = padded_width(int(lengths.max()), self.max_length)
        hidden = parts[rows[0][0]]["states"].shape[1]
        out = np.zeros((len(rows), width, hidden), dtype=np.float16)
        for b, (p, i) in enumerate(rows):
            start = int(parts[p]["offsets"][i])
            out[b, : lengths[b]] = parts[p]["states"][start : start + int(lengths[b])]
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return {
            "text_hidden": torch.from_numpy(out),
            "attention_mask": mask,
            "text_tokens": lengths,
        }


def _tmp(path: Path) -> Path:
    """A temporary name only this process writes (two jobs may build the same cache)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = _tmp(path)
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


@torch.no_grad()
def _build_part(
    model: nn.Module,
    shards: ShardSet,
    data: DataConfig,
    max_length: int,
    rank: int,
    world: int,
    folder: Path,
    device: torch.device,
    batch_size: int,
) -> int:
    """Embeds this rank's share of the split (the samples whose key hashes to it) and writes
    its part; returns (samples embedded, samples the reader rejects). A shard that cannot be
    read is an error: a cache without some of the split's samples must not be written."""
    decode = sample_decoder(shards, data)
    keys, texts = [], []
    counter = SkipCounter(str(shards.folder))
    remote = RemoteRead(shards.sizes, data.remote_retries, data.remote_backoff_s)
    urls = [p for p, _ in shards.shards]
    for raw in _read_tars(urls, counter, dict(shards.shards), remote):
        if zlib.crc32(str(raw.get("__key__")).encode()) % world != rank:
            continue
        try:
            sample = decode(raw)
        except Exception as err:  # the reader rejects the same sample at training time
            counter.add("undecodable", str(err))
            continue
        keys.append(sample["key"])
        texts.append(sample["text"])
    if counter.counts["lost"]:
        raise DataError(
            f"{shards.folder}: {counter.counts['lost']} samples could not be read while building "
            f"the text cache; nothing was written. First reasons: {counter.first[:3]}"
        )
    tokenizer = model.text.tokenizer
    kind = cache_kind(model)
    lengths = np.zeros(len(texts), dtype=np.int64)
    for start in range(0, len(texts), batch_size):
        _, mask = tokenize_texts(tokenizer, texts[start : start + batch_size], max_length)
        lengths[start : start + len(mask)] = mask.sum(1).numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    hidden = model.text.hidden_size
    rows = len(texts) if kind == "pooled" else int(lengths.sum())
    prefix = f"part-{rank:03d}-of-{world:03d}"
    states_path = folder / f"{prefix}.states.npy"
    tmp = _tmp(states_path)
    states = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(rows, hidden))
    was_training = model.training
    model.eval()
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenize_texts(tokenizer, texts[start : start + batch_size], max_length)
        ids, mask = ids.to(device), mask.to(device)
        h = model.text.forward_features(ids, mask)
        if kind == "pooled":
            states[start : start + len(ids)] = model.text.pool(h, mask).float().cpu().numpy()
            continue
        for b in range(len(ids)):
            n = int(lengths[start + b])
            at = int(offsets[start + b])
            states[at : at + n] = h[b, :n].float().cpu().numpy()
    model.train(was_training)
    states.flush()
    del states
    os.replace(tmp, states_path)
    _save_npy(folder / f"{prefix}.lengths.npy", lengths)
    _save_npy(folder / f"{prefix}.offsets.npy", offsets)
    keys_path = folder / f"{prefix}.keys.json"  # last: the part is complete
    _tmp(keys_path).write_text(json.dumps(keys))
    os.replace(_tmp(keys_path), keys_path)
    return len(keys), sum(counter.counts.values())


def prepare_text_cache(
    model: nn.Module,
    data: DataConfig,
    split_dir: str,
    max_length: int,
    accelerator: Accelerator,
    batch_size: int = 64,
    tower: str | None = None,
) -> TextCache:
    """The split's cache for this tower: reused when built, else built (each rank its share).
    `tower`: the tower's digest when the caller has it (`tower_digest`; one per run)."""
    reason = why_not_cached(model)
    if reason is not None:
        raise ValueError(f"data.text_cache=true: {reason}")
    if zero_stage(accelerator) == 3:
        raise ValueError(
            "data.text_cache=true under DeepSpeed ZeRO-3: the tower's weights are partitioned "
            "(neither hashed nor run on one rank alone); use ZeRO-1/2 or DDP to build the cache"
        )
    shards = ShardSet.load(split_dir)
    digest = fingerprint(model, data, split_dir, max_length, tower)
    folder = cache_folder(data, split_dir, shards.name, digest)
    rank, world = accelerator.process_index, accelerator.num_processes
    # One decision for every rank (another job may finish the same cache meanwhile).
    built = [(folder / META).is_file() if accelerator.is_main_process else None]
    if world > 1:
        built = broadcast_object_list(built)
    if built[0]:
        log.info("text cache %s: reusing %s", shards.name, folder)
        return TextCache(folder, data.pad_to, max_length)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(
            f"{folder}: cannot create the text cache ({err.strerror}); set data.text_cache_dir "
            "to a writable folder"
        ) from err
    start = time.perf_counter()
    try:
        n, rejected = _build_part(
            model, shards, data, max_length, rank, world, folder, accelerator.device, batch_size
        )
    except DataError as err:
        problem, n, rejected = str(err), 0, 0
    else:
        problem = ""
    log.info(
        "text cache %s: rank %d embedded %d texts in %.1f s",
        shards.name,
        rank,
        n,
        time.perf_counter() - start,
    )
    problems = [p for p in gather_object([problem]) if p]
    if problems:
        raise DataError("; ".join(problems))
    counted = sum_over_ranks(accelerator, [n, rejected])
    if counted[0] + counted[1] != shards.num_samples:
        raise DataError(
            f"{shards.folder}: the text cache holds {counted[0]} samples and {counted[1]} were "
            f"rejected, but the manifest lists {shards.num_samples}; nothing was committed"
        )
    if accelerator.is_main_process:
        meta = {
            "fingerprint": digest,
            "kind": cache_kind(model),
            "hidden_size": model.text.hidden_size,
            "max_length": max_length,
            "split": shards.name,
            "parts": [f"part-{r:03d}-of-{world:03d}" for r in range(world)],
        }
        tmp = folder / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, folder / META)
    accelerator.wait_for_everyone()
    return TextCache(folder, data.pad_to, max_length)
