"""Activation checkpointing of the ViT blocks: same numbers, fewer saved activations."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from model_fixtures import tiny_vision
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import models.vit as vit_module
from models.attention import CrossBlock
from models.vit import VisionConfig, VisionTransformer


def _pair(cfg: VisionConfig) -> tuple[VisionTransformer, VisionTransformer]:
    """The same weights without and with checkpointing."""
    torch.manual_seed(0)
    plain = VisionTransformer(cfg)
    ckpt = VisionTransformer(dataclasses.replace(cfg, grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


def _image(cfg: VisionConfig, batch: int = 2) -> Tensor:
    return torch.randn((batch, cfg.in_chans) + (cfg.img_size,) * cfg.spatial_dims)


def saved_activation_bytes(model: nn.Module, fn: Callable[[], Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn runs, parameters
    left out. Non-reentrant checkpointing saves each block's input through autograd outside
    its own hooks, so those inputs are counted here too."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()  # kept alive until the sum, so no saved storage is freed and reused
    assert out.requires_grad
    return sum(saved.values())


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
def test_same_outputs_and_gradients(spatial_dims: int, mask_ratio: float) -> None:
    cfg = tiny_vision(spatial_dims, depth=3)
    plain, ckpt = _pair(cfg)
    x = _image(cfg)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # the same random mask for both
        out = model.forward_features(x, mask_ratio)
        (out.square().mean() + model.pool(out).sum()).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((out, grads))
    (out_plain, grads_plain), (out_ckpt, grads_ckpt) = results
    torch.testing.assert_close(out_ckpt, out_plain)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name, grad in grads_plain.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


def test_cross_blocks_same_outputs_and_gradients() -> None:
    cfg = tiny_vision(2, depth=2)
    plain, ckpt = _pair(cfg)
    cross = CrossBlock(cfg.embed_dim, num_heads=2, context_dim=32)
    with torch.no_grad():
        cross.gate_attn.fill_(0.5)
        cross.gate_mlp.fill_(0.5)
    tokens = plain.embed(_image(cfg)).tokens.detach()
    context = torch.randn(2, 5, 32)
    context_mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    results = []
    for model in (plain, ckpt):
        cross.zero_grad(set_to_none=True)
        ctx = context.clone().requires_grad_(True)
        # cross block 0 first (the `start - 1` key), then after block 1
        out = model.forward_blocks(tokens, 1, 2, {0: cross, 1: cross}, ctx, context_mask)
        out.square().mean().backward()
        grads = [p.grad for p in model.blocks[1].parameters()] + [ctx.grad]
        results.append((out, grads + [p.grad for p in cross.parameters()]))
    (out_plain, grads_plain), (out_ckpt, grads_ckpt) = results
    torch.testing.assert_close(out_ckpt, out_plain)
    for g_ckpt, g_plain in zip(grads_ckpt, grads_plain, strict=True):
        assert g_plain is not None and g_plain.abs().sum() > 0
        torch.testing.assert_close(g_ckpt, g_plain)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_checkpointing_saves_fewer_activations(spatial_dims: int) -> None:
    cfg = tiny_vision(spatial_dims, depth=4)
    plain, ckpt = _pair(cfg)
    x = _image(cfg)
    full = saved_activation_bytes(plain, lambda: plain.forward_features(x))
    less = saved_activation_bytes(ckpt, lambda: ckpt.forward_features(x))
    tokens = cfg.num_patches + 1
    block_input = x.shape[0] * tokens * cfg.embed_dim * 4  # float32 (B, T, D)
    # What a checkpointed pass must still keep: every block's input (the measure sees them).
    assert less >= cfg.depth * block_input
    # Each block saves about a dozen tensors of its input's size; checkpointed, it saves one.
    assert full >= 8 * cfg.depth * block_input
    assert less < full / 3


def test_checkpointing_only_in_training_with_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(fn)
        return checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(vit_module, "checkpoint", counting_checkpoint)
    cfg = tiny_vision(3, depth=2)
    plain, ckpt = _pair(cfg)
    x = _image(cfg)
    ckpt.forward_features(x)
    assert calls == list(ckpt.blocks)
    calls.clear()
    with torch.no_grad():
        ckpt.forward_features(x)
    plain.forward_features(x)
    ckpt.eval()
    ckpt.forward_features(x)
    assert calls == []
    plain.eval()  # eval mode: the same tensors saved as without checkpointing
    assert saved_activation_bytes(ckpt, lambda: ckpt.forward_features(x)) == (
        saved_activation_bytes(plain, lambda: plain.forward_features(x))
    )
