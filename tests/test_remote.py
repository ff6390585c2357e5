"""Shards read from where users keep them: a loopback HTTP server (fsspec) and `pipe:`
commands, against the local reader on the same shards; a connection dropped mid-shard is
retried and counted, a shard damaged where it is stored is counted, not retried forever."""

from __future__ import annotations

import functools
import json
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cmd, tiny_overrides, train_cmd
from shard_fixtures import CharTokenizer

from shards.reader import DataConfig, EvalStream, ShardSet, TrainStream
from shards.remote import is_remote, join


class _Handler(SimpleHTTPRequestHandler):
    """Serves a folder; the first `drops[name]` requests of a file get half of it, then the
    connection closes (Content-Length promised the whole file)."""

    drops: dict[str, int] = {}
    requests: list[str] = []

    def log_message(self, *args) -> None:
        """No request log on stderr."""

    def copyfile(self, source, outputfile) -> None:
        name = self.path.rsplit("/", 1)[-1]
        type(self).requests.append(name)
        if self.drops.get(name, 0) > 0:
            self.drops[name] -= 1
            data = source.read()
            outputfile.write(data[: len(data) // 2])
            outputfile.flush()
            self.close_connection = True
            return
        shutil.copyfileobj(source, outputfile)


@pytest.fixture
def server(ad_shards):
    _Handler.drops, _Handler.requests = {}, []
    handler = functools.partial(_Handler, directory=str(ad_shards))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _eval(location: str, **cfg) -> list[dict]:
    data = DataConfig(eval_batch_size=4, remote_backoff_s=0.0, **cfg)
    return list(EvalStream(ShardSet.load(location), data, CharTokenizer(), 32))


def _same(a: list[dict], b: list[dict]) -> None:
    assert [x["key"] for x in a] == [y["key"] for y in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["input_ids"], y["input_ids"])


def test_locations():
    assert is_remote("https://h/x") and is_remote("s3://b/x") and is_remote("pipe:cat {}")
    assert not is_remote("/data/x") and not is_remote("file:///data/x")
    assert join("https://h/x/", "manifest.json") == "https://h/x/manifest.json"
    assert join("pipe:cat /d/{}", "a b.tar") == "pipe:cat /d/'a b.tar'"
    with pytest.raises(ValueError, match="needs \\{\\} where the file name goes"):
        join("pipe:cat /d/x", "manifest.json")


def test_http_and_pipe_give_the_local_samples(ad_shards, server):
    local = _eval(str(ad_shards / "test"))
    over_http = ShardSet.load(f"{server}/test")
    assert (
        over_http.name == "test"
        and over_http.num_samples == ShardSet.load(str(ad_shards / "test")).num_samples
    )
    _same(_eval(f"{server}/test"), local)
    _same(_eval(f"pipe:cat {ad_shards / 'test'}/{{}}"), local)


def test_a_dropped_connection_is_retried_and_counted(ad_shards, server):
    shards = ShardSet.load(str(ad_shards / "train"))
    first = Path(shards.shards[0][0]).name
    _Handler.drops = {first: 1}
    cfg = DataConfig(batch_size=3, shuffle_buffer=1, remote_backoff_s=0.0)
    remote = TrainStream(ShardSet.load(f"{server}/train"), cfg, CharTokenizer(), 32, seed=2)
    local = TrainStream(shards, cfg, CharTokenizer(), 32, seed=2)
    n = shards.num_samples // 3
    it_remote, it_local = iter(remote), iter(local)
    got = [next(it_remote) for _ in range(n)]
    want = [next(it_local) for _ in range(n)]
    _same(got, want)  # no sample lost or repeated across the retry
    assert _Handler.requests.count(first) == 2 and got[-1]["retries"] == 1
    assert got[-1]["skipped"] == 0


def test_a_shard_damaged_where_it_is_stored_is_counted(ad_shards, tmp_path):
    copy = tmp_path / "test"
    shutil.copytree(ad_shards / "test", copy)
    shards = ShardSet.load(str(copy))
    path, count = shards.shards[0]
    data = bytearray(Path(path).read_bytes())
    data[2048:2560] = b"\xff" * 512  # a damaged header, same size: the stream is whole
    Path(path).write_bytes(bytes(data))
    stream = EvalStream(
        ShardSet.load(f"pipe:cat {copy}/{{}}"),
        DataConfig(eval_batch_size=4, remote_backoff_s=0.0),
        CharTokenizer(),
        32,
    )
    batches = list(stream)
    assert stream.counter.retries == 0  # nothing to gain from reading it again
    assert 0 < stream.counter.counts["lost"] <= count
    assert (
        sum(b["valid"].sum().item() for b in batches) + stream.counter.total == shards.num_samples
    )


def test_a_failing_command_is_retried_then_counted(ad_shards):
    cfg = DataConfig(eval_batch_size=4, remote_retries=2, remote_backoff_s=0.0)
    folder = ad_shards / "test"
    # manifest.json comes through; every shard fetch fails
    location = f"pipe:f={folder}/{{}}; case $f in *.tar) exit 3;; esac; cat $f"
    stream = EvalStream(ShardSet.load(location), cfg, CharTokenizer(), 32)
    with pytest.raises(RuntimeError, match="read no valid sample"):
        list(stream)
    shards = ShardSet.load(str(folder))
    assert stream.counter.retries == 2 * len(shards.shards)
    assert stream.counter.counts["lost"] == shards.num_samples


def test_a_missing_remote_manifest_names_the_url(server):
    with pytest.raises(FileNotFoundError, match="nowhere/manifest.json"):
        ShardSet.load(f"{server}/nowhere")


def test_a_run_trains_on_shards_over_http(ad_shards, tiny_bert, server, tmp_path):
    out = tmp_path / "run"
    overrides = [
        o
        for o in tiny_overrides(ad_shards, tiny_bert, out)
        if not o.startswith(("data.train=", "data.val=", "data.test="))
    ]
    run_cmd(
        train_cmd(
            *overrides,
            f"data.train={server}/train",
            f"data.val={server}/val",
            f"data.test=pipe:cat {ad_shards / 'test'}/{{}}",
            "train.max_steps=3",
            "train.eval_splits=[test]",
        )
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert len(steps) == 3 and all(r["data/retries"] == 0 and r["data/skipped"] == 0 for r in steps)
    assert json.loads((out / "results.json").read_text())["test"]["itc_loss"] > 0


def test_a_split_opens_as_a_datasets_iterable_dataset(ad_shards, server):
    from shards.hf import iterable_dataset

    local = _eval(str(ad_shards / "test"))
    for location in (str(ad_shards / "test"), f"{server}/test"):
        ds = iterable_dataset(location)
        assert ds.n_shards == len(ShardSet.load(location).shards)
        examples = list(ds)
        assert [e["key"] for e in examples] == [k for b in local for k in b["key"]]
        first = local[0]
        assert np.array_equal(examples[0]["image"], first["image"][0].float().numpy())
        assert examples[0]["text"] == first["text"][0] and examples[0]["label"] == first["label"][0]
