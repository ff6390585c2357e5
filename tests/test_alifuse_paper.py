"""The Alifuse paper's model: joint training (eq. 5), cross-attention between self-attention and
MLP in every grounded block, unimodal ITC on the whole image, learnable positions, the text
decoder, one mask ratio."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import tiny_batch, tiny_bert, tiny_config, tiny_vision, warm_up

from models.alifuse import AlifuseConfig, AlifuseModel, build_model
from models.attention import Block, CrossAttentionLayer
from models.text_decoder import TextDecoder
from models.vit import sincos_pos_embed

PAPER = dict(
    task="joint",
    cross_attention="between",
    cross_layers_image="all",
    cross_layers_text="all",
    unimodal_image="full",
    shared_mask_ratio=True,
    fusion_features="unimodal",
    fusion_activation="relu",
)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    return tiny_bert(tmp_path_factory.mktemp("paper"))


def _paper(bert_dir: str, seed: int = 0, **overrides) -> AlifuseModel:
    torch.manual_seed(seed)
    vision = tiny_vision(3, mask_ratio=0.5, pos_embed="learnable")
    cfg = {**PAPER, "vision": vision, **overrides}
    cfg.setdefault("text_decoder", {"kind": "transformer", "depth": 2, "width": 32, "num_heads": 2})
    if isinstance(cfg["text_decoder"], dict):
        from models.text_decoder import TextDecoderConfig

        cfg["text_decoder"] = TextDecoderConfig(**cfg["text_decoder"])
    return build_model(tiny_config(bert_dir, "full", **cfg))


def _groups(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    groups: dict[str, list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(name.split(".")[0], []).append((name, param))
    return groups


def _reached(param: torch.nn.Parameter) -> bool:
    return param.grad is not None and param.grad.abs().sum().item() > 0


# loss -> parts whose every trainable parameter it reaches / parts it must not touch. The text
# tower's own parameters ("text") are shared by ITC, MLM and the classifier; its MLM head is
# frozen when the transformer decoder predicts the tokens.
JOINT_ROUTES = {
    "itc_loss": (
        {"image_proj", "text_proj", "logit_scale"},
        {"image_cross", "text_cross", "decoder", "text_decoder", "fusion_head"},
    ),
    "mae_loss": (
        {"image_cross", "decoder"},
        {"image_proj", "text_proj", "logit_scale", "text_cross", "text_decoder", "fusion_head"},
    ),
    "mlm_loss": (
        {"text_cross", "text_decoder"},
        {"image_proj", "text_proj", "logit_scale", "image_cross", "decoder", "fusion_head"},
    ),
    "cls_loss": (
        {"fusion_head"},
        {"image_proj", "text_proj", "logit_scale", "image_cross", "text_cross", "decoder"},
    ),
}


@pytest.mark.parametrize("placement", ["between", "after"])
@pytest.mark.parametrize("loss_key", sorted(JOINT_ROUTES))
def test_joint_training_moves_each_objectives_parts(bert_dir, placement, loss_key) -> None:
    overrides = {} if placement == "between" else {"cross_attention": "after"}
    model = _paper(bert_dir, **overrides)
    warm_up(model)
    out = model(tiny_batch(model))
    assert set(out) == {"itc_loss", "mae_loss", "mlm_loss", "cls_loss", "logits", "logit_scale"}
    out[loss_key].backward()
    groups = _groups(model)
    reached, untouched = JOINT_ROUTES[loss_key]
    for part in reached | {"visual"} if loss_key != "mlm_loss" else reached:
        missing = [n for n, p in groups[part] if not _reached(p)]
        assert not missing, f"{loss_key} does not reach {missing}"
    for part in untouched:
        leaked = [n for n, p in groups.get(part, []) if _reached(p)]
        assert not leaked, f"{loss_key} reaches {leaked}"
    if loss_key != "mae_loss":  # the text encoder serves ITC, MLM and the classifier
        assert any(_reached(p) for _, p in groups["text"])


def test_joint_sum_trains_every_parameter(bert_dir) -> None:
    model = _paper(bert_dir)
    warm_up(model)
    out = model(tiny_batch(model))
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    idle = [n for n, p in model.named_parameters() if p.requires_grad and not _reached(p)]
    assert not idle, f"no gradient: {idle}"


def test_joint_losses_are_the_weighted_terms_of_the_two_passes(bert_dir) -> None:
    base = _paper(bert_dir)
    batch = tiny_batch(base)
    torch.manual_seed(4)
    one = base(batch)
    weighted = _paper(bert_dir, itc_weight=2.0, mae_weight=0.5, mlm_weight=3.0, cls_weight=0.25)
    weighted.load_state_dict(base.state_dict())
    torch.manual_seed(4)
    got = weighted(batch)
    for key, factor in [("itc", 2.0), ("mae", 0.5), ("mlm", 3.0), ("cls", 0.25)]:
        torch.testing.assert_close(got[f"{key}_loss"], factor * one[f"{key}_loss"])
    # The classifier and ITC see the whole image: the same logits without any masking.
    torch.testing.assert_close(one["logits"], got["logits"])


def test_unimodal_itc_on_the_whole_image_differs_from_the_masked_shortcut(bert_dir) -> None:
    full = _paper(bert_dir).eval()
    masked = _paper(bert_dir, unimodal_image="masked").eval()
    masked.load_state_dict(full.state_dict())
    batch = tiny_batch(full)
    with torch.no_grad():
        torch.manual_seed(1)
        a = full(batch)
        torch.manual_seed(1)
        b = masked(batch)
        torch.manual_seed(1)
        itc_full = full(batch, embed=True)  # ITC states of the whole inputs
    # The whole-image ITC equals the embedding pass's; the shortcut's is computed on 50 % of
    # the patches, and its MAE pass (sharing the masked trunk) draws the same mask.
    scale = full.scale()
    from models.losses import ClipLoss

    expected = ClipLoss()(itc_full["image"]["emb"], itc_full["text"]["emb"], scale)
    torch.testing.assert_close(a["itc_loss"], expected)
    assert not torch.allclose(a["itc_loss"], b["itc_loss"])
    torch.testing.assert_close(a["mae_loss"], b["mae_loss"])
    torch.testing.assert_close(a["logits"], b["logits"])


def test_paper_structure(bert_dir) -> None:
    model = _paper(bert_dir)
    cfg = model.cfg
    assert len(model.image_cross) == cfg.vision.depth and model.image_split == 0
    assert len(model.text_cross) == len(model.text.layers) and model.text_split == 0
    assert all(isinstance(m, CrossAttentionLayer) for m in [*model.image_cross, *model.text_cross])
    assert isinstance(model.text_decoder, TextDecoder)
    assert isinstance(model.visual.pos_embed, torch.nn.Parameter)
    assert isinstance(model.fusion_head[1], torch.nn.ReLU)
    assert model.fusion_head[0].in_features == cfg.vision.embed_dim + model.text.hidden_size
    # The MLM head is not used with the decoder: frozen (its tied embedding still trains).
    assert not model.text.mlm_head.predictions.transform.dense.weight.requires_grad


def test_one_mask_ratio_masks_the_text_at_the_image_ratio(bert_dir) -> None:
    model = _paper(bert_dir)
    batch = tiny_batch(model, batch_size=64)
    seen = {}

    def spy(ids, mask, probability):
        seen["p"] = probability
        return original(ids, mask, probability)

    original = model.text.mask_tokens
    model.text.mask_tokens = spy
    model(batch)
    assert seen["p"] == 0.5 == model.cfg.vision.mask_ratio
    own = _paper(bert_dir, shared_mask_ratio=False)
    own.text.mask_tokens = spy
    own(batch)
    assert seen["p"] == own.cfg.text.mlm_probability


# ---- cross-attention between self-attention and MLP --------------------------------------


def test_vit_block_with_cross_attention_equals_hand_composition() -> None:
    torch.manual_seed(0)
    block, cross = Block(24, 3, mlp_ratio=2.0), CrossAttentionLayer(24, 3, context_dim=16)
    for p in cross.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, ctx = torch.randn(2, 5, 24), torch.randn(2, 7, 16)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1] * 7]).bool()
    from models.vit import grounded_block

    got = grounded_block(block, cross, x, ctx, keep)
    h = x + block.attn(block.norm1(x))
    h = h + cross.attn(cross.norm(h), cross.norm_context(ctx), keep)
    h = h + block.mlp(block.norm2(h))
    torch.testing.assert_close(got, h)
    # Padding in the context is never attended: changing it leaves the output unchanged.
    ctx2 = ctx.clone()
    ctx2[0, 4:] = 100.0
    torch.testing.assert_close(grounded_block(block, cross, x, ctx2, keep), got)


def test_vit_forward_blocks_runs_the_layer_inside_each_grounded_block(bert_dir) -> None:
    model = _paper(bert_dir).eval()
    warm_up(model)
    x = model.visual.embed(torch.randn(2, 1, 16, 16, 16)).tokens
    ctx, keep = torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.bool)
    with torch.no_grad():
        got = model.image_grounded(x, ctx, keep)
        h = x
        for block, cross in zip(model.visual.blocks, model.image_cross, strict=True):
            h = block.attend(h)
            h = h + cross.attn(cross.norm(h), cross.norm_context(ctx), keep)
            h = block.feed_forward(h)
    torch.testing.assert_close(got, model.visual.norm(h))


def test_bert_layer_with_cross_attention_equals_hand_composition(bert_dir) -> None:
    model = _paper(bert_dir).eval()
    for p in model.text_cross.parameters():
        torch.nn.init.normal_(p, std=0.2)
    batch = tiny_batch(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image = torch.randn(4, 9, 48)
    with torch.no_grad():
        got = model.text_grounded(model.text.embed(ids), mask, image)
        h = model.text.embed(ids)
        layer_mask = model.text.layer_mask(h, mask)
        for layer, cross in zip(model.text.layers, model.text_cross, strict=True):
            h = layer.attention(h, attention_mask=layer_mask)[0]  # BERT self-attention sublayer
            h = cross.norm(h + cross.attn(h, cross.norm_context(image)))  # post-norm, as BERT
            h = layer.output(layer.intermediate(h), h)  # BERT feed-forward sublayer
    torch.testing.assert_close(got, h)


# ---- position embeddings -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sincos", "learnable"])
def test_both_position_embeddings_train(bert_dir, kind) -> None:
    model = _paper(bert_dir, vision=tiny_vision(3, mask_ratio=0.5, pos_embed=kind))
    table = sincos_pos_embed(48, (4, 4, 4))[None]
    torch.testing.assert_close(model.visual.pos_embed.detach(), table)  # same start
    assert ("visual.pos_embed" in model.state_dict()) == (kind == "learnable")
    assert isinstance(model.visual.pos_embed, torch.nn.Parameter) == (kind == "learnable")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = tiny_batch(model, batch_size=8)
    losses = []
    for step in range(8):
        torch.manual_seed(step % 2)
        out = model(batch)
        loss = sum(v for k, v in out.items() if k.endswith("_loss"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-2] < losses[0] and losses[-1] < losses[1]  # same masks, lower loss
    moved = not torch.equal(model.visual.pos_embed.detach(), table)
    assert moved == (kind == "learnable")
    assert "visual.pos_embed" in model.no_weight_decay() or kind == "sincos"


# ---- configuration rules -----------------------------------------------------------------


def test_joint_and_tower_rules_are_config_errors(bert_dir) -> None:
    with pytest.raises(ValueError, match="cls_weight=0 with task=joint"):
        AlifuseConfig(task="joint", cls_weight=0.0)
    with pytest.raises(ValueError, match="itc needs both towers"):
        AlifuseConfig(task="joint", image_tower="none", cross_layers_text=0, mae_weight=0)
    with pytest.raises(ValueError, match="mae needs an image tower"):
        AlifuseConfig(task="joint", image_tower="none", itc_weight=0, cross_layers_text=0)
    with pytest.raises(ValueError, match="fusion_features=grounded needs both towers"):
        AlifuseConfig(task="classify", text_tower="none", cross_layers_image=0)
    with pytest.raises(ValueError, match="expected 'all' or a value"):
        AlifuseConfig(cross_layers_image=-1)
    with pytest.raises(ValueError, match="mlm_weight=nan"):
        AlifuseConfig(mlm_weight=float("nan"))


@pytest.mark.parametrize("tower", ["image", "text"])
def test_one_tower_models_train_jointly(bert_dir, tower) -> None:
    """Alifuse-I / Alifuse-T: classification plus the one reconstruction that has its input."""
    if tower == "image":
        overrides = dict(text_tower="none", itc_weight=0.0, mlm_weight=0.0, cross_layers_image=0)
        cfg = tiny_config(bert_dir, "full", **{**PAPER, **overrides})
        model = build_model(cfg)
        assert model.text is None and model.tokenizer is None
        batch = {"image": torch.randn(3, 1, 16, 16, 16), "label": torch.tensor([0, 1, 2])}
        expected = {"mae_loss", "cls_loss", "logits"}
    else:
        overrides = dict(image_tower="none", itc_weight=0.0, mae_weight=0.0, cross_layers_text=0)
        model = build_model(tiny_config(bert_dir, "full", **{**PAPER, **overrides}))
        assert model.visual is None
        batch = tiny_batch(model, batch_size=3)
        batch.pop("image")
        expected = {"mlm_loss", "cls_loss", "logits"}
    out = model(batch)
    assert set(out) == expected
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not idle
    width = 48 if tower == "image" else model.text.hidden_size
    assert model.fusion_head[0].in_features == width


@pytest.mark.parametrize("unimodal", ["masked", "full"])
def test_the_image_mask_is_each_steps_first_random_draw(bert_dir, unimodal) -> None:
    """In training mode the text tower's dropout draws random numbers too: the image mask
    comes first, so a seed fixes it whatever else the step computes."""
    model = _paper(bert_dir, unimodal_image=unimodal).train()
    model.text.hf_model.config.hidden_dropout_prob = 0.1
    batch = tiny_batch(model)
    seen = []
    embed = model.visual.embed

    def spy(image, mask_ratio=0.0):
        out = embed(image, mask_ratio)
        if mask_ratio:
            seen.append(out.mask)
        return out

    model.visual.embed = spy
    torch.manual_seed(11)
    model(batch)
    torch.manual_seed(11)
    first = embed(batch["image"], model.cfg.vision.mask_ratio).mask
    assert len(seen) == 1 and torch.equal(seen[0], first)
