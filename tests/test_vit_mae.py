"""ViT (2D and 3D), random masking, sin-cos positions, patchify and the MAE decoder."""

from __future__ import annotations

import math

import pytest
import torch
from model_fixtures import tiny_vision

from models.mae import MAEDecoder, patchify, unpatchify
from models.vit import PatchEmbed, VisionConfig, VisionTransformer, random_masking, sincos_pos_embed


def _image(cfg: VisionConfig, batch: int = 2) -> torch.Tensor:
    return torch.randn((batch, cfg.in_chans) + (cfg.img_size,) * cfg.spatial_dims)


@pytest.mark.parametrize(
    ("spatial_dims", "in_chans", "num_patches"), [(2, 3, 16), (3, 1, 64), (3, 2, 64)]
)
def test_vit_shapes(spatial_dims: int, in_chans: int, num_patches: int) -> None:
    torch.manual_seed(0)
    cfg = tiny_vision(spatial_dims, in_chans=in_chans, mask_ratio=0.75)
    vit = VisionTransformer(cfg)
    x = _image(cfg)
    assert vit.patch_embed.num_patches == num_patches == cfg.num_patches
    assert vit.forward_features(x).shape == (2, 1 + num_patches, cfg.embed_dim)
    keep = round(num_patches * 0.25)
    assert vit.forward_features(x, mask_ratio=0.75).shape == (2, 1 + keep, cfg.embed_dim)
    pooled = vit.pool(vit.forward_features(x))
    assert pooled.shape == (2, cfg.embed_dim)
    torch.testing.assert_close(vit(x), vit.forward_head(pooled))


@pytest.mark.parametrize("mask_ratio", [0.0, 0.1, 0.5, 0.75, 0.9])
def test_random_masking_counts_and_positions(mask_ratio: float) -> None:
    torch.manual_seed(0)
    B, N, D = 3, 37, 4
    x = torch.arange(B * N, dtype=torch.float32).reshape(B, N, 1).expand(B, N, D).contiguous()
    kept, mask, ids_restore = random_masking(x, mask_ratio)
    keep = round(N * (1 - mask_ratio))
    assert kept.shape == (B, keep, D)
    assert mask.shape == (B, N)
    assert torch.equal(mask.sum(dim=1), torch.full((B,), float(N - keep)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for b in range(B):
        kept_positions = sorted(int(v) - b * N for v in kept[b, :, 0])
        assert kept_positions == (mask[b] == 0).nonzero().squeeze(1).tolist()
    # ids_restore un-shuffles [kept, dropped] back to patch order
    ids_shuffle = ids_restore.argsort(dim=1)
    torch.testing.assert_close(kept, x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, D)))
    if mask_ratio > 0:
        assert not torch.equal(ids_restore[0], ids_restore[1])  # per-sample masks


