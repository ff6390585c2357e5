"""Helpers shared by the model tests: a clinical corpus, tiny configs, a tiny batch."""

from __future__ import annotations

from pathlib import Path

import torch

from models.alifuse import AlifuseConfig
from models.text import TextConfig, make_tiny_bert_checkpoint
from models.vit import VisionConfig

CORPUS = [
    "No acute cardiopulmonary process.",
    "Mild cardiomegaly with a small left pleural effusion.",
    "Right lower lobe opacity concerning for pneumonia.",
    "Patient with mild cognitive impairment, MMSE 26, CDR 0.5.",
    "Hippocampal atrophy consistent with Alzheimer disease.",
    "Cognitively normal control, MMSE 30, no memory complaints.",
    "Endotracheal tube terminates 4 cm above the carina.",
    "Interval improvement of bilateral pulmonary edema.",
    "Age 74, female, APOE4 carrier, progressive memory decline.",
    "Moderate global cortical atrophy and ventricular enlargement.",
]

TEXTS = [
    "mild cardiomegaly with pleural effusion",
    "no acute process",
    "hippocampal atrophy, mmse 22",
    "cognitively normal control",
]


def tiny_bert(root: Path, hidden_size: int = 32) -> str:
    """A 2-layer BERT with a WordPiece tokenizer trained on CORPUS, written under root."""
    return make_tiny_bert_checkpoint(
        root / f"bert{hidden_size}", CORPUS * 3, hidden_size=hidden_size, num_heads=2
    )


def tiny_vision(spatial_dims: int = 3, **overrides) -> VisionConfig:
    """3D: 16^3 volume, patch 4 (64 patches); 2D: 16^2 image, patch 4 (16 patches)."""
    base = dict(
        spatial_dims=spatial_dims,
        img_size=16,
        patch_size=4,
        embed_dim=48,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        mask_ratio=0.75 if spatial_dims == 3 else 0.5,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    return VisionConfig(**{**base, **overrides})


def tiny_config(checkpoint: str, mode: str = "lora", **overrides) -> AlifuseConfig:
    """Image width 48 vs text width 32, so the cross-attention must project dimensions."""
    vision = overrides.pop("vision", tiny_vision())
    text = TextConfig(checkpoint=checkpoint, mode=mode, max_length=12, mlm_probability=0.4)
    base = dict(
        vision=vision,
        text=text,
        embed_dim=16,
        cross_layers_image=1,
        cross_layers_text=1,
        fusion_hidden=24,
        num_classes=3,
    )
    return AlifuseConfig(**{**base, **overrides})


def tiny_batch(model, batch_size: int = 4, seed: int = 0) -> dict:
    """A batch with the fixed keys plus ignored extras (lists of strings, ints)."""
    v = model.cfg.vision
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, v.in_chans) + (v.img_size,) * v.spatial_dims
    texts = [TEXTS[i % len(TEXTS)] for i in range(batch_size)]
    tokens = model.text.tokenize(texts, model.cfg.text_max_length)
    return {
        "image": torch.randn(shape, generator=gen),
        **tokens,
        "label": torch.arange(batch_size) % model.cfg.num_classes,
        "valid": torch.ones(batch_size, dtype=torch.bool),
        "key": [f"s{i}" for i in range(batch_size)],
        "cohort": ["ADNI"] * batch_size,
        "worker": 0,
    }


def warm_up(model: torch.nn.Module) -> None:
    """Moves the zero-initialised gates and LoRA B off zero, as after some training, so
    that every weight behind them is on the gradient path."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".gate_" in name or "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
