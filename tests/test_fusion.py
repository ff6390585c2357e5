"""The fusion classifier: encoders, the three fusion modes, padding, gradients, training, configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.fusion import (
    CnnConfig,
    CnnEncoder,
    FusionConfig,
    FusionModel,
    RnnTextConfig,
    RnnTextEncoder,
    masked_mean,
)
from models.vit import VisionConfig

MODES = ["early", "late", "intermediate"]
IMG = 16  # side of the synthetic images and volumes
VOCAB = 32
PAD, CLASS_TOKENS = 0, (1, 2)  # id 1 appears in class-0 texts, id 2 in class-1 texts


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and lose much to them on a busy box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(mode: str, spatial_dims: int = 2, cell: str = "gru", **overrides) -> FusionConfig:
    """2D: 2-channel 16^2 image; 3D: 1-channel 16^3 volume; both end on a 2^d map of width 16."""
    image = CnnConfig(
        spatial_dims=spatial_dims,
        in_chans=2 if spatial_dims == 2 else 1,
        widths=[8, 16],
        blocks_per_stage=[1, 1],
        norm_groups=4,
    )
    text = RnnTextConfig(
        vocab_size=VOCAB, embed_dim=16, hidden_size=12, num_layers=1, cell=cell, dropout=0.0
    )
    base = dict(image=image, text=text, mode=mode, dim=16, num_heads=2, depth=1, hidden=32)
    return FusionConfig(**{**base, "dropout": 0.0, **overrides})


def make_model(
    cfg: FusionConfig, seed: int = 0, num_classes: int = 2, cls_weight: float = 1.0
) -> FusionModel:
    torch.manual_seed(seed)
    return FusionModel(cfg, num_classes, cls_weight)


def separable_batch(cfg: FusionConfig, batch_size: int = 8, length: int = 10, seed: int = 0):
    """Class 1: a bright square somewhere in the image and token 2 in the text; class 0: no
    square and token 1. Texts are right-padded to `length` with varying lengths."""
    gen = torch.Generator().manual_seed(seed)
    sd, chans = cfg.image.spatial_dims, cfg.image.in_chans
    label = torch.arange(batch_size) % 2
    image = 0.1 * torch.randn((batch_size, chans) + (IMG,) * sd, generator=gen)
    input_ids = torch.randint(3, VOCAB, (batch_size, length), generator=gen)
    lengths = torch.randint(4, length + 1, (batch_size,), generator=gen)
    attention_mask = (torch.arange(length) < lengths[:, None]).long()
    for i in range(batch_size):
        if label[i]:
            corner = torch.randint(0, IMG - 6, (sd,), generator=gen).tolist()
            image[(i, slice(None)) + tuple(slice(c, c + 6) for c in corner)] += 1.0
        pos = int(torch.randint(0, int(lengths[i]), (1,), generator=gen))
        input_ids[i, pos] = CLASS_TOKENS[int(label[i])]
    input_ids[attention_mask == 0] = PAD
    return {
        "image": image,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "label": label,
        "key": [f"s{i}" for i in range(batch_size)],  # extra keys are ignored
        "worker": 0,
    }


# ---- encoders -------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("norm", ["group", "batch"])
def test_cnn_tokens_and_pool(spatial_dims: int, norm: str) -> None:
    cfg = CnnConfig(
        spatial_dims=spatial_dims,
        in_chans=3,
        widths=[8, 16, 24],
        blocks_per_stage=[1, 2, 1],
        norm=norm,
        norm_groups=4,
    )
    enc = CnnEncoder(cfg)
    x = torch.randn((2, 3) + (32,) * spatial_dims)
    tokens = enc.forward_features(x)
    # stem /4, two more strided stages /4: a 2^d map
    assert tokens.shape == (2, 2**spatial_dims, 24)
    assert enc.pool(tokens).shape == (2, 24)
    torch.testing.assert_close(enc(x), tokens.mean(1))
    with pytest.raises(ValueError, match="spatial dims"):
        enc.forward_features(torch.randn((2, 3) + (32,) * (5 - spatial_dims)))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_rnn_states_and_masked_pool(cell: str, bidirectional: bool) -> None:
    cfg = RnnTextConfig(
        vocab_size=VOCAB,
        embed_dim=8,
        hidden_size=6,
        num_layers=2,
        cell=cell,
        bidirectional=bidirectional,
        dropout=0.0,
    )
    enc = RnnTextEncoder(cfg)
    ids = torch.randint(1, VOCAB, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6])
    h = enc.forward_features(ids, mask)
    width = 12 if bidirectional else 6
    assert enc.out_dim == width and h.shape == (3, 7, width)
    assert torch.all(h[mask == 0] == 0)
    pooled = enc.pool(h, mask)
    torch.testing.assert_close(pooled[1], h[1, :4].mean(0))
    # each row alone, unpadded, gives the same states: packing sees only the real tokens
    for i, n in enumerate(mask.sum(1).tolist()):
        alone = enc.forward_features(ids[i : i + 1, :n], mask[i : i + 1, :n])
        torch.testing.assert_close(alone[0], h[i, :n], atol=1e-6, rtol=1e-5)


def test_masked_mean_ignores_padding() -> None:
    h = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    out = masked_mean(h, mask)
    torch.testing.assert_close(out[0], h[0, :2].mean(0))
    torch.testing.assert_close(out[1], h[1].mean(0))


def test_text_mask_must_be_right_padded_and_non_empty() -> None:
    enc = RnnTextEncoder(RnnTextConfig(vocab_size=VOCAB, embed_dim=8, hidden_size=4))
    ids = torch.randint(1, VOCAB, (2, 4))
    with pytest.raises(ValueError, match="right padding"):
        enc.forward_features(ids, torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="at least one real token"):
        enc.forward_features(ids, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))


# ---- the composed model ---------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_outputs(mode: str, spatial_dims: int) -> None:
    cfg = tiny_config(mode, spatial_dims)
    model = make_model(cfg, num_classes=3, cls_weight=2.0)
    batch = separable_batch(cfg, batch_size=4)
    batch["label"] = torch.tensor([0, 1, 2, 1])
    out = model(batch)
    assert set(out) == {"cls_loss", "logits"}
    assert out["logits"].shape == (4, 3)
    assert out["cls_loss"].shape == () and torch.isfinite(out["cls_loss"])
    expected = 2.0 * F.cross_entropy(out["logits"], batch["label"])
    torch.testing.assert_close(out["cls_loss"], expected)
    logits = model.forward_logits(batch["image"], batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(logits, out["logits"])


def _fit(model: FusionModel, batch: dict, steps: int = 40) -> list[float]:
    """`steps` Adam steps on one fixed batch; the losses."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(batch)["cls_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_trains_on_separable_batch(mode: str, spatial_dims: int) -> None:
    """40 Adam steps on one fixed batch: the loss falls below 60 % of its start, and the
    model classifies a fresh batch of the same rule (it learned the signal, not the noise)."""
    cfg = tiny_config(mode, spatial_dims)
    model = make_model(cfg)
    batch = separable_batch(cfg, batch_size=16, seed=0)
    losses = _fit(model, batch)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.6 * losses[0], losses
    held_out = separable_batch(cfg, batch_size=32, seed=1)
    model.eval()
    with torch.no_grad():
        pred = model(held_out)["logits"].argmax(-1)
    assert (pred == held_out["label"]).float().mean() >= 0.75


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("mode", MODES)
def test_padding_does_not_change_logits(mode: str, cell: str) -> None:
    cfg = tiny_config(mode, cell=cell, depth=2)
    model = make_model(cfg).eval()
    batch = separable_batch(cfg, batch_size=6)
    mask = batch["attention_mask"]
    assert (mask == 0).any()
    _warm_up(model)  # open the cross-attention gates, so text reaches the image stream
    with torch.no_grad():
        ref = model(batch)["logits"]
        other = dict(batch, input_ids=batch["input_ids"].clone())
        n_pad = int((mask == 0).sum())
        other["input_ids"][mask == 0] = torch.randint(1, VOCAB, (n_pad,))
        torch.testing.assert_close(model(other)["logits"], ref, atol=0.0, rtol=0.0)
        longer = dict(
            batch,
            input_ids=F.pad(batch["input_ids"], (0, 5), value=7),
            attention_mask=F.pad(mask, (0, 5), value=0),
        )
        torch.testing.assert_close(model(longer)["logits"], ref, atol=1e-5, rtol=1e-5)
        # and the text does matter: changing a real token changes the logits
        real = dict(batch, input_ids=batch["input_ids"].clone())
        real["input_ids"][:, 0] = (real["input_ids"][:, 0] + 1) % VOCAB
        assert not torch.allclose(model(real)["logits"], ref)


