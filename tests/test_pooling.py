"""Attention pooling: text tokens attend over image tokens, real tokens' answers are averaged."""

from __future__ import annotations

import pytest
import torch

from models.pooling import AttentionPool, AttentionPoolConfig, build_attention_pool

B, L, N, DT, DI = 3, 6, 5, 40, 24


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(B, L, DT, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    image = torch.randn(B, N, DI, generator=gen)
    return text, mask, image


def _pool(num_queries: int = 1) -> AttentionPool:
    torch.manual_seed(0)
    pool = AttentionPool(DT, DI, out_dim=16, num_heads=4, num_queries=num_queries)
    for norm in (pool.norm_text, pool.norm_image):  # non-trivial affine so the test sees them
        torch.nn.init.normal_(norm.weight, 1.0, 0.2)
        torch.nn.init.normal_(norm.bias, 0.0, 0.2)
    return pool


@pytest.mark.parametrize("num_queries", [1, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_shapes(num_queries: int, batch: int) -> None:
    text, mask, image = _inputs()
    out = _pool(num_queries)(text[:batch], mask[:batch], image[:batch])
    assert out.shape == (batch, 16) and torch.isfinite(out).all()


def test_matches_a_hand_computation() -> None:
    pool = _pool().eval()
    text, mask, image = _inputs()
    with torch.no_grad():
        out = pool(text, mask.bool(), image)
        for i in range(B):
            n = int(mask[i].sum())
            q = pool.query(pool.norm_text(text[i : i + 1, :n]))  # only the real tokens
            answers = pool.attn(q, pool.norm_image(image[i : i + 1]))  # (1, n, D)
            torch.testing.assert_close(out[i], pool.proj(answers.mean(1))[0])


def test_padding_text_tokens_do_not_matter() -> None:
    pool = _pool(num_queries=2)
    text, mask, image = _inputs()
    out = pool(text, mask, image)
    noisy = text.clone()
    padding = mask == 0
    noisy[padding] = torch.randn(int(padding.sum()), DT) * 1e4
    noisy[2, 3] = float("nan")
    noisy_out = pool(noisy, mask, image)
    assert torch.equal(noisy_out, out)
    noisy_out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in pool.parameters())


def test_samples_see_only_their_own_image() -> None:
    pool = _pool()
    text, mask, image = _inputs()
    out = pool(text, mask, image)
    other = image.clone()
    other[1] = torch.randn(N, DI)  # sample 1's image
    changed = pool(text, mask, other)
    assert torch.equal(changed[0], out[0]) and torch.equal(changed[2], out[2])
    assert (changed[1] - out[1]).abs().max() > 1e-3


def test_masked_image_tokens_do_not_matter() -> None:
    pool = _pool()
    text, mask, image = _inputs()
    image_mask = torch.ones(B, N, dtype=torch.bool)
    image_mask[:, -2:] = False
    out = pool(text, mask, image, image_mask)
    moved = image.clone()
    moved[:, -2:] = torch.randn(B, 2, DI) * 10
    torch.testing.assert_close(pool(text, mask, moved, image_mask), out)
    assert not torch.allclose(pool(text, mask, moved), out)


def test_gradients_reach_every_parameter() -> None:
    pool = _pool(num_queries=2)
    text, mask, image = _inputs()
    text.requires_grad_(True)
    image.requires_grad_(True)
    pool(text, mask, image).square().sum().backward()
    for name, param in pool.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert text.grad[mask == 0].abs().sum() == 0 and text.grad[mask == 1].abs().sum() > 0
    assert image.grad.abs().sum() > 0


def test_config_and_builder() -> None:
    assert build_attention_pool(AttentionPoolConfig(), 40, 24) is None  # disabled by default
    pool = build_attention_pool(
        AttentionPoolConfig(enabled=True, num_heads=2, out_dim=8, num_queries=2), 40, 24
    )
    assert isinstance(pool, AttentionPool) and pool.proj.weight.shape == (8, 16)
    with pytest.raises(ValueError, match="out_dim=10: expected a positive multiple of num_heads=4"):
        AttentionPoolConfig(num_heads=4, out_dim=10)
    with pytest.raises(ValueError, match="num_heads=0"):
        AttentionPoolConfig(num_heads=0)
    with pytest.raises(ValueError, match="num_queries=0"):
        AttentionPoolConfig(num_queries=0)
    with pytest.raises(ValueError, match="num_heads=3"):
        AttentionPool(40, 24, out_dim=16, num_heads=3)


@pytest.mark.parametrize("num_queries", [1, 3])
def test_pairs_equal_forward_on_every_pair(num_queries: int) -> None:
    pool = _pool(num_queries)
    text, mask, _ = _inputs()
    mask = torch.cat([mask, torch.zeros(1, L, dtype=mask.dtype)])  # a text with no real token
    text = torch.cat([text, torch.randn(1, L, DT)])
    images = torch.randn(4, N, DI, generator=torch.Generator().manual_seed(1))
    got = pool.pairs(text, mask, images)  # (4 images, 4 texts, 16)
    want = pool(
        text.unsqueeze(0).expand(4, -1, -1, -1).flatten(0, 1),
        mask.unsqueeze(0).expand(4, -1, -1).flatten(0, 1),
        images.unsqueeze(1).expand(-1, 4, -1, -1).flatten(0, 1),
    ).view(4, 4, -1)
    assert got.shape == (4, 4, 16)
    assert torch.allclose(got, want, atol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), list(pool.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
