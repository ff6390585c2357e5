"""Alifuse-style image-text model: contrastive, masked-image and masked-text pretraining,
then a fusion classifier over image-grounded and text-grounded features.

Parts (attribute names are stable across tasks, so pretrained weights load by name):

- `visual`: ViT (2D or 3D) on the MAE-visible tokens.
- `text`: BERT-family `TextTower` (frozen, LoRA or full), or with `text_tower: llama` a
  `LlamaTower` (4-bit NF4 + LoRA, LoRA, or frozen; models/llama_text.py). LLaMA is causal
  and has no MLM head: with it `mlm_weight` is 0 and there are no image-grounded text
  layers (`cross_layers_text` unused); ITC, grounded MAE and unimodal fusion work.
- `image_proj`, `text_proj`, `logit_scale`: ITC heads and the learned temperature.
- `attention_pool` (with `attention_pool.enabled`): the ITC image side becomes the report's
  tokens attention-pooled over the image's tokens (models/pooling.py), so every (image,
  report) pair is scored jointly (`PairwiseClipLoss`); `image_proj` is then not built.
- `image_cross`: CrossBlocks after each of the last `cross_layers_image` ViT blocks; with
  them the ViT is the text-grounded image encoder (image tokens attend to text tokens).
- `text_cross`: CrossBlocks after each of the last `cross_layers_text` BERT layers; with
  them BERT is the image-grounded text encoder (text tokens attend to image tokens).
- `decoder`: MAE decoder. `fusion_head`: MLP over [image CLS, text CLS] -> classes.

Only the parts an enabled objective uses are built (the others are `nn.Identity()` or
empty), so every trainable parameter receives a gradient every step: DDP needs no
`find_unused_parameters`, and a run's checkpoint holds no dead weights.

    task        objective  built parts
    pretrain    itc        image_proj (or attention_pool), text_proj, logit_scale
    pretrain    mae        image_cross, decoder
    pretrain    mlm        text_cross (and the text tower's MLM head trains in "full" mode)
    classify    cls        fusion_head; image_cross and text_cross if fusion is "grounded"

Forward data flow in pretraining (one image pass is shared up to the first cross block):

    image -> embed + mask -> blocks[0 : split] = trunk
      trunk -> remaining blocks -> norm = unimodal image tokens -> CLS -> ITC
      trunk -> remaining blocks with CrossBlocks(text tokens) -> norm -> decoder -> MAE
    text -> BERT = unimodal text tokens -> CLS -> ITC (and the context of the MAE pass)
    BERT-masked text -> BERT with CrossBlocks(unimodal image tokens) -> MLM head -> MLM
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import CrossBlock, init_vit_weights
from models.fusion import FusionConfig, FusionModel, build_fusion_model
from models.heads import MultiLabelConfig, MultiLabelModel
from models.llama_text import LlamaTextConfig, LlamaTower, build_llama_tower
from models.losses import ClipLoss, PairwiseClipLoss, mlm_loss
from models.mae import MAEDecoder, mae_loss, patchify
from models.pooling import AttentionPoolConfig, build_attention_pool
from models.text import TextConfig, TextTower, build_text_tower, load_tokenizer, local_checkpoint
from models.vit import VisionConfig, VisionTransformer


@dataclass
class AlifuseConfig:
    """The composed model: towers, fusion, ITC settings and the weight of each objective."""

    # pretrain: ITC + MAE + MLM; classify: fusion classifier (image + text -> one class);
    # multilabel: image-only multi-label heads (models/heads.py, e.g. the 14 CheXpert labels).
    task: Literal["pretrain", "classify", "multilabel"] = "pretrain"
    # alifuse: this module's ViT + BERT / LLaMA model. fusion: the CNN + recurrent-text fusion
    # classifier of models/fusion.py (`fusion` section; task classify; its tokenizer is the one
    # in text.checkpoint, its classes and loss weight are num_classes and cls_weight below).
    arch: Literal["alifuse", "fusion"] = "alifuse"
    fusion: FusionConfig = field(default_factory=FusionConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    # Which of `text` / `llama` is the text tower; none: image-only MAE pretraining (the
    # MAE-only baseline), no text is loaded or tokenized.
    text_tower: Literal["bert", "llama", "none"] = "bert"
    text: TextConfig = field(default_factory=TextConfig)
    llama: LlamaTextConfig = field(default_factory=LlamaTextConfig)
    attention_pool: AttentionPoolConfig = field(default_factory=AttentionPoolConfig)
    multilabel: MultiLabelConfig = field(default_factory=MultiLabelConfig)
    embed_dim: int = 256  # ITC projection size
    cross_layers_image: int = 2  # last N ViT blocks get an inserted cross-attention
    cross_layers_text: int = 2  # last N BERT layers get an inserted cross-attention
    fusion_hidden: int = 512
    num_classes: int = 3
    fusion_features: Literal["grounded", "unimodal"] = "grounded"
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
        if self.cross_layers_text < 0:
            raise ValueError(f"cross_layers_text={self.cross_layers_text}: expected >= 0")
        depth = self.vision.depth if isinstance(self.vision, VisionConfig) else None
        if self.cross_layers_image < 0 or (depth is not None and self.cross_layers_image > depth):
            raise ValueError(
                f"cross_layers_image={self.cross_layers_image}: expected a value in "
                f"[0, vision.depth={depth}]"
            )
        if self.init_temperature <= 0:
            raise ValueError(f"init_temperature={self.init_temperature}: expected > 0")
        if self.max_logit_scale < 1.0 / self.init_temperature:
            raise ValueError(
                f"max_logit_scale={self.max_logit_scale}: expected >= 1 / init_temperature "
                f"= {1.0 / self.init_temperature:g}, or the clamp overrides the initial value"
            )
        weights = ("itc_weight", "mae_weight", "mlm_weight", "cls_weight")
        for name in weights:
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 0")
        if self.task == "pretrain" and not (self.itc_weight or self.mae_weight or self.mlm_weight):
            raise ValueError("itc_weight, mae_weight and mlm_weight are all 0: nothing to pretrain")
        if (
            self.task == "pretrain"
            and self.mae_weight
            and isinstance(self.vision, VisionConfig)
            and self.vision.mask_ratio == 0
        ):
            raise ValueError("vision.mask_ratio=0 with mae_weight > 0: MAE needs masked patches")
        if self.arch == "fusion" and self.task != "classify":
            raise ValueError(
                f"task={self.task}: arch=fusion is a classifier; expected task: classify"
            )
        if self.text_tower == "none":
            used = {
                "task": (self.task, "pretrain"),
                "itc_weight": (self.itc_weight, 0),
                "mlm_weight": (self.mlm_weight, 0),
                "cross_layers_image": (self.cross_layers_image, 0),
            }
            for name, (value, want) in used.items():
                if value != want:
                    raise ValueError(
                        f"{name}={value}: text_tower=none is image-only MAE pretraining; "
                        f"expected {name}: {want}"
                    )
        if self.text_tower == "llama":
            if self.task == "pretrain" and self.mlm_weight:
                raise ValueError(
                    f"mlm_weight={self.mlm_weight}: masked text reconstruction needs a masked-LM "
                    "text tower (text_tower: bert); set mlm_weight: 0 with text_tower: llama"
                )
            if self.task == "classify" and self.fusion_features == "grounded":
                if self.cross_layers_text:
                    raise ValueError(
                        f"cross_layers_text={self.cross_layers_text}: the LLaMA tower has no "
                        "image-grounded text layers; set cross_layers_text: 0"
                    )
        pool = self.attention_pool
        if isinstance(pool, AttentionPoolConfig) and pool.enabled:
            if self.task != "pretrain" or not self.itc_weight:
                raise ValueError(
                    "attention_pool.enabled: the pool is an ITC head; expected task: pretrain "
                    "with itc_weight > 0"
                )
            if pool.out_dim != self.embed_dim:
                raise ValueError(
                    f"attention_pool.out_dim={pool.out_dim}: expected embed_dim="
                    f"{self.embed_dim} (the pooled vector is compared with the text embedding)"
                )

    @property
    def text_max_length(self) -> int:
        """Tokens per text for the configured tower (the reader pads and truncates to it)."""
        return self.llama.max_length if self.text_tower == "llama" else self.text.max_length


class AlifuseModel(nn.Module):
    """See the module docstring. `forward(batch) -> dict` of weighted `*_loss` terms and more."""

    def __init__(self, cfg: AlifuseConfig, text_tower: TextTower | LlamaTower | None) -> None:
        super().__init__()
        self.cfg = cfg
        v = cfg.vision
        n_text_layers = 0 if text_tower is None else len(text_tower.layers)
        if text_tower is not None and cfg.cross_layers_text > n_text_layers:
            raise ValueError(
                f"cross_layers_text={cfg.cross_layers_text}: expected a value in "
                f"[0, {n_text_layers}] (the text checkpoint's layers)"
            )
        pretrain = cfg.task == "pretrain"
        grounded = cfg.task == "classify" and cfg.fusion_features == "grounded"
        self.use_itc = pretrain and cfg.itc_weight > 0
        self.use_mae = pretrain and cfg.mae_weight > 0
        self.use_mlm = pretrain and cfg.mlm_weight > 0
        n_img = cfg.cross_layers_image if (self.use_mae or grounded) else 0
        n_txt = cfg.cross_layers_text if (self.use_mlm or grounded) else 0
        d_img = v.embed_dim
        d_txt = 0 if text_tower is None else text_tower.hidden_size

        self.visual = VisionTransformer(v)
        self.text = text_tower
        pool_cfg = cfg.attention_pool if self.use_itc else AttentionPoolConfig()
        self.attention_pool = build_attention_pool(pool_cfg, d_txt, d_img)
        if self.use_itc:
            self.image_proj = (
                nn.Linear(d_img, cfg.embed_dim) if self.attention_pool is None else nn.Identity()
            )
            self.text_proj = nn.Linear(d_txt, cfg.embed_dim)
            # Shape [1], not a scalar: DeepSpeed cannot flatten 0-dim parameters.
            self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / cfg.init_temperature)))
        else:
            self.image_proj, self.text_proj = nn.Identity(), nn.Identity()
            self.register_parameter("logit_scale", None)
        self.image_cross = nn.ModuleList(
            CrossBlock(d_img, v.num_heads, context_dim=d_txt, mlp_ratio=v.mlp_ratio)
            for _ in range(n_img)
        )
        self.text_cross = nn.ModuleList(
            CrossBlock(d_txt, text_tower.num_heads, context_dim=d_img) for _ in range(n_txt)
        )
        self.decoder = MAEDecoder(v) if self.use_mae else nn.Identity()
        self.fusion_head = (
            nn.Sequential(
                nn.Linear(d_img + d_txt, cfg.fusion_hidden),
                nn.GELU(),
                nn.Linear(cfg.fusion_hidden, cfg.num_classes),
            )
            if cfg.task == "classify"
            else nn.Identity()
        )
        for part in (self.image_proj, self.text_proj, self.image_cross, self.text_cross):
            part.apply(init_vit_weights)
        self.fusion_head.apply(init_vit_weights)
        if self.attention_pool is not None:
            self.attention_pool.apply(init_vit_weights)
        self.clip_loss = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad)
        self.pair_loss = PairwiseClipLoss(gather_with_grad=cfg.gather_with_grad)
        if not self.use_mlm and isinstance(text_tower, TextTower):
            # Without MLM the head is unused; freezing it keeps "full" mode free of parameters
            # without gradients. Its decoder weight is tied to the word embeddings: keep those.
            tied = {id(p) for p in text_tower.encoder_model.embeddings.parameters()}
            for p in text_tower.mlm_head.parameters():
                if id(p) not in tied:
                    p.requires_grad_(False)

        # Blocks [0, split) run once and are shared by the unimodal and grounded passes:
        # everything up to and including the first block that is followed by a CrossBlock.
        self.image_split = v.depth - n_img + 1 if n_img else v.depth
        self.text_split = n_text_layers - n_txt + 1 if n_txt else n_text_layers
        self.max_log_scale = math.log(cfg.max_logit_scale)

    @property
    def tokenizer(self):
        """The text tower's tokenizer (the reader tokenizes batches with it); None without one."""
        return None if self.text is None else self.text.tokenizer

    # ---- parts ---------------------------------------------------------------------------

    def _image_cross_at(self) -> dict[int, nn.Module]:
        """ViT block index -> the CrossBlock that runs after it (the last blocks)."""
        depth = len(self.visual.blocks)
        return dict(zip(range(depth - len(self.image_cross), depth), self.image_cross, strict=True))

    def _text_cross_at(self) -> dict[int, nn.Module]:
        """BERT layer index -> the CrossBlock that runs after it (the last layers)."""
        n_layers = len(self.text.layers)
        return dict(
            zip(range(n_layers - len(self.text_cross), n_layers), self.text_cross, strict=True)
        )

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
        self, h: Tensor, attention_mask: Tensor, image_tokens: Tensor, start: int = 0
    ) -> Tensor:
        """Text states (B, L, Dt) after layers [0, start) attending to image (B, T, Di)."""
        return self.text.run_layers(
            h, attention_mask, start, None, self._text_cross_at(), image_tokens, None
        )

    def scale(self) -> Tensor:
        """exp(logit_scale) clamped to max_logit_scale, shape (1,)."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def image_state(self, image_tokens: Tensor) -> dict[str, Tensor]:
        """Normed image tokens (B, T, Di) -> what ITC compares: {"emb": (B, embed_dim)}
        L2-normalised, or with the attention pool {"tokens": the tokens}."""
        if self.attention_pool is not None:
            return {"tokens": image_tokens}
        return {"emb": F.normalize(self.image_proj(self.visual.pool(image_tokens)), dim=-1)}

    def text_state(self, text_tokens: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """Text states (B, L, Dt), mask (B, L) -> {"emb": (B, embed_dim)} L2-normalised, and
        with the attention pool also the tokens and mask it pools."""
        pooled = self.text.pool(text_tokens, attention_mask)
        state = {"emb": F.normalize(self.text_proj(pooled), dim=-1)}
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
            n = part.shape[0]
            pooled = self.attention_pool(
                tokens.unsqueeze(0).expand(n, -1, -1, -1).flatten(0, 1),  # (n * bt, L, Dt)
                mask.unsqueeze(0).expand(n, -1, -1).flatten(0, 1),
                part.unsqueeze(1).expand(-1, bt, -1, -1).flatten(0, 1),  # (n * bt, T, Di)
            )
            pooled = F.normalize(pooled, dim=-1).view(n, bt, -1)
            rows.append((pooled * text_emb.unsqueeze(0)).sum(-1))  # (n, bt)
        return torch.cat(rows)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay: tokens, temperature, norms, biases, gates."""
        named = {"visual.cls_token", "decoder.mask_token", "logit_scale"}
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n in named}

    # ---- forward -------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any], embed: bool = False) -> dict[str, Any]:
        """batch: image (B, C, *spatial), input_ids (B, L), attention_mask (B, L), label (B,);
        other keys are ignored.

        pretrain -> itc_loss, mae_loss, mlm_loss (those with weight > 0, each already
        multiplied by its weight) and logit_scale (detached, for logging, with ITC).
        classify -> cls_loss (weighted) and logits (B, num_classes).
        embed=True (ITC models; retrieval and zero-shot) -> "image" and / or "text" states of
        the unmasked inputs the batch holds (see `similarity`) and logit_scale.
        """
        if embed:
            return self._forward_embed(batch)
        if self.cfg.task == "pretrain":
            return self._forward_pretrain(
                batch["image"], batch.get("input_ids"), batch.get("attention_mask")
            )
        return self._forward_classify(
            batch["image"], batch["input_ids"], batch["attention_mask"], batch["label"]
        )

    def _forward_embed(self, batch: dict[str, Any]) -> dict[str, Any]:
        if not self.use_itc:
            raise RuntimeError(
                "embedding needs the ITC heads, built only with task=pretrain and itc_weight > 0"
            )
        out: dict[str, Any] = {"logit_scale": self.scale().detach().squeeze()}
        if "image" in batch:
            out["image"] = self.image_state(self.visual.forward_features(batch["image"]))
        if "input_ids" in batch:
            mask = batch["attention_mask"]
            out["text"] = self.text_state(
                self.text.forward_features(batch["input_ids"], mask), mask
            )
        return out

    def _forward_pretrain(
        self, image: Tensor, input_ids: Tensor | None, attention_mask: Tensor | None
    ) -> dict[str, Tensor]:
        cfg, out = self.cfg, {}
        text_keep = None if attention_mask is None else attention_mask.bool()
        emb = self.visual.embed(image, cfg.vision.mask_ratio)  # visible tokens only
        trunk = self.visual.forward_blocks(emb.tokens, 0, self.image_split)  # (B, 1 + K, Di)
        image_tokens = text_tokens = None
        if self.use_itc or self.use_mlm:  # ITC features; the MLM pass's context
            image_tokens = self.image_unimodal(trunk)
        if self.use_itc or (self.use_mae and len(self.image_cross)):  # and the MAE pass's
            text_tokens = self.text.forward_features(input_ids, attention_mask)  # (B, L, Dt)

        if self.use_itc:
            scale = self.scale()
            image_state = self.image_state(image_tokens)
            text_state = self.text_state(text_tokens, attention_mask)
            if self.attention_pool is None:
                itc = self.clip_loss(image_state["emb"], text_state["emb"], scale)
            else:
                itc = self.pair_loss(
                    lambda i, t: scale * self.similarity(i, t), image_state, text_state
                )
            out["itc_loss"] = cfg.itc_weight * itc
            out["logit_scale"] = scale.detach().squeeze()
        if self.use_mae:
            grounded = self.image_grounded(trunk, text_tokens, text_keep)
            pred = self.decoder(grounded, emb.ids_restore)  # (B, N, P)
            target = patchify(image, cfg.vision.patch_size)
            out["mae_loss"] = cfg.mae_weight * mae_loss(
                pred, target, emb.mask, cfg.vision.norm_pix_loss
            )
        if self.use_mlm:
            masked_ids, labels = self.text.mask_tokens(
                input_ids, attention_mask, cfg.text.mlm_probability
            )
            h = self.text_grounded(self.text.embed(masked_ids), attention_mask, image_tokens)
            out["mlm_loss"] = cfg.mlm_weight * mlm_loss(self.text.mlm_logits(h), labels)
        return out

    def _forward_classify(
        self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, label: Tensor
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        trunk = self.visual.forward_blocks(self.visual.embed(image).tokens, 0, self.image_split)
        image_tokens = self.image_unimodal(trunk)  # (B, 1 + N, Di)
        if len(self.text_cross):  # BERT: a text trunk shared with the image-grounded pass
            text_trunk = self.text.run_layers(
                self.text.embed(input_ids), attention_mask, 0, self.text_split
            )
            text_tokens = self.text.run_layers(text_trunk, attention_mask, self.text_split)
        else:
            text_tokens = self.text.forward_features(input_ids, attention_mask)
        if cfg.fusion_features == "grounded":
            image_out = self.image_grounded(trunk, text_tokens, attention_mask.bool())
            text_out = text_tokens
            if len(self.text_cross):
                text_out = self.text_grounded(
                    text_trunk, attention_mask, image_tokens, self.text_split
                )
        else:
            image_out, text_out = image_tokens, text_tokens
        fused = torch.cat(
            [self.visual.pool(image_out), self.text.pool(text_out, attention_mask)], dim=-1
        )
        logits = self.fusion_head(fused)  # (B, num_classes)
        out = {"logits": logits}
        if cfg.cls_weight:
            out["cls_loss"] = cfg.cls_weight * F.cross_entropy(logits.float(), label)
        return out


def build_model(
    cfg: AlifuseConfig, device: str | torch.device | None = None
) -> AlifuseModel | MultiLabelModel | FusionModel:
    """The model for `cfg.arch` and `cfg.task`: the text tower (`cfg.text` or `cfg.llama`, a
    local checkpoint) and the composed model, the image-only multi-label model (no text
    tower), or the CNN + RNN fusion classifier (the tokenizer of `cfg.text.checkpoint`).

    `device` is where a 4-bit LLaMA tower is quantized at load time (None: where it loads).
    """
    if cfg.arch == "fusion":
        folder = local_checkpoint(cfg.text.checkpoint, "text.checkpoint", "a tokenizer")
        tokenizer = load_tokenizer(folder, "text.checkpoint")
        return build_fusion_model(cfg.fusion, cfg.num_classes, cfg.cls_weight, tokenizer)
    if cfg.task == "multilabel":
        return MultiLabelModel(cfg.vision, cfg.multilabel, loss_weight=cfg.cls_weight)
    if cfg.text_tower == "llama":
        return AlifuseModel(cfg, build_llama_tower(cfg.llama, device))
    if cfg.text_tower == "none":
        return AlifuseModel(cfg, None)
    return AlifuseModel(cfg, build_text_tower(cfg.text))
