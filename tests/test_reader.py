"""Streaming reader: exactly-once coverage across ranks x workers, determinism, resume skipping,
bad samples counted and skipped, eval padding."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from accelerate import Accelerator
from shard_fixtures import CharTokenizer
from torch.utils.data import DataLoader

from shards import reader
from shards.formats.volume_class import decode_sample, npy_array
from shards.reader import (
    DataConfig,
    EvalStream,
    ShardSet,
    SkipCounter,
    TrainStream,
    _read_tars,
)
from trainer.loop import Mover


def _sample(i: int, size: int = 4) -> dict:
    vol = np.full((size, size, size), i / 1000.0, dtype=np.float16)
    buf = io.BytesIO()
    np.save(buf, vol)
    meta = {"subject": f"s{i}", "cohort": "ADNI", "label": i % 3, "split": "train"}
    return {
        "__key__": f"k{i:05d}",
        "vol.npy": buf.getvalue(),
        "txt": f"The MMSE score is {i}.",
        "json": json.dumps(meta),
    }


def write_split(folder, n: int, per_shard: int, bad: dict | None = None, make=None) -> ShardSet:
    """n samples (`make(i)`, default _sample) in shards of `per_shard`; `bad` maps sample index
    -> a damaged version."""
    make = make or _sample
    folder.mkdir(parents=True, exist_ok=True)
    shards, i = [], 0
    while i < n:
        name = f"train-{len(shards):06d}.tar"
        count = 0
        with wds.TarWriter(str(folder / name)) as sink:
            while count < per_shard and i < n:
                sink.write((bad or {}).get(i, make(i)))
                i, count = i + 1, count + 1
        shards.append({"name": name, "num_samples": count, "bytes": 0, "sha256": ""})
    (folder / "manifest.json").write_text(
        json.dumps({"split": "train", "num_samples": n, "shards": shards})
    )
    return ShardSet.load(str(folder))


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_each_sample_once_across_ranks_and_workers(tmp_path):
    shards = write_split(tmp_path / "train", n=48, per_shard=4)  # 12 shards
    cfg = DataConfig(batch_size=2, num_workers=2, shuffle_buffer=5)
    seen = []
    for rank in range(2):
        stream = TrainStream(shards, cfg, CharTokenizer(), 16, rank=rank, world_size=2, seed=3)
        loader = DataLoader(stream, batch_size=None, num_workers=2)
        it = iter(loader)
        # One epoch of this rank: its 6 shards = 24 samples = 12 batches over both workers.
        seen += _keys(next(it) for _ in range(12))
    assert sorted(seen) == [f"k{i:05d}" for i in range(48)]


def test_stream_is_deterministic_and_resume_skips_exactly(tmp_path):
    shards = write_split(tmp_path / "train", n=30, per_shard=5)
    cfg = DataConfig(batch_size=3, num_workers=0, shuffle_buffer=7)

    def first(n, start=0):
        stream = TrainStream(shards, cfg, CharTokenizer(), 16, seed=11)
        stream.set_start(start)
        it = iter(stream)
        return [next(it) for _ in range(n)]

    full = first(25)  # crosses epochs: 30 samples per epoch = 10 batches
    assert _keys(full) == _keys(first(25))
    resumed = first(12, start=13)
    assert _keys(resumed) == _keys(full[13:])
    assert torch.equal(resumed[0]["image"], full[13]["image"])
    epoch0, epoch1 = _keys(full[:10]), _keys(full[10:20])
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # reshuffled per epoch


def test_resume_skip_with_workers(tmp_path):
    shards = write_split(tmp_path / "train", n=40, per_shard=5)
    cfg = DataConfig(batch_size=2, num_workers=2, shuffle_buffer=4)

    def keys(n, start=0):
        stream = TrainStream(shards, cfg, CharTokenizer(), 16, seed=0)
        stream.set_start(start)
        it = iter(DataLoader(stream, batch_size=None, num_workers=2))
        return [next(it)["key"] for _ in range(n)]

    assert keys(6, start=5) == keys(11)[5:]


def test_bad_samples_are_counted_and_skipped(tmp_path, caplog):
    bad = {
        2: {**_sample(2), "txt": "   "},  # empty text
        5: {k: v for k, v in _sample(5).items() if k != "vol.npy"},  # missing volume
        7: {**_sample(7), "vol.npy": b"not a numpy file"},
    }
    nan = _sample(8)
    vol = np.full((4, 4, 4), np.nan, dtype=np.float16)
    buf = io.BytesIO()
    np.save(buf, vol)
    bad[8] = {**nan, "vol.npy": buf.getvalue()}
    shards = write_split(tmp_path / "train", n=12, per_shard=12, bad=bad)
    cfg = DataConfig(batch_size=2, num_workers=0, shuffle_buffer=1)
    stream = TrainStream(shards, cfg, CharTokenizer(), 16, seed=0)
    it = iter(stream)
    batches = [next(it) for _ in range(4)]  # 8 good samples in the first epoch
    assert sorted(_keys(batches)) == sorted(f"k{i:05d}" for i in range(12) if i not in bad)
    assert stream.counter.counts["undecodable"] == 4
    assert batches[-1]["skipped"] == 4
    assert (
        "empty text" in caplog.text
        and "non-finite" in caplog.text
        and "no 'vol.npy'" in caplog.text
    )


def test_truncated_tar_is_skipped_not_fatal(tmp_path):
    shards = write_split(tmp_path / "train", n=8, per_shard=4)
    path = shards.shards[0][0]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2 + 100])  # cut inside a member
    cfg = DataConfig(batch_size=1, num_workers=0, shuffle_buffer=1)
    stream = TrainStream(shards, cfg, CharTokenizer(), 16, seed=0)
    it = iter(stream)
    keys = _keys(next(it) for _ in range(7))  # one epoch holds 6 readable samples
    assert set(keys) == {f"k{i:05d}" for i in (0, 1, 4, 5, 6, 7)}  # intact members are read
    # Every sample that did not arrive is counted once: the one cut in half (undecodable) and
    # the one after it (lost: the shard yielded 3 of the 4 samples its manifest lists).
    assert stream.counter.counts == {"undecodable": 1, "lost": 1}
    assert stream.counter.total == 8 - 6


def test_eval_stream_pads_ranks_to_equal_batches(tmp_path):
    shards = write_split(tmp_path / "val", n=7, per_shard=3)
    cfg = DataConfig(eval_batch_size=2)
    per_rank = []
    for rank in range(2):
        stream = EvalStream(shards, cfg, CharTokenizer(), 16, rank=rank, world_size=2)
        batches = list(stream)
        assert len(batches) == len(stream) == 2
        per_rank.append(batches)
    valid = [k for r in per_rank for b in r for k, v in zip(b["key"], b["valid"], strict=True) if v]
    assert sorted(valid) == [f"k{i:05d}" for i in range(7)]
    assert sum(int((~b["valid"]).sum()) for r in per_rank for b in r) == 1


def test_too_few_shards_for_ranks_and_workers(tmp_path):
    shards = write_split(tmp_path / "train", n=6, per_shard=3)
    with pytest.raises(
        ValueError, match="2 shards cannot be split over 2 ranks x 2 loader workers"
    ):
        TrainStream(shards, DataConfig(num_workers=2), CharTokenizer(), 16, rank=0, world_size=2)


def test_missing_manifest_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        ShardSet.load(str(tmp_path / "nowhere"))


def test_binary_label_mode():
    raw = {
        k: (v.encode() if isinstance(v, str) and k != "__key__" else v)
        for k, v in _sample(2).items()
    }
    assert decode_sample(raw, "binary")["label"] == 1
    assert decode_sample(raw, "three_class")["label"] == 2
    raw["json"] = json.dumps({"label": 7}).encode()
    with pytest.raises(ValueError, match="label=7"):
        decode_sample(raw, "three_class")


def test_tarfile_members_are_plain(tmp_path):
    # Guards the on-disk contract: members are named <key>.<field>.
    shards = write_split(tmp_path / "t", n=1, per_shard=1)
    with tarfile.open(shards.shards[0][0]) as tar:
        assert sorted(tar.getnames()) == ["k00000.json", "k00000.txt", "k00000.vol.npy"]


def test_resampled_draws_are_seeded_per_rank_and_allow_few_shards(tmp_path):
    shards = write_split(tmp_path / "train", n=6, per_shard=3)  # 2 shards, 2 ranks x 2 workers
    cfg = DataConfig(batch_size=1, num_workers=2, resampled=True, shuffle_buffer=1)

    def keys(rank):
        stream = TrainStream(shards, cfg, CharTokenizer(), 16, rank=rank, world_size=2, seed=5)
        it = iter(DataLoader(stream, batch_size=None, num_workers=2))
        return [next(it)["key"][0] for _ in range(12)]

    assert keys(0) == keys(0)  # reproducible
    assert keys(0) != keys(1)  # ranks draw independently
    assert set(keys(0)) <= {f"k{i:05d}" for i in range(6)}


def test_manifest_format_and_ad_batch_keys(tmp_path, ad_shards):
    shards = write_split(tmp_path / "old", n=2, per_shard=2)  # no "format": read as AD
    assert (shards.format, shards.size, shards.volume_size) == ("medalign-ad-v1", None, None)
    real = ShardSet.load(str(ad_shards / "train"))  # the writer's manifest names its format
    assert real.format == "medalign-ad-v1" and real.volume_size == real.size == 16
    batch = next(iter(EvalStream(real, DataConfig(eval_batch_size=2), CharTokenizer(), 16)))
    assert set(batch) == {
        "image",
        "input_ids",
        "attention_mask",
        "label",
        "binary",
        "valid",
        "key",
        "text",
        "subject",
        "cohort",
        "split",
        "worker",
        "skipped",
        "read",
        "pool_pos",
        "retries",
        "text_tokens",
    }
    assert batch["image"].shape == (2, 1, 16, 16, 16) and batch["label"].dtype == torch.long
    assert batch["binary"].dtype == torch.bool and all(batch["subject"])
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({**manifest, "format": "nifti"}))
    with pytest.raises(ValueError, match="unknown shard format 'nifti'.*medalign-ad-v1"):
        ShardSet.load(str(tmp_path / "old"))


def test_label_fraction_trains_on_a_nested_seeded_subset(tmp_path):
    shards = write_split(tmp_path / "train", n=40, per_shard=4)  # 10 shards
    every = [f"k{i:05d}" for i in range(40)]
    chosen = {}
    for fraction in (0.1, 0.25, 1.0):
        cfg = DataConfig(batch_size=2, shuffle_buffer=3, label_fraction=fraction)
        seen: set[str] = set()
        for rank in range(2):
            stream = TrainStream(shards, cfg, None, 16, rank=rank, world_size=2, seed=1)
            # Several epochs of this rank: each epoch deals it a different half of the shards.
            seen |= set(_keys(b for _, b in zip(range(60), iter(stream), strict=False)))
        chosen[fraction] = seen
    assert len(chosen[0.1]) == 4 and len(chosen[0.25]) == 10
    assert sorted(chosen[1.0]) == every
    assert chosen[0.1] < chosen[0.25] < chosen[1.0]
    other_seed = DataConfig(batch_size=2, label_fraction=0.25, label_fraction_seed=5)
    stream = TrainStream(shards, other_seed, None, 16)
    assert set(_keys(b for _, b in zip(range(60), iter(stream), strict=False))) != chosen[0.25]
    with pytest.raises(ValueError, match="label_fraction=0: expected a value in"):
        DataConfig(label_fraction=0)


def test_two_nodes_of_two_ranks_share_every_epoch_disjointly(tmp_path):
    """World 4 (2 machines x 2 processes) x 2 loader workers: each sample once per epoch; the
    eval split (not a multiple of 4) gives every rank the same number of batches."""
    shards = write_split(tmp_path / "train", n=64, per_shard=4)  # 16 shards, 2 per stream
    cfg = DataConfig(batch_size=2, num_workers=2, shuffle_buffer=3)
    seen = []
    for rank in range(4):
        stream = TrainStream(shards, cfg, None, 16, rank=rank, world_size=4, seed=7)
        it = iter(DataLoader(stream, batch_size=None, num_workers=2))
        seen += _keys(next(it) for _ in range(8))  # one epoch of this rank: 16 samples
    assert sorted(seen) == [f"k{i:05d}" for i in range(64)]
    evals = write_split(tmp_path / "val", n=10, per_shard=3)
    batches = [
        list(EvalStream(evals, DataConfig(eval_batch_size=2), None, 16, rank=r, world_size=4))
        for r in range(4)
    ]
    assert len({len(b) for b in batches}) == 1  # no rank waits for another at the end
    valid = [
        k for rank in batches for b in rank for k, v in zip(b["key"], b["valid"], strict=True) if v
    ]
    assert sorted(valid) == [f"k{i:05d}" for i in range(10)]
    with pytest.raises(ValueError, match="16 shards cannot be split over 4 ranks x 8 loader"):
        TrainStream(shards, DataConfig(num_workers=8), None, 16, rank=0, world_size=4)


# --------------------------------------------------------------------------- fast local path


def _distinct_sample(i: int, size: int = 6) -> dict:
    vol = np.random.default_rng(i).standard_normal((size, size, size)).astype(np.float16)
    buf = io.BytesIO()
    np.save(buf, vol)
    return {**_sample(i), "vol.npy": buf.getvalue()}


def _no_mmap(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")  # what a file system without mmap answers

    monkeypatch.setattr(reader.mmap, "mmap", refuse)
    reader._warn_unmapped.cache_clear()


@pytest.mark.parametrize("mapped", [True, False])
def test_local_tar_reader_reads_what_webdataset_reads(tmp_path, monkeypatch, caplog, mapped):
    if not mapped:
        _no_mmap(monkeypatch)
    shards = write_split(tmp_path / "t", n=10, per_shard=4)  # the last shard is short
    urls = [path for path, _ in shards.shards]
    ours = list(_read_tars(urls, SkipCounter()))
    theirs = list(wds.tarfile_to_samples()(iter({"url": u} for u in urls)))
    assert len(ours) == len(theirs) == 10
    for a, b in zip(ours, theirs, strict=True):
        assert set(a) == set(b)
        for name in b:
            value = a[name]
            assert (value.tobytes() if isinstance(value, memoryview) else value) == b[name], name
    # mapped: image members are views of the file, not copies
    assert isinstance(ours[0]["vol.npy"], memoryview if mapped else bytes)
    assert isinstance(ours[0]["txt"], bytes)
    assert ("cannot be memory-mapped" in caplog.text) is not mapped


@pytest.mark.parametrize("mapped", [True, False])
@pytest.mark.parametrize("damage", ["garbage_header", "cut_in_header", "cut_in_member"])
def test_damaged_tar_is_counted_and_its_intact_members_kept(tmp_path, monkeypatch, damage, mapped):
    if not mapped:
        _no_mmap(monkeypatch)
    shards = write_split(tmp_path / "t", n=4, per_shard=4)
    path = shards.shards[0][0]
    data = open(path, "rb").read()
    with tarfile.open(path) as tar:
        third = next(m for m in tar.getmembers() if m.name.startswith("k00002"))
        volume = tar.getmember("k00002.vol.npy")
    head = data[: third.offset]  # samples 0 and 1 are whole
    if damage == "garbage_header":
        damaged = head + b"\x17" * 600 + data[third.offset :]
    elif damage == "cut_in_header":
        damaged = head + data[third.offset : third.offset + 200]
    else:  # k00002's members before its volume are whole; the volume is cut
        damaged = data[: volume.offset_data + 100]
    open(path, "wb").write(damaged)
    counter = SkipCounter()
    raws = list(_read_tars([path], counter, {path: 4}))
    assert [raw["__key__"] for raw in raws[:2]] == ["k00000", "k00001"]
    assert all("vol.npy" in raw for raw in raws[:2])
    # what is left of k00002, if anything, has no volume: the decoder rejects it
    assert len(raws) == 2 or (len(raws) == 3 and "vol.npy" not in raws[2])
    # the samples the shard did not yield are counted as lost, by number
    assert counter.counts["lost"] == 4 - len(raws)


def test_npy_array_is_a_view_of_the_bytes_and_names_bad_input():
    for order in ("C", "F"):
        for dtype in ("<f2", ">f2", "<f4", "<i2"):
            array = np.asarray(np.arange(60).reshape(3, 4, 5), dtype=dtype, order=order)
            buf = io.BytesIO()
            np.save(buf, array)
            data = bytearray(buf.getvalue())
            view = npy_array(memoryview(data), "x.npy")
            np.testing.assert_array_equal(view, np.load(io.BytesIO(bytes(data))))
            assert view.dtype == np.dtype(dtype) and np.shares_memory(
                view, np.frombuffer(data, np.uint8)
            )
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 4), np.float16))
    with pytest.raises(
        ValueError, match=r"s1\.tar: sample k vol\.npy has 16 data bytes; shape \(4, 4\)"
    ):
        npy_array(buf.getvalue()[:-16], "s1.tar: sample k vol.npy")
    with pytest.raises(ValueError, match="vol.npy is not a readable .npy file"):
        npy_array(b"not a numpy file", "vol.npy")
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="holds Python objects"):
        npy_array(buf.getvalue(), "vol.npy")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float16_voxel_is_rejected(bad):
    raw = {
        k: (v.encode() if isinstance(v, str) and k != "__key__" else v)
        for k, v in _sample(1).items()
    }
    vol = np.zeros((70, 70, 70), np.float16)  # more voxels than one finiteness chunk
    vol[69, 69, 69] = bad
    buf = io.BytesIO()
    np.save(buf, vol)
    with pytest.raises(ValueError, match="non-finite voxels"):
        decode_sample({**raw, "vol.npy": buf.getvalue()}, "three_class")
    vol[69, 69, 69] = 65504.0  # the largest finite float16 passes
    buf = io.BytesIO()
    np.save(buf, vol)
    assert decode_sample({**raw, "vol.npy": buf.getvalue()}, "three_class")["image"].max() == 65504


@pytest.mark.parametrize("workers", [0, 1])
def test_volume_batches_stay_float16_until_the_device(tmp_path, workers):
    shards = write_split(tmp_path / "t", n=4, per_shard=4, make=_distinct_sample)
    samples = [_distinct_sample(i) for i in range(4)]
    cfg = DataConfig(batch_size=4, num_workers=workers, shuffle_buffer=1)
    stream = TrainStream(shards, cfg, CharTokenizer(), 16, seed=0)
    batch = next(iter(DataLoader(stream, batch_size=None, num_workers=workers)))
    assert batch["image"].dtype == torch.float16 and batch["image"].shape == (4, 1, 6, 6, 6)
    stored = {s["__key__"]: np.load(io.BytesIO(s["vol.npy"])) for s in samples}
    for key, image in zip(batch["key"], batch["image"], strict=True):
        np.testing.assert_array_equal(image[0].numpy(), stored[key])
    moved = Mover(Accelerator(cpu=True))(batch)
    assert moved["image"].dtype == torch.float32 and moved["input_ids"].dtype == torch.long
    assert torch.equal(moved["image"], batch["image"].float())


def test_resume_is_exact_and_keeps_counting_after_rejected_samples(tmp_path):
    # Rejected samples shift a stream's batches off the batch_size grid: a resume that skipped
    # batches x batch_size raw samples would replay or drop some. The per-stream (read,
    # skipped) counts a checkpoint records make it exact, and the loss count goes on.
    bad = {i: {**_sample(i), "txt": " "} for i in (3, 4, 9, 17)}
    shards = write_split(tmp_path / "train", n=24, per_shard=6, bad=bad)
    cfg = DataConfig(batch_size=2, num_workers=0, shuffle_buffer=3)

    def run(start=0, counts=None):
        stream = TrainStream(shards, cfg, CharTokenizer(), 16, seed=3)
        stream.set_start(start, counts)
        it = iter(stream)
        return [next(it) for _ in range(20 - start)]

    full = run()
    cut = 7
    last = full[cut - 1]
    resumed = run(cut, {last["worker"]: (last["read"], last["skipped"])})
    assert _keys(resumed) == _keys(full[cut:])
    assert [b["skipped"] for b in resumed] == [b["skipped"] for b in full[cut:]]
    assert full[-1]["skipped"] > last["skipped"] > 0  # the count carried on past the resume