def test_random_masking_without_masking_draws_no_random_numbers() -> None:
    x = torch.randn(2, 8, 3)
    state = torch.get_rng_state()
    kept, mask, ids_restore = random_masking(x, 0.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(kept, x) and mask.sum() == 0
    assert torch.equal(ids_restore, torch.arange(8).expand(2, 8))


def test_masked_encoder_sees_only_visible_tokens() -> None:
    torch.manual_seed(0)
    cfg = tiny_vision(3)
    vit = VisionTransformer(cfg)
    x = _image(cfg)
    torch.manual_seed(1)
    emb = vit.embed(x, cfg.mask_ratio)
    all_tokens = vit.patch_embed(x) + vit.pos_embed[:, 1:]
    kept_ids = emb.ids_restore.argsort(dim=1)[:, : emb.tokens.shape[1] - 1]
    expected = all_tokens.gather(1, kept_ids[..., None].expand(-1, -1, cfg.embed_dim))
    torch.testing.assert_close(emb.tokens[:, 1:], expected)
    torch.testing.assert_close(
        emb.tokens[:, 0], (vit.cls_token + vit.pos_embed[:, 0]).expand(2, 1, -1)[:, 0]
    )
    # forward_features with masking = embed (same RNG) -> all blocks -> norm
    torch.manual_seed(1)
    feats = vit.forward_features(x, cfg.mask_ratio)
    torch.testing.assert_close(feats, vit.norm(vit.forward_blocks(emb.tokens)))
    # blocks can be run in two parts (the grounded encoder shares the first part)
    torch.testing.assert_close(
        vit.forward_blocks(vit.forward_blocks(emb.tokens, 0, 1), 1), vit.forward_blocks(emb.tokens)
    )


def test_sincos_pos_embed() -> None:
    for grid, dim in [((4, 4), 32), ((4, 4, 4), 48), ((4, 4, 4), 32)]:
        table = sincos_pos_embed(dim, grid, cls_token=True)
        n = math.prod(grid)
        assert table.shape == (1 + n, dim)
        assert torch.equal(table[0], torch.zeros(dim))
        assert torch.unique(table[1:], dim=0).shape[0] == n  # every position distinct
    # 2D, dim 8: axis 0 uses channels 0-3 (sin, sin, cos, cos of row * [1, 1/100])
    table = sincos_pos_embed(8, (3, 5), cls_token=False)
    row, col = 2, 4
    expected = [
        math.sin(row),
        math.sin(row / 100),
        math.cos(row),
        math.cos(row / 100),
        math.sin(col),
        math.sin(col / 100),
        math.cos(col),
        math.cos(col / 100),
    ]
    torch.testing.assert_close(table[row * 5 + col], torch.tensor(expected))


@pytest.mark.parametrize(("spatial_dims", "chans"), [(2, 1), (2, 3), (3, 1), (3, 2)])
def test_patchify_roundtrip_and_order_matches_patch_embed(spatial_dims: int, chans: int) -> None:
    torch.manual_seed(0)
    p, size = 4, 8
    x = torch.randn((2, chans) + (size,) * spatial_dims)
    patches = patchify(x, p)
    grid = (size // p,) * spatial_dims
    assert patches.shape == (2, math.prod(grid), p**spatial_dims * chans)
    torch.testing.assert_close(unpatchify(patches, p, grid, chans), x)
    # The conv patch embedding is a linear map of exactly these patches, in the same order,
    # so MAE targets line up with the tokens.
    embed = PatchEmbed(spatial_dims, size, p, chans, 5)
    w = embed.proj.weight  # (5, C, p, p[, p]) -> (5, p, p[, p], C) flattened like patchify
    w = w.permute(0, *range(2, 2 + spatial_dims), 1).reshape(5, -1)
    torch.testing.assert_close(embed(x), patches @ w.T + embed.proj.bias, atol=1e-5, rtol=1e-5)
    # first patch is the corner block
    corner = x[(slice(None), slice(None)) + (slice(0, p),) * spatial_dims]
    torch.testing.assert_close(patches[:, 0], patchify(corner, p)[:, 0])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mae_decoder_predicts_every_patch(spatial_dims: int) -> None:
    torch.manual_seed(0)
    cfg = tiny_vision(spatial_dims, in_chans=2)
    vit, decoder = VisionTransformer(cfg), MAEDecoder(cfg)
    emb = vit.embed(_image(cfg), cfg.mask_ratio)
    pred = decoder(vit.norm(vit.forward_blocks(emb.tokens)), emb.ids_restore)
    assert pred.shape == (2, cfg.num_patches, cfg.patch_size**spatial_dims * 2)
    assert cfg.patch_dim == pred.shape[-1]


def test_mae_decoder_puts_mask_tokens_at_masked_positions() -> None:
    torch.manual_seed(0)
    cfg = tiny_vision(2, decoder_depth=0)  # no blocks: each output depends on its own input only
    vit, decoder = VisionTransformer(cfg), MAEDecoder(cfg)
    emb = vit.embed(_image(cfg), cfg.mask_ratio)
    pred = decoder(emb.tokens, emb.ids_restore)
    masked = emb.mask.bool()
    from_mask_token = decoder.pred(decoder.norm(decoder.mask_token + decoder.pos_embed[:, 1:]))
    expected = from_mask_token.expand(2, -1, -1)
    torch.testing.assert_close(pred[masked], expected[masked])
    assert not torch.allclose(pred[~masked], expected[~masked])


def test_bad_vision_arguments_raise() -> None:
    with pytest.raises(ValueError, match="img_size=30"):
        VisionConfig(img_size=30, patch_size=16)
    with pytest.raises(ValueError, match="mask_ratio=1.0"):
        VisionConfig(mask_ratio=1.0)
    with pytest.raises(ValueError, match="mask_ratio=-0.1"):
        VisionConfig(mask_ratio=-0.1)
    with pytest.raises(ValueError, match="num_heads=5"):
        VisionConfig(embed_dim=64, num_heads=5)
    with pytest.raises(ValueError, match="decoder_num_heads=3"):
        VisionConfig(decoder_embed_dim=64, decoder_num_heads=3)
    with pytest.raises(ValueError, match="mask_ratio=0.99"):
        tiny_vision(2, mask_ratio=0.99)  # 16 patches: keeps none
    with pytest.raises(ValueError, match="mask_ratio=1.5"):
        random_masking(torch.randn(1, 4, 2), 1.5)
    with pytest.raises(ValueError, match="img_size=10"):
        PatchEmbed(3, 10, 4, 1, 8)
    with pytest.raises(ValueError, match="spatial shape"):
        VisionTransformer(tiny_vision(3))(torch.randn(1, 1, 16, 16, 8))
    with pytest.raises(ValueError, match="multiples of patch_size"):
        patchify(torch.randn(1, 1, 10, 10), 4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_bf16_parameters_with_float32_buffers(spatial_dims: int) -> None:
    """DeepSpeed bf16 casts parameters but not buffers: the fixed position tables stay float32
    and must not promote the tokens back to float32 (LayerNorm would then refuse the mix)."""
    cfg = tiny_vision(spatial_dims)
    vit, decoder = VisionTransformer(cfg), MAEDecoder(cfg)
    for module in (vit, decoder):
        for param in module.parameters():
            param.data = param.data.to(torch.bfloat16)
    assert vit.pos_embed.dtype == decoder.pos_embed.dtype == torch.float32
    emb = vit.embed(_image(cfg).to(torch.bfloat16), cfg.mask_ratio)
    tokens = vit.norm(vit.forward_blocks(emb.tokens, 0))
    pred = decoder(tokens, emb.ids_restore)
    assert tokens.dtype == pred.dtype == torch.bfloat16
    assert torch.isfinite(pred.float()).all()
