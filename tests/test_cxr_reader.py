"""The streaming reader on chest X-ray shards (medalign-cxr-v1): the same pipeline as the AD
volumes, with CXR decoding: 8/16-bit PNG images, 14 labels through the uncertainty policy,
study groups; exactly-once coverage, resume, eval padding, bad samples skipped and counted."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from shard_fixtures import CharTokenizer
from torch.utils.data import DataLoader

from shards.cxr_labels import LABEL_NAMES, LabelPolicyConfig, labels_to_array
from shards.formats.image_multilabel import decode_cxr_sample
from shards.mimic_cxr import FORMAT, write_cxr_shards
from shards.reader import (
    DataConfig,
    EvalStream,
    ShardSet,
    SkipCounter,
    TrainStream,
    _read_tars,
)
from shards.synthetic.cxr import generate_mimic_cxr
from shards.xray_images import encode_png

SIZE = 32
CXR_KEYS = {
    "image",
    "input_ids",
    "attention_mask",
    "labels",
    "label_mask",
    "valid",
    "key",
    "text",
    "split",
    "group",
    "worker",
    "skipped",
    "read",
    "pool_pos",
    "retries",
    "text_tokens",
}


@pytest.fixture(scope="module")
def cxr_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cxr")
    paths = generate_mimic_cxr(root / "raw", subjects=12, size=64, seed=0)
    write_cxr_shards(
        paths["root"], paths["reports_root"], root / "shards", size=SIZE, samples_per_shard=8
    )
    return root / "shards"


def raw_samples(split_dir: Path) -> dict[str, dict]:
    """key -> raw tar sample (bytes members), in shard order."""
    urls = [p for p, _ in ShardSet.load(str(split_dir)).shards]
    return {
        raw["__key__"]: {k: v.tobytes() if isinstance(v, memoryview) else v for k, v in raw.items()}
        for raw in _read_tars(urls, SkipCounter())
    }


def write_samples(folder: Path, samples: list[dict], per_shard: int, **manifest) -> ShardSet:
    """Samples -> shards + a medalign-cxr-v1 manifest (for hand-made and damaged samples)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(samples), per_shard):
        name = f"train-{len(shards):06d}.tar"
        chunk = samples[start : start + per_shard]
        with wds.TarWriter(str(folder / name)) as sink:
            for sample in chunk:
                sink.write({k: v for k, v in sample.items() if k != "__url__"})
        shards.append({"name": name, "num_samples": len(chunk), "bytes": 0, "sha256": ""})
    info = {
        "split": "train",
        "format": FORMAT,
        "num_samples": len(samples),
        "shards": shards,
        "image_size": SIZE,
        "bit_depth": 8,
        "label_names": list(LABEL_NAMES),
        **manifest,
    }
    (folder / "manifest.json").write_text(json.dumps(info))
    return ShardSet.load(str(folder))


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_manifest_format_and_size(cxr_shards, tmp_path):
    shards = ShardSet.load(str(cxr_shards / "train"))
    assert (shards.format, shards.size, shards.volume_size) == (FORMAT, SIZE, None)
    manifest = json.loads((cxr_shards / "train" / "manifest.json").read_text())
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": "medalign-xx-v9"}))
    with pytest.raises(ValueError, match=r"manifest.json: unknown shard format 'medalign-xx-v9'"):
        ShardSet.load(str(folder))
    with pytest.raises(ValueError, match="medalign-ad-v1, medalign-cxr-v1"):
        ShardSet.load(str(folder))


def test_train_batches_have_the_cxr_keys_shapes_and_dtypes(cxr_shards):
    shards = ShardSet.load(str(cxr_shards / "train"))
    cfg = DataConfig(batch_size=4, shuffle_buffer=8)
    batch = next(iter(TrainStream(shards, cfg, CharTokenizer(), 24, seed=0)))
    assert set(batch) == CXR_KEYS
    assert batch["image"].shape == (4, 1, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["image"].std() > 0
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 24)
    for name in ("labels", "label_mask"):
        assert batch[name].shape == (4, 14) and batch[name].dtype == torch.float32
    assert batch["valid"].dtype == torch.bool and batch["valid"].all()
    raws = raw_samples(cxr_shards / "train")
    for key, group, split in zip(batch["key"], batch["group"], batch["split"], strict=True):
        meta = json.loads(raws[key]["json"])
        assert isinstance(group, str) and group == meta["study"] and key.startswith("p")
        assert f"_s{group}_" in key and split == "train"


