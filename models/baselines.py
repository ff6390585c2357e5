"""Baseline NC / MCI / AD classifiers of the Alifuse paper's Table II.

Every baseline is a `BaselineClassifier`: a backbone that turns a batch into one feature
vector, and a head (LayerNorm (ViT-style backbones only) -> dropout -> linear) over classes.

    batch -> backbone -> (B, F) -> head -> logits (B, num_classes)

The archs (`build_baseline(arch, ...)`), by Table II row:

- resnet3d ("3D ResNet50"): MONAI's 3D ResNet (`monai.networks.nets.resnet10` .. `resnet152`,
  depth from `resnet.depth`) trained from scratch on the image, globally average-pooled.
  Shortcut B, no bias in the downsampling conv (batch norm follows it). The stem conv has
  stride 2 on every axis as in the 2D ResNet and Med3D; MONAI's default (`conv1_t_stride=1`,
  from video ResNets where it is the temporal stride) would keep 64 channels at the full
  128^3 resolution after the 7^3 stem.
- medicalnet ("MedicalNet", Chen et al. 2019, Med3D): the same MONAI ResNet in Med3D's
  variant (shortcut type and downsampling bias as MONAI's
  `get_medicalnet_pretrained_resnet_args`: B without bias for depth 10 / 50 / 101 / 152, A
  for 18 / 34; stem stride 2 as MONAI's `ResNetFeatures`), its trunk loaded from a local
  MedicalNet `.pth` (`resnet.pretrained`; nothing is downloaded), Med3D's segmentation head
  dropped, a new classifier. The whole network is fine-tuned.
- vit ("3D ViT"): the project's `VisionTransformer` (models/vit.py) from scratch, unmasked;
  the CLS token is the feature.
- bert ("BERT"): text only: the project's text tower (models/text.py) from the local
  `text.checkpoint`, trained as `text.mode` says (frozen / lora / full), pooled as
  `text.pooling` says. Its MLM head is not used and stays frozen.
- perceiver ("Perceiver", Jaegle et al. 2021): Hugging Face's `PerceiverModel` without pre-
  or post-processors. Its input array is the image's patch tokens and the text's token
  embeddings, each with a learned position and a learned modality embedding; padded text
  tokens are masked out of the latents' cross-attention. Output: the mean of the latents.
  Departs from the paper: conv patches with learned positions instead of raw pixels with
  Fourier features; text embedded from scratch with the tokenizer of `text.checkpoint`;
  no attention dropout (Hugging Face's default is 0.1; no baseline here has any dropout but
  the head's). As in the paper, `num_blocks` repeats one weight-shared self-attention block.
- irene ("IRENE", Zhou et al., Nat. Biomed. Eng. 2023): early fusion: [CLS] + image patch
  tokens + text tokens (the same embedding as perceiver's) through `irene.depth` pre-norm
  transformer blocks, padded text tokens masked as keys; the CLS output is the feature.
  Departs from the paper: IRENE's first two layers are bidirectional multimodal attention
  (each modality attends to itself and to the other with separate weights, then ordinary
  layers follow); here every layer is joint self-attention over the concatenated sequence,
  which holds the same intra- and cross-modal attention with weights shared between
  modalities. IRENE read chest X-ray patches, a chief complaint and tabular lab values; here
  it reads the volume and one text (the report / clinical text), embedded from scratch.

M3T and GIT, the other rows of Table II, are not built here.

Text is right-padded (`attention_mask` ones then zeros). For perceiver and irene, logits do
not depend on what the padded positions hold or on how many there are.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import PerceiverConfig as HFPerceiverConfig
from transformers import PerceiverModel

from models.attention import Block, init_vit_weights
from models.losses import classification_loss
from models.text import TextConfig, TextTower, build_text_tower, load_tokenizer, local_checkpoint
from models.vit import PatchEmbed, VisionConfig, VisionTransformer, sincos_pos_embed

ARCHS = ("resnet3d", "medicalnet", "vit", "bert", "perceiver", "irene")
IMAGE_ONLY_ARCHS = ("resnet3d", "medicalnet", "vit")
RESNET_DEPTHS = (10, 18, 34, 50, 101, 152)
PRETRAINED_KEY = "model.baseline.resnet.pretrained"

# ---- configs --------------------------------------------------------------------------------


@dataclass
class ResNetConfig:
    """MONAI's 3D ResNet (archs resnet3d and medicalnet)."""

    depth: Literal[10, 18, 34, 50, 101, 152] = 50
    widen_factor: float = 1.0  # channel multiplier (small values for CPU smoke runs)
    pretrained: str = ""  # arch medicalnet: local path of a MedicalNet (Med3D) checkpoint .pth

    def __post_init__(self) -> None:
        if self.depth not in RESNET_DEPTHS:
            raise ValueError(
                f"depth={self.depth}: expected one of {', '.join(map(str, RESNET_DEPTHS))}"
            )
        # MONAI truncates 64 * widen_factor to an int: the first stage needs one channel
        if not self.widen_factor * 64 >= 1:
            raise ValueError(f"widen_factor={self.widen_factor}: expected >= 1/64")


