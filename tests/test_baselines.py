"""The Table II baseline classifiers (models/baselines.py): loss and gradients of every arch,
MONAI ResNet depths, MedicalNet checkpoint loading, text padding masks, config checks."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import TEXTS, tiny_bert, tiny_vision
from monai.networks.nets import ResNet, resnet18
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

from models.baselines import (
    ARCHS,
    IMAGE_ONLY_ARCHS,
    BaselineClassifier,
    BaselineConfig,
    IreneConfig,
    PerceiverConfig,
    ResNetConfig,
    build_baseline,
)
from models.text import TextConfig

BATCH = 4
CLS_WEIGHT = 0.5
BLOCKS = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 50: [3, 4, 6, 3]}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and lose much to them on a busy box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return tiny_bert(tmp_path_factory.mktemp("baselines"))


def tiny_config(depth: int = 10, pretrained: str = "", **overrides) -> BaselineConfig:
    base = dict(
        resnet=ResNetConfig(depth=depth, widen_factor=0.25, pretrained=pretrained),
        perceiver=PerceiverConfig(
            d_model=32,
            num_latents=8,
            d_latents=32,
            num_self_attends_per_block=2,
            num_self_attention_heads=2,
        ),
        irene=IreneConfig(dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    )
    return BaselineConfig(**{**base, **overrides})


def build(
    arch: str, checkpoint: str, cfg: BaselineConfig | None = None, max_length: int = 12, seed=0
) -> BaselineClassifier:
    torch.manual_seed(seed)
    text = TextConfig(checkpoint=checkpoint, mode="full", max_length=max_length)
    cfg = tiny_config() if cfg is None else cfg
    return build_baseline(arch, cfg, tiny_vision(), text, 3, CLS_WEIGHT)


def make_batch(model: BaselineClassifier, max_length: int = 12, seed: int = 0) -> dict:
    """16^3 volumes, labels, text when the model has a tokenizer, and keys to ignore."""
    gen = torch.Generator().manual_seed(seed)
    batch = {
        "image": torch.randn(BATCH, 1, 16, 16, 16, generator=gen),
        "label": torch.tensor([0, 1, 2, 1]),
        "key": [f"s{i}" for i in range(BATCH)],
        "valid": torch.ones(BATCH, dtype=torch.bool),
    }
    if model.tokenizer is not None:
        enc = model.tokenizer(
            TEXTS[:BATCH], padding="max_length", max_length=max_length, return_tensors="pt"
        )
        batch.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return batch


def medicalnet_state(seed: int) -> dict[str, torch.Tensor]:
    """A MedicalNet-format state dict: the trunk of a MONAI ResNet-18 in Med3D's variant
    (shortcut A, as MONAI's get_medicalnet_pretrained_resnet_args(18)), widen 0.25, under
    DataParallel's `module.` prefix, with Med3D's segmentation head."""
    torch.manual_seed(seed)
    net = resnet18(
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_stride=2,
        widen_factor=0.25,
        shortcut_type="A",
        bias_downsample=True,
        feed_forward=False,
    )
    for m in net.modules():  # non-default running stats, so that buffers are checked too
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-1, 1)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.randn(8, 128, 3, 3, 3)  # Med3D's seg head
    state["module.conv_seg.0.bias"] = torch.randn(8)
    return state


@pytest.fixture(scope="module")
def medicalnet_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("medicalnet") / "resnet_18_23dataset.pth"
    torch.save({"state_dict": medicalnet_state(seed=1)}, path)
    return str(path)


# ---- every arch -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_logits_and_gradients(arch, checkpoint, medicalnet_file):
    cfg = tiny_config(depth=18, pretrained=medicalnet_file) if arch == "medicalnet" else None
    model = build(arch, checkpoint, cfg)
    assert (model.tokenizer is None) == (arch in IMAGE_ONLY_ARCHS)
    batch = make_batch(model)
    if model.tokenizer is None:
        assert "input_ids" not in batch  # image-only models read no text
    model.train()
    out = model(batch)
    assert out["logits"].shape == (BATCH, 3)
    assert torch.isfinite(out["cls_loss"])
    expected = CLS_WEIGHT * F.cross_entropy(out["logits"].float(), batch["label"])
    torch.testing.assert_close(out["cls_loss"], expected)
    out["cls_loss"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"{arch}: no gradient for {no_grad}"


@pytest.mark.parametrize("arch", ARCHS)
def test_no_weight_decay(arch, checkpoint, medicalnet_file):
    cfg = tiny_config(depth=18, pretrained=medicalnet_file) if arch == "medicalnet" else None
    model = build(arch, checkpoint, cfg)
    params = dict(model.named_parameters())
    names = model.no_weight_decay()
    assert names <= set(params)
    assert {n for n, p in params.items() if p.ndim <= 1} <= names
    assert "head.fc.weight" not in names
    named = {
        "vit": {"backbone.vit.cls_token"},
        "bert": {"backbone.tower.hf_model.bert.embeddings.position_embeddings.weight"},
        "perceiver": {"backbone.perceiver.embeddings.latents", "backbone.embed.text_pos"},
        "irene": {"backbone.cls_token", "backbone.embed.image_pos", "backbone.embed.text_type"},
    }
    assert named.get(arch, set()) <= names
    assert not any(n.endswith("word_embeddings.weight") for n in names)


def test_head_dropout(checkpoint):
    model = build("vit", checkpoint, tiny_config(dropout=0.5))
    assert isinstance(model.head.drop, nn.Dropout) and model.head.drop.p == 0.5
    assert isinstance(model.head.norm, nn.LayerNorm)
    resnet = build("resnet3d", checkpoint, tiny_config(dropout=0.5))
    assert isinstance(resnet.head.drop, nn.Dropout)
    assert isinstance(resnet.head.norm, nn.Identity)


# ---- ResNets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "widen", "block"),
    [(10, 0.25, ResNetBlock), (18, 0.25, ResNetBlock), (50, 0.125, ResNetBottleneck)],
)
def test_resnet3d_depth(depth, widen, block, checkpoint):
    cfg = tiny_config(resnet=ResNetConfig(depth=depth, widen_factor=widen))
    model = build("resnet3d", checkpoint, cfg)
    net = model.backbone.net
    assert isinstance(net, ResNet)
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    assert [len(s) for s in stages] == BLOCKS[depth]
    assert all(isinstance(b, block) for s in stages for b in s)
    assert net.fc is None  # the classifier is the model's head
    assert net.conv1.stride == (2, 2, 2)  # not MONAI's default stride-1 stem
    assert model.head.fc.in_features == int(512 * widen) * block.expansion
    assert isinstance(net.layer2[0].downsample, nn.Sequential)  # shortcut B
    assert model.eval()(make_batch(model))["logits"].shape == (BATCH, 3)


def test_resnet3d_refuses_pretrained(checkpoint, medicalnet_file):
    with pytest.raises(ValueError, match="use arch medicalnet"):
        build("resnet3d", checkpoint, tiny_config(pretrained=medicalnet_file))


def test_medicalnet_loads_trunk(checkpoint, medicalnet_file):
    model = build("medicalnet", checkpoint, tiny_config(depth=18, pretrained=medicalnet_file))
    net = model.backbone.net
    assert isinstance(net.layer2[0].downsample, functools.partial)  # Med3D's shortcut A
    assert net.conv1.stride == (2, 2, 2)  # Med3D's stem
    expected = medicalnet_state(seed=1)
    loaded = net.state_dict()
    trunk = {k: v for k, v in expected.items() if not k.startswith("module.conv_seg")}
    assert {f"module.{k}" for k in loaded} == set(trunk)
    for key, value in trunk.items():
        torch.testing.assert_close(loaded[key.removeprefix("module.")], value, msg=key)
    # and not by chance: a net that loaded nothing (seed 0) differs from the file (seed 1)
    fresh = build("resnet3d", checkpoint, tiny_config(depth=18)).backbone.net.state_dict()
    assert not torch.equal(fresh["conv1.weight"], loaded["conv1.weight"])


def test_medicalnet_depth10_variant(checkpoint, tmp_path):
    """Depth 10 is shortcut B without downsampling bias (MONAI's Med3D arguments). The file
    lacks num_batches_tracked, as files saved before torch 0.4.1 do."""
    torch.manual_seed(3)
    source = build("resnet3d", checkpoint, tiny_config(depth=10)).backbone.net
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": state}, path)
    net = build("medicalnet", checkpoint, tiny_config(depth=10, pretrained=str(path))).backbone.net
    assert net.layer2[0].downsample[0].bias is None
    torch.testing.assert_close(net.state_dict(), source.state_dict())


def test_medicalnet_refuses_bad_files(checkpoint, tmp_path):
    with pytest.raises(
        ValueError, match="model.baseline.resnet.pretrained is empty.*not downloaded"
    ):
        build("medicalnet", checkpoint, tiny_config(depth=18))
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*not downloaded"):
        build("medicalnet", checkpoint, tiny_config(depth=18, pretrained=str(missing)))

    state = medicalnet_state(seed=1)
    state["module.layer1.0.conv1.weight"] = torch.randn(3, 16, 3, 3, 3)
    bad_shape = tmp_path / "bad_shape.pth"
    torch.save({"state_dict": state}, bad_shape)
    with pytest.raises(ValueError, match=r"bad_shape\.pth: layer1\.0\.conv1\.weight has shape"):
        build("medicalnet", checkpoint, tiny_config(depth=18, pretrained=str(bad_shape)))

    state = medicalnet_state(seed=1)
    del state["module.layer3.1.bn2.weight"]
    lacking = tmp_path / "lacking.pth"
    torch.save({"state_dict": state}, lacking)
    with pytest.raises(
        ValueError, match=r"lacking\.pth: 1 ResNet trunk keys.*layer3\.1\.bn2\.weight"
    ):
        build("medicalnet", checkpoint, tiny_config(depth=18, pretrained=str(lacking)))


# ---- text masks -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["perceiver", "irene"])
def test_padding_does_not_change_logits(arch, checkpoint):
    model = build(arch, checkpoint, max_length=24).eval()
    short = make_batch(model, max_length=12)
    assert not short["attention_mask"][:, -1].any()  # no text was truncated
    long = make_batch(model, max_length=24)
    pad = long["attention_mask"] == 0
    assert pad.sum(1).gt(short["attention_mask"].eq(0).sum(1)).all()
    # what sits in padded positions must not matter either
    noise = torch.randint(5, len(model.tokenizer), long["input_ids"].shape)
    long["input_ids"] = torch.where(pad, noise, long["input_ids"])
    with torch.no_grad():
        ref = model(short)["logits"]
        torch.testing.assert_close(model(long)["logits"], ref, atol=1e-5, rtol=1e-5)
        changed = dict(short, input_ids=short["input_ids"].clone())
        old = int(changed["input_ids"][0, 1])
        changed["input_ids"][0, 1] = old + 1 if old + 1 < len(model.tokenizer) else 5
        logits = model(changed)["logits"]
    assert (logits[0] - ref[0]).abs().max() > 1e-4  # a real token is read
    torch.testing.assert_close(logits[1:], ref[1:])  # and samples do not mix


def test_text_longer_than_position_table(checkpoint):
    model = build("irene", checkpoint, max_length=12)
    batch = make_batch(model, max_length=16)
    with pytest.raises(ValueError, match="text.max_length=12"):
        model(batch)


# ---- configs and arguments ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: BaselineConfig(dropout=1.0), "dropout"),
        (lambda: BaselineConfig(dropout=-0.1), "dropout"),
        (lambda: ResNetConfig(depth=20), "depth"),
        (lambda: ResNetConfig(widen_factor=0.0), "widen_factor"),
        (lambda: PerceiverConfig(num_latents=0), "num_latents"),
        (
            lambda: PerceiverConfig(d_latents=30, num_self_attention_heads=4),
            "num_self_attention_heads",
        ),
        (
            lambda: PerceiverConfig(d_model=30, num_cross_attention_heads=4),
            "num_cross_attention_heads",
        ),
        (lambda: IreneConfig(dim=32, num_heads=3), "num_heads"),
        (lambda: IreneConfig(depth=0), "depth"),
        (lambda: IreneConfig(mlp_ratio=0.0), "mlp_ratio"),
    ],
)
def test_config_rejects(make, key):
    with pytest.raises(ValueError, match=rf"^{key}="):
        make()


def test_defaults_are_valid():
    cfg = BaselineConfig()
    assert (cfg.resnet.depth, cfg.irene.dim, cfg.perceiver.d_latents) == (50, 384, 512)


def test_build_rejects_arguments(checkpoint):
    with pytest.raises(ValueError, match="arch='m3t'"):
        build("m3t", checkpoint)
    text = TextConfig(checkpoint=checkpoint, mode="full", max_length=12)
    with pytest.raises(ValueError, match="num_classes=1"):
        build_baseline("vit", tiny_config(), tiny_vision(), text, 1, 1.0)
    with pytest.raises(ValueError, match="cls_weight=0"):
        build_baseline("vit", tiny_config(), tiny_vision(), text, 3, 0.0)
    with pytest.raises(ValueError, match="text.checkpoint is empty"):
        build_baseline("irene", tiny_config(), tiny_vision(), TextConfig(), 3, 1.0)
