"""Alifuse-style image-text model: contrastive alignment, masked image and text reconstruction
through cross-modal grounded encoders, and a fusion classifier (Chen and Hong, "Alifuse").

Tasks (`AlifuseConfig.task`) and the loss terms each trains:

    pretrain   itc, mae, mlm (those with weight > 0): the alignment stage of a two-stage run
    classify   cls: the fusion classifier, usually from a pretraining run's towers
    joint      itc, mae, mlm and cls at once: the paper's eq. (5),
               itc_weight * L_cl + mae_weight * L_res^I + mlm_weight * L_res^T + cls_weight * L_cls

Parts (attribute names are stable across tasks, so pretrained weights load by name):

- `visual`: ViT (2D or 3D); None with `image_tower: none` (text-only, Alifuse-T).
- `text`: BERT-family `TextTower` (frozen, LoRA or full), or with `text_tower: llama` a
  `LlamaTower` (4-bit NF4 + LoRA, LoRA, or frozen; models/llama_text.py); None with
  `text_tower: none` (image-only: MAE pretraining, or Alifuse-I). LLaMA is causal and has no
  MLM head: with it `mlm_weight` is 0 and there are no image-grounded text layers.
- `image_proj`, `text_proj`, `logit_scale`: ITC heads and the learned temperature.
- `attention_pool` (with `attention_pool.enabled`): the ITC image side becomes the report's
  tokens attention-pooled over the image's tokens (models/pooling.py), so every (image,
  report) pair is scored jointly (`PairwiseClipLoss`); `image_proj` is then not built.
- `image_cross`: cross-attention on text for the last `cross_layers_image` ViT blocks; with
  them the ViT is the text-grounded image encoder (the two image encoders share every weight
  but these). `cross_attention: between` puts a `CrossAttentionLayer` between each block's
  self-attention and MLP (the paper); `after` a gated `CrossBlock` after the block.
- `text_cross`: the same for the last `cross_layers_text` BERT layers: the image-grounded
  text encoder.
- `decoder`: MAE decoder. `text_decoder`: with `text_decoder.kind: transformer` the paper's
  light decoder + linear projection onto the vocabulary; with `mlm_head` (default) the text
  checkpoint's own MLM head predicts the masked tokens.
- `fusion_head`: MLP (GELU or ReLU) over [image CLS, text pooled] -> classes.

Only the parts an enabled objective uses are built (the others are `nn.Identity()`, empty or
None), so every trainable parameter receives a gradient every step: DDP needs no
`find_unused_parameters`, and a run's checkpoint holds no dead weights.

Passes (each pair passes twice, as in the paper: unimodal encoders on the whole inputs for
ITC and classification, grounded encoders on the masked inputs for reconstruction):

    text -> BERT = unimodal text tokens z_T -> ITC, classification, the MAE pass's context
    image -> ViT = unimodal image tokens z_I -> ITC, classification, the MLM pass's context
    masked image -> ViT with cross-attention on z_T -> MAE decoder -> L_res^I
    masked text -> BERT with cross-attention on z_I -> text decoder / MLM head -> L_res^T

`unimodal_image: masked` is a shortcut: z_I for ITC (and the MLM context) comes from the
masked image instead of a second pass over the whole image, and the masked pass is shared
up to the first grounded block. Classification always sees the whole inputs; with
`fusion_features: grounded` its features come from the grounded encoders run on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import CrossAttentionLayer, CrossBlock, init_vit_weights
from models.baselines import ARCHS as BASELINE_ARCHS
from models.baselines import BaselineConfig, build_baseline
from models.fusion import FusionConfig, build_fusion_model
from models.heads import MultiLabelConfig, MultiLabelModel
from models.llama_text import LlamaTextConfig, LlamaTower, build_llama_tower
from models.losses import (
    ClipLoss,
    MarginLoss,
    PairwiseClipLoss,
    classification_loss,
    infonce,
    mlm_loss,
)
from models.mae import MAEDecoder, mae_loss, patchify
from models.pooling import AttentionPoolConfig, build_attention_pool
from models.text import TextConfig, TextTower, build_text_tower, load_tokenizer, local_checkpoint
from models.text_decoder import TextDecoder, TextDecoderConfig
from models.vit import VisionConfig, VisionTransformer

OBJECTIVES = ("itc", "mae", "mlm", "cls")
# task -> the objectives it may train (each needs its weight > 0)
TASK_OBJECTIVES = {
    "pretrain": ("itc", "mae", "mlm"),
    "classify": ("cls",),
    "joint": ("itc", "mae", "mlm", "cls"),
    "multilabel": (),
}


@dataclass
class AlifuseConfig:
    """The composed model: towers, fusion, ITC settings and the weight of each objective."""

    # pretrain: ITC + MAE + MLM; classify: fusion classifier (image + text -> one class);
    # joint: both at once (Alifuse eq. 5); multilabel: image-only multi-label heads
    # (models/heads.py, e.g. the 14 CheXpert labels).
    task: Literal["pretrain", "classify", "joint", "multilabel"] = "pretrain"
    # alifuse: this module's ViT + BERT / LLaMA model. fusion: the CNN + recurrent-text fusion
    # classifier of models/fusion.py (`fusion` section; task classify; its tokenizer is the one
    # in text.checkpoint, its classes and loss weight are num_classes and cls_weight below).
    # resnet3d, medicalnet, vit, bert, perceiver, irene: the baseline classifiers of
    # models/baselines.py (`baseline` section; task classify).
    arch: Literal[
        "alifuse", "fusion", "resnet3d", "medicalnet", "vit", "bert", "perceiver", "irene"
    ] = "alifuse"
    fusion: FusionConfig = field(default_factory=FusionConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    # none: a text-only model (Alifuse-T of the paper's Table III); no image tower is built.
    image_tower: Literal["vit", "none"] = "vit"
    # Which of `text` / `llama` is the text tower; none: an image-only model (MAE pretraining,
    # the MAE-only baseline, or Alifuse-I); no text is loaded or tokenized.
    text_tower: Literal["bert", "llama", "none"] = "bert"
    text: TextConfig = field(default_factory=TextConfig)
    llama: LlamaTextConfig = field(default_factory=LlamaTextConfig)
    attention_pool: AttentionPoolConfig = field(default_factory=AttentionPoolConfig)
    multilabel: MultiLabelConfig = field(default_factory=MultiLabelConfig)
    text_decoder: TextDecoderConfig = field(default_factory=TextDecoderConfig)
    embed_dim: int = 256  # ITC projection size
    # Where the grounded encoders' cross-attention sits: between self-attention and MLP of each
    # grounded block (the paper), or in a gated block after it.
    cross_attention: Literal["after", "between"] = "after"
    cross_layers_image: int | Literal["all"] = 2  # last N ViT blocks are grounded ("all": every)
    cross_layers_text: int | Literal["all"] = 2  # last N BERT layers are grounded ("all": every)
    # Where the unimodal image features of ITC (and the MLM pass's context) come from: a pass
    # over the whole image (the paper), or the masked image's pass (a shortcut; see above).
    unimodal_image: Literal["full", "masked"] = "masked"
    # true: text tokens are masked at vision.mask_ratio, one mask ratio for both modalities
    # (the paper: 0.5); false: at text.mlm_probability (BERT's 0.15).
    shared_mask_ratio: bool = False
    fusion_hidden: int = 512
    fusion_activation: Literal["gelu", "relu"] = "gelu"
    num_classes: int = 3
    fusion_features: Literal["grounded", "unimodal"] = "grounded"
    # ITC criterion: symmetric InfoNCE with a learned temperature (CLIP), or the margin-based
    # pairwise loss of the MAE + LLaMA report (eq. 1; models/losses.py: MarginLoss), whose
    # margin is a distance between unit vectors (no temperature is learned then).
    contrastive: Literal["infonce", "margin"] = "infonce"
    margin: float = 1.0
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    gather_with_grad: bool = True
    local_loss: bool = False
    itc_weight: float = 1.0
    mae_weight: float = 1.0
    mlm_weight: float = 1.0
    cls_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("embed_dim", "fusion_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes}: expected >= 2")
        depth = self.vision.depth if isinstance(self.vision, VisionConfig) else None
        for name, bound in (("cross_layers_image", depth), ("cross_layers_text", None)):
            value = getattr(self, name)
            if value == "all":
                continue
            if value < 0 or (bound is not None and value > bound):
                allowed = f"[0, vision.depth={bound}]" if bound is not None else ">= 0"
                raise ValueError(f"{name}={value}: expected 'all' or a value in {allowed}")
        if not 0.0 < self.margin <= 2.0:
            raise ValueError(f"margin={self.margin}: expected a value in (0, 2] (unit vectors)")
        if self.init_temperature <= 0:
            raise ValueError(f"init_temperature={self.init_temperature}: expected > 0")
        if self.max_logit_scale < 1.0 / self.init_temperature:
            raise ValueError(
                f"max_logit_scale={self.max_logit_scale}: expected >= 1 / init_temperature "
                f"= {1.0 / self.init_temperature:g}, or the clamp overrides the initial value"
            )
        for name in ("itc_weight", "mae_weight", "mlm_weight", "cls_weight"):
            value = getattr(self, name)
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"{name}={value}: expected a number >= 0")
        if self.arch == "fusion" or self.arch in BASELINE_ARCHS:
            if self.task != "classify":
                raise ValueError(
                    f"task={self.task}: arch={self.arch} is a classifier; expected task: classify"
                )
            return
        if self.task == "multilabel":
            return
        self._check_objectives()

    def _check_objectives(self) -> None:
        """What the towers can train: each enabled objective needs its inputs."""
        objectives = self.objectives
        if not objectives:
            weights = ", ".join(f"{o}_weight" for o in TASK_OBJECTIVES[self.task])
            raise ValueError(f"{weights}: all 0, task={self.task} has nothing to train")
        if self.task == "joint" and "cls" not in objectives:
            raise ValueError(
                "cls_weight=0 with task=joint: joint training includes the classifier; "
                "use task: pretrain for alignment alone"
            )
        image, text = self.image_tower != "none", self.text_tower != "none"
        if not (image or text):
            raise ValueError("image_tower=none and text_tower=none: expected at least one tower")
        needs = {
            "itc": (image and text, "both towers"),
            "mae": (image, "an image tower"),
            "mlm": (self.text_tower == "bert", "a masked-LM text tower (text_tower: bert)"),
        }
        for name, (ok, what) in needs.items():
            if name in objectives and not ok:
                raise ValueError(
                    f"{name}_weight={getattr(self, name + '_weight')}: {name} needs {what} "
                    f"(image_tower={self.image_tower}, text_tower={self.text_tower}); "
                    f"set {name}_weight: 0"
                )
        if "cls" in objectives and self.fusion_features == "grounded" and not (image and text):
            raise ValueError(
                "fusion_features=grounded needs both towers; expected fusion_features: unimodal"
            )
        if not text and self.cross_layers_image not in (0,):
            raise ValueError(
                f"cross_layers_image={self.cross_layers_image}: without a text tower there is "
                "nothing to ground the image in; expected cross_layers_image: 0"
            )
        if not image and self.cross_layers_text not in (0,):
            raise ValueError(
                f"cross_layers_text={self.cross_layers_text}: without an image tower there is "
                "nothing to ground the text in; expected cross_layers_text: 0"
            )
        if self.text_tower == "llama" and self.cross_layers_text not in (0,):
            grounded_text = "mlm" in objectives or (
                "cls" in objectives and self.fusion_features == "grounded"
            )
            if grounded_text:
                raise ValueError(
                    f"cross_layers_text={self.cross_layers_text}: the LLaMA tower has no "
                    "image-grounded text layers; set cross_layers_text: 0"
                )
        if isinstance(self.vision, VisionConfig) and "mae" in objectives:
            if self.vision.mask_ratio == 0:
                raise ValueError(
                    "vision.mask_ratio=0 with mae_weight > 0: MAE needs masked patches"
                )
        if self.shared_mask_ratio and "mlm" in objectives and self.vision.mask_ratio == 0:
            raise ValueError(
                "shared_mask_ratio=true masks the text at vision.mask_ratio, which is 0: "
                "MLM needs masked tokens"
            )
        pool = self.attention_pool
        if isinstance(pool, AttentionPoolConfig) and pool.enabled:
            if "itc" not in objectives:
                raise ValueError(
                    "attention_pool.enabled: the pool is an ITC head; expected task: pretrain "
                    "or joint with itc_weight > 0"
                )
            if pool.out_dim != self.embed_dim:
                raise ValueError(
                    f"attention_pool.out_dim={pool.out_dim}: expected embed_dim="
                    f"{self.embed_dim} (the pooled vector is compared with the text embedding)"
                )

    @property
    def objectives(self) -> tuple[str, ...]:
        """The loss terms this config trains (a task's objectives with weight > 0)."""
        if self.arch != "alifuse" or self.task == "classify":
            return ("cls",)  # a classifier always has its head; cls_weight 0: logits only
        allowed = TASK_OBJECTIVES[self.task]
        return tuple(o for o in OBJECTIVES if o in allowed and getattr(self, f"{o}_weight") > 0)

    @property
    def has_itc(self) -> bool:
        """Whether the model has the ITC heads (retrieval and zero-shot need them)."""
        return self.arch == "alifuse" and "itc" in self.objectives

    @property
    def text_max_length(self) -> int:
        """Tokens per text for the configured tower (the reader pads and truncates to it)."""
        return self.llama.max_length if self.text_tower == "llama" else self.text.max_length


def _grounded_count(value: int | str, depth: int) -> int:
    """cross_layers_* as a number of blocks ("all": every block)."""
    return depth if value == "all" else min(int(value), depth)


class AlifuseModel(nn.Module):
    """See the module docstring. `forward(batch) -> dict` of weighted `*_loss` terms and more."""

    def __init__(self, cfg: AlifuseConfig, text_tower: TextTower | LlamaTower | None) -> None:
        super().__init__()
        self.cfg = cfg
        v = cfg.vision
        self.objectives = frozenset(cfg.objectives)
        self.use_itc, self.use_mae, self.use_mlm, self.use_cls = (
            o in self.objectives for o in OBJECTIVES
        )
        grounded_cls = self.use_cls and cfg.fusion_features == "grounded"
        between = cfg.cross_attention == "between"
        n_text_layers = 0 if text_tower is None else len(text_tower.layers)
        if isinstance(cfg.cross_layers_text, int) and text_tower is not None:
            if cfg.cross_layers_text > n_text_layers:
                raise ValueError(
                    f"cross_layers_text={cfg.cross_layers_text}: expected 'all' or a value in "
                    f"[0, {n_text_layers}] (the text checkpoint's layers)"
                )
        n_img = n_txt = 0
        if text_tower is not None and (self.use_mae or grounded_cls):
            n_img = _grounded_count(cfg.cross_layers_image, v.depth)
        if cfg.image_tower != "none" and (self.use_mlm or grounded_cls):
            n_txt = _grounded_count(cfg.cross_layers_text, n_text_layers)
        if between and n_txt and not text_tower.supports_inner_cross_attention():
            raise ValueError(
                "cross_attention=between: the text checkpoint's layers do not split into "
                "attention and feed-forward parts (BERT-shaped layers do); use "
                "cross_attention: after"
            )
        d_img = v.embed_dim if cfg.image_tower != "none" else 0
        d_txt = 0 if text_tower is None else text_tower.hidden_size

        self.visual = VisionTransformer(v) if cfg.image_tower != "none" else None
        self.text = text_tower
        pool_cfg = cfg.attention_pool if self.use_itc else AttentionPoolConfig()
        self.attention_pool = build_attention_pool(pool_cfg, d_txt, d_img)
        if self.use_itc:
            self.image_proj = (
                nn.Linear(d_img, cfg.embed_dim) if self.attention_pool is None else nn.Identity()
            )
            self.text_proj = nn.Linear(d_txt, cfg.embed_dim)
            if cfg.contrastive == "infonce":
                # Shape [1], not a scalar: DeepSpeed cannot flatten 0-dim parameters.
                self.logit_scale = nn.Parameter(
                    torch.full((1,), math.log(1 / cfg.init_temperature))
                )
            else:  # the margin loss compares distances: no temperature to learn
                self.register_parameter("logit_scale", None)
        else:
            self.image_proj, self.text_proj = nn.Identity(), nn.Identity()
            self.register_parameter("logit_scale", None)
        if between:
            self.image_cross = nn.ModuleList(
                CrossAttentionLayer(d_img, v.num_heads, context_dim=d_txt) for _ in range(n_img)
            )
            self.text_cross = nn.ModuleList(
                CrossAttentionLayer(
                    d_txt, text_tower.num_heads, d_img, "post", text_tower.layer_norm_eps
                )
                for _ in range(n_txt)
            )
        else:
            self.image_cross = nn.ModuleList(
                CrossBlock(d_img, v.num_heads, context_dim=d_txt, mlp_ratio=v.mlp_ratio)
                for _ in range(n_img)
            )
            self.text_cross = nn.ModuleList(
                CrossBlock(d_txt, text_tower.num_heads, context_dim=d_img) for _ in range(n_txt)
            )
        self.decoder = MAEDecoder(v) if self.use_mae else nn.Identity()
        own_decoder = self.use_mlm and cfg.text_decoder.kind == "transformer"
        self.text_decoder = (
            TextDecoder(d_txt, text_tower.vocab_size, cfg.text_decoder)
            if own_decoder
            else nn.Identity()
        )
        activation = nn.ReLU() if cfg.fusion_activation == "relu" else nn.GELU()
        self.fusion_head = (
            nn.Sequential(
                nn.Linear(d_img + d_txt, cfg.fusion_hidden),
                activation,
                nn.Linear(cfg.fusion_hidden, cfg.num_classes),
            )
            if self.use_cls
            else nn.Identity()
        )
        for part in (self.image_proj, self.text_proj, self.image_cross, self.text_cross):
            part.apply(init_vit_weights)
        self.fusion_head.apply(init_vit_weights)
        if self.attention_pool is not None:
            self.attention_pool.apply(init_vit_weights)
        criterion = MarginLoss(cfg.margin) if cfg.contrastive == "margin" else infonce
        self.clip_loss = ClipLoss(
            local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, criterion=criterion
        )
        self.pair_loss = PairwiseClipLoss(
            gather_with_grad=cfg.gather_with_grad, criterion=criterion
        )
        if text_tower is not None and not (
            self.use_itc or self.use_mlm or self.use_cls or len(self.image_cross)
        ):
            # A tower no objective reads (MAE alone, ungrounded): frozen, so every trainable
            # parameter still receives a gradient.
            text_tower.requires_grad_(False)
        if not (self.use_mlm and not own_decoder) and isinstance(text_tower, TextTower):
            # Without MLM through it the head is unused; freezing it keeps "full" mode free of
            # parameters without gradients. Its decoder weight is tied to the word embeddings:
            # keep those.
            tied = {id(p) for p in text_tower.encoder_model.embeddings.parameters()}
            for p in text_tower.mlm_head.parameters():
                if id(p) not in tied:
                    p.requires_grad_(False)

        # Blocks [0, split) run once and are shared by the unimodal and grounded passes over
        # the same input: everything before the first block whose output the grounding changes
        # (a cross layer inside block i changes block i; a CrossBlock after it, block i + 1).
        shared = 0 if between else 1
        depth = v.depth if self.visual is not None else 0
        self.image_split = depth - n_img + shared if n_img else depth
        self.text_split = n_text_layers - n_txt + shared if n_txt else n_text_layers
        self.max_log_scale = math.log(cfg.max_logit_scale)

    def train(self, mode: bool = True) -> AlifuseModel:
        """Like nn.Module.train, but a frozen text tower (no parameter trains) stays in eval
        mode: its dropout is off, so it maps a text to the same states every step (the states
        a text cache stores, trainer/text_cache.py)."""
        super().train(mode)
        if self.text is not None and not any(p.requires_grad for p in self.text.parameters()):
            self.text.eval()
        return self

    @property
    def tokenizer(self):
        """The text tower's tokenizer (the reader tokenizes batches with it); None without one."""
        return None if self.text is None else self.text.tokenizer

    # ---- parts ---------------------------------------------------------------------------

    def _image_cross_at(self) -> dict[int, nn.Module]:
        """ViT block index -> the cross layer that grounds it (the last blocks)."""
        depth = len(self.visual.blocks)
        return dict(zip(range(depth - len(self.image_cross), depth), self.image_cross, strict=True))

    def _text_cross_at(self) -> dict[int, nn.Module]:
        """BERT layer index -> the cross layer that grounds it (the last layers)."""
        n_layers = len(self.text.layers)
        return dict(
            zip(range(n_layers - len(self.text_cross), n_layers), self.text_cross, strict=True)
        )

    def image_trunk(self, image: Tensor, mask_ratio: float = 0.0) -> tuple[Tensor, Any]:
        """(B, C, *spatial) -> the shared blocks' output (B, 1 + K, Di) and the masking."""
        emb = self.visual.embed(image, mask_ratio)
        return self.visual.forward_blocks(emb.tokens, 0, self.image_split), emb

    def image_unimodal(self, trunk: Tensor) -> Tensor:
        """Trunk (B, T, Di) -> normed unimodal image tokens (B, T, Di)."""
        return self.visual.norm(self.visual.forward_blocks(trunk, self.image_split))

    def image_grounded(self, trunk: Tensor, text_tokens: Tensor, text_keep: Tensor) -> Tensor:
        """Trunk (B, T, Di) attending to text (B, L, Dt), text_keep (B, L) -> (B, T, Di)."""
        x = self.visual.forward_blocks(
            trunk, self.image_split, None, self._image_cross_at(), text_tokens, text_keep
        )
        return self.visual.norm(x)

    def text_grounded(
        self, h: Tensor, attention_mask: Tensor, image_tokens: Tensor | None, start: int = 0
    ) -> Tensor:
        """Text states (B, L, Dt) after layers [0, start) attending to image (B, T, Di)."""
        if image_tokens is None:  # no image tower: the plain text encoder
            return self.text.run_layers(h, attention_mask, start)
        return self.text.run_layers(
            h, attention_mask, start, None, self._text_cross_at(), image_tokens, None
        )

    def scale(self) -> Tensor:
        """exp(logit_scale) clamped to max_logit_scale, shape (1,); 1 for the margin loss."""
        if self.logit_scale is None:
            return torch.ones(1, device=self.text_proj.weight.device)
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def image_state(self, image_tokens: Tensor) -> dict[str, Tensor]:
        """Normed image tokens (B, T, Di) -> what ITC compares: {"emb": (B, embed_dim)}
        L2-normalised, or with the attention pool {"tokens": the tokens}."""
        if self.attention_pool is not None:
            return {"tokens": image_tokens}
        return {"emb": F.normalize(self.image_proj(self.visual.pool(image_tokens)), dim=-1)}

    def text_state(
        self,
        text_tokens: Tensor | None,
        attention_mask: Tensor | None,
        pooled: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Text states (B, L, Dt), mask (B, L) -> {"emb": (B, embed_dim)} L2-normalised, and
        with the attention pool also the tokens and mask it pools. `pooled` (B, Dt): the
        tower's pooled vectors when given instead of the states (a text cache)."""
        if pooled is None:
            pooled = self.text.pool(text_tokens, attention_mask)
        state = {"emb": F.normalize(self.text_proj(pooled.to(self.text_proj.weight.dtype)), dim=-1)}
        if self.attention_pool is not None:
            state.update(tokens=text_tokens, mask=attention_mask)
        return state

    def similarity(
        self, image_state: dict[str, Tensor], text_state: dict[str, Tensor], max_pairs: int = 4096
    ) -> Tensor:
        """Cosine similarity (bi, bt) of every image against every text.

        Without the pool a matrix product; with it, text j pooled over image i's tokens and
        compared with text j's embedding, `max_pairs` pairs at a time.
        """
        text_emb = text_state["emb"]
        if self.attention_pool is None:
            return image_state["emb"] @ text_emb.T
        image, bt = image_state["tokens"], text_emb.shape[0]
        tokens, mask = text_state["tokens"], text_state["mask"]
        rows = []
        for start in range(0, image.shape[0], max(1, max_pairs // bt)):
            part = image[start : start + max(1, max_pairs // bt)]  # (n, T, Di)
            pooled = F.normalize(self.attention_pool.pairs(tokens, mask, part), dim=-1)
            rows.append((pooled * text_emb.unsqueeze(0)).sum(-1))  # (n, bt)
        return torch.cat(rows)

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay: tokens, position tables, temperature,
        norms, biases, gates."""
        named = {
            "visual.cls_token",
            "visual.pos_embed",
            "decoder.mask_token",
            "decoder.pos_embed",
            "logit_scale",
        }
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n in named}

    # ---- forward -------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any], embed: bool = False) -> dict[str, Any]:
        """batch: image (B, C, *spatial), input_ids (B, L), attention_mask (B, L), label (B,);
        other keys are ignored (and a tower's inputs when the model has no such tower).

        -> the enabled objectives' losses, each already multiplied by its weight: itc_loss,
        mae_loss, mlm_loss, cls_loss; logit_scale (detached, for logging) with ITC; logits
        (B, num_classes) with the classifier.
        embed=True (ITC models; retrieval and zero-shot) -> "image" and / or "text" states of
        the unmasked inputs the batch holds (see `similarity`) and logit_scale.
        """
        if embed:
            return self._forward_embed(batch)
        cfg, out = self.cfg, {}
        image = batch.get("image") if self.visual is not None else None
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        has_text = self.text is not None
        # A text cache (trainer/text_cache.py): the frozen tower's stored output stands in for it.
        cached_pooled = batch.get("text_pooled")
        from_full = cfg.unimodal_image == "full"  # where ITC's z_I comes from

        needs_image_context = self.use_itc or (self.use_mlm and len(self.text_cross))
        full_trunk = full_tokens = image_tokens = masked = None
        # The masked image's shared blocks come first: its random mask is a step's first draw
        # (then the text tower's dropout), whatever else the step computes.
        if image is not None and (self.use_mae or (needs_image_context and not from_full)):
            masked = self.image_trunk(image, cfg.vision.mask_ratio)  # (B, 1 + K, Di), masking
            if not from_full:  # the shortcut: z_I of the visible patches
                image_tokens = self.image_unimodal(masked[0])

        # Unimodal passes over the whole inputs: z_T (ITC, classification, the MAE context)
        # and z_I (ITC and the MLM context unless taken from the masked pass, classification).
        text_trunk = text_tokens = None
        if has_text and (self.use_itc or self.use_cls or (self.use_mae and len(self.image_cross))):
            if len(self.text_cross):  # a trunk shared with the grounded pass over the text
                text_trunk = self.text.run_layers(self.text.embed(ids), mask, 0, self.text_split)
                text_tokens = self.text.run_layers(text_trunk, mask, self.text_split)
            elif cached_pooled is None:
                text_tokens = self._text_features(batch)  # (B, L, Dt)
        if image is not None and (self.use_cls or (needs_image_context and from_full)):
            full_trunk, _ = self.image_trunk(image)
            full_tokens = self.image_unimodal(full_trunk)  # (B, 1 + N, Di)
            if from_full:
                image_tokens = full_tokens

        # The masked image grounded in z_T, reconstructed.
        if self.use_mae:
            trunk, emb = masked
            text_keep = None if mask is None else mask.bool()
            grounded = (
                self.image_grounded(trunk, text_tokens, text_keep)
                if len(self.image_cross)
                else self.image_unimodal(trunk)
            )
            pred = self.decoder(grounded, emb.ids_restore)  # (B, N, P)
            target = patchify(image, cfg.vision.patch_size)
            out["mae_loss"] = cfg.mae_weight * mae_loss(
                pred, target, emb.mask, cfg.vision.norm_pix_loss
            )

        if self.use_itc:
            scale = self.scale()
            image_state = self.image_state(image_tokens)
            text_state = self.text_state(text_tokens, mask, cached_pooled)
            if self.attention_pool is None:
                itc = self.clip_loss(image_state["emb"], text_state["emb"], scale)
            else:
                itc = self.pair_loss(
                    lambda i, t: scale * self.similarity(i, t), image_state, text_state
                )
            out["itc_loss"] = cfg.itc_weight * itc
            out["logit_scale"] = scale.detach().squeeze()

        # The masked text: grounded in z_I, reconstructed.
        if self.use_mlm:
            ratio = cfg.vision.mask_ratio if cfg.shared_mask_ratio else cfg.text.mlm_probability
            masked_ids, labels = self.text.mask_tokens(ids, mask, ratio)
            context = image_tokens if len(self.text_cross) else None
            h = self.text_grounded(self.text.embed(masked_ids), mask, context)
            logits = (
                self.text_decoder(h, mask)
                if isinstance(self.text_decoder, TextDecoder)
                else self.text.mlm_logits(h)
            )
            out["mlm_loss"] = cfg.mlm_weight * mlm_loss(logits, labels)

        if self.use_cls:
            logits = self.fusion_head(
                self._fused(full_trunk, full_tokens, text_trunk, text_tokens, mask, cached_pooled)
            )
            out["logits"] = logits  # (B, num_classes)
            if cfg.cls_weight:
                out["cls_loss"] = cfg.cls_weight * classification_loss(
                    logits, batch["label"], batch.get("binary")
                )
        return out

    def _fused(
        self,
        image_trunk: Tensor | None,
        image_tokens: Tensor | None,
        text_trunk: Tensor | None,
        text_tokens: Tensor | None,
        attention_mask: Tensor | None,
        text_pooled: Tensor | None = None,
    ) -> Tensor:
        """The classifier's input (B, Di + Dt): pooled image and text features of the whole
        inputs, unimodal or (`fusion_features: grounded`) from the grounded encoders.
        `text_pooled`: the text tower's pooled vectors from a text cache."""
        parts = []
        if self.cfg.fusion_features == "grounded":
            parts.append(
                self.visual.pool(
                    self.image_grounded(image_trunk, text_tokens, attention_mask.bool())
                )
            )
            text_out = text_tokens
            if len(self.text_cross):
                text_out = self.text_grounded(
                    text_trunk, attention_mask, image_tokens, self.text_split
                )
            parts.append(self.text.pool(text_out, attention_mask))
            return torch.cat(parts, dim=-1)
        if image_tokens is not None:
            parts.append(self.visual.pool(image_tokens))
        if text_pooled is not None:
            parts.append(text_pooled.to(parts[0].dtype if parts else text_pooled.dtype))
        elif text_tokens is not None:
            parts.append(self.text.pool(text_tokens, attention_mask))
        return torch.cat(parts, dim=-1)

    def _text_features(self, batch: dict[str, Any]) -> Tensor:
        """The text tower's last states (B, L, Dt) of the batch's whole texts: from a text
        cache's `text_hidden` when the batch has it (the tower is not run), else the tower."""
        cached = batch.get("text_hidden")
        if cached is not None:  # in the dtype the tower returns (LLaMA: float32, BERT: its own)
            dtype = (
                torch.float32 if isinstance(self.text, LlamaTower) else self.text_proj.weight.dtype
            )
            return cached.to(dtype)
        return self.text.forward_features(batch["input_ids"], batch["attention_mask"])

    def _forward_embed(self, batch: dict[str, Any]) -> dict[str, Any]:
        if not self.use_itc:
            raise RuntimeError(
                "embedding needs the ITC heads, built only with task pretrain or joint and "
                "itc_weight > 0"
            )
        out: dict[str, Any] = {"logit_scale": self.scale().detach().squeeze()}
        if "image" in batch:
            out["image"] = self.image_state(self.visual.forward_features(batch["image"]))
        if "text_pooled" in batch:
            out["text"] = self.text_state(None, None, batch["text_pooled"])
        elif "input_ids" in batch or "text_hidden" in batch:
            mask = batch["attention_mask"]
            out["text"] = self.text_state(self._text_features(batch), mask)
        return out


def build_model(cfg: AlifuseConfig, device: str | torch.device | None = None) -> nn.Module:
    """The model for `cfg.arch` and `cfg.task`: the composed Alifuse model (its text tower from
    `cfg.text` or `cfg.llama`, a local checkpoint), the image-only multi-label model, the CNN +
    RNN fusion classifier (the tokenizer of `cfg.text.checkpoint`), or a baseline classifier.

    `device` is where a 4-bit LLaMA tower is quantized at load time (None: where it loads).
    """
    if cfg.arch == "fusion":
        tokenizer = None
        if "rnn" in cfg.fusion.branches:
            folder = local_checkpoint(cfg.text.checkpoint, "text.checkpoint", "a tokenizer")
            tokenizer = load_tokenizer(folder, "text.checkpoint")
        return build_fusion_model(
            cfg.fusion, cfg.num_classes, cfg.cls_weight, tokenizer, cfg.vision
        )
    if cfg.arch in BASELINE_ARCHS:
        return build_baseline(
            cfg.arch, cfg.baseline, cfg.vision, cfg.text, cfg.num_classes, cfg.cls_weight
        )
    if cfg.task == "multilabel":
        return MultiLabelModel(cfg.vision, cfg.multilabel, loss_weight=cfg.cls_weight)
    if cfg.text_tower == "llama":
        return AlifuseModel(cfg, build_llama_tower(cfg.llama, device))
    if cfg.text_tower == "none":
        return AlifuseModel(cfg, None)
    return AlifuseModel(cfg, build_text_tower(cfg.text))
