"""Fault injection: a resumed, preempted or damaged run never silently trains something else.

Each test breaks a run the way a cluster or a disk does (kill -9, a kill inside a checkpoint
write, a garbled marker, NaN, damaged shards, a stopped rank, a dead launcher, a changed
setting on resume) and checks what the trainer does. docs/RELIABILITY.md lists each probe.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, launch_cmd, run_cmd, tiny_overrides, train_cmd
from safetensors.torch import load_file

from shards.reader import DataConfig, DataError, ShardSet, TrainStream
from trainer.checkpoint import LATEST, STATE_FILE, CheckpointError
from trainer.metrics_log import read_metrics

FAULT = [sys.executable, str(REPO / "tests" / "fault_inject.py")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def losses(run_dir: Path) -> dict[int, float]:
    return {
        r["step"]: r["train/loss"]
        for r in read_metrics(run_dir / "metrics.jsonl")
        if "train/loss" in r
    }


def run_fails(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode != 0, f"expected a failure: {' '.join(cmd)}\n{proc.stdout[-2000:]}"
    return proc


def logged_step(run_dir: Path) -> int:
    """The last training step a running run has logged (0 before its first line); a line still
    being written ends the read."""
    path = run_dir / "metrics.jsonl"
    steps = [0]
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.endswith("}"):
                break
            record = json.loads(line)
            if "train/loss" in record:
                steps.append(record["step"])
    return max(steps)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before the fault was injected"
        if logged_step(run_dir) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def checkpoint_weights_finite(run_dir: Path) -> list[Path]:
    """Every committed checkpoint's model weights; asserts each tensor is finite."""
    folders = sorted((run_dir / "checkpoints").glob("step_*"))
    for folder in folders:
        for tensor in load_file(str(folder / "model.safetensors")).values():
            assert torch.isfinite(tensor).all(), folder
    return folders


@pytest.fixture(scope="module")
def base(ad_shards, tiny_bert, tmp_path_factory):
    """An uninterrupted run: the reference losses, and checkpoints at steps 2, 4, 6, 8."""
    out = tmp_path_factory.mktemp("base")
    args = [*tiny_overrides(ad_shards, tiny_bert, out), "train.max_steps=8", "train.save_every=2"]
    run_cmd(train_cmd(*args, "train.keep_last=4"))
    return out, args


