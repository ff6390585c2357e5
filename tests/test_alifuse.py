"""The composed model: outputs, weights, gradient routing, grounded encoders, wiring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import tiny_batch, tiny_bert, tiny_config, tiny_vision, warm_up

from models.alifuse import AlifuseConfig, AlifuseModel, build_model
from models.losses import ClipLoss, mlm_loss
from models.mae import mae_loss, patchify


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    return tiny_bert(tmp_path_factory.mktemp("alifuse"))


def _model(bert_dir: str, mode: str = "lora", seed: int = 0, **overrides) -> AlifuseModel:
    torch.manual_seed(seed)
    return build_model(tiny_config(bert_dir, mode, **overrides))


def _losses(out: dict) -> dict:
    return {k: v for k, v in out.items() if k.endswith("_loss")}


def _groups(model: AlifuseModel) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    groups: dict[str, list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head = name.split(".")[0]
        key = "text_lora" if head == "text" else head
        groups.setdefault(key, []).append((name, param))
    return groups


def _nonzero(param: torch.nn.Parameter) -> bool:
    return param.grad is not None and param.grad.abs().sum().item() > 0


# ---- outputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_pretrain_outputs(bert_dir: str, spatial_dims: int) -> None:
    vision = tiny_vision(spatial_dims, in_chans=3 if spatial_dims == 2 else 1)
    model = _model(bert_dir, vision=vision)
    out = model(tiny_batch(model))  # extra keys (lists of str, ints) are ignored
    assert set(out) == {"itc_loss", "mae_loss", "mlm_loss", "logit_scale"}
    for key, value in out.items():
        assert value.shape == () and torch.isfinite(value), key
    assert not out["logit_scale"].requires_grad
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert model.logit_scale.shape == (1,)
    assert all(v.requires_grad for v in _losses(out).values())


def test_classify_outputs(bert_dir: str) -> None:
    for fusion in ("grounded", "unimodal"):
        model = _model(bert_dir, task="classify", fusion_features=fusion, cls_weight=2.0)
        batch = tiny_batch(model)
        out = model(batch)
        assert set(out) == {"logits", "cls_loss"}
        assert out["logits"].shape == (4, 3)
        expected = 2.0 * F.cross_entropy(out["logits"], batch["label"])
        torch.testing.assert_close(out["cls_loss"], expected)
        built = len(model.image_cross), len(model.text_cross)
        assert built == ((1, 1) if fusion == "grounded" else (0, 0))
        assert not hasattr(model.decoder, "blocks") and model.logit_scale is None


@pytest.mark.parametrize("key", ["itc", "mae", "mlm"])
def test_zero_weight_removes_the_objective(bert_dir: str, key: str) -> None:
    model = _model(bert_dir, **{f"{key}_weight": 0.0})
    out = model(tiny_batch(model))
    assert f"{key}_loss" not in out
    assert set(_losses(out)) == {f"{k}_loss" for k in ("itc", "mae", "mlm") if k != key}
    parts = {
        "itc": model.logit_scale is not None,
        "mae": isinstance(model.decoder, torch.nn.Module) and hasattr(model.decoder, "blocks"),
        "mlm": len(model.text_cross) > 0,
    }
    assert parts == {k: k != key for k in parts}  # not built: no parameter without gradient
    assert ("logit_scale" in out) == (key != "itc")


def test_classify_zero_weight_keeps_logits(bert_dir: str) -> None:
    model = _model(bert_dir, task="classify", cls_weight=0.0)
    assert set(model(tiny_batch(model))) == {"logits"}


def test_losses_are_weighted(bert_dir: str) -> None:
    base = _model(bert_dir)
    batch = tiny_batch(base)
    torch.manual_seed(5)
    one = _losses(base(batch))
    weighted = _model(bert_dir, itc_weight=2.0, mae_weight=0.5, mlm_weight=3.0)
    weighted.load_state_dict(base.state_dict())
    torch.manual_seed(5)
    got = _losses(weighted(batch))
    for key, factor in [("itc_loss", 2.0), ("mae_loss", 0.5), ("mlm_loss", 3.0)]:
        torch.testing.assert_close(got[key], factor * one[key])


def test_same_seed_same_masks_and_losses(bert_dir: str) -> None:
    model = _model(bert_dir).eval()
    batch = tiny_batch(model)
    torch.manual_seed(3)
    a = _losses(model(batch))
    torch.manual_seed(3)
    b = _losses(model(batch))
    c = _losses(model(batch))  # the RNG moved on: other masks
    assert a == b
    assert a["mae_loss"] != c["mae_loss"]


def test_logit_scale_is_clamped(bert_dir: str) -> None:
    model = _model(bert_dir, max_logit_scale=50.0)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    out = model(tiny_batch(model))
    assert out["logit_scale"].item() == pytest.approx(50.0)
    out["itc_loss"].backward()
    assert model.logit_scale.grad.abs().sum() == 0  # beyond the clamp


# ---- gradients ---------------------------------------------------------------------------

# loss -> groups whose every trainable parameter gets a gradient / groups that get none.
ROUTES = {
    "itc_loss": (
        {"visual", "image_proj", "text_proj", "logit_scale", "text_lora"},
        {"image_cross", "text_cross", "decoder"},
    ),
    "mae_loss": (
        {"visual", "image_cross", "decoder"},
        {"image_proj", "text_proj", "logit_scale", "text_cross"},
    ),
    "mlm_loss": (
        {"text_cross", "text_lora"},
        {"image_proj", "text_proj", "logit_scale", "image_cross", "decoder"},
    ),
}


@pytest.mark.parametrize("loss_key", sorted(ROUTES))
def test_each_loss_trains_its_parts_only(bert_dir: str, loss_key: str) -> None:
    model = _model(bert_dir)
    warm_up(model)
    batch = tiny_batch(model)
    torch.manual_seed(0)
    out = model(batch)
    out[loss_key].backward()
    groups = _groups(model)
    reached, untouched = ROUTES[loss_key]
    assert set(groups) >= reached | untouched
    for group in reached:
        missing = [n for n, p in groups[group] if not _nonzero(p)]
        assert not missing, f"{loss_key} does not reach {missing}"
    for group in untouched:
        leaked = [n for n, p in groups[group] if _nonzero(p)]
        assert not leaked, f"{loss_key} reaches {leaked}"
    if loss_key == "mlm_loss":  # image tokens are the context: the image tower learns too
        assert any(_nonzero(p) for _, p in groups["visual"])


def test_gates_learn_from_the_first_step(bert_dir: str) -> None:
    model = _model(bert_dir)  # gates and LoRA B at zero, as built
    torch.manual_seed(0)
    out = model(tiny_batch(model))
    (out["mae_loss"] + out["mlm_loss"]).backward()
    for blocks in (model.image_cross, model.text_cross):
        assert all(_nonzero(b.gate_attn) and _nonzero(b.gate_mlp) for b in blocks)
    lora_b = [p for n, p in model.text.named_parameters() if "lora_B" in n]
    assert lora_b and all(_nonzero(p) for p in lora_b)


def test_classification_loss_routes(bert_dir: str) -> None:
    model = _model(bert_dir, task="classify")
    warm_up(model)
    model(tiny_batch(model))["cls_loss"].backward()
    groups = _groups(model)
    assert set(groups) == {"visual", "text_lora", "image_cross", "text_cross", "fusion_head"}
    missing = [n for params in groups.values() for n, p in params if not _nonzero(p)]
    assert not missing, f"cls_loss does not reach {missing}"


def test_frozen_text_tower_gets_no_gradient(bert_dir: str) -> None:
    model = _model(bert_dir, "frozen")
    warm_up(model)
    torch.manual_seed(0)
    out = model(tiny_batch(model))
    sum(_losses(out).values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.text.parameters())
    assert all(_nonzero(p) for p in model.text_cross.parameters())
    assert all(_nonzero(p) for p in model.text_proj.parameters())


def test_full_mode_freezes_the_unused_mlm_head_only(bert_dir: str) -> None:
    model = _model(bert_dir, "full", task="classify")
    head = model.text.mlm_head
    embeddings = model.text.encoder_model.embeddings.word_embeddings.weight
    assert head.predictions.decoder.weight is embeddings and embeddings.requires_grad
    assert not head.predictions.transform.dense.weight.requires_grad
    pretrain = _model(bert_dir, "full")
    assert pretrain.text.mlm_head.predictions.transform.dense.weight.requires_grad


# ---- grounded encoders and wiring ------------------------------------------------------------


def test_inserted_cross_blocks_leave_outputs_unchanged_at_init(bert_dir: str) -> None:
    model = _model(bert_dir, cross_layers_image=2, cross_layers_text=2).eval()
    batch = tiny_batch(model)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        trunk = model.visual.forward_blocks(
            model.visual.embed(batch["image"]).tokens, 0, model.image_split
        )
        image_tokens = model.image_unimodal(trunk)
        torch.testing.assert_close(image_tokens, model.visual.forward_features(batch["image"]))
        text_tokens = model.text.forward_features(ids, attention)
        grounded = model.image_grounded(trunk, text_tokens, attention.bool())
        torch.testing.assert_close(grounded, image_tokens, atol=0, rtol=0)
        text_grounded = model.text_grounded(model.text.embed(ids), attention, image_tokens)
        torch.testing.assert_close(text_grounded, text_tokens, atol=0, rtol=0)
        warm_up(model)
        assert not torch.allclose(
            model.image_grounded(trunk, text_tokens, attention.bool()), image_tokens
        )


def test_cross_blocks_sit_after_the_last_layers(bert_dir: str) -> None:
    model = _model(bert_dir, cross_layers_image=2, cross_layers_text=1)
    assert list(model._image_cross_at()) == [0, 1] and model.image_split == 1
    assert list(model._text_cross_at()) == [1] and model.text_split == 2
    with pytest.raises(ValueError, match="cross_layers_text=3"):
        _model(bert_dir, cross_layers_text=3)  # the tiny BERT has 2 layers


def test_pretrain_wiring_equals_manual_composition(bert_dir: str) -> None:
    """The forward equals the documented data flow, written out with the public parts."""
    model = _model(bert_dir).eval()
    warm_up(model)
    batch = tiny_batch(model)
    image, ids, attention = batch["image"], batch["input_ids"], batch["attention_mask"]
    cfg = model.cfg
    with torch.no_grad():
        torch.manual_seed(7)
        out = model(batch)
        torch.manual_seed(7)
        emb = model.visual.embed(image, cfg.vision.mask_ratio)
        visible = model.visual.norm(model.visual.forward_blocks(emb.tokens))  # unimodal
        text = model.text.forward_features(ids, attention)
        itc = ClipLoss()(
            F.normalize(model.image_proj(visible[:, 0]), dim=-1),
            F.normalize(model.text_proj(text[:, 0]), dim=-1),
            model.logit_scale.exp(),
        )
        x = emb.tokens
        for block, cross in zip(model.visual.blocks, [None, model.image_cross[0]], strict=True):
            x = block(x)
            x = x if cross is None else cross(x, text, attention.bool())
        pred = model.decoder(model.visual.norm(x), emb.ids_restore)
        mae = mae_loss(pred, patchify(image, 4), emb.mask, True)
        masked_ids, labels = model.text.mask_tokens(ids, attention, cfg.text.mlm_probability)
        h = model.text.embed(masked_ids)
        h = model.text.run_layers(h, attention, 0, 2)
        h = model.text_cross[0](h, visible)
        mlm = mlm_loss(model.text.mlm_logits(h), labels)
    torch.testing.assert_close(out["itc_loss"], itc)
    torch.testing.assert_close(out["mae_loss"], mae)
    torch.testing.assert_close(out["mlm_loss"], mlm)
    assert (labels != -100).any()


def test_itc_equals_clip_loss_on_encoders_without_masking(bert_dir: str) -> None:
    model = _model(bert_dir, vision=tiny_vision(3, mask_ratio=0.0), mae_weight=0.0, mlm_weight=0.0)
    model.eval()
    batch = tiny_batch(model)
    with torch.no_grad():
        out = model(batch)
        states = model(batch, embed=True)
        image, text = states["image"]["emb"], states["text"]["emb"]
    assert image.shape == text.shape == (4, 16)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out["itc_loss"], ClipLoss()(image, text, model.logit_scale.exp()))


def test_encoders_need_the_itc_heads(bert_dir: str) -> None:
    model = _model(bert_dir, task="classify")
    with pytest.raises(RuntimeError, match="itc_weight"):
        model({"image": torch.zeros(1, 1, 16, 16, 16)}, embed=True)


def test_no_weight_decay_names(bert_dir: str) -> None:
    model = _model(bert_dir, "full")
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert {"visual.cls_token", "logit_scale", "decoder.mask_token"} <= names
    assert "image_cross.0.gate_attn" in names and "visual.norm.weight" in names
    assert "visual.blocks.0.attn.qkv.bias" in names
    assert "visual.blocks.0.attn.qkv.weight" not in names
    assert all(n in params for n in names)
    assert all(params[n].ndim <= 1 for n in names - {"visual.cls_token", "decoder.mask_token"})


def test_bad_model_config_raises(bert_dir: str) -> None:
    vision = tiny_vision(3)
    with pytest.raises(ValueError, match="cross_layers_image=3"):
        AlifuseConfig(vision=vision, cross_layers_image=3)
    with pytest.raises(ValueError, match="task=pretrain has nothing to train"):
        AlifuseConfig(itc_weight=0.0, mae_weight=0.0, mlm_weight=0.0)
    with pytest.raises(ValueError, match="mask_ratio=0"):
        AlifuseConfig(vision=tiny_vision(3, mask_ratio=0.0))
    with pytest.raises(ValueError, match="max_logit_scale=10"):
        AlifuseConfig(max_logit_scale=10.0)
    with pytest.raises(ValueError, match="itc_weight=-1"):
        AlifuseConfig(itc_weight=-1.0)
    with pytest.raises(ValueError, match="num_classes=1"):
        AlifuseConfig(num_classes=1)
    assert math.isclose(AlifuseConfig().init_temperature, 0.07)


def test_image_only_mae_needs_no_text_tower() -> None:
    cfg = AlifuseConfig(
        vision=tiny_vision(2),
        text_tower="none",
        itc_weight=0.0,
        mlm_weight=0.0,
        cross_layers_image=0,
    )
    model = build_model(cfg)
    assert model.text is None and model.tokenizer is None
    out = model({"image": torch.randn(3, 1, 16, 16)})  # no text in the batch
    assert set(out) == {"mae_loss"}
    out["mae_loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="itc_weight=1.0: itc needs both towers"):
        AlifuseConfig(
            vision=tiny_vision(2), text_tower="none", mlm_weight=0.0, cross_layers_image=0
        )