@dataclass
class PerceiverConfig:
    """Hugging Face's PerceiverModel over image patches + text tokens (arch perceiver)."""

    d_model: int = 256  # width of the input array (patches and tokens projected to it)
    num_latents: int = 128
    d_latents: int = 512
    num_blocks: int = 1  # repeats of the (weight-shared) self-attention block
    num_self_attends_per_block: int = 6
    num_self_attention_heads: int = 8
    num_cross_attention_heads: int = 1

    def __post_init__(self) -> None:
        for name in (
            "d_model",
            "num_latents",
            "d_latents",
            "num_blocks",
            "num_self_attends_per_block",
            "num_self_attention_heads",
            "num_cross_attention_heads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        # Cross-attention heads split the inputs' width (queries and keys are d_model wide)
        # and the latents' width; self-attention heads split the latents' width.
        for dim in ("d_model", "d_latents"):
            if getattr(self, dim) % self.num_cross_attention_heads != 0:
                raise ValueError(
                    f"num_cross_attention_heads={self.num_cross_attention_heads}: expected a "
                    f"divisor of {dim}={getattr(self, dim)}"
                )
        if self.d_latents % self.num_self_attention_heads != 0:
            raise ValueError(
                f"num_self_attention_heads={self.num_self_attention_heads}: expected a divisor "
                f"of d_latents={self.d_latents}"
            )


@dataclass
class IreneConfig:
    """IRENE-style early-fusion transformer (arch irene)."""

    dim: int = 384
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if self.dim % self.num_heads != 0:
            raise ValueError(f"num_heads={self.num_heads}: expected a divisor of dim={self.dim}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio}: expected > 0")


@dataclass
class BaselineConfig:
    """The baselines' own settings; the image tower's patching and sizes come from `vision`,
    the text checkpoint from `text`, classes and loss weight from the model section."""

    resnet: ResNetConfig = field(default_factory=ResNetConfig)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    irene: IreneConfig = field(default_factory=IreneConfig)
    dropout: float = 0.0  # before the final linear layer of every baseline head

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: expected a value in [0, 1)")


# ---- shared parts ---------------------------------------------------------------------------


def build_head(in_dim: int, num_classes: int, dropout: float, norm: bool = True) -> nn.Sequential:
    """(B, in_dim) -> (B, num_classes): [LayerNorm] -> [Dropout] -> Linear, ViT init.

    Parts are named (`head.norm`, `head.drop`, `head.fc`); a disabled one is an Identity, so
    parameter names do not depend on the config.
    """
    head = nn.Sequential(
        OrderedDict(
            norm=nn.LayerNorm(in_dim, eps=1e-6) if norm else nn.Identity(),
            drop=nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            fc=nn.Linear(in_dim, num_classes),
        )
    )
    head.apply(init_vit_weights)
    return head


class ImageTextEmbed(nn.Module):
    """Image patches and text tokens as one token array, for the fusion transformers.

    image (B, C, *spatial) -> patch conv (as the ViT's) + learned position + image type;
    input_ids (B, L) -> token embedding (from scratch) + learned position + text type.
    Output: tokens (B, N + L, dim) and `keep` (B, N + L) bool, True = a real token (every
    patch, the non-padding text tokens).

    The image positions start from the ViT's fixed sin-cos table (a spatial prior that
    training may move); text positions, modality types and token embeddings start as BERT's,
    normal with std 0.02. L may be anything up to `max_length`.
    """

    def __init__(
        self, vision: VisionConfig, dim: int, vocab_size: int, pad_id: int, max_length: int
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(
            vision.spatial_dims, vision.img_size, vision.patch_size, vision.in_chans, dim
        )
        table = sincos_pos_embed(dim, self.patch_embed.grid_size, cls_token=False)
        self.image_pos = nn.Parameter(table[None])  # (1, N, dim)
        self.text_embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.text_pos = nn.Parameter(torch.zeros(1, max_length, dim))
        self.image_type = nn.Parameter(torch.zeros(1, 1, dim))
        self.text_type = nn.Parameter(torch.zeros(1, 1, dim))
        self.max_length = max_length
        w = self.patch_embed.proj.weight.data  # as a linear layer on the flattened patch (MAE)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.text_embed.weight, std=0.02)
        with torch.no_grad():
            self.text_embed.weight[pad_id].zero_()
        for p in (self.text_pos, self.image_type, self.text_type):
            nn.init.normal_(p, std=0.02)

    def forward(
        self, image: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(B, C, *spatial), (B, L), (B, L) -> tokens (B, N + L, dim), keep (B, N + L) bool."""
        L = input_ids.shape[1]
        if L > self.max_length:
            raise ValueError(
                f"input_ids of length {L}: expected <= text.max_length={self.max_length} "
                "(the size of the text position table)"
            )
        weight = self.patch_embed.proj.weight
        img = self.patch_embed(image.to(weight.dtype)) + self.image_pos + self.image_type
        txt = self.text_embed(input_ids) + self.text_pos[:, :L] + self.text_type  # (B, L, dim)
        keep = torch.cat([attention_mask.new_ones(img.shape[:2]), attention_mask], dim=1).bool()
        return torch.cat([img, txt], dim=1), keep


# ---- backbones: batch -> one feature vector (B, out_dim) -------------------------------------
#
# Each has `out_dim`, `tokenizer` (None for image-only ones), `head_norm` (whether the head
# starts with a LayerNorm) and `no_weight_decay_names()` (parameter names, relative to the
# backbone, that are kept out of weight decay beyond the biases and norms).


class ResNetBackbone(nn.Module):
    """A MONAI ResNet without its classifier: image -> global average of the last stage."""

    head_norm = False  # batch norm precedes the pooling already
    tokenizer = None

    def __init__(self, net: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.net = net
        self.out_dim = out_dim

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """image (B, C, *spatial) -> (B, out_dim)."""
        return self.net(batch["image"].to(self.net.conv1.weight.dtype))

    def no_weight_decay_names(self) -> set[str]:
        return set()


class ViTBackbone(nn.Module):
    """The project's ViT, unmasked: image -> the normed CLS token."""

    head_norm = True
    tokenizer = None

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.vit = VisionTransformer(vision)
        self.out_dim = vision.embed_dim

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """image (B, C, *spatial) -> (B, embed_dim)."""
        return self.vit.pool(self.vit.forward_features(batch["image"]))

    def no_weight_decay_names(self) -> set[str]:
        return {"vit.cls_token", "vit.pos_embed"}  # pos_embed is a parameter when learnable


class BertBackbone(nn.Module):
    """The project's text tower: text -> its pooled state (CLS or masked mean)."""

    head_norm = True

    def __init__(self, tower: TextTower) -> None:
        super().__init__()
        self.tower = tower
        self.tokenizer = tower.tokenizer
        self.out_dim = tower.hidden_size
        # The MLM head takes no part in classification. Trainable but unused parameters would
        # hold optimizer state for nothing and make DDP wait for gradients that never come;
        # its decoder weight is the (tied) word embedding, which stays as `text.mode` set it.
        encoder = {id(p) for p in tower.encoder_model.parameters()}
        for p in tower.mlm_head.parameters():
            if id(p) not in encoder:
                p.requires_grad_(False)

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """input_ids, attention_mask (B, L) -> (B, hidden_size)."""
        mask = batch["attention_mask"]
        return self.tower.pool(self.tower.forward_features(batch["input_ids"], mask), mask)

    def no_weight_decay_names(self) -> set[str]:
        suffixes = ("position_embeddings.weight", "token_type_embeddings.weight")
        return {n for n, _ in self.named_parameters() if n.endswith(suffixes)}


class PerceiverBackbone(nn.Module):
    """Image patches + text tokens -> Hugging Face PerceiverModel -> mean latent."""

    head_norm = True

    def __init__(
        self, cfg: PerceiverConfig, vision: VisionConfig, tokenizer: Any, max_length: int
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.out_dim = cfg.d_latents
        self.embed = ImageTextEmbed(
            vision, cfg.d_model, len(tokenizer), tokenizer.pad_token_id, max_length
        )
        hf_cfg = HFPerceiverConfig(
            d_model=cfg.d_model,
            num_latents=cfg.num_latents,
            d_latents=cfg.d_latents,
            num_blocks=cfg.num_blocks,
            num_self_attends_per_block=cfg.num_self_attends_per_block,
            num_self_attention_heads=cfg.num_self_attention_heads,
            num_cross_attention_heads=cfg.num_cross_attention_heads,
            attention_probs_dropout_prob=0.0,
        )
        self.perceiver = PerceiverModel(hf_cfg, decoder=None, input_preprocessor=None)

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """image (B, C, *spatial), input_ids and attention_mask (B, L) -> (B, d_latents)."""
        tokens, keep = self.embed(batch["image"], batch["input_ids"], batch["attention_mask"])
        # The mask (B, N + L) 1 = real enters the latents' cross-attention as an additive
        # -inf-like bias on padded keys; the latents' self-attention has no mask to need.
        out = self.perceiver(inputs=tokens, attention_mask=keep.long())
        return out.last_hidden_state.mean(1)  # (B, num_latents, d_latents) -> (B, d_latents)

    def no_weight_decay_names(self) -> set[str]:
        return {
            "perceiver.embeddings.latents",
            "embed.image_pos",
            "embed.text_pos",
            "embed.image_type",
            "embed.text_type",
        }


class IreneBackbone(nn.Module):
    """[CLS] + image patch tokens + text tokens through joint transformer blocks -> CLS."""

    head_norm = True

    def __init__(
        self, cfg: IreneConfig, vision: VisionConfig, tokenizer: Any, max_length: int
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.out_dim = cfg.dim
        self.embed = ImageTextEmbed(
            vision, cfg.dim, len(tokenizer), tokenizer.pad_token_id, max_length
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.apply(init_vit_weights)  # linears and norms only: the embedding keeps its init
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """image (B, C, *spatial), input_ids and attention_mask (B, L) -> (B, dim)."""
        tokens, keep = self.embed(batch["image"], batch["input_ids"], batch["attention_mask"])
        B = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)  # (B, 1 + N + L, dim)
        keep = torch.cat([keep.new_ones(B, 1), keep], dim=1)
        # Padded rows are queries too, but masked out as keys: the CLS never sees them.
        for block in self.blocks:
            x = block(x, keep)
        return self.norm(x[:, 0])

    def no_weight_decay_names(self) -> set[str]:
        return {
            "cls_token",
            "embed.image_pos",
            "embed.text_pos",
            "embed.image_type",
            "embed.text_type",
        }


# ---- the classifier -------------------------------------------------------------------------


class BaselineClassifier(nn.Module):
    """backbone -> head; `forward(batch) -> {"cls_loss", "logits"}` like `FusionModel`.

    `tokenizer` is the backbone's: None for image-only baselines (the reader then batches no
    text), else the Hugging Face tokenizer whose ids the backbone embeds.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, cls_weight: float, dropout: float
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: expected >= 2")
        if cls_weight <= 0:
            raise ValueError(f"cls_weight={cls_weight}: expected > 0 (the only objective)")
        self.cls_weight = cls_weight
        self.tokenizer = backbone.tokenizer
        self.backbone = backbone
        self.head = build_head(backbone.out_dim, num_classes, dropout, norm=backbone.head_norm)

    def forward_logits(self, batch: dict[str, Any]) -> Tensor:
        """batch -> logits (B, num_classes)."""
        return self.head(self.backbone(batch))

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """batch: image (B, C, *spatial), input_ids and attention_mask (B, L) when the model
        has a tokenizer, label (B,); other keys are ignored. -> cls_loss (cross-entropy times
        cls_weight), logits (B, num_classes)."""
        logits = self.forward_logits(batch)
        loss = classification_loss(logits, batch["label"], batch.get("binary"))
        return {"cls_loss": self.cls_weight * loss, "logits": logits}

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay: tokens, latents, position and type
        embeddings, norms, biases."""
        named = {f"backbone.{n}" for n in self.backbone.no_weight_decay_names()}
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n in named}


# ---- builders -------------------------------------------------------------------------------


def build_resnet(cfg: ResNetConfig, vision: VisionConfig, medicalnet: bool) -> ResNetBackbone:
    """MONAI's ResNet of `cfg.depth` without classifier; Med3D's variant when `medicalnet`
    (weights not loaded here: see `load_medicalnet`)."""
    # Imported here: MONAI's package import takes seconds, and only these two archs need it.
    from monai.networks.nets import resnet as monai_resnet

    if medicalnet:
        bias_downsample, shortcut_type = monai_resnet.get_medicalnet_pretrained_resnet_args(
            cfg.depth
        )
        bias_downsample = bool(bias_downsample)  # MONAI 1.3 returns -1 / 0
    else:
        bias_downsample, shortcut_type = False, "B"
    # resnet10 .. resnet152 pick the block type and the blocks per stage for the depth
    net = getattr(monai_resnet, f"resnet{cfg.depth}")(
        pretrained=False,
        spatial_dims=vision.spatial_dims,
        n_input_channels=vision.in_chans,
        conv1_t_size=7,
        conv1_t_stride=2,
        widen_factor=cfg.widen_factor,
        shortcut_type=shortcut_type,
        bias_downsample=bias_downsample,
        feed_forward=False,  # the head is ours: dropout goes in front of the linear layer
    )
    block = type(net.layer4[-1])
    out_dim = int(monai_resnet.get_inplanes()[-1] * cfg.widen_factor) * block.expansion
    return ResNetBackbone(net, out_dim)


def load_medicalnet(net: nn.Module, path: str) -> None:
    """Loads a MedicalNet (Med3D) checkpoint into the trunk of a MONAI ResNet, in place.

    The file is a torch file holding {"state_dict": {"module.conv1.weight": ...}} (saved from
    DataParallel). The `module.` prefix is stripped; keys the trunk does not have (Med3D's
    segmentation head `conv_seg.*`, any `fc.*`) are dropped; every trunk key must be in the
    file with the trunk's shape. Errors name the file and the key.

    MONAI's own loader (`resnet50(pretrained=path)`) is not used: it wants a bare state dict
    with exactly the model's keys, so it refuses Med3D's files as they are published.
    """
    file = Path(path)
    if not path:
        raise ValueError(
            f"{PRETRAINED_KEY} is empty: arch medicalnet needs the local path of a MedicalNet "
            "checkpoint (.pth); MedicalNet weights are not downloaded at run time"
        )
    if not file.is_file():
        raise FileNotFoundError(
            f"{PRETRAINED_KEY}={path}: no such file (MedicalNet weights are not downloaded at "
            "run time; download a MedicalNet .pth and point the key to it)"
        )
    ckpt = torch.load(file, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{PRETRAINED_KEY}={path}: expected a dict with a 'state_dict'")
    trunk = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    loaded = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key not in trunk:
            continue  # conv_seg.* (Med3D's segmentation head), fc.*
        if tuple(value.shape) != tuple(trunk[key].shape):
            raise ValueError(
                f"{PRETRAINED_KEY}={path}: {key} has shape {tuple(value.shape)}, the ResNet "
                f"expects {tuple(trunk[key].shape)} (check resnet.depth, resnet.widen_factor, "
                "vision.in_chans and vision.spatial_dims against the checkpoint)"
            )
        loaded[key] = value
    # Batch norm fills a missing num_batches_tracked itself (files from before torch 0.4.1)
    missing = [k for k in net.load_state_dict(loaded, strict=False).missing_keys if k in trunk]
    if missing:
        raise ValueError(
            f"{PRETRAINED_KEY}={path}: {len(missing)} ResNet trunk keys missing from the file, "
            f"e.g. {', '.join(missing[:3])} (is it a MedicalNet checkpoint of resnet.depth?)"
        )


def _scratch_tokenizer(text: TextConfig) -> Any:
    """The tokenizer of `text.checkpoint`, for models that embed its ids from scratch."""
    folder = local_checkpoint(text.checkpoint, "text.checkpoint", "a tokenizer")
    tokenizer = load_tokenizer(folder, "text.checkpoint")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"text.checkpoint={text.checkpoint}: the tokenizer has no pad token")
    return tokenizer


def build_baseline(
    arch: str,
    cfg: BaselineConfig,
    vision: VisionConfig,
    text: TextConfig,
    num_classes: int,
    cls_weight: float,
) -> BaselineClassifier:
    """The baseline classifier `arch` (one of `ARCHS`; see the module docstring).

    `vision` gives the image geometry (and the ViT's sizes), `text` the local checkpoint of the
    tokenizer (and, for bert, of the model). A MedicalNet checkpoint is read from
    `cfg.resnet.pretrained`, which every other arch refuses.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: expected one of {', '.join(ARCHS)}")
    if cfg.resnet.pretrained and arch != "medicalnet":
        raise ValueError(
            f"{PRETRAINED_KEY}={cfg.resnet.pretrained}: only arch medicalnet loads pretrained "
            f"ResNet weights (arch {arch} trains from scratch); use arch medicalnet, or clear "
            "the key"
        )
    if arch == "resnet3d":
        backbone = build_resnet(cfg.resnet, vision, medicalnet=False)
    elif arch == "medicalnet":
        if vision.spatial_dims != 3:
            raise ValueError(
                f"vision.spatial_dims={vision.spatial_dims}: arch medicalnet loads 3D weights"
            )
        backbone = build_resnet(cfg.resnet, vision, medicalnet=True)
        load_medicalnet(backbone.net, cfg.resnet.pretrained)
    elif arch == "vit":
        backbone = ViTBackbone(vision)
    elif arch == "bert":
        backbone = BertBackbone(build_text_tower(text))
    elif arch == "perceiver":
        backbone = PerceiverBackbone(
            cfg.perceiver, vision, _scratch_tokenizer(text), text.max_length
        )
    else:
        backbone = IreneBackbone(cfg.irene, vision, _scratch_tokenizer(text), text.max_length)
    return BaselineClassifier(backbone, num_classes, cls_weight, cfg.dropout)