def test_kill_9_at_a_random_step_then_resume_gives_identical_losses(base, tmp_path):
    ref, args = base
    out = tmp_path / "run"
    args = [a if not a.startswith("train.output_dir=") else f"train.output_dir={out}" for a in args]
    kill_at = random.Random(1234).randint(3, 6)
    proc = subprocess.Popen(
        train_cmd(*args, "train.save_every=1"),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_step(out, kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_cmd(train_cmd(*args, "train.save_every=1", "--resume"))
    first, resumed = losses(ref), losses(out)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(first[step], rel=1e-6, abs=1e-7), step
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_inside_a_checkpoint_write_resumes_from_the_previous(base, tmp_path):
    ref, args = base
    out = tmp_path / "run"
    args = [a if not a.startswith("train.output_dir=") else f"train.output_dir={out}" for a in args]
    proc = subprocess.run(
        [*FAULT, "kill_in_save:6", "--", *args], cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL
    root = out / "checkpoints"
    assert (root / LATEST).read_text() == "step_0000004"  # never pointed at the half-written one
    assert not (root / "step_0000006").exists() and (root / ".tmp-step_0000006").is_dir()
    resumed = run_cmd(train_cmd(*args, "--resume"))
    assert "resumed from" in resumed.stderr and "step_0000004" in resumed.stderr
    assert not (root / ".tmp-step_0000006").exists()  # cleaned by the next save of step 6
    first, again = losses(ref), losses(out)
    for step in (5, 6, 7, 8):
        assert again[step] == pytest.approx(first[step], rel=1e-6, abs=1e-7), step


def test_early_stopping_state_survives_a_kill_and_resume(ad_shards, tiny_bert, tmp_path):
    def args(out):
        return [
            *tiny_overrides(ad_shards, tiny_bert, out, task="classify"),
            "train.max_steps=16",
            "train.eval_every=2",
            "train.early_stop_metric=acc",
            "train.early_stop_patience=3",  # the earliest stop is at step 8
            "train.save_every=1",
        ]

    ref, out = tmp_path / "ref", tmp_path / "run"
    run_cmd(train_cmd(*args(ref)))
    proc = subprocess.Popen(
        train_cmd(*args(out)),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_step(out, 5, proc)  # after the evaluations of steps 2 and 4
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_cmd(train_cmd(*args(out), "--resume"))
    first = json.loads((ref / "results.json").read_text())
    again = json.loads((out / "results.json").read_text())
    assert again["early_stopping"] == first["early_stopping"], (first, again)
    assert again["val"]["acc"] == first["val"]["acc"]
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "damage", ["empty_state", "garbled_state", "missing_file", "garbled_latest"]
)
def test_a_damaged_checkpoint_is_passed_over_on_resume(base, tmp_path, damage):
    ref, args = base
    out = tmp_path / "run"
    shutil.copytree(ref / "checkpoints", out / "checkpoints")
    newest = out / "checkpoints" / "step_0000008"
    if damage == "empty_state":
        (newest / STATE_FILE).write_text("")
    elif damage == "garbled_state":
        (newest / STATE_FILE).write_bytes(b"\x00\xff{garbage")
    elif damage == "missing_file":
        (newest / "model.safetensors").unlink()
    else:
        (out / "checkpoints" / LATEST).write_bytes(b"\xff\xfe not a name")
    args = [a if not a.startswith("train.output_dir=") else f"train.output_dir={out}" for a in args]
    proc = run_cmd(train_cmd(*args, "train.max_steps=9", "--resume"))
    if damage == "garbled_latest":  # the newest complete folder is taken instead
        assert "step_0000008" in proc.stderr and "resumed from" in proc.stderr
        return
    assert "passed over" in proc.stderr and "step_0000008" in proc.stderr
    assert "resumed from" in proc.stderr and "step_0000006" in proc.stderr
    assert sorted(losses(out)) == [7, 8, 9]
    # set aside, so keep_last prunes around the good ones and it is never tried again
    assert (out / "checkpoints" / ".damaged-step_0000008").is_dir()


def test_an_explicit_broken_checkpoint_is_an_error_not_a_fallback(base, tmp_path):
    ref, args = base
    broken = tmp_path / "step_0000004"
    shutil.copytree(ref / "checkpoints" / "step_0000004", broken)
    (broken / STATE_FILE).write_text("{")
    proc = run_fails(
        train_cmd(*args, f"train.output_dir={tmp_path / 'run'}", "--resume", str(broken))
    )
    assert "trainer_state.json: unreadable" in proc.stderr


def test_nan_loss_steps_are_skipped_counted_and_named(base, tmp_path):
    ref, args = base
    out = tmp_path / "run"
    args = [a if not a.startswith("train.output_dir=") else f"train.output_dir={out}" for a in args]
    proc = run_cmd([*FAULT, "nan_at:3", "--", *args])
    assert "step 3: NaN / inf gradients, the optimizer did not step" in proc.stderr
    assert re.search(r"its batch's sample keys: [A-Za-z0-9-]+_[A-Za-z0-9_-]+", proc.stderr)
    records = read_metrics(out / "metrics.jsonl")
    skipped = {r["step"]: r["train/nonfinite_skipped"] for r in records if "train/lr" in r}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1, 8: 1}
    assert 3 not in losses(out)  # the skipped step's NaN never reaches the logged means
    checkpoint_weights_finite(out)
    state = json.loads((out / "checkpoints" / "step_0000008" / STATE_FILE).read_text())
    assert state["nonfinite_skipped"] == 1 and state["nonfinite_in_row"] == 0
    # policy stop: the first such step ends the run, nothing non-finite is saved
    stop = tmp_path / "stop"
    args = [
        a if not a.startswith("train.output_dir=") else f"train.output_dir={stop}" for a in args
    ]
    failed = run_fails([*FAULT, "nan_at:3", "--", *args, "train.nonfinite=stop"])
    assert "Stopping: train.nonfinite=stop" in failed.stderr
    assert [p.name for p in checkpoint_weights_finite(stop)] == ["step_0000002"]


def test_a_diverging_run_stops_and_never_saves_nonfinite_weights(base, tmp_path):
    _, args = base
    out = tmp_path / "run"
    args = [a if not a.startswith("train.output_dir=") else f"train.output_dir={out}" for a in args]
    proc = run_fails(train_cmd(*args, "optim.lr=1e10", "train.save_every=1", "train.max_steps=30"))
    assert "in a row (train.max_nonfinite_in_row=3)" in proc.stderr or "not saving" in proc.stderr
    checkpoint_weights_finite(out)


def test_resume_with_another_batch_size_is_refused_unless_allowed(base, tmp_path):
    ref, args = base
    out = tmp_path / "run"
    shutil.copytree(ref / "checkpoints", out / "checkpoints")
    args = [a if not a.startswith("train.output_dir=") else f"train.output_dir={out}" for a in args]
    proc = run_fails(train_cmd(*args, "data.batch_size=2", "train.max_steps=9", "--resume"))
    assert "batch_size: checkpoint 4, now 2" in proc.stderr
    assert "--allow-resume-changes" in proc.stderr
    proc = run_fails(
        train_cmd(*args, "train.seed=7", "data.num_workers=1", "train.max_steps=9", "--resume")
    )
    assert (
        "seed: checkpoint 0, now 7" in proc.stderr
        and "num_workers: checkpoint 0, now 1" in proc.stderr
    )
    ok = run_cmd(
        train_cmd(
            *args, "data.batch_size=2", "train.max_steps=9", "--resume", "--allow-resume-changes"
        )
    )
    assert "resume with a change" in ok.stderr and "batch_size" in ok.stderr


def _damaged_copy(ad_shards: Path, tmp_path: Path, how: str) -> tuple[Path, str]:
    root = tmp_path / "shards"
    shutil.copytree(ad_shards, root)
    shard = sorted((root / "train").glob("*.tar"))[1]
    data = bytearray(shard.read_bytes())
    if how == "bit_flip":
        data[len(data) // 2] ^= 0x10
    elif how == "zeroed":  # a volume's voxels overwritten with zeros, the tar still valid
        data[2048 : 2048 + 2048] = bytes(2048)
    else:  # cut
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    return root, shard.name


@pytest.mark.parametrize("how", ["bit_flip", "zeroed", "cut"])
def test_damaged_shards_stop_the_run_at_start(ad_shards, tiny_bert, tmp_path, how):
    root, name = _damaged_copy(ad_shards, tmp_path, how)
    started = time.monotonic()
    proc = run_fails(
        train_cmd(*tiny_overrides(root, tiny_bert, tmp_path / "run"), "train.max_steps=2")
    )
    assert time.monotonic() - started < 60
    assert "differ from their manifest" in proc.stderr and name in proc.stderr
    assert ("sha256" if how != "cut" else "bytes, the manifest says") in proc.stderr


def test_a_cut_shard_counts_every_lost_sample(ad_shards, tmp_path):
    root, name = _damaged_copy(ad_shards, tmp_path, "cut")
    shards = ShardSet.load(str(root / "train"))
    stream = TrainStream(shards, DataConfig(batch_size=1, shuffle_buffer=1), None, 8, seed=0)
    it = iter(stream)
    seen = [next(it) for _ in range(shards.num_samples)]  # more than one epoch's worth
    per_epoch = shards.num_samples - stream.counter.total
    keys = {k for b in seen[:per_epoch] for k in b["key"]}
    assert len(keys) == per_epoch  # one epoch: every readable sample once
    lost = stream.counter.total
    expected = dict(shards.shards)[str(root / "train" / name)]
    assert 0 < lost <= expected  # all lost samples come from the cut shard, each counted once
    assert seen[-1]["skipped"] >= lost


def test_a_split_where_nothing_decodes_fails_within_seconds(ad_shards, tiny_bert, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(ad_shards, root)
    for shard in (root / "train").glob("*.tar"):
        shard.write_bytes(b"\x17" * shard.stat().st_size)  # same size; sha256 not checked
    started = time.monotonic()
    proc = run_fails(
        train_cmd(*tiny_overrides(root, tiny_bert, tmp_path / "run"), "data.verify_shards=off")
    )
    assert time.monotonic() - started < 60
    assert "failures in a row" in proc.stderr and "lost" in proc.stderr
    # the same through the stream alone
    stream = TrainStream(ShardSet.load(str(root / "train")), DataConfig(batch_size=2), None, 8)
    with pytest.raises(DataError, match="nothing trains on this split"):
        next(iter(stream))


def _launch_two(ad_shards, tiny_bert, out, *extra):
    cmd = launch_cmd("--num_processes", "2", "--multi_gpu")
    cmd += [*tiny_overrides(ad_shards, tiny_bert, out), "train.max_steps=100000", *extra]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / "launch.log", "w")  # a file: a full pipe would stall the job
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def _heartbeat(out: Path, rank: int) -> dict:
    return json.loads((out / "heartbeat" / f"rank_{rank}.json").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is gone for our purpose
        return fh.read().split()[2] != "Z"


def test_a_stopped_rank_ends_the_job_within_the_timeout(ad_shards, tiny_bert, tmp_path):
    out = tmp_path / "run"
    proc = _launch_two(ad_shards, tiny_bert, out, "train.collective_timeout_s=10")
    try:
        wait_for_step(out, 3, proc)
        pid = _heartbeat(out, 1)["pid"]
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        proc.wait(timeout=120)
        took = time.monotonic() - stopped
        stderr = (tmp_path / "launch.log").read_text()
    finally:
        if "pid" in locals() and _alive(pid):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert took < 100, took  # 10 s timeout + the launcher's grace period for the stopped rank
    assert "rank 1 stopped answering" in stderr and "collective_timeout_s=10" in stderr


def test_killing_the_launcher_leaves_no_worker(ad_shards, tiny_bert, tmp_path):
    out = tmp_path / "run"
    proc = _launch_two(ad_shards, tiny_bert, out)
    try:
        wait_for_step(out, 2, proc)
        pids = [_heartbeat(out, r)["pid"] for r in (0, 1)]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in pids if _alive(p)]
    finally:
        for p in locals().get("pids", []):
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} outlived the launcher"


def test_a_pickle_payload_in_a_deepspeed_checkpoint_is_refused(tmp_path):
    from accelerate.utils import DistributedType

    from trainer.checkpoint import _weights_only_loads

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(1)}, "evil": Payload()}, path)

    class FakeAccelerator:
        distributed_type = DistributedType.DEEPSPEED

    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        with _weights_only_loads(FakeAccelerator(), trust=False):
            torch.load(path, map_location="cpu", weights_only=False)  # as DeepSpeed calls it
    assert not (tmp_path / "pwned").exists()
    # what DeepSpeed's files hold (tensors, ZeRO enums, argparse namespaces) still loads
    import argparse

    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save(
        {"zero_stage": ZeroStageEnum(2), "args": argparse.Namespace(a=1), "t": torch.ones(2)}, path
    )
    with _weights_only_loads(FakeAccelerator(), trust=False):
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    assert loaded["zero_stage"] == ZeroStageEnum(2) and loaded["t"].sum() == 2
    assert math.isfinite(float(loaded["t"][0]))


