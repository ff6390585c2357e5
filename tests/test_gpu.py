"""GPU-only checks (marker `gpu`, deselected by default; run with `pytest -m gpu` on a CUDA
machine): training attention never falls back to the math SDPA kernel in bf16, and the 4-bit
LLaMA tower trains its LoRA matrices on the GPU with bf16 compute, and a cached frozen 4-bit
tower's run reports MFU."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import CORPUS, TEXTS
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.attention import Attention, CrossBlock
from models.llama_text import LlamaTextConfig, build_llama_tower, make_tiny_llama_checkpoint

pytestmark = pytest.mark.gpu
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@pytest.mark.parametrize("tokens", [197, 512])
def test_self_attention_runs_without_the_math_backend(tokens: int) -> None:
    attn = Attention(768, 12).cuda().to(torch.bfloat16)
    x = torch.randn(4, tokens, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with sdpa_kernel(FUSED):  # raises if only the math kernel could take these inputs
        attn(x).float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_cross_attention_over_padded_text_runs_without_the_math_backend() -> None:
    block = CrossBlock(768, 12, context_dim=1024).cuda().to(torch.bfloat16)
    x = torch.randn(4, 197, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    text = torch.randn(4, 64, 1024, device="cuda", dtype=torch.bfloat16)
    keep = torch.ones(4, 64, dtype=torch.bool, device="cuda")
    keep[1, 20:] = False
    with sdpa_kernel(FUSED):
        block(x, text, keep).float().square().mean().backward()
    assert torch.isfinite(x.grad).all()


def test_qlora_tower_trains_on_the_gpu_in_bf16(tmp_path) -> None:
    folder = make_tiny_llama_checkpoint(tmp_path / "llama", CORPUS * 3, hidden_size=128)
    cfg = LlamaTextConfig(checkpoint=folder, mode="qlora", compute_dtype="bf16", max_length=16)
    tower = build_llama_tower(cfg, device="cuda")
    tower.train()
    batch = {k: v.cuda() for k, v in tower.tokenize(TEXTS, 16).items()}
    tower(batch["input_ids"], batch["attention_mask"]).square().mean().backward()
    lora_b = [p for n, p in tower.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_cached_frozen_4bit_run_reports_mfu_on_the_gpu(ad_shards, tiny_llama, tmp_path) -> None:
    import json

    from conftest import llama_overrides, run_cmd, tiny_overrides, train_cmd

    from trainer.flops import peak_flops

    assert peak_flops(torch.device("cuda")) is not None, torch.cuda.get_device_name()
    out = tmp_path / "run"
    run_cmd(
        train_cmd(
            *tiny_overrides(ad_shards, tiny_llama, out),
            *llama_overrides(tiny_llama, "frozen_4bit"),
            "model.cross_layers_text=0",
            "model.attention_pool.enabled=true",
            "model.attention_pool.out_dim=16",
            "model.attention_pool.num_heads=2",
            "model.mae_weight=0",
            "model.cross_layers_image=0",
            "data.text_cache=true",
            f"data.text_cache_dir={tmp_path / 'cache'}",
            "train.max_steps=4",
            "train.eval_splits=[]",
        )
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert len(steps) == 4
    assert all(0 < r["train/mfu"] < 1 and r["train/text_tokens_per_s"] > 0 for r in steps)
    assert (tmp_path / "cache" / "train").is_dir()
