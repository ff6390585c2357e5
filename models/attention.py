"""The one attention module of the project, and the transformer blocks built on it.

`Attention` runs on `torch.nn.functional.scaled_dot_product_attention`, which picks a fused
kernel (FlashAttention / cuDNN / memory-efficient on GPU, a fused C++ path on CPU).
`eager_attention` is the textbook formula with the same mask semantics; it exists so that
tests can check the fused path against it, and is never called by model code.

Mask convention everywhere: `key_padding_mask` is a bool (B, M) tensor, True = a real key
that may be attended to, False = padding. This is SDPA's boolean convention, so the mask
goes to the kernel as is (broadcast over heads and queries).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def eager_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
) -> Tensor:
    """Reference softmax(q k^T / sqrt(d)) v, for tests only.

    q (B, H, N, d), k and v (B, H, M, d), key_padding_mask (B, M) bool True=keep -> (B, H, N, d).
    """
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, N, M)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head self- or cross-attention on SDPA.

    Self-attention (`context_dim=None`): one fused qkv projection of x.
    Cross-attention (`context_dim` set): queries from x (B, N, dim), keys and values from
    `context` (B, M, context_dim); the kv projection maps context_dim to dim, so towers of
    different widths can attend to each other.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, context_dim: int | None = None
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads}: expected a divisor of dim={dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: Tensor) -> Tensor:
        # (B, N, dim) -> (B, H, N, head_dim)
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, N, d), k and v (B, H, M, d): the inputs of the attention kernel."""
        if self.is_cross != (context is not None):
            kind = "cross-attention needs" if self.is_cross else "self-attention takes no"
            raise ValueError(f"{kind} `context`")
        if self.is_cross:
            q = self.q(x)
            k, v = self.kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self._heads(q), self._heads(k), self._heads(v)

    def forward(
        self, x: Tensor, context: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """x (B, N, dim), context (B, M, context_dim), key_padding_mask (B, M) -> (B, N, dim)."""
        q, k, v = self.project(x, context)
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, d)
        return self.proj(out.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, as in ViT."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm `Block`): x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def attend(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """The self-attention residual branch: x + attn(norm1(x)), (B, N, dim)."""
        return x + self.attn(self.norm1(x), key_padding_mask=key_padding_mask)

    def feed_forward(self, x: Tensor) -> Tensor:
        """The MLP residual branch: x + mlp(norm2(x)), (B, N, dim)."""
        return x + self.mlp(self.norm2(x))

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """(B, N, dim), key_padding_mask (B, N) True = attendable -> (B, N, dim)."""
        return self.feed_forward(self.attend(x, key_padding_mask))


class CrossBlock(nn.Module):
    """Pre-norm cross-attention + MLP, inserted into a pretrained tower to ground it.

    x (B, N, dim) attends to `context` (B, M, context_dim). Each residual branch is scaled
    by a per-channel gate initialised to zero (LayerScale with init 0): at insertion the
    block is the identity, so the pretrained tower it sits in computes exactly what it did
    before, and random cross-attention weights cannot wreck its features in the first
    steps. The gates receive gradient from the first step and open as far as the loss
    asks; the other weights receive gradient once the gates are non-zero.
    """

    inside_block = False  # runs after the block it follows (see `CrossAttentionLayer`)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm_context = nn.LayerNorm(context_dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, context_dim=context_dim)
        self.gate_attn = nn.Parameter(torch.zeros(dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gate_mlp = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, context: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """x (B, N, dim), context (B, M, context_dim), key_padding_mask (B, M) -> (B, N, dim)."""
        x = x + self.gate_attn * self.attn(
            self.norm1(x), self.norm_context(context), key_padding_mask
        )
        return x + self.gate_mlp * self.mlp(self.norm2(x))


class CrossAttentionLayer(nn.Module):
    """A cross-attention sublayer that runs inside a block, between its self-attention and its
    MLP: the grounded encoders of Alifuse (and of ALBEF / BLIP) insert one into every block.

    x (B, N, dim) attends to `context` (B, M, context_dim). The residual follows the block it
    sits in: `norm="pre"` for pre-norm blocks (the ViT: x + attn(norm(x), norm_c(context))),
    `norm="post"` for post-norm ones (BERT layers: norm(x + attn(x, norm_c(context))), like
    BERT's own sublayers). No gate: unlike `CrossBlock`, which is appended to a finished
    tower, this layer is part of the block from the start, as in the paper.
    `inside_block` tells the towers' `forward_blocks` / `run_layers` where to run it.
    """

    inside_block = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int | None = None,
        norm: str = "pre",
        eps: float = 1e-6,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if norm not in ("pre", "post"):
            raise ValueError(f"norm={norm!r}: expected 'pre' or 'post'")
        context_dim = dim if context_dim is None else context_dim
        self.pre_norm = norm == "pre"
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.norm_context = nn.LayerNorm(context_dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, context_dim=context_dim)

    def forward(self, x: Tensor, context: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """x (B, N, dim), context (B, M, context_dim), key_padding_mask (B, M) -> (B, N, dim)."""
        context = self.norm_context(context)
        if self.pre_norm:
            return x + self.attn(self.norm(x), context, key_padding_mask)
        return self.norm(x + self.attn(x, context, key_padding_mask))


def init_vit_weights(module: nn.Module) -> None:
    """MAE / JAX-ViT init, for `module.apply`: xavier-uniform linears, zero biases, unit norms.

    Leaves other parameters alone (CrossBlock gates stay zero, tokens keep their own init).
    """
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
