"""The attention maps behind the figures: what they sum to, and words built from tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import tiny_batch, tiny_bert, tiny_config, tiny_vision

from models.alifuse import build_model
from models.attention import eager_attention
from trainer.figures import image_cls_attention, modality_gap, text_cls_attention, words


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_config(
        tiny_bert(tmp_path_factory.mktemp("fig")), "full", vision=tiny_vision(3, mask_ratio=0.5)
    )
    return build_model(cfg).eval()


def test_image_attention_is_the_last_blocks_cls_row(model) -> None:
    image = torch.randn(2, 1, 16, 16, 16)
    maps = image_cls_attention(model, image)
    assert maps.shape == (2, 4, 4, 4)
    with torch.no_grad():
        x = model.visual.embed(image).tokens
        for block in model.visual.blocks[:-1]:
            x = block(x)
        block = model.visual.blocks[-1]
        q, k, v = block.attn.project(block.norm1(x))
        # eager attention of a one-hot value picks out the attention weights themselves
        eye = torch.eye(k.shape[2]).expand(2, k.shape[1], -1, -1)
        weights = eager_attention(q, k, eye)[:, :, 0].mean(1)  # (B, T)
    torch.testing.assert_close(maps.flatten(1), weights[:, 1:])
    assert torch.all(maps.flatten(1).sum(1) < 1) and torch.all(maps >= 0)
    assert not torch.allclose(maps[0], maps[1])


def test_text_attention_ignores_padding(model) -> None:
    batch = tiny_batch(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    maps = text_cls_attention(model, ids, mask)
    torch.testing.assert_close(maps.sum(1), torch.ones(4))
    assert torch.all(maps[mask == 0] == 0)


def test_words_sum_their_pieces(model) -> None:
    tok = model.tokenizer
    text = "The MMSE score is 29.3 and hippocampal atrophy"
    enc = tok(text)
    weights = np.arange(len(enc["input_ids"]), dtype=float)
    mask = torch.ones(len(enc["input_ids"]))
    got = words(text, tok, weights, mask)
    assert [w for w, _ in got] == text.split()
    assert sum(w for _, w in got) == pytest.approx(weights[1:-1].sum())  # all but [CLS], [SEP]


def test_modality_gap_is_the_centroid_distance() -> None:
    emb = {
        "image": np.array([[1.0, 0.0], [0.0, 1.0]]),
        "text": np.array([[-1.0, 0.0], [0.0, -1.0]]),
    }
    assert modality_gap(emb) == pytest.approx(np.sqrt(2))
