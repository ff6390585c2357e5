"""Helpers shared by the shard-writer tests of both verticals."""

from __future__ import annotations

import tarfile
from pathlib import Path

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