# --- checked at start, and errors that name the file and the reason ----------------------


@pytest.mark.parametrize(
    "override",
    ["train.grad_clip=.nan", "model.mae_weight=.nan", "optim.lr=.inf", "train.output_dir="],
)
def test_settings_that_cannot_be_right_are_refused_by_the_config(override):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="expected a finite number|output_dir is empty"):
        load_config(None, [override])


def test_task_settings_are_checked_before_anything_is_built(ad_shards):
    from trainer.config import load_config
    from trainer.tasks import build_task

    base = [f"data.train={ad_shards / 'train'}", "model.task=classify", "train.eval_every=5"]
    task = build_task(load_config(None, [*base, "train.early_stop_metric=accuracy"]))
    with pytest.raises(ValueError, match="early_stop_metric='accuracy'.*'acc'"):
        task.check_settings()
    task = build_task(load_config(None, [*base, "model.vision.img_size=32"]))
    with pytest.raises(ValueError, match="model.vision.img_size=32.*volume_size=16"):
        task.check(ShardSet.load(str(ad_shards / "train")))
    task = build_task(
        load_config(
            None,
            [*base, "model.vision.img_size=16", "model.vision.patch_size=4", "model.num_classes=2"],
        )
    )
    with pytest.raises(ValueError, match="model.num_classes=2: data.label_mode=three_class"):
        task.check(ShardSet.load(str(ad_shards / "train")))


