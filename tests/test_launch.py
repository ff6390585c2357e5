"""`accelerate launch` with 2 processes on CPU: DeepSpeed ZeRO-2 (with exact resume), ZeRO-3,
DDP and a QLoRA text tower under ZeRO-2, checking the mode that actually ran, not only the
exit code."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import REPO, launch_cmd, llama_overrides, run_cmd, tiny_overrides
from safetensors.torch import load_file
from test_train import losses

from models.alifuse import build_model
from trainer.config import load_config

pytestmark = pytest.mark.distributed


def _launch(mode: list[str], overrides: list[str], *extra: str):
    return run_cmd([*launch_cmd("--num_processes", "2", *mode), *overrides, *extra])


def test_zero2_two_processes_and_exact_resume(ad_shards, tiny_bert, tmp_path):
    zero2 = ["--use_deepspeed", "--zero_stage", "2"]
    first = tmp_path / "first"
    _launch(
        zero2,
        tiny_overrides(ad_shards, tiny_bert, first),
        "train.max_steps=4",
        "train.save_every=2",
    )
    launch = json.loads((first / "launch.json").read_text())
    assert launch["distributed_type"] == "DistributedType.DEEPSPEED"
    assert launch["num_processes"] == 2 and launch["zero_stage"] == 2
    second = tmp_path / "second"
    _launch(
        zero2,
        tiny_overrides(ad_shards, tiny_bert, second),
        "train.max_steps=4",
        "train.save_every=2",
        "--resume",
        str(first / "checkpoints" / "step_0000002"),
    )
    a, b = losses(first), losses(second)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)


def test_zero3_two_processes_trains_and_exports_full_weights(ad_shards, tiny_bert, tmp_path):
    _launch(
        ["--use_deepspeed", "--zero_stage", "3"],
        tiny_overrides(ad_shards, tiny_bert, tmp_path, task="classify"),
        "train.max_steps=3",
        "train.eval_splits=[test]",
    )
    launch = json.loads((tmp_path / "launch.json").read_text())
    assert launch["zero_stage"] == 3 and launch["num_processes"] == 2
    weights = load_file(str(tmp_path / "model.safetensors"))
    # Gathered full tensors, not ZeRO-3's empty placeholders: every key and shape of the model.
    reference = build_model(load_config(str(tmp_path / "config.yaml")).model).state_dict()
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        k: tuple(v.shape) for k, v in reference.items()
    }
    results = json.loads((tmp_path / "results.json").read_text())
    n_test = json.loads((ad_shards / "test" / "manifest.json").read_text())["num_samples"]
    assert results["test"]["n"] == n_test


def test_ddp_two_processes_on_cpu(ad_shards, tiny_bert, tmp_path):
    _launch(["--multi_gpu"], tiny_overrides(ad_shards, tiny_bert, tmp_path), "train.max_steps=2")
    launch = json.loads((tmp_path / "launch.json").read_text())
    assert launch["distributed_type"] == "DistributedType.MULTI_CPU"
    assert launch["num_processes"] == 2


def test_text_cache_built_by_two_ranks_under_zero2(ad_shards, tiny_bert, tmp_path):
    cached = [
        "model.text.mode=frozen",
        "model.mlm_weight=0",
        "model.cross_layers_text=0",
        "model.cross_layers_image=0",
        "data.text_cache=true",
        f"data.text_cache_dir={tmp_path / 'cache'}",
        "train.max_steps=2",
        "train.eval_splits=[test]",
    ]
    zero2 = [
        "--use_deepspeed",
        "--deepspeed_config_file",
        str(REPO / "configs/deepspeed/zero2.json"),
    ]
    _launch(zero2, tiny_overrides(ad_shards, tiny_bert, tmp_path / "a"), *cached)
    folders = sorted((tmp_path / "cache" / "train").iterdir())
    assert len(folders) == 1
    meta = json.loads((folders[0] / "meta.json").read_text())
    assert meta["parts"] == ["part-000-of-002", "part-001-of-002"]
    keys = [json.loads((folders[0] / f"{p}.keys.json").read_text()) for p in meta["parts"]]
    assert all(keys) and not set(keys[0]) & set(keys[1])  # each rank its share, once
    total = json.loads((ad_shards / "train" / "manifest.json").read_text())["num_samples"]
    assert len(keys[0]) + len(keys[1]) == total
    # A second run reuses the cache on both ranks (one decision for all, no hang).
    proc = _launch(zero2, tiny_overrides(ad_shards, tiny_bert, tmp_path / "b"), *cached)
    assert "reusing" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "b" / "results.json").read_text())["test"]["itc_loss"] > 0


def test_qlora_text_tower_with_itc_under_zero2(ad_shards, tiny_bert, tiny_llama, tmp_path):
    _launch(
        ["--use_deepspeed", "--zero_stage", "2"],
        tiny_overrides(ad_shards, tiny_bert, tmp_path) + llama_overrides(tiny_llama),
        "train.max_steps=3",
    )
    launch = json.loads((tmp_path / "launch.json").read_text())
    assert launch["zero_stage"] == 2 and launch["num_processes"] == 2
    assert set(losses(tmp_path)[3]) >= {"train/itc_loss", "train/mae_loss"}
    weights = load_file(str(tmp_path / "model.safetensors"))
    fresh = build_model(load_config(str(tmp_path / "config.yaml")).model).state_dict()
    lora_b = [k for k in weights if "lora_B" in k]
    packed = [k for k in weights if k.endswith("base_layer.weight")]
    assert lora_b and packed
    # LoRA B starts at zero: non-zero after 3 steps means the adapter trained through the
    # 4-bit layers on both ranks; the packed NF4 base weights are the checkpoint's, unchanged.
    assert all(weights[k].abs().sum() > 0 and fresh[k].abs().sum() == 0 for k in lora_b)
    for key in packed:
        assert weights[key].dtype == fresh[key].dtype == torch.uint8
        assert torch.equal(weights[key], fresh[key]), key


def test_4bit_text_tower_under_zero3_is_refused(ad_shards, tiny_bert, tiny_llama, tmp_path):
    cmd = launch_cmd("--num_processes", "2", "--use_deepspeed", "--zero_stage", "3")
    cmd += tiny_overrides(ad_shards, tiny_bert, tmp_path) + llama_overrides(tiny_llama)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "under DeepSpeed ZeRO-3 trains wrongly; use ZeRO-1 or ZeRO-2" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


# A ZeRO-2 JSON as the Hugging Face / DeepSpeed docs ship it: optimizer and scheduler
# sections and most values "auto", fp16 loss-scaling knobs, offload to the CPU.
STOCK_ZERO2 = {
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "bf16": {"enabled": "auto"},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
    },
    "scheduler": {
        "type": "WarmupDecayLR",
        "params": {
            "warmup_min_lr": "auto",
            "warmup_max_lr": "auto",
            "warmup_num_steps": "auto",
            "total_num_steps": "auto",
        },
    },
    "zero_optimization": {
        "stage": 2,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "allgather_partitions": True,
        "allgather_bucket_size": 2e8,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": "auto",
        "contiguous_gradients": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}


@pytest.fixture(scope="module")
def zero2_reference(ad_shards, tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2_reference")
    _launch(
        ["--use_deepspeed", "--deepspeed_config_file", str(REPO / "configs/deepspeed/zero2.json")],
        tiny_overrides(ad_shards, tiny_bert, out),
        "train.max_steps=3",
        "train.eval_splits=[]",
    )
    return out


@pytest.mark.parametrize(
    "json_file, stage",
    [("zero1.json", 1), ("zero3.json", 3), ("zero3_offload.json", 3), ("stock_zero2.json", 2)],
)
def test_every_zero_config_trains_like_zero2(
    ad_shards, tiny_bert, tmp_path, zero2_reference, json_file, stage
):
    path = REPO / "configs" / "deepspeed" / json_file
    if json_file == "stock_zero2.json":  # written by someone else, not one of ours
        path = tmp_path / json_file
        path.write_text(json.dumps(STOCK_ZERO2, indent=2))
    out = tmp_path / "run"
    _launch(
        ["--use_deepspeed", "--deepspeed_config_file", str(path)],
        tiny_overrides(ad_shards, tiny_bert, out),
        "train.max_steps=3",
        "train.eval_splits=[]",
    )
    launch = json.loads((out / "launch.json").read_text())
    assert launch["zero_stage"] == stage and launch["num_processes"] == 2
    # Same seed, same data, fp32: the stage only changes where states live, not the math.
    a, b = losses(zero2_reference), losses(out)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (json_file, step, key)
    # Consolidated weights in Hugging Face layout, loadable without DeepSpeed.
    weights = load_file(str(out / "model.safetensors"))
    fresh = build_model(load_config(str(out / "config.yaml")).model)
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        k: tuple(v.shape) for k, v in fresh.state_dict().items()
    }
    fresh.load_state_dict(weights)  # strict: every key, no DeepSpeed involved
    assert torch.equal(fresh.state_dict()["logit_scale"], weights["logit_scale"])


def test_a_json_that_sets_trainer_owned_values_is_refused(ad_shards, tiny_bert, tmp_path):
    stock = json.loads(json.dumps(STOCK_ZERO2))
    stock["optimizer"]["params"]["lr"] = 3e-4
    path = tmp_path / "fixed_lr.json"
    path.write_text(json.dumps(stock))
    cmd = launch_cmd(
        "--num_processes", "2", "--use_deepspeed", "--deepspeed_config_file", str(path)
    )
    proc = subprocess.run(
        cmd + tiny_overrides(ad_shards, tiny_bert, tmp_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "'optimizer' section sets {'lr': 0.0003}" in proc.stderr
