"""A light transformer decoder that reconstructs masked text tokens (Alifuse's text decoder).

    image-grounded text states (B, L, Dt) -> linear to `width` -> `depth` transformer blocks
    (bidirectional, padding masked out as keys) -> LayerNorm -> linear to the vocabulary
    -> logits (B, L, V)

The alternative (`kind: mlm_head`) is the text checkpoint's own masked-LM head, which needs no
new weights; the paper puts eight blocks of width 768 and a linear projection there instead
(section II, "Unimodal Decoder"). The states already carry positions (the text encoder added
them), so the decoder adds none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from models.attention import Block, init_vit_weights


@dataclass
class TextDecoderConfig:
    """What predicts the masked tokens: the checkpoint's MLM head, or a transformer decoder."""

    kind: Literal["mlm_head", "transformer"] = "mlm_head"
    depth: int = 8
    width: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("depth", "width", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if self.width % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads}: expected a divisor of width={self.width}"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio}: expected > 0")


class TextDecoder(nn.Module):
    """(B, L, in_dim) states, (B, L) attention mask -> (B, L, vocab_size) logits."""

    def __init__(self, in_dim: int, vocab_size: int, cfg: TextDecoderConfig) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, cfg.width)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.pred = nn.Linear(cfg.width, vocab_size)
        self.apply(init_vit_weights)

    def forward(self, h: Tensor, attention_mask: Tensor) -> Tensor:
        """h (B, L, in_dim), attention_mask (B, L) 1 = token -> logits (B, L, vocab_size)."""
        x = self.embed(h)
        keep = attention_mask.bool()
        for block in self.blocks:
            x = block(x, keep)
        return self.pred(self.norm(x))