def _warm_up(model: FusionModel) -> None:
    """Moves the zero-initialised residual scales (CNN blocks' last norm, CrossBlock gates)
    off zero, as after some training, so every weight behind them is on the gradient path."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (name.startswith("image.") and name.endswith("norm2.weight")) or ".gate_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_both_encoders(mode: str) -> None:
    cfg = tiny_config(mode, spatial_dims=3, cell="lstm")
    model = make_model(cfg)
    batch = separable_batch(cfg, batch_size=4)
    model(batch)["cls_loss"].backward()
    for part in (model.image, model.text):  # at initialisation already
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    for part in (model.image.stem, model.text.rnn):
        assert all(p.grad.abs().sum() > 0 for p in part.parameters())

    model.zero_grad(set_to_none=True)
    _warm_up(model)
    model(batch)["cls_loss"].backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead, f"no gradient in mode={mode}: {dead}"


def test_modes_build_only_their_parts() -> None:
    names = {
        mode: {n for n, _ in make_model(tiny_config(mode)).named_parameters()} for mode in MODES
    }
    assert not any(n.startswith("fusion.") for n in names["late"])
    assert (
        "fusion.cls_token" in names["early"] and "fusion.blocks.0.attn.qkv.weight" in names["early"]
    )
    assert "fusion.cross.cnn.0.gate_attn" in names["intermediate"]
    assert "fusion.cross.rnn.0.attn.kv.weight" in names["intermediate"]


def test_no_weight_decay() -> None:
    model = make_model(tiny_config("early"))
    skip = model.no_weight_decay()
    assert {"fusion.cls_token", "fusion.branch_type.cnn", "fusion.branch_type.rnn"} <= skip
    assert "fusion.norm.weight" in skip and "head.0.bias" in skip
    assert "image.stem.1.weight" in skip  # a norm scale
    assert "image.stem.0.weight" not in skip and "head.0.weight" not in skip
    assert "text.embed.weight" not in skip and "text.rnn.weight_ih_l0" not in skip
    assert skip <= {n for n, _ in model.named_parameters()}


# ---- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: CnnConfig(widths=[8, 16], blocks_per_stage=[1]), "blocks_per_stage"),
        (lambda: CnnConfig(widths=[8, 16], blocks_per_stage=[1, 0]), "blocks_per_stage"),
        (lambda: CnnConfig(widths=[]), "widths"),
        (lambda: CnnConfig(widths=[8, 12], blocks_per_stage=[1, 1]), "norm_groups=8"),
        (lambda: CnnConfig(in_chans=0), "in_chans=0"),
        (lambda: RnnTextConfig(hidden_size=0), "hidden_size=0"),
        (lambda: RnnTextConfig(dropout=1.0), "dropout=1.0"),
        (lambda: FusionConfig(dim=30, num_heads=4), "num_heads=4: expected a divisor of dim=30"),
        (lambda: FusionConfig(mode="early", depth=0), "depth=0"),
        (lambda: FusionModel(tiny_config("late"), num_classes=1), "num_classes=1"),
        (lambda: FusionModel(tiny_config("late"), 2, cls_weight=0.0), "cls_weight=0.0"),
        (lambda: RnnTextConfig(vocab_size=-1), "vocab_size=-1"),
        (lambda: FusionModel(FusionConfig(), 2), "vocab_size=0: expected >= 1"),
        (lambda: FusionConfig(dropout=-0.1), "dropout=-0.1"),
        (lambda: FusionConfig(branches=[]), "branches=\\[\\]"),
        (lambda: FusionConfig(branches=["cnn", "cnn"]), "distinct names"),
        (lambda: FusionConfig(branches=["resnet"]), "distinct names from"),
        (lambda: FusionConfig(combine="attention"), "only with mode=late"),
        (lambda: FusionConfig(branches=["cnn"]), "mode=intermediate needs two branches"),
        (lambda: FusionModel(FusionConfig(branches=["vit", "cnn"]), 2), "pass the model.vision"),
    ],
)
def test_bad_configs_raise(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_late_mode_needs_no_depth() -> None:
    FusionModel(tiny_config("late", depth=0), 2)


def test_group_norm_check_is_skipped_for_batch_norm() -> None:
    CnnEncoder(CnnConfig(widths=[8, 12], blocks_per_stage=[1, 1], norm="batch"))


def test_loads_through_the_config_schema() -> None:
    from trainer.schema import ConfigError, from_dict, to_dict

    data = {
        "mode": "late",
        "image": {"spatial_dims": 2, "widths": [8, 16], "blocks_per_stage": [1, 1]},
        "text": {"cell": "lstm", "vocab_size": VOCAB},
    }
    cfg = from_dict(FusionConfig, data)
    assert cfg.image.widths == [8, 16] and cfg.text.cell == "lstm"
    assert from_dict(FusionConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="text.cell='rnn'"):
        from_dict(FusionConfig, {"text": {"cell": "rnn"}})
    with pytest.raises(ConfigError, match="image: blocks_per_stage"):
        from_dict(FusionConfig, {"image": {"widths": [8], "blocks_per_stage": [1, 1]}})


# ---- seed 002: three branches, combine modes, single-branch baselines --------------------------

VIT = VisionConfig(
    spatial_dims=2, in_chans=2, img_size=IMG, patch_size=4, embed_dim=16, depth=1, num_heads=2
)
THREE = ["cnn", "vit", "rnn"]


@pytest.mark.parametrize(
    ("mode", "combine"),
    [
        ("early", "concat"),
        ("late", "concat"),
        ("late", "weighted_sum"),
        ("late", "attention"),
        ("intermediate", "concat"),
    ],
)
def test_three_branches_train_in_every_fusion_mode(mode: str, combine: str) -> None:
    cfg = tiny_config(mode, branches=THREE, combine=combine)
    torch.manual_seed(0)
    model = FusionModel(cfg, 2, vision=VIT)
    assert model.image is not None and model.vit is not None and model.text is not None
    batch = separable_batch(cfg, batch_size=16, seed=0)
    losses = _fit(model, batch)
    assert losses[-1] < 0.6 * losses[0], losses
    if combine == "weighted_sum":
        weights = model.fusion.branch_weights()
        assert weights.shape == (3,) and torch.isclose(weights.sum(), torch.tensor(1.0))
        assert not torch.allclose(weights, torch.full((3,), 1 / 3))  # the weights learned
    fused = model.fusion(model.streams(batch["image"], batch["input_ids"], batch["attention_mask"]))
    assert fused.shape == (16, model.fusion.out_dim)


@pytest.mark.parametrize(
    "branches", [["cnn"], ["vit"], ["rnn"], ["vit", "rnn"], ["cnn", "rnn"], ["cnn", "vit"]]
)
def test_single_branch_baselines_and_ablations_hold_only_their_branches(branches) -> None:
    cfg = tiny_config("late", branches=branches)
    model = FusionModel(cfg, 3, vision=VIT)
    parts = {"cnn": "image.", "vit": "vit.", "rnn": "text."}
    names = {n for n, _ in model.named_parameters()}
    for branch, prefix in parts.items():
        assert any(n.startswith(prefix) for n in names) == (branch in branches), branch
    batch = separable_batch(cfg, batch_size=4)
    batch["label"] = torch.tensor([0, 1, 2, 1])
    if "rnn" not in branches:  # an image-only model needs no text in its batches
        del batch["input_ids"], batch["attention_mask"]
        assert model.tokenizer is None
    out = model(batch)
    assert out["logits"].shape == (4, 3) and torch.isfinite(out["cls_loss"])
