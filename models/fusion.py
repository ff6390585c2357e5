"""Multimodal fusion classifier (seed 002): up to three branches, one of three ways of fusing
them, then an MLP over classes.

    image (B, C, *spatial) -> CnnEncoder.forward_features -> cnn tokens (B, N, Ci)   [cnn]
    image -> VisionTransformer.forward_features -> vit tokens (B, 1 + N, Dv)         [vit]
    input_ids, attention_mask (B, L) -> RnnTextEncoder.forward_features -> (B, L, Ht) [rnn]
    {branch: tokens} -> fusion -> fused (B, F) -> head -> logits (B, classes)

`FusionConfig.branches` picks any non-empty set: one branch is a single-modality baseline
(the paper's CNN, RNN and Transformer rows), two are an ablation (N_CNN, N_RNN,
N_Transformer: the model without that branch), three the full model.

Fusion modes (`FusionConfig.mode`):

- early: every branch's tokens projected to `dim`, tagged with a learned branch embedding,
  concatenated after a CLS token and run through `depth` shared transformer blocks (padded
  text tokens are masked out as keys); the CLS output is the fused feature, F = dim.
- late: every branch pooled to one vector (image: the mean of its tokens; text: the masked
  mean), combined by `combine`: concat (F = the sum of widths: the same fusion head as
  Alifuse's), weighted_sum (projected to `dim`, learned softmax weights, F = dim) or
  attention (projected to `dim` as tokens, a learned fusion token attends over them,
  F = dim): the paper's "direct splicing", "weighted summation" and "attention mechanism".
- intermediate: every branch's tokens projected to `dim`, then `depth` rounds in which each
  branch's tokens attend to the other branches' tokens (the project's `CrossBlock`, every
  stream reading the others of the previous round); each stream pooled and concatenated,
  F = branches * dim.

CNN tokens carry no position embedding: the convolutions' receptive fields and zero padding
already encode where a feature is, and every mode pools or attends without needing order.

Text is right-padded (`attention_mask` rows are ones then zeros, each with at least one
one). The recurrent encoder runs on packed sequences, so padding ids never enter the
computation, and every mode masks padding out of attention and pooling: logits do not
depend on what sits in the padded positions or on how much padding there is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.attention import Attention, Block, CrossBlock, init_vit_weights
from models.losses import classification_loss
from models.vit import VisionConfig, VisionTransformer

# ---- configs --------------------------------------------------------------------------------


@dataclass
class CnnConfig:
    """ResNet-style image encoder: a stride-4 stem, then one stage per entry of `widths`.

    Stage i has `blocks_per_stage[i]` basic residual blocks of width `widths[i]`; every stage
    after the first halves the resolution, so the final map is input / (4 * 2 ** (S - 1)).
    Group norm by default: batch statistics are meaningless at a few samples per rank.
    """

    spatial_dims: Literal[2, 3] = 3
    in_chans: int = 1
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    blocks_per_stage: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    norm: Literal["batch", "group"] = "group"
    norm_groups: int = 8  # group norm only; must divide every width

    def __post_init__(self) -> None:
        for name in ("in_chans", "norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths={self.widths}: expected a non-empty list of values >= 1")
        if len(self.blocks_per_stage) != len(self.widths) or any(
            n < 1 for n in self.blocks_per_stage
        ):
            raise ValueError(
                f"blocks_per_stage={self.blocks_per_stage}: expected one value >= 1 per stage "
                f"of widths={self.widths}"
            )
        if self.norm == "group" and any(w % self.norm_groups for w in self.widths):
            raise ValueError(
                f"norm_groups={self.norm_groups}: expected a divisor of every width in "
                f"widths={self.widths}"
            )


@dataclass
class RnnTextConfig:
    """Recurrent text encoder: token embedding, then a (bi)directional GRU or LSTM."""

    vocab_size: int = 0  # 0: the tokenizer's size (the trainer builds it from text.checkpoint)
    embed_dim: int = 256
    hidden_size: int = 256  # per direction; the output width doubles when bidirectional
    num_layers: int = 2
    cell: Literal["gru", "lstm"] = "gru"
    bidirectional: bool = True
    dropout: float = 0.1  # on the embeddings and between recurrent layers

    def __post_init__(self) -> None:
        for name in ("embed_dim", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size={self.vocab_size}: expected >= 1, or 0 (the tokenizer's)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: expected a value in [0, 1)")

    @property
    def out_dim(self) -> int:
        return self.hidden_size * (2 if self.bidirectional else 1)


@dataclass
class FusionConfig:
    """The fusion classifier: both encoders, the fusion mode, the head. The number of classes
    and the loss weight belong to the model section (`model.num_classes`, `model.cls_weight`)
    and are passed to `FusionModel`."""

    image: CnnConfig = field(default_factory=CnnConfig)
    text: RnnTextConfig = field(default_factory=RnnTextConfig)
    # The branches (seed 002): cnn (spatial features of the image), vit (patch tokens of the
    # image through model.vision's ViT: global features), rnn (the text); any non-empty set.
    branches: list[str] = field(default_factory=lambda: ["cnn", "rnn"])
    mode: Literal["early", "late", "intermediate"] = "intermediate"
    # late mode: how the pooled branch features combine (concat, learned weighted sum, or a
    # fusion token attending over them).
    combine: Literal["concat", "weighted_sum", "attention"] = "concat"
    dim: int = 256  # shared width of early / intermediate fusion
    num_heads: int = 8
    depth: int = 2  # transformer blocks (early) or cross-attention rounds (intermediate)
    mlp_ratio: float = 4.0  # of the transformer and cross-attention blocks
    hidden: int = 512  # the classifier MLP's hidden width
    dropout: float = 0.1  # in the classifier MLP

    def __post_init__(self) -> None:
        for name in ("dim", "num_heads", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if self.dim % self.num_heads != 0:
            raise ValueError(f"num_heads={self.num_heads}: expected a divisor of dim={self.dim}")
        known = ("cnn", "vit", "rnn")
        if (
            not self.branches
            or any(b not in known for b in self.branches)
            or len(set(self.branches)) != len(self.branches)
        ):
            raise ValueError(
                f"branches={self.branches}: expected a non-empty list of distinct names from "
                f"{list(known)}"
            )
        if self.combine != "concat" and self.mode != "late":
            raise ValueError(f"combine={self.combine}: only with mode=late (mode={self.mode})")
        if self.mode == "intermediate" and len(self.branches) < 2:
            raise ValueError(
                f"mode=intermediate needs two branches or more (branches={self.branches}); use "
                "early or late for one"
            )
        min_depth = 0 if self.mode == "late" else 1
        if self.depth < min_depth:
            raise ValueError(f"depth={self.depth}: expected >= {min_depth} with mode={self.mode}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio}: expected > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: expected a value in [0, 1)")


# ---- pooling --------------------------------------------------------------------------------


def masked_mean(h: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, L, H), (B, L) 1 = token, 0 = padding -> (B, H): the mean over real tokens."""
    keep = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
    return (h * keep).sum(1) / keep.sum(1).clamp(min=1.0)


