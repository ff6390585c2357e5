"""The text side's cost: batches padded to their longest text, length bucketing (with exact
resume), the frozen-tower text cache (the step never runs the tower), and the step metrics."""

from __future__ import annotations

import json
import random

import pytest
import torch
from accelerate import Accelerator
from conftest import run_cmd, tiny_overrides, train_cmd
from model_fixtures import tiny_vision
from shard_fixtures import CharTokenizer
from test_reader import _sample, write_split

from models.alifuse import AlifuseConfig, build_model
from models.pooling import AttentionPoolConfig
from models.text import TextConfig
from shards.reader import (
    DataConfig,
    EvalStream,
    ShardSet,
    TrainStream,
    build_train_loader,
    padded_width,
)
from trainer import text_cache
from trainer.flops import peak_flops
from trainer.run_state import RunState


def _varied(i: int) -> dict:
    """A sample whose text length varies a lot from sample to sample (1 to 40 words)."""
    words = random.Random(i).randint(1, 40)
    return {**_sample(i), "txt": " ".join(["word"] * words)}


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_padded_width_rounds_up_to_eight_and_stops_at_max_length():
    assert [padded_width(n, 70) for n in (0, 1, 8, 9, 64, 65, 70)] == [1, 8, 8, 16, 64, 70, 70]


def test_batches_are_padded_to_their_longest_text(tmp_path):
    shards = write_split(tmp_path / "train", n=12, per_shard=12, make=_varied)
    longest = DataConfig(eval_batch_size=4)
    fixed = DataConfig(eval_batch_size=4, pad_to="max_length")
    tok = CharTokenizer()
    for a, b in zip(
        EvalStream(shards, longest, tok, 256), EvalStream(shards, fixed, tok, 256), strict=True
    ):
        width = a["input_ids"].shape[1]
        assert width % 8 == 0 and b["input_ids"].shape[1] == 256
        assert width == padded_width(int(a["attention_mask"].sum(1).max()), 256)
        assert torch.equal(a["input_ids"], b["input_ids"][:, :width])  # same tokens, less padding
        assert not b["attention_mask"][:, width:].any()
        assert torch.equal(a["text_tokens"], b["attention_mask"].sum(1))


def _stream(shards, cfg, start=0, counts=None, seed=4):
    stream = TrainStream(shards, cfg, CharTokenizer(), 256, seed=seed)
    stream.set_start(start, counts)
    return iter(stream)


def test_length_bucketing_cuts_padding_and_keeps_every_sample(tmp_path):
    shards = write_split(tmp_path / "train", n=96, per_shard=12, make=_varied)
    plain = DataConfig(batch_size=4, shuffle_buffer=16)
    bucketed = DataConfig(batch_size=4, shuffle_buffer=16, bucket_batches=8)

    def ratio(batches):
        return sum(b["attention_mask"].numel() for b in batches) / sum(
            int(b["text_tokens"].sum()) for b in batches
        )

    it_plain, it_bucket = _stream(shards, plain), _stream(shards, bucketed)
    a = [next(it_plain) for _ in range(24)]  # one epoch: 96 samples
    b = [next(it_bucket) for _ in range(24)]
    assert sorted(_keys(a)) == sorted(_keys(b)) == [f"k{i:05d}" for i in range(96)]
    assert ratio(b) < 1.15 < ratio(a)
    again = _stream(shards, bucketed)
    assert _keys(b) == _keys(next(again) for _ in range(24))  # deterministic
    assert _keys(a) != _keys(b)


