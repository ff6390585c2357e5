"""Two "machines" on this host over loopback: two `accelerate launch` commands (machine ranks
0 and 1, one process each) from the multi-node config join one DeepSpeed ZeRO-2 world and
train exactly like a 2-process run on one machine with the same seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, free_port, run_cmd, tiny_overrides
from test_train import losses

pytestmark = pytest.mark.distributed


def _launch(config: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs" / "accelerate" / config),
        "--mixed_precision",
        "no",
        *args,
        str(REPO / "train.py"),
    ]


def test_two_machines_over_loopback_match_one_machine(ad_shards, tiny_bert, tmp_path):
    steps = ["train.max_steps=3", "train.eval_splits=[]"]
    one = tmp_path / "one_machine"
    run_cmd(
        _launch("cpu_2proc_zero2.yaml", "--main_process_port", str(free_port()))
        + tiny_overrides(ad_shards, tiny_bert, one)
        + steps
    )

    two = tmp_path / "two_machines"
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for rank in (0, 1):
        cmd = _launch(
            "multinode_zero2.yaml",
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", port,
        ) + tiny_overrides(ad_shards, tiny_bert, two) + steps  # fmt: skip
        log = open(tmp_path / f"machine{rank}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log, env=env), log))
    for proc, log in procs:
        try:
            proc.wait(timeout=600)
        finally:
            log.close()
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, (tmp_path / f"machine{rank}.log").read_text()[-4000:]

    launch = json.loads((two / "launch.json").read_text())
    assert launch["num_processes"] == 2 and launch["zero_stage"] == 2
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)