# ---- image encoder --------------------------------------------------------------------------


def _norm_factory(cfg: CnnConfig) -> Callable[[int], nn.Module]:
    """Channels -> a norm layer of the configured kind for 2D or 3D feature maps."""
    if cfg.norm == "group":
        return lambda ch: nn.GroupNorm(cfg.norm_groups, ch)
    return nn.BatchNorm2d if cfg.spatial_dims == 2 else nn.BatchNorm3d


class BasicBlock(nn.Module):
    """ResNet basic block: relu(x' + norm(conv3(relu(norm(conv3(x)))))), 2D or 3D.

    The shortcut x' is x, or a strided 1x1 conv + norm where the block changes width or
    resolution. The last norm's scale starts at zero, so a new block is the identity on its
    residual path (timm's `zero_init_last`), which helps deep stacks train from scratch.
    """

    def __init__(
        self,
        conv: type[nn.Module],
        norm: Callable[[int], nn.Module],
        in_ch: int,
        out_ch: int,
        stride: int,
    ) -> None:
        super().__init__()
        self.conv1 = conv(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm1 = norm(out_ch)
        self.conv2 = conv(out_ch, out_ch, kernel_size=3, padding=1, bias=False)
        self.norm2 = norm(out_ch)
        self.act = nn.ReLU(inplace=True)
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                conv(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), norm(out_ch)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_ch, *S) -> (B, out_ch, *S / stride)."""
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class CnnEncoder(nn.Module):
    """ResNet-style encoder for 2D images or 3D volumes (Conv2d or Conv3d from the config).

    Interface (timm): `forward_features` -> tokens (B, N, C), the final feature map
    flattened in row-major order; `pool` -> (B, C), their global average.
    """

    def __init__(self, cfg: CnnConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_features = cfg.widths[-1]
        conv = nn.Conv2d if cfg.spatial_dims == 2 else nn.Conv3d
        pool = nn.MaxPool2d if cfg.spatial_dims == 2 else nn.MaxPool3d
        norm = _norm_factory(cfg)
        self.stem = nn.Sequential(
            conv(cfg.in_chans, cfg.widths[0], kernel_size=7, stride=2, padding=3, bias=False),
            norm(cfg.widths[0]),
            nn.ReLU(inplace=True),
            pool(kernel_size=3, stride=2, padding=1),
        )
        stages, in_ch = [], cfg.widths[0]
        for i, (width, n_blocks) in enumerate(zip(cfg.widths, cfg.blocks_per_stage, strict=True)):
            blocks = []
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(conv, norm, in_ch, width, stride))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.norm2.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, *spatial) -> tokens (B, N, C), N the final map's voxel count."""
        if x.ndim != 2 + self.cfg.spatial_dims:
            raise ValueError(
                f"image of shape {tuple(x.shape)}: expected (B, C) + {self.cfg.spatial_dims} "
                "spatial dims"
            )
        weight = self.stem[0].weight
        x = self.stages(self.stem(x.to(weight.dtype)))  # (B, C, *S')
        return x.flatten(2).transpose(1, 2)

    def pool(self, tokens: Tensor) -> Tensor:
        """(B, N, C) -> (B, C): global average."""
        return tokens.mean(1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, *spatial) -> (B, C)."""
        return self.pool(self.forward_features(x))


# ---- text encoder ---------------------------------------------------------------------------


class RnnTextEncoder(nn.Module):
    """Token embedding + GRU / LSTM over packed right-padded sequences.

    `forward_features` -> states (B, L, H) with zeros at padded positions, H = `out_dim`
    (hidden_size, doubled when bidirectional); `pool` -> (B, H), the masked mean.
    """

    def __init__(self, cfg: RnnTextConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError(
                f"vocab_size={cfg.vocab_size}: expected >= 1 (0 is resolved from the tokenizer "
                "by build_fusion_model)"
            )
        self.cfg = cfg
        self.out_dim = cfg.out_dim
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        rnn = nn.GRU if cfg.cell == "gru" else nn.LSTM
        self.rnn = rnn(
            cfg.embed_dim,
            cfg.hidden_size,
            num_layers=cfg.num_layers,
            batch_first=True,
            bidirectional=cfg.bidirectional,
            # torch applies it between layers only, and warns when there is a single layer
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        )

    @staticmethod
    def lengths(attention_mask: Tensor) -> Tensor:
        """(B, L) right-padded mask -> lengths (B,) int64 on the CPU, as packing wants them.

        Raises ValueError for an empty row or a mask that is not ones-then-zeros: both would
        be silently misread by packing.
        """
        mask = attention_mask.bool()
        lengths = mask.sum(1)
        right_padded = torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]
        lengths = lengths.cpu()
        if int(lengths.min()) < 1:
            raise ValueError("attention_mask: every row needs at least one real token")
        if not torch.equal(mask, right_padded):
            raise ValueError("attention_mask: expected right padding (ones, then zeros)")
        return lengths

    def forward_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) ids and (B, L) mask -> states (B, L, out_dim), zero at padding."""
        lengths = self.lengths(attention_mask)
        x = self.drop(self.embed(input_ids))  # (B, L, E)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        h, _ = pad_packed_sequence(out, batch_first=True, total_length=input_ids.shape[1])
        return h

    def pool(self, h: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L, H), (B, L) -> (B, H): the mean over non-padding tokens."""
        return masked_mean(h, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) ids and mask -> (B, out_dim)."""
        return self.pool(self.forward_features(input_ids, attention_mask), attention_mask)


