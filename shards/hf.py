"""Shard splits as Hugging Face `datasets`, for a user who wants to look inside one.

    from shards.hf import iterable_dataset
    ds = iterable_dataset("data/cxr_shards/test")       # a local folder, a URL or pipe:
    next(iter(ds))  # {"key", "image" (C, *spatial) float32, "text", labels ..., as training sees them}

Every sample goes through the reader's own decoder (shards/reader.py: the label policy, the
clinical re-rendering and the prompt template of the `DataConfig` given), so an example is
what a training batch holds for that sample, one at a time. The dataset is sharded by tar
file (`n_shards`), so `datasets`' and torch's loader workers split it without overlap; samples
that cannot be decoded are skipped and logged, as in training.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from shards.reader import DataConfig, RemoteRead, ShardSet, SkipCounter, _read_tars, sample_decoder


def _examples(urls: list[str], split_dir: str, data: DataConfig) -> Iterator[dict[str, Any]]:
    shards = ShardSet.load(split_dir)
    decode = sample_decoder(shards, data)
    counter = SkipCounter(split_dir)
    remote = RemoteRead(shards.sizes, data.remote_retries, data.remote_backoff_s)
    expected = {url: n for url, n in shards.shards if url in urls}
    for raw in _read_tars(urls, counter, expected, remote):
        try:
            sample = decode(raw)
        except Exception as err:  # as the training stream: counted, logged, skipped
            counter.add("undecodable", str(err))
            continue
        yield {
            k: np.asarray(v, dtype=np.float32)
            if k == "image"
            else v.numpy()
            if torch.is_tensor(v)
            else v
            for k, v in sample.items()
        }


def iterable_dataset(split_dir: str, data: DataConfig | None = None):
    """The split as a `datasets.IterableDataset` of decoded samples (see the module docstring)."""
    from datasets import IterableDataset

    shards = ShardSet.load(split_dir)
    return IterableDataset.from_generator(
        _examples,
        gen_kwargs={
            "urls": [url for url, _ in shards.shards],
            "split_dir": str(split_dir),
            "data": data or DataConfig(),
        },
    )