def test_a_full_disk_names_the_file_and_the_reason(tmp_path, monkeypatch):
    import errno

    from trainer import checkpoint

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(CheckpointError) as err:
        checkpoint.write_atomic(tmp_path / "latest", "step_0000002")
    assert f"could not write {tmp_path / 'latest'}: No space left on device" in str(err.value)
    assert "MB free on its file system" in str(err.value)
    assert not list(tmp_path.iterdir())  # no half-written file left behind


def test_a_shard_run_that_writes_nothing_exits_non_zero(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import make_ad_shards

    from shards.synthetic.ad import generate_ad_cohort

    raw = tmp_path / "raw"
    generate_ad_cohort(raw, subjects_per_cohort=2, shape=(8, 8, 8), seed=0, template="phantom")
    tables = {".csv", ".tsv", ".json", ".xlsx", ".xls", ".txt"}
    for image in [p for p in raw.rglob("*") if p.is_file() and p.suffix not in tables]:
        image.unlink()  # every record now points at a missing image
    code = make_ad_shards.main(
        ["--synthetic-root", str(raw), "--out", str(tmp_path / "out"), "--size", "8"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "no sample written" in err and "rejected" in err and "rejects.jsonl" in err


def test_every_rank_resumes_its_own_loader_streams():
    from trainer.run_state import RunState

    rank0 = RunState(step=5, batches_consumed=5, streams={0: (12, 2, 0)})
    rank1 = RunState(step=5, batches_consumed=5, streams={0: (10, 0, 3)})
    saved = json.loads(json.dumps(rank0.to_json({}, None, [rank0.streams, rank1.streams])))
    assert RunState.from_json(saved, 0).streams == {0: (12, 2, 0)}
    assert RunState.from_json(saved, 1).streams == {0: (10, 0, 3)}
    assert RunState.from_json(saved, 1).skipped == 0  # not rank 0's count