# ---- fusion ---------------------------------------------------------------------------------

# A branch's output: tokens (B, T, D) and, for text, the (B, T) padding mask (None: all real).
Stream = tuple[Tensor, "Tensor | None"]


def pool_stream(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """(B, T, D) -> (B, D): the mean over real tokens."""
    return tokens.mean(1) if mask is None else masked_mean(tokens, mask)


class EarlyFusion(nn.Module):
    """[CLS, branch tokens...] in `dim` through shared blocks -> CLS (B, dim). Each branch's
    tokens are projected to `dim` and tagged with a learned branch embedding."""

    def __init__(self, dims: dict[str, int], cfg: FusionConfig) -> None:
        super().__init__()
        self.out_dim = cfg.dim
        self.proj = nn.ModuleDict({b: nn.Linear(d, cfg.dim) for b, d in dims.items()})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.branch_type = nn.ParameterDict(
            {b: nn.Parameter(torch.zeros(1, 1, cfg.dim)) for b in dims}
        )
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.apply(init_vit_weights)
        nn.init.normal_(self.cls_token, std=0.02)
        for p in self.branch_type.values():
            nn.init.normal_(p, std=0.02)

    def forward(self, streams: dict[str, Stream]) -> Tensor:
        """{branch: (tokens (B, T, D), mask or None)} -> (B, dim)."""
        first = next(iter(streams.values()))[0]
        parts = [self.cls_token.expand(first.shape[0], -1, -1)]
        keep = [first.new_ones(first.shape[0], 1, dtype=torch.bool)]
        for b, (tokens, mask) in streams.items():
            parts.append(self.proj[b](tokens) + self.branch_type[b])
            keep.append(
                tokens.new_ones(tokens.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
            )
        x, keep_all = torch.cat(parts, dim=1), torch.cat(keep, dim=1)
        for block in self.blocks:
            x = block(x, keep_all)
        return self.norm(x[:, 0])


class LateFusion(nn.Module):
    """Each branch pooled to one vector (image tokens: mean; text: masked mean), then combined
    (`FusionConfig.combine`):

    - concat: [pooled branches] -> (B, sum of widths): the same fusion head as Alifuse's;
    - weighted_sum: each projected to `dim`, summed with learned softmax weights -> (B, dim);
    - attention: each projected to `dim` (+ a branch embedding) as one token; a learned fusion
      token attends over them (multi-head cross-attention) -> (B, dim).
    """

    def __init__(self, dims: dict[str, int], cfg: FusionConfig) -> None:
        super().__init__()
        self.combine = cfg.combine
        if self.combine == "concat":
            self.out_dim = sum(dims.values())
            return
        self.out_dim = cfg.dim
        self.proj = nn.ModuleDict({b: nn.Linear(d, cfg.dim) for b, d in dims.items()})
        if self.combine == "weighted_sum":
            self.branch_logits = nn.Parameter(torch.zeros(len(dims)))  # equal weights at start
        else:
            self.fusion_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
            self.branch_type = nn.Parameter(torch.zeros(1, len(dims), cfg.dim))
            self.norm_context = nn.LayerNorm(cfg.dim, eps=1e-6)
            self.attn = Attention(cfg.dim, cfg.num_heads, context_dim=cfg.dim)
            self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.apply(init_vit_weights)
        if self.combine == "attention":
            nn.init.normal_(self.fusion_token, std=0.02)
            nn.init.normal_(self.branch_type, std=0.02)

    def branch_weights(self) -> Tensor:
        """weighted_sum: the branches' weights (n,), summing to 1."""
        return self.branch_logits.softmax(0)

    def forward(self, streams: dict[str, Stream]) -> Tensor:
        """{branch: (tokens, mask or None)} -> (B, out_dim)."""
        pooled = {b: pool_stream(t, m) for b, (t, m) in streams.items()}
        if self.combine == "concat":
            return torch.cat(list(pooled.values()), dim=-1)
        projected = torch.stack([self.proj[b](v) for b, v in pooled.items()], dim=1)  # (B, n, dim)
        if self.combine == "weighted_sum":
            return (self.branch_weights()[None, :, None] * projected).sum(1)
        context = self.norm_context(projected + self.branch_type)
        query = self.fusion_token.expand(projected.shape[0], -1, -1)
        return self.norm(query + self.attn(query, context))[:, 0]


class IntermediateFusion(nn.Module):
    """Every branch's tokens, projected to `dim`, attend to the other branches' tokens for
    `depth` rounds (the project's `CrossBlock`; each round reads the previous round's
    streams), then each stream is pooled and the results concatenated -> (B, n * dim).

    The CrossBlocks' gates start at zero (see `CrossBlock`): at initialisation this is late
    fusion of the projected tokens, and cross-modal exchange opens as training asks for it.
    """

    def __init__(self, dims: dict[str, int], cfg: FusionConfig) -> None:
        super().__init__()
        self.out_dim = len(dims) * cfg.dim
        self.proj = nn.ModuleDict({b: nn.Linear(d, cfg.dim) for b, d in dims.items()})
        self.cross = nn.ModuleDict(  # branch queries; the other branches' keys and values
            {
                b: nn.ModuleList(
                    CrossBlock(cfg.dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio)
                    for _ in range(cfg.depth)
                )
                for b in dims
            }
        )
        self.norm = nn.ModuleDict({b: nn.LayerNorm(cfg.dim, eps=1e-6) for b in dims})
        self.apply(init_vit_weights)

    def forward(self, streams: dict[str, Stream]) -> Tensor:
        """{branch: (tokens, mask or None)} -> (B, n * dim)."""
        x = {b: self.proj[b](t) for b, (t, _) in streams.items()}
        keep = {
            b: t.new_ones(t.shape[:2], dtype=torch.bool) if m is None else m.bool()
            for b, (t, m) in streams.items()
        }
        for r in range(len(next(iter(self.cross.values())))):
            # Padded text rows are queries too, but masked out as keys and in the pooling.
            x = {
                b: self.cross[b][r](
                    x[b],
                    torch.cat([x[o] for o in x if o != b], dim=1),
                    torch.cat([keep[o] for o in x if o != b], dim=1),
                )
                for b in x
            }
        return torch.cat([pool_stream(self.norm[b](x[b]), streams[b][1]) for b in x], dim=-1)


FUSIONS: dict[str, type[nn.Module]] = {
    "early": EarlyFusion,
    "late": LateFusion,
    "intermediate": IntermediateFusion,
}


# ---- the composed model ---------------------------------------------------------------------


class FusionModel(nn.Module):
    """Image (+ text) -> class. Branches (`FusionConfig.branches`): `image` (CnnEncoder,
    spatial features), `vit` (VisionTransformer, patch tokens and CLS: global features),
    `text` (RnnTextEncoder); `fusion` (the configured mode's module), `head` (MLP over the
    fused feature). `tokenizer` is what the reader tokenizes the texts with (its ids index
    the RNN's embedding); None without a text branch (the batches then carry no text)."""

    def __init__(
        self,
        cfg: FusionConfig,
        num_classes: int,
        cls_weight: float = 1.0,
        tokenizer: Any = None,
        vision: VisionConfig | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: expected >= 2")
        if cls_weight <= 0:
            raise ValueError(f"cls_weight={cls_weight}: expected > 0 (the only objective)")
        self.cfg = cfg
        self.cls_weight = cls_weight
        self.branches = list(cfg.branches)
        self.tokenizer = tokenizer if "rnn" in self.branches else None
        dims = {}
        self.image = self.vit = self.text = None
        for branch in self.branches:
            if branch == "cnn":
                self.image = CnnEncoder(cfg.image)
                dims["cnn"] = self.image.num_features
            elif branch == "vit":
                if vision is None:
                    raise ValueError("fusion.branches has vit: pass the model.vision settings")
                self.vit = VisionTransformer(vision)
                dims["vit"] = vision.embed_dim
            else:
                self.text = RnnTextEncoder(cfg.text)
                dims["rnn"] = self.text.out_dim
        self.fusion = FUSIONS[cfg.mode](dims, cfg)
        self.head = nn.Sequential(
            nn.Linear(self.fusion.out_dim, cfg.hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity(),
            nn.Linear(cfg.hidden, num_classes),
        )
        self.head.apply(init_vit_weights)

    def streams(
        self, image: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> dict[str, Stream]:
        """Every branch's tokens, in `branches` order."""
        out: dict[str, Stream] = {}
        for branch in self.branches:
            if branch == "cnn":
                out["cnn"] = (self.image.forward_features(image), None)  # (B, N, Ci)
            elif branch == "vit":
                out["vit"] = (self.vit.forward_features(image), None)  # (B, 1 + N, Dv)
            else:
                out["rnn"] = (self.text.forward_features(input_ids, attention_mask), attention_mask)
        return out

    def forward_logits(
        self, image: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """image (B, C, *spatial), input_ids and attention_mask (B, L) -> logits (B, classes)."""
        return self.head(self.fusion(self.streams(image, input_ids, attention_mask)))

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """batch: image (B, C, *spatial), input_ids (B, L) and attention_mask (B, L) with a text
        branch, label (B,); other keys are ignored. -> cls_loss (cross-entropy times
        cls_weight), logits (B, K)."""
        logits = self.forward_logits(
            batch["image"], batch.get("input_ids"), batch.get("attention_mask")
        )
        loss = classification_loss(logits, batch["label"], batch.get("binary"))
        return {"cls_loss": self.cls_weight * loss, "logits": logits}

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay: tokens, branch embeddings, norms, biases,
        gates, the branch weights."""
        return {
            n
            for n, p in self.named_parameters()
            if p.ndim <= 1
            or "cls_token" in n
            or "branch_type" in n
            or "fusion_token" in n
            or n.endswith("pos_embed")
        }


def build_fusion_model(
    cfg: FusionConfig,
    num_classes: int,
    cls_weight: float,
    tokenizer: Any,
    vision: VisionConfig | None = None,
) -> FusionModel:
    """The fusion classifier for a tokenizer: `text.vocab_size` 0 becomes the tokenizer's size;
    a smaller explicit vocabulary than the tokenizer's is an error (ids would overflow)."""
    if "rnn" in cfg.branches:
        size = len(tokenizer)
        vocab = cfg.text.vocab_size or size
        if vocab < size:
            raise ValueError(
                f"fusion.text.vocab_size={vocab}: the tokenizer has {size} tokens; use 0 (the "
                "tokenizer's size) or a larger value"
            )
        cfg = replace(cfg, text=replace(cfg.text, vocab_size=vocab))
    return FusionModel(cfg, num_classes, cls_weight, tokenizer, vision)