@pytest.mark.parametrize(
    "uncertain, blank", list(itertools.product(("ignore", "zeros", "ones"), ("negative", "masked")))
)
def test_labels_and_mask_follow_the_policy(cxr_shards, uncertain, blank):
    policy = LabelPolicyConfig(uncertain=uncertain, blank=blank)
    cfg = DataConfig(eval_batch_size=16, labels=policy)
    raws = raw_samples(cxr_shards / "train")
    shards = ShardSet.load(str(cxr_shards / "train"))
    batches = list(EvalStream(shards, cfg, CharTokenizer(), 16))
    seen = 0
    for batch in batches:
        for i, key in enumerate(batch["key"]):
            targets, mask = policy.apply(labels_to_array(json.loads(raws[key]["json"])["labels"]))
            assert np.array_equal(batch["labels"][i].numpy(), targets), key
            assert np.array_equal(batch["label_mask"][i].numpy(), mask), key
            seen += 1
    assert seen == len(raws)
    # The data exercise every rule: uncertain, blank, positive and negative values all occur.
    values = [v for raw in raws.values() for v in json.loads(raw["json"])["labels"]]
    assert {-1.0, 0.0, 1.0} <= set(values) and None in values


def test_each_train_sample_once_across_ranks_and_workers(cxr_shards):
    shards = ShardSet.load(str(cxr_shards / "train"))
    sizes = dict(shards.shards)
    cfg = DataConfig(batch_size=2, num_workers=2, shuffle_buffer=5)
    seen = []
    for rank in range(2):
        stream = TrainStream(shards, cfg, CharTokenizer(), 16, rank=rank, world_size=2, seed=3)
        # Samples each worker holds in epoch 0 (shards may differ in size).
        per_worker = {w: sum(sizes[u] for u in next(stream._urls(w, 2))) for w in range(2)}
        by_worker: dict[int, list[str]] = {0: [], 1: []}
        it = iter(DataLoader(stream, batch_size=None, num_workers=2))
        while any(len(by_worker[w]) < per_worker[w] for w in range(2)):
            batch = next(it)
            by_worker[batch["worker"]] += batch["key"]
        for w in range(2):
            seen += by_worker[w][: per_worker[w]]
    assert sorted(seen) == sorted(raw_samples(cxr_shards / "train"))


def test_stream_is_deterministic_and_resume_skips_exactly(cxr_shards):
    shards = ShardSet.load(str(cxr_shards / "train"))
    cfg = DataConfig(batch_size=3, num_workers=0, shuffle_buffer=7)

    def first(n, start=0):
        stream = TrainStream(shards, cfg, CharTokenizer(), 16, seed=11)
        stream.set_start(start)
        it = iter(stream)
        return [next(it) for _ in range(n)]

    full = first(14)  # 26 samples per epoch: crosses into epoch 1
    assert _keys(full) == _keys(first(14))
    resumed = first(5, start=9)
    assert _keys(resumed) == _keys(full[9:])
    assert torch.equal(resumed[0]["image"], full[9]["image"])
    assert torch.equal(resumed[0]["labels"], full[9]["labels"])


def test_resampled_cxr_stream(cxr_shards):
    shards = ShardSet.load(str(cxr_shards / "train"))
    cfg = DataConfig(batch_size=2, resampled=True, shuffle_buffer=1)

    def keys(rank):
        stream = TrainStream(shards, cfg, CharTokenizer(), 16, rank=rank, world_size=2, seed=5)
        it = iter(stream)
        return _keys(next(it) for _ in range(8))

    assert keys(0) == keys(0) and keys(0) != keys(1)
    assert set(keys(1)) <= set(raw_samples(cxr_shards / "train"))


