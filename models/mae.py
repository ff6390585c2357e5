"""Masked autoencoding for 2D and 3D: patchify / unpatchify, a light decoder, the loss (MAE).

Patch order everywhere is the row-major grid order of `PatchEmbed`'s conv output; inside a
patch, values are ordered (p, p[, p], C) as in MAE's `patchify`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.attention import Block, init_vit_weights
from models.vit import VisionConfig, add_position_table


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """(B, C, *spatial) -> (B, N, patch_size ** dims * C); dims = 2 or 3, any C."""
    B, C, *spatial = imgs.shape
    p = patch_size
    if any(s % p for s in spatial):
        raise ValueError(f"spatial shape {tuple(spatial)}: expected multiples of patch_size={p}")
    grid = [s // p for s in spatial]
    d = len(spatial)
    x = imgs.reshape(B, C, *[n for g in grid for n in (g, p)])  # (B, C, g1, p, g2, p, ...)
    # -> (B, g1, g2, ..., p, p, ..., C)
    x = x.permute(0, *range(2, 2 + 2 * d, 2), *range(3, 3 + 2 * d, 2), 1)
    return x.reshape(B, math.prod(grid), p**d * C)


def unpatchify(x: Tensor, patch_size: int, grid_size: tuple[int, ...], chans: int) -> Tensor:
    """(B, N, patch_size ** dims * chans) -> (B, chans, *spatial); inverse of `patchify`."""
    B = x.shape[0]
    p, d = patch_size, len(grid_size)
    x = x.reshape(B, *grid_size, *([p] * d), chans)  # (B, g1, ..., p, ..., C)
    # -> (B, C, g1, p, g2, p, ...)
    order = [0, 2 * d + 1] + [n for i in range(d) for n in (1 + i, 1 + d + i)]
    return x.permute(*order).reshape(B, chans, *[g * p for g in grid_size])


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool) -> Tensor:
    """Mean squared error per patch, averaged over the masked patches only.

    pred, target (B, N, P) (target = `patchify(image)`), mask (B, N) 1 = masked. With
    `norm_pix` each target patch is standardised by its own mean and (unbiased) variance,
    as MAE does. Computed in float32; a batch without masked patches gives 0.
    """
    pred, target, mask = pred.float(), target.float(), mask.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


class MAEDecoder(nn.Module):
    """Light MAE decoder: encoder tokens + mask tokens in patch order -> pixels per patch."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        dim = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(cfg.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        add_position_table(self, cfg.pos_embed, dim, cfg.grid_size)  # (1, 1 + N, dim)
        self.blocks = nn.ModuleList(
            Block(dim, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, cfg.patch_dim)
        self.apply(init_vit_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        """tokens (B, 1 + K, E) from the encoder, ids_restore (B, N) -> pred (B, N, P)."""
        x = self.decoder_embed(tokens)  # (B, 1 + K, dim)
        B, T, dim = x.shape
        N = ids_restore.shape[1]
        masked = self.mask_token.expand(B, N + 1 - T, -1)
        patches = torch.cat([x[:, 1:], masked], dim=1)  # [kept, dropped] order
        patches = patches.gather(1, ids_restore[:, :, None].expand(-1, -1, dim))  # patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)  # see vit.embed
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]  # drop CLS
