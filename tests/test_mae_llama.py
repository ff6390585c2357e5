"""The MAE + LLaMA chest X-ray report (seed 001) as presets: alignment with a frozen LLaMA and
the margin loss, the prompt template, the fully connected 14-label head and its frozen-MAE
baseline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_VISION
from model_fixtures import CORPUS, tiny_batch, warm_up

from models.alifuse import build_model
from models.heads import MultiLabelConfig, MultiLabelModel
from models.llama_text import make_tiny_llama_checkpoint
from models.vit import VisionConfig
from shards.reader import DataConfig
from trainer.config import load_config
from trainer.optim import OptimConfig, build_optimizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return make_tiny_llama_checkpoint(
        tmp_path_factory.mktemp("llama") / "tiny", CORPUS * 3, hidden_size=64, num_layers=2
    )


def _align(llama_dir: str, *extra: str):
    shrink = [
        f"model.llama.checkpoint={llama_dir}",
        "model.llama.max_length=12",
        "model.llama.gradient_checkpointing=false",
        *TINY_VISION,
        "model.attention_pool.num_heads=2",
        *extra,
    ]
    return load_config(str(CONFIGS / "cxr_mae_llama_align.yaml"), shrink)


@pytest.mark.parametrize("mode", ["frozen", "frozen_4bit"])
def test_a_frozen_text_tower_trains_nothing(llama_dir: str, mode: str) -> None:
    cfg = _align(llama_dir, f"model.llama.mode={mode}")
    assert cfg.model.contrastive == "margin" and cfg.model.attention_pool.enabled
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.train()
    warm_up(model)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.05), False)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    text = dict(model.text.named_parameters())
    assert text and not in_optimizer & {id(p) for p in text.values()}
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    for step in range(3):
        out = model(tiny_batch(model, batch_size=3, seed=step))
        assert set(k for k in out if k.endswith("_loss")) == {"itc_loss"}  # contrastive only
        out["itc_loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    text_keys = [k for k in before if k.startswith("text.")]
    assert text_keys and all(torch.equal(before[k], after[k]) for k in text_keys)
    moved = [
        k
        for k in before
        if k.startswith(("visual.", "attention_pool.")) and not torch.equal(before[k], after[k])
    ]
    assert moved  # the image tower and the pool did train
    assert model.logit_scale is None  # the margin loss learns no temperature


def test_prompt_template_wraps_every_text() -> None:
    cfg = DataConfig(prompt_template="{text} In one word:")
    assert cfg.prompted("No effusion.") == "No effusion. In one word:"
    assert DataConfig().prompted("No effusion.") == "No effusion."
    with pytest.raises(ValueError, match="expected \\{text\\} exactly once"):
        DataConfig(prompt_template="no placeholder")


def test_fully_connected_head_and_its_frozen_baseline() -> None:
    vision = VisionConfig(
        spatial_dims=2, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2
    )
    deep = MultiLabelModel(vision, MultiLabelConfig(head_layers=3, head_hidden=24, dropout=0.1))
    linears = [m for m in deep.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 24), (24, 24), (24, 14)]
    frozen = MultiLabelModel(vision, MultiLabelConfig(head_layers=3, finetune="linear_probe"))
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)
    with pytest.raises(ValueError, match="head_layers=0"):
        MultiLabelConfig(head_layers=0)


def test_the_recipe_presets_chain_and_hold_the_papers_choices() -> None:
    align = load_config(str(CONFIGS / "cxr_mae_llama_align.yaml"))
    finetune = load_config(str(CONFIGS / "cxr_mae_llama_finetune.yaml"))
    baseline = load_config(str(CONFIGS / "cxr_mae_baseline_finetune.yaml"))
    assert align.train.init_from == "runs/cxr_mae_pretrain"  # stage 1's output
    assert align.model.llama.mode == "frozen_4bit" and align.model.mae_weight == 0
    assert align.data.prompt_template
    assert finetune.train.init_from == align.train.output_dir
    assert finetune.model.multilabel.head_layers == baseline.model.multilabel.head_layers > 1
    assert baseline.model.multilabel.finetune == "linear_probe"
    assert baseline.train.init_from == "runs/cxr_mae_pretrain"
