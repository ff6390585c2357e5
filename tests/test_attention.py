"""Attention on SDPA against the eager reference; blocks; argument checks."""

from __future__ import annotations

import pytest
import torch

from models.attention import Attention, Block, CrossBlock, eager_attention


def _padding(batch: int, length: int, lengths: list[int]) -> torch.Tensor:
    """(batch, length) bool, True for the first lengths[b] positions."""
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


def _reference(attn: Attention, x, context=None, key_padding_mask=None) -> torch.Tensor:
    q, k, v = attn.project(x, context)
    out = eager_attention(q, k, v, key_padding_mask)  # (B, H, N, d)
    return attn.proj(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("with_mask", [False, True])
def test_self_attention_matches_eager(with_mask: bool) -> None:
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4)
    x = torch.randn(3, 7, 32)
    mask = _padding(3, 7, [7, 4, 1]) if with_mask else None
    out = attn(x, key_padding_mask=mask)
    assert out.shape == (3, 7, 32)
    torch.testing.assert_close(out, _reference(attn, x, None, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_mask", [False, True])
def test_cross_attention_matches_eager(with_mask: bool) -> None:
    torch.manual_seed(0)
    attn = Attention(32, num_heads=2, context_dim=24)  # different widths: kv projects 24 -> 32
    x, context = torch.randn(2, 5, 32), torch.randn(2, 9, 24)
    mask = _padding(2, 9, [9, 3]) if with_mask else None
    out = attn(x, context, mask)
    assert out.shape == (2, 5, 32)
    torch.testing.assert_close(out, _reference(attn, x, context, mask), atol=1e-5, rtol=1e-5)


def test_eager_reference_is_the_textbook_formula() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    keep = torch.tensor([[True, False, True]])
    weights = torch.softmax((q @ k.transpose(-2, -1) / 2.0)[..., [0, 2]], dim=-1)
    expected = weights @ v[..., [0, 2], :]
    torch.testing.assert_close(eager_attention(q, k, v, keep), expected)


def test_padded_keys_do_not_change_the_output() -> None:
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, context_dim=16)
    x, context = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    mask = _padding(2, 6, [6, 2])
    out = attn(x, context, mask)
    changed = context.clone()
    changed[1, 2:] = 100.0  # only padded keys of sample 1
    torch.testing.assert_close(attn(x, changed, mask), out)
    changed[1, 0] = 100.0  # a real key: now the output must move
    assert not torch.allclose(attn(x, changed, mask)[1], out[1])


def test_cross_block_is_identity_at_init_and_not_after() -> None:
    torch.manual_seed(0)
    block = CrossBlock(32, num_heads=2, context_dim=48)
    x, context = torch.randn(2, 5, 32), torch.randn(2, 7, 48)
    mask = _padding(2, 7, [7, 3])
    torch.testing.assert_close(block(x, context, mask), x, atol=0.0, rtol=0.0)
    with torch.no_grad():
        block.gate_attn.fill_(0.5)
    assert not torch.allclose(block(x, context, mask), x)


def test_cross_block_gates_get_gradient_at_init() -> None:
    torch.manual_seed(0)
    block = CrossBlock(16, num_heads=2)
    x, context = torch.randn(2, 3, 16), torch.randn(2, 4, 16)
    block(x, context).square().sum().backward()
    assert block.gate_attn.grad.abs().sum() > 0
    assert block.gate_mlp.grad.abs().sum() > 0


def test_block_shape_and_residual() -> None:
    torch.manual_seed(0)
    block = Block(24, num_heads=3, mlp_ratio=2.0)
    x = torch.randn(2, 6, 24)
    out = block(x)
    assert out.shape == x.shape
    assert not torch.allclose(out, x)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="num_heads=5"):
        Attention(32, num_heads=5)
    with pytest.raises(ValueError, match="num_heads=3"):
        CrossBlock(32, num_heads=3, context_dim=16)
    with pytest.raises(ValueError, match="needs `context`"):
        Attention(16, 2, context_dim=16)(torch.randn(1, 2, 16))
    with pytest.raises(ValueError, match="takes no `context`"):
        Attention(16, 2)(torch.randn(1, 2, 16), torch.randn(1, 3, 16))
