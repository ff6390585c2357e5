"""Attention pooling of a report over its image (the MAE + LLaMA chest X-ray model).

Each text token asks the image a question: its (projected) state is a query, the image
tokens are keys and values, through the project's one `Attention` module in
cross-attention mode. The answers of the real text tokens are averaged and projected to
one vector per sample:

    text (B, L, Dt) -> norm -> Linear -> (B, L, Q x D) -> queries (B, L x Q, D)
    image (B, N, Di) -> norm -> keys, values inside Attention(D, context_dim=Di)
    cross-attention -> (B, L x Q, D) -> mean over real text tokens -> (B, Q, D)
    -> flatten (B, Q x D) -> Linear -> (B, out_dim)

with D = out_dim and Q = num_queries (query views per text token; 1 = one query each).
Text tokens never attend to each other, and padding tokens are replaced by 0 on the way
in and their answers by 0 before the mean (replaced, not multiplied by 0), so nothing in
a padding position, not even a NaN, reaches the output or the gradients; samples never mix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import Attention


@dataclass
class AttentionPoolConfig:
    """Whether the composed model pools text over image tokens, and the pool's size."""

    enabled: bool = False
    num_heads: int = 8
    out_dim: int = 256
    num_queries: int = 1

    def __post_init__(self) -> None:
        if self.num_heads < 1:
            raise ValueError(f"num_heads={self.num_heads}: expected >= 1")
        if self.out_dim < 1 or self.out_dim % self.num_heads:
            raise ValueError(
                f"out_dim={self.out_dim}: expected a positive multiple of num_heads={self.num_heads}"
            )
        if self.num_queries < 1:
            raise ValueError(f"num_queries={self.num_queries}: expected >= 1")


class AttentionPool(nn.Module):
    """Text tokens attend over image tokens; the real tokens' answers pool to (B, out_dim)."""

    def __init__(
        self, text_dim: int, image_dim: int, out_dim: int, num_heads: int, num_queries: int = 1
    ) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries={num_queries}: expected >= 1")
        self.num_queries = num_queries
        self.out_dim = out_dim
        self.norm_text = nn.LayerNorm(text_dim, eps=1e-6)
        self.norm_image = nn.LayerNorm(image_dim, eps=1e-6)
        self.query = nn.Linear(text_dim, num_queries * out_dim)
        self.attn = Attention(out_dim, num_heads, context_dim=image_dim)
        self.proj = nn.Linear(num_queries * out_dim, out_dim)

    def forward(
        self,
        text_tokens: Tensor,
        text_mask: Tensor,
        image_tokens: Tensor,
        image_mask: Tensor | None = None,
    ) -> Tensor:
        """text_tokens (B, L, Dt), text_mask (B, L) 1/True = real token, image_tokens
        (B, N, Di), image_mask (B, N) True = real (None: all) -> (B, out_dim).

        A sample without any real text token pools to proj(0).
        """
        b, length, _ = text_tokens.shape
        real = text_mask.to(device=text_tokens.device, dtype=bool)  # (B, L)
        # Padding is zeroed on the way in and out, so it reaches neither output nor gradients.
        text_tokens = text_tokens.masked_fill(~real[:, :, None], 0.0)
        q = self.query(self.norm_text(text_tokens))  # (B, L, Q * D)
        q = q.reshape(b, length * self.num_queries, self.out_dim)  # (B, L * Q, D)
        answers = self.attn(q, self.norm_image(image_tokens), image_mask)  # (B, L * Q, D)
        answers = answers.reshape(b, length, self.num_queries, self.out_dim)  # (B, L, Q, D)
        summed = answers.masked_fill(~real[:, :, None, None], 0.0).sum(1)  # (B, Q, D)
        count = real.sum(1).clamp(min=1).to(answers.dtype)  # (B,)
        mean = summed / count[:, None, None]
        return self.proj(mean.flatten(1))  # (B, out_dim)

    def pairs(self, text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor) -> Tensor:
        """Every text pooled over every image: text_tokens (T, L, Dt), text_mask (T, L),
        image_tokens (I, N, Di) -> (I, T, out_dim), row i column j = forward(text j, image i).

        The same numbers as `forward` on each of the I x T pairs, computed with the text side's
        projections once per text and the image side's once per image; only the attention
        itself runs per pair. The output projection of the attention is linear, so it is
        applied after the mean over tokens (once per pair, not per token).
        """
        t, length, _ = text_tokens.shape
        images = image_tokens.shape[0]
        attn, q_views, dim = self.attn, self.num_queries, self.out_dim
        real = text_mask.to(device=text_tokens.device, dtype=bool)  # (T, L)
        text_tokens = text_tokens.masked_fill(~real[:, :, None], 0.0)
        q = self.query(self.norm_text(text_tokens)).reshape(t, length * q_views, dim)
        q = attn._heads(attn.q(q))  # (T, H, L * Q, d)
        k, v = (attn._heads(x) for x in attn.kv(self.norm_image(image_tokens)).chunk(2, dim=-1))
        heads, queries, head_dim = q.shape[1:]
        q = q.unsqueeze(0).expand(images, -1, -1, -1, -1).flatten(0, 1)  # (I * T, H, LQ, d)
        k = k.unsqueeze(1).expand(-1, t, -1, -1, -1).flatten(0, 1)  # (I * T, H, N, d)
        v = v.unsqueeze(1).expand(-1, t, -1, -1, -1).flatten(0, 1)
        out = F.scaled_dot_product_attention(q, k, v)  # (I * T, H, LQ, d)
        out = out.transpose(1, 2).reshape(images, t, length, q_views, dim)
        summed = out.masked_fill(~real[None, :, :, None, None], 0.0).sum(2)  # (I, T, Q, D)
        count = real.sum(1).clamp(min=1).to(out.dtype)  # (T,)
        answered = attn.proj(summed / count[None, :, None, None])
        # A text without any real token pools to proj(0), as in `forward`.
        answered = answered * real.any(1)[None, :, None, None].to(answered.dtype)
        return self.proj(answered.flatten(2))  # (I, T, out_dim)


def build_attention_pool(
    cfg: AttentionPoolConfig, text_dim: int, image_dim: int
) -> AttentionPool | None:
    """The pool sized by `cfg` for these tower widths, or None when `cfg.enabled` is False."""
    if not cfg.enabled:
        return None
    return AttentionPool(text_dim, image_dim, cfg.out_dim, cfg.num_heads, cfg.num_queries)
