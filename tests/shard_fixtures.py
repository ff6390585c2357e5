"""Helpers shared by the shard-writer and reader tests of both verticals."""

from __future__ import annotations

import tarfile
from pathlib import Path

import torch

SPLITS = ("train", "val", "test")


def read_samples(out: Path) -> dict[str, list[dict]]:
    """All samples per split, read with tarfile (the raw bytes, no decoding help)."""
    samples: dict[str, list[dict]] = {}
    for split in SPLITS:
        rows: dict[str, dict] = {}
        for tar in sorted((out / split).glob("*.tar")):
            with tarfile.open(tar) as tf:
                for member in tf.getmembers():
                    key, ext = member.name.split(".", 1)
                    rows.setdefault(key, {"__key__": key, "__shard__": tar.name})[ext] = (
                        tf.extractfile(member).read()
                    )
        samples[split] = list(rows.values())
    return samples


class CharTokenizer:
    """A stand-in tokenizer: one id per character, enough to check the batching."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, text in enumerate(texts):
            codes = [ord(c) % 100 + 1 for c in text][:max_length]
            ids[i, : len(codes)] = torch.tensor(codes)
            mask[i, : len(codes)] = 1
        return {"input_ids": ids, "attention_mask": mask}