@pytest.mark.parametrize("cut", [1, 5, 8, 13])
def test_bucketed_stream_resumes_exactly(tmp_path, cut):
    # Rejected samples too, so the pool boundaries are off the batch grid.
    bad = {i: {**_varied(i), "txt": " "} for i in (3, 20, 21)}
    shards = write_split(tmp_path / "train", n=60, per_shard=10, make=_varied, bad=bad)
    cfg = DataConfig(batch_size=3, shuffle_buffer=5, bucket_batches=4)
    it = _stream(shards, cfg)
    full = [next(it) for _ in range(20)]
    last = full[cut - 1]
    state = RunState(streams={last["worker"]: (last["read"], last["skipped"], last["pool_pos"])})
    saved = state.to_json({}, None, [state.streams])
    counts = RunState.from_json(json.loads(json.dumps(saved)), 0).streams  # through the JSON
    resumed = _stream(shards, cfg, cut, counts)
    again = [next(resumed) for _ in range(20 - cut)]
    assert _keys(again) == _keys(full[cut:])
    for x, y in zip(again, full[cut:], strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert (x["skipped"], x["read"], x["pool_pos"]) == (y["skipped"], y["read"], y["pool_pos"])


def test_bucketed_resume_counts_a_short_shards_losses_once(tmp_path):
    # A manifest that promises 2 more samples than a shard holds: the loss is found while the
    # next sample is pulled, which may be a pool's first. A resume into that pool counts it
    # once, as the uninterrupted stream does.
    shards = write_split(tmp_path / "train", n=72, per_shard=12, make=_varied)
    manifest = json.loads((tmp_path / "train" / "manifest.json").read_text())
    manifest["shards"][1]["num_samples"] += 2
    manifest["num_samples"] += 2
    (tmp_path / "train" / "manifest.json").write_text(json.dumps(manifest))
    shards = ShardSet.load(str(tmp_path / "train"))
    cfg = DataConfig(batch_size=3, shuffle_buffer=1, bucket_batches=4)
    it = _stream(shards, cfg)
    full = [next(it) for _ in range(30)]
    assert full[-1]["skipped"] >= 2
    for cut in range(1, 30):
        last = full[cut - 1]
        counts = {last["worker"]: (last["read"], last["skipped"], last["pool_pos"])}
        resumed = _stream(shards, cfg, cut, counts)
        again = [next(resumed) for _ in range(30 - cut)]
        assert _keys(again) == _keys(full[cut:]), cut
        assert [b["skipped"] for b in again] == [b["skipped"] for b in full[cut:]], cut


def test_old_checkpoint_stream_counts_still_load():
    state = RunState.from_json(
        {"step": 3, "batches_consumed": 3, "streams": {"0": {"0": [9, 1]}}}, 0
    )
    assert state.streams == {0: (9, 1, 0)} and state.skipped == 1


# ---- the text cache --------------------------------------------------------------------------


def _cached_model(bert, mode: str = "frozen", **overrides) -> torch.nn.Module:
    cfg = AlifuseConfig(
        vision=tiny_vision(),
        text=TextConfig(checkpoint=str(bert), mode=mode, max_length=48),
        embed_dim=16,
        cross_layers_image=0,
        cross_layers_text=0,
        mlm_weight=0.0,
        **overrides,
    )
    torch.manual_seed(0)
    return build_model(cfg)


def _data(ad_shards, **kw) -> DataConfig:
    return DataConfig(train=str(ad_shards / "train"), batch_size=4, shuffle_buffer=8, **kw)


@pytest.mark.parametrize("pool", [False, True])
def test_cached_training_step_never_runs_the_tower_and_matches(
    ad_shards, tiny_bert, tmp_path, pool
):
    pool_cfg = AttentionPoolConfig(enabled=True, out_dim=16, num_heads=2)
    overrides = {"attention_pool": pool_cfg} if pool else {}
    model = _cached_model(tiny_bert, **overrides)
    data = _data(ad_shards, text_cache=True, text_cache_dir=str(tmp_path / "cache"))
    acc = Accelerator(cpu=True)
    cache = text_cache.prepare_text_cache(model, data, data.train, 48, acc)
    assert cache.kind == ("hidden" if pool else "pooled")
    split = str(ad_shards / "train")
    plain = next(iter(build_train_loader(split, data, model.tokenizer, 48, 0, 1, 0)))
    cached = next(
        iter(build_train_loader(split, data, model.tokenizer, 48, 0, 1, 0, text_cache=cache))
    )
    assert plain["key"] == cached["key"] and "input_ids" not in cached
    assert torch.equal(plain["text_tokens"], cached["text_tokens"])

    torch.manual_seed(1)
    want = model(plain)["itc_loss"]

    def refuse(*args, **kwargs):
        raise AssertionError("the text tower ran in a cached step")

    model.text.forward_features = refuse
    model.text.forward = refuse
    torch.manual_seed(1)
    got = model(cached)
    got["itc_loss"].backward()  # the step's backward does not reach the tower either
    assert torch.allclose(got["itc_loss"], want, atol=2e-3)  # states stored in float16
    assert model.text_proj.weight.grad is not None


def test_cache_is_reused_and_rebuilt_when_its_inputs_change(ad_shards, tiny_bert, tmp_path, caplog):
    model = _cached_model(tiny_bert)
    data = _data(ad_shards, text_cache=True, text_cache_dir=str(tmp_path / "cache"))
    acc = Accelerator(cpu=True)
    first = text_cache.prepare_text_cache(model, data, data.train, 48, acc)
    with caplog.at_level("INFO", logger="medalign"):
        again = text_cache.prepare_text_cache(model, data, data.train, 48, acc)
    assert again.folder == first.folder and "reusing" in caplog.text
    shorter = text_cache.prepare_text_cache(model, data, data.train, 24, acc)
    prompted = DataConfig(**{**data.__dict__, "prompt_template": "Findings: {text}"})
    with_prompt = text_cache.prepare_text_cache(model, prompted, data.train, 48, acc)
    with torch.no_grad():
        model.text.encoder_model.embeddings.word_embeddings.weight[5] += 1.0
    changed = text_cache.prepare_text_cache(model, data, data.train, 48, acc)
    folders = {c.folder for c in (first, shorter, with_prompt, changed)}
    assert len(folders) == 4
    n = ShardSet.load(data.train).num_samples
    assert len(first._arrays()["index"]) == n


def test_cache_refuses_a_tower_that_trains(ad_shards, tiny_bert, tmp_path):
    model = _cached_model(tiny_bert, mode="lora")
    data = _data(ad_shards, text_cache=True, text_cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="data.text_cache=true: the text tower trains"):
        text_cache.prepare_text_cache(model, data, data.train, 48, Accelerator(cpu=True))


def test_a_cached_run_trains_and_logs_the_step_metrics(ad_shards, tiny_bert, tmp_path):
    out = tmp_path / "run"
    run_cmd(
        train_cmd(
            *tiny_overrides(ad_shards, tiny_bert, out),
            "model.text.mode=frozen",
            "model.mlm_weight=0",
            "model.cross_layers_text=0",
            "model.cross_layers_image=0",
            "data.text_cache=true",
            f"data.text_cache_dir={tmp_path / 'cache'}",
            "data.bucket_batches=4",
            "train.max_steps=4",
            "train.retrieval=true",
            "train.eval_splits=[test]",
        )
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert len(steps) == 4
    for row in steps:
        assert row["train/samples_per_s"] > 0 and row["train/text_tokens_per_s"] > 0
        assert 0 <= row["train/data_wait"] <= 1 and row["train/tflops_per_s"] > 0
        assert row["train/padded_per_real_tokens"] >= 1
        # MFU needs a GPU of the peak table (the run trains on CUDA when there is one)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        assert ("train/mfu" in row) == (peak_flops(device) is not None)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["test", "train"]
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["test"]["i2t_r10"] <= 1
