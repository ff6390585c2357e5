"""Vision Transformer for 2D images and 3D volumes, with MAE-style random token masking.

One code path serves both: `PatchEmbed` picks Conv2d or Conv3d; the position embedding is
a fixed N-d sin-cos table (MAE) or a learnable table that starts from it (`pos_embed:
learnable`, the Alifuse paper's choice). Interface (timm): `forward_features` -> `pool` -> `forward_head`.
For callers that insert layers (the text-grounded image encoder), the pass is also exposed
in parts: `embed` (patches + position + masking + CLS), `forward_blocks(x, start, end)`,
and `norm`. With `grad_checkpointing` each block keeps only its input for the backward pass
and recomputes its inner activations there (less memory, about one more forward of time).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.attention import Block, init_vit_weights


@dataclass
class VisionConfig:
    """The image tower and its MAE decoder."""

    spatial_dims: Literal[2, 3] = 3
    in_chans: int = 1
    img_size: int = 128
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75  # MAE; in [0, 1)
    # sincos: a fixed table (MAE). learnable: a parameter initialised with the same table, so
    # that the two start equal and differ only in whether training moves it (Alifuse II).
    pos_embed: Literal["sincos", "learnable"] = "sincos"
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = True
    # Activation checkpointing of the blocks in `forward_blocks` (training, grad enabled).
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("in_chans", "img_size", "patch_size", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        for name in ("decoder_embed_dim", "decoder_num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if self.decoder_depth < 0:
            raise ValueError(f"decoder_depth={self.decoder_depth}: expected >= 0")
        if self.img_size % self.patch_size != 0:
            raise ValueError(
                f"img_size={self.img_size}: expected a multiple of patch_size={self.patch_size}"
            )
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"num_heads={self.num_heads}: expected a divisor of embed_dim={self.embed_dim}"
            )
        if self.decoder_embed_dim % self.decoder_num_heads != 0:
            raise ValueError(
                f"decoder_num_heads={self.decoder_num_heads}: expected a divisor of "
                f"decoder_embed_dim={self.decoder_embed_dim}"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio}: expected > 0")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio}: expected a value in [0, 1)")
        if round(self.num_patches * (1.0 - self.mask_ratio)) < 1:
            raise ValueError(
                f"mask_ratio={self.mask_ratio}: keeps no token of {self.num_patches} patches"
            )

    @property
    def grid_size(self) -> tuple[int, ...]:
        return (self.img_size // self.patch_size,) * self.spatial_dims

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid_size)

    @property
    def patch_dim(self) -> int:
        """Values in one patch: patch_size ** spatial_dims * in_chans."""
        return self.patch_size**self.spatial_dims * self.in_chans


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, for 2D or 3D: a conv with kernel = stride = patch."""

    def __init__(
        self, spatial_dims: int, img_size: int, patch_size: int, in_chans: int, embed_dim: int
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims={spatial_dims}: expected 2 or 3")
        if img_size % patch_size != 0:
            raise ValueError(f"img_size={img_size}: expected a multiple of patch_size={patch_size}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.img_shape = (img_size,) * spatial_dims
        self.grid_size = (img_size // patch_size,) * spatial_dims
        self.num_patches = math.prod(self.grid_size)
        self.proj = conv(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, *img_shape) -> (B, N, D), patches in row-major grid order (as `patchify`)."""
        if tuple(x.shape[2:]) != self.img_shape:
            raise ValueError(
                f"image of spatial shape {tuple(x.shape[2:])}: expected {self.img_shape}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_pos_embed(embed_dim: int, grid_size: Sequence[int], cls_token: bool = True) -> Tensor:
    """Fixed N-d sin-cos position table: (N [+ 1], embed_dim), CLS row (first) all zeros.

    Each axis gets the same even number of channels (half sin, half cos of the coordinate
    at geometric frequencies, as in MAE); when embed_dim is not a multiple of 2 * ndim the
    few leftover channels are zero, so any width works for 2D and 3D alike.
    """
    ndim = len(grid_size)
    per_axis = embed_dim // (2 * ndim) * 2
    if per_axis < 2:
        raise ValueError(f"embed_dim={embed_dim}: expected >= {2 * ndim} for a {ndim}-d grid")
    omega = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / (per_axis / 2))
    axes = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid_size], indexing="ij")
    parts = []
    for coord in axes:  # flattened row-major, matching PatchEmbed's token order
        angle = coord.reshape(-1, 1) * omega  # (N, per_axis / 2)
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, dim=1)
    table = torch.cat([table, table.new_zeros(table.shape[0], embed_dim - table.shape[1])], dim=1)
    if cls_token:
        table = torch.cat([table.new_zeros(1, embed_dim), table], dim=0)
    return table.float()


def add_position_table(
    module: nn.Module, kind: str, embed_dim: int, grid_size: Sequence[int]
) -> None:
    """Gives `module` its `pos_embed`: the (1, 1 + N, embed_dim) table of a token grid with a
    CLS row.

    sincos: a fixed buffer, rebuilt from the config and not saved, so optimizers, ZeRO
    partitioning and checkpoints never see it. learnable: an `nn.Parameter` starting from the
    same table, saved with the weights and trained like any other.
    """
    table = sincos_pos_embed(embed_dim, grid_size, cls_token=True)[None]
    if kind == "learnable":
        module.pos_embed = nn.Parameter(table)
    elif kind == "sincos":
        module.register_buffer("pos_embed", table, persistent=False)
    else:
        raise ValueError(f"pos_embed={kind!r}: expected 'sincos' or 'learnable'")


class MaskedTokens(NamedTuple):
    """Output of `VisionTransformer.embed`."""

    tokens: Tensor  # (B, 1 + K, D): CLS then the K kept patch tokens
    mask: Tensor  # (B, N) 1 = masked (dropped), 0 = kept, in patch order
    ids_restore: Tensor  # (B, N) long: un-shuffles [kept, dropped] back to patch order


def random_masking(x: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """MAE per-sample random masking by argsort of uniform noise (global torch RNG).

    x (B, N, D) -> kept (B, K, D) with K = round(N * (1 - mask_ratio)), mask (B, N) in x's
    dtype with 1 = masked, ids_restore (B, N). With nothing to drop it returns x unshuffled
    and draws no random numbers.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio}: expected a value in [0, 1)")
    B, N, D = x.shape
    keep = round(N * (1.0 - mask_ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio}: keeps no token of {N}")
    if keep == N:
        ids = torch.arange(N, device=x.device).expand(B, N)
        return x, x.new_zeros(B, N), ids
    noise = torch.rand(B, N, device=x.device)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the first `keep` are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
    mask = x.new_ones(B, N)
    mask[:, :keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


def grounded_block(
    block: Block, cross: nn.Module, x: Tensor, context: Tensor, context_mask: Tensor | None
) -> Tensor:
    """A block with a cross-attention layer between its self-attention and MLP: (B, T, D)."""
    return block.feed_forward(cross(block.attend(x), context, context_mask))


class VisionTransformer(nn.Module):
    """ViT with a CLS token for 2D or 3D inputs; encodes only the visible tokens when masking."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(
            cfg.spatial_dims, cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        add_position_table(self, cfg.pos_embed, cfg.embed_dim, cfg.grid_size)  # (1, 1 + N, D)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Identity()  # no classifier: the fusion head lives in the composed model
        self.apply(init_vit_weights)
        w = self.patch_embed.proj.weight.data  # as a linear layer on the flattened patch (MAE)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, x: Tensor, mask_ratio: float = 0.0) -> MaskedTokens:
        """(B, C, *spatial) -> tokens (B, 1 + K, D) before the blocks, mask, ids_restore."""
        # Inputs may arrive in another float dtype than the weights (bf16 runs, fp16 shards).
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))  # (B, N, D)
        # Buffers stay float32 when an engine casts only the parameters (DeepSpeed bf16):
        # follow the tokens' dtype, or the sum would silently promote them back to float32.
        pos = self.pos_embed.to(x.dtype)
        x = x + pos[:, 1:]  # positions before masking: kept tokens keep theirs
        x, mask, ids_restore = random_masking(x, mask_ratio)
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        return MaskedTokens(torch.cat([cls, x], dim=1), mask, ids_restore)

    def forward_blocks(
        self,
        x: Tensor,
        start: int = 0,
        end: int | None = None,
        cross_blocks: Mapping[int, nn.Module] | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """Runs blocks [start, end) on x (B, T, D) -> (B, T, D).

        `cross_blocks[i]` grounds block i in `context` (B, M, Dc) with `context_mask` (B, M)
        True=keep: a `CrossBlock` runs right after block i, a `CrossAttentionLayer`
        (`inside_block`) inside it, between its self-attention and its MLP. A CrossBlock at
        key `start - 1` runs first: it continues a pass whose last block was `start - 1` (a
        trunk shared with another pass). With `cfg.grad_checkpointing`, every block (with the
        cross layer inside it) and every CrossBlock is checkpointed.
        """
        cross = {} if cross_blocks is None else cross_blocks
        end = len(self.blocks) if end is None else end
        before = cross.get(start - 1)
        if before is not None and not before.inside_block:
            x = self._run(before, x, context, context_mask)
        for i in range(start, end):
            layer = cross.get(i)
            if layer is not None and layer.inside_block:
                x = self._run(grounded_block, self.blocks[i], layer, x, context, context_mask)
                continue
            x = self._run(self.blocks[i], x)
            if layer is not None:
                x = self._run(layer, x, context, context_mask)
        return x

    def _run(self, fn, *args):
        """fn(*args), under activation checkpointing when configured and it can matter."""
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant: gradients reach every parameter and input that needs them (the
            # context of a cross block too), even when x itself needs none.
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward_features(self, x: Tensor, mask_ratio: float = 0.0) -> Tensor:
        """(B, C, *spatial) -> normed tokens (B, 1 + K, D); K = N without masking."""
        return self.norm(self.forward_blocks(self.embed(x, mask_ratio).tokens))

    def pool(self, tokens: Tensor) -> Tensor:
        """(B, T, D) -> (B, D): the CLS token."""
        return tokens[:, 0]

    def forward_head(self, pooled: Tensor) -> Tensor:
        return self.head(pooled)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, *spatial) -> (B, D), unmasked."""
        return self.forward_head(self.pool(self.forward_features(x)))
