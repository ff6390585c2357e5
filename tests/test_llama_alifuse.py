"""The composed model with a 4-bit LLaMA text tower and with the attention-pool ITC head:
config rules, what trains, the pairwise contrastive loss against a per-pair reference,
the embedding / similarity path used by retrieval and zero-shot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VISION
from model_fixtures import CORPUS, tiny_batch, tiny_bert, tiny_config, tiny_vision, warm_up

from models.alifuse import AlifuseConfig, build_model
from models.llama_text import LlamaTextConfig, make_tiny_llama_checkpoint
from models.pooling import AttentionPoolConfig


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return make_tiny_llama_checkpoint(
        tmp_path_factory.mktemp("llama") / "tiny", CORPUS * 3, hidden_size=64, num_layers=2
    )


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    return tiny_bert(tmp_path_factory.mktemp("bert"))


def _llama_config(llama_dir: str, mode: str = "qlora", **overrides) -> AlifuseConfig:
    llama = LlamaTextConfig(checkpoint=llama_dir, mode=mode, max_length=12, lora_dropout=0.0)
    base = dict(text_tower="llama", llama=llama, mlm_weight=0.0, cross_layers_text=0)
    return tiny_config("", **{**base, **overrides})


def test_llama_rules_are_config_errors(llama_dir: str) -> None:
    with pytest.raises(ValueError, match="mlm_weight=1.0: mlm needs a masked-LM text tower"):
        tiny_config("", text_tower="llama", llama=LlamaTextConfig(checkpoint=llama_dir))
    with pytest.raises(ValueError, match="cross_layers_text=1: the LLaMA tower"):
        _llama_config(llama_dir, task="classify", cross_layers_text=1)
    # Unimodal fusion uses no text cross layers: allowed whatever cross_layers_text says.
    _llama_config(llama_dir, task="classify", fusion_features="unimodal", cross_layers_text=1)


def test_qlora_tower_pretrains_with_itc_and_grounded_mae(llama_dir: str) -> None:
    torch.manual_seed(0)
    model = build_model(_llama_config(llama_dir))
    warm_up(model)
    assert model.cfg.text_max_length == 12
    assert len(model.text_cross) == 0
    out = model(tiny_batch(model))
    assert set(k for k in out if k.endswith("_loss")) == {"itc_loss", "mae_loss"}
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(n.startswith("text.") for n in lora)
    # Besides LoRA, no text-tower weight trains (the 4-bit base is frozen) ...
    assert not [n for n in trainable if n.startswith("text.") and "lora_" not in n]
    # ... and every trainable parameter (LoRA A and B, ITC heads, MAE) gets a gradient.
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("fusion", ["grounded", "unimodal"])
def test_llama_fusion_classifier_trains(llama_dir: str, fusion: str) -> None:
    torch.manual_seed(0)
    cfg = _llama_config(llama_dir, mode="lora", task="classify", fusion_features=fusion)
    model = build_model(cfg)
    warm_up(model)
    batch = tiny_batch(model)
    out = model(batch)
    assert out["logits"].shape == (4, 3)
    out["cls_loss"].backward()
    assert len(model.image_cross) == (1 if fusion == "grounded" else 0)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def _pool_config(bert_dir: str, **overrides) -> AlifuseConfig:
    pool = AttentionPoolConfig(enabled=True, num_heads=2, out_dim=16)
    return tiny_config(bert_dir, attention_pool=pool, mae_weight=0.0, mlm_weight=0.0, **overrides)


def test_attention_pool_rules_are_config_errors(bert_dir: str) -> None:
    with pytest.raises(ValueError, match="attention_pool.out_dim=8: expected embed_dim=16"):
        pool = AttentionPoolConfig(enabled=True, num_heads=2, out_dim=8)
        tiny_config(bert_dir, attention_pool=pool)
    with pytest.raises(ValueError, match="the pool is an ITC head"):
        _pool_config(bert_dir, task="classify")


def test_attention_pool_itc_scores_every_pair(bert_dir: str) -> None:
    torch.manual_seed(0)
    model = build_model(_pool_config(bert_dir, vision=tiny_vision(mask_ratio=0.0)))
    model.eval()  # no dropout; mask_ratio 0 keeps every image token
    assert isinstance(model.image_proj, torch.nn.Identity)
    batch = tiny_batch(model, batch_size=4)
    batch["attention_mask"][1, 3:] = 0  # a shorter text: its padding must not matter
    out = model(batch)

    # Reference: pool each (image i, text j) pair on its own and build the InfoNCE by hand.
    image_tokens = model.visual.forward_features(batch["image"])
    text_tokens = model.text.forward_features(batch["input_ids"], batch["attention_mask"])
    text_emb = model.text_state(text_tokens, batch["attention_mask"])["emb"]
    logits = torch.empty(4, 4)
    for i in range(4):
        for j in range(4):
            pooled = model.attention_pool(
                text_tokens[j : j + 1], batch["attention_mask"][j : j + 1], image_tokens[i : i + 1]
            )
            logits[i, j] = model.scale() * (F.normalize(pooled, dim=-1) * text_emb[j]).sum()
    labels = torch.arange(4)
    ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(out["itc_loss"], ref, rtol=1e-5, atol=1e-5)

    model.train()
    model(batch)["itc_loss"].backward()
    for name, param in model.attention_pool.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_embed_and_similarity(bert_dir: str) -> None:
    torch.manual_seed(0)
    plain = build_model(tiny_config(bert_dir, mae_weight=0.0, mlm_weight=0.0))
    pooled = build_model(_pool_config(bert_dir))
    for model in (plain, pooled):
        model.eval()
        batch = tiny_batch(model, batch_size=5)
        with torch.no_grad():
            states = model(batch, embed=True)
            sim = model.similarity(states["image"], states["text"])
            chunked = model.similarity(states["image"], states["text"], max_pairs=3)
            text_only = model({k: batch[k] for k in ("input_ids", "attention_mask")}, embed=True)
        assert sim.shape == (5, 5) and sim.abs().max() <= 1.0 + 1e-5  # cosine similarities
        torch.testing.assert_close(chunked, sim)
        assert "image" not in text_only
        torch.testing.assert_close(text_only["text"]["emb"], states["text"]["emb"])
    emb = plain(tiny_batch(plain, batch_size=5), embed=True)
    torch.testing.assert_close(
        plain.similarity(emb["image"], emb["text"]), emb["image"]["emb"] @ emb["text"]["emb"].T
    )


def test_paper_scale_llama_preset_runs_at_tiny_size(llama_dir: str) -> None:
    """configs/cxr_mae_llama_pretrain.yaml's combination (QLoRA LLaMA with gradient
    checkpointing, attention-pool ITC, grounded MAE) with only the sizes shrunk."""
    from trainer.config import load_config

    shrink = [
        f"model.llama.checkpoint={llama_dir}",
        "model.llama.max_length=12",
        *TINY_VISION,
        "model.attention_pool.num_heads=2",
    ]
    preset = Path(__file__).resolve().parents[1] / "configs" / "cxr_mae_llama_pretrain.yaml"
    cfg = load_config(str(preset), shrink)
    assert cfg.model.llama.mode == "qlora" and cfg.model.llama.gradient_checkpointing
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.train()
    warm_up(model)
    out = model(tiny_batch(model, batch_size=3))
    assert set(k for k in out if k.endswith("_loss")) == {"itc_loss", "mae_loss"}
    (out["itc_loss"] + out["mae_loss"]).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in grads) and any(n.startswith("attention_pool.") for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [
        n for n, g in grads.items() if g is None or g.abs().sum() == 0
    ]