def test_eval_padding_covers_every_sample_once(cxr_shards):
    shards = ShardSet.load(str(cxr_shards / "test"))
    n = shards.num_samples
    assert n % 2 == 1  # so one rank is padded
    cfg = DataConfig(eval_batch_size=4)
    valid, padding = [], 0
    for rank in range(2):
        stream = EvalStream(shards, cfg, CharTokenizer(), 16, rank=rank, world_size=2)
        batches = list(stream)
        per_rank = (n + 1) // 2
        assert len(batches) == len(stream) == (per_rank + 3) // 4
        for b in batches:
            assert set(b) == CXR_KEYS and b["image"].shape[1:] == (1, SIZE, SIZE)
            assert len(b["group"]) == len(b["key"]) == b["labels"].shape[0]
            valid += [k for k, v in zip(b["key"], b["valid"], strict=True) if v]
            padding += int((~b["valid"]).sum())
    assert sorted(valid) == sorted(raw_samples(cxr_shards / "test"))
    assert padding == 1


def test_16_bit_png_keeps_its_depth(cxr_shards, tmp_path):
    template = next(iter(raw_samples(cxr_shards / "train").values()))
    ramp = np.linspace(0, 65535, SIZE * SIZE).round().astype(np.uint16).reshape(SIZE, SIZE)
    sample = {**template, "__key__": "p1_s2_deep", "img.png": encode_png(ramp)}
    shards = write_samples(tmp_path / "deep", [sample], per_shard=1, bit_depth=16)
    batch = next(iter(EvalStream(shards, DataConfig(), CharTokenizer(), 16)))
    image = batch["image"][0, 0].numpy()
    assert len(np.unique(image)) > 256
    np.testing.assert_allclose(image, ramp / 65535.0, atol=1e-6)


def test_bad_cxr_samples_are_counted_and_skipped(cxr_shards, tmp_path, caplog):
    good = list(raw_samples(cxr_shards / "train").values())[:10]

    def with_meta(sample, **change):
        meta = {**json.loads(sample["json"]), **change}
        return {**sample, "json": json.dumps(meta).encode()}

    png = good[3]["img.png"]
    bad = {
        1: {**good[1], "img.png": b"not a png at all"},
        3: {**good[3], "img.png": png[: len(png) // 2]},  # truncated
        4: with_meta(good[4], labels=[1.0] * 13),
        6: with_meta(good[6], labels=[2.0] + [None] * 13),
        7: with_meta(good[7], labels=[True] + [None] * 13),  # JSON true is not 1.0
        8: {**good[8], "txt": b"  \n "},
        9: {**good[9], "img.png": encode_png(np.zeros((SIZE, SIZE + 1), dtype=np.uint8))},
    }
    samples = [bad.get(i, s) for i, s in enumerate(good)]
    shards = write_samples(tmp_path / "bad", samples, per_shard=10)
    cfg = DataConfig(batch_size=1, num_workers=0, shuffle_buffer=1)
    stream = TrainStream(shards, cfg, CharTokenizer(), 16, seed=0)
    it = iter(stream)
    # 3 good samples in the first epoch; the 4th batch (epoch 1) is read past all of them.
    batches = [next(it) for _ in range(4)]
    assert sorted(_keys(batches[:3])) == sorted(good[i]["__key__"] for i in (0, 2, 5))
    assert stream.counter.counts["undecodable"] == len(bad)
    assert batches[-1]["skipped"] == len(bad)
    for text in ("img.png cannot be decoded", "has 13 labels", "[2.0]", "[True]", "empty text"):
        assert text in caplog.text, text
    assert "the manifest says 32x32" in caplog.text
    # The eval stream skips and counts them the same way.
    stream = EvalStream(shards, DataConfig(eval_batch_size=16), CharTokenizer(), 16)
    (batch,) = list(stream)  # the manifest's 10 rows: 3 good ones, then padding
    assert batch["valid"].tolist() == [True] * 3 + [False] * 7
    assert stream.counter.counts["undecodable"] == len(bad)


def test_decode_cxr_sample_direct(cxr_shards):
    raw = next(iter(raw_samples(cxr_shards / "val").values()))
    out = decode_cxr_sample(raw, LabelPolicyConfig("ignore", "masked"), size=SIZE)
    assert out["image"].shape == (1, SIZE, SIZE) and out["split"] == "val"
    assert set(out) == {"image", "text", "labels", "label_mask", "key", "split", "group"}
    with pytest.raises(ValueError, match="has no 'img.png' member"):
        decode_cxr_sample({k: v for k, v in raw.items() if k != "img.png"}, LabelPolicyConfig())
