"""Multi-label diagnosis heads on a pretrained image tower (the 14 CheXpert labels).

    image (B, C, *spatial) -> visual (ViT, unmasked) -> CLS or mean of patch tokens (B, D)
    -> LayerNorm -> [Linear -> GELU -> dropout] x (head_layers - 1) -> [dropout] -> Linear
    -> logits (B, num_labels)

`head_layers=1` is a linear probe on the normalised feature; more layers give the fully
connected head of the MAE + LLaMA report (its fine-tuning and its frozen-MAE baseline share
the same head).

The image tower is named `visual`, as in `AlifuseModel`, so the weights of a pretraining run
load by name (`train.init_from`). `linear_probe` freezes the tower (MAE's protocol: only the
head trains); `full` fine-tunes everything. The loss is BCE over the entries the label policy
keeps (`label_mask`), so uncertain or blank labels can be left out of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from models.losses import masked_bce
from models.vit import VisionTransformer


@dataclass
class MultiLabelConfig:
    """The head: how many labels, what trains, how tokens are pooled."""

    num_labels: int = 14
    finetune: Literal["full", "linear_probe"] = "full"
    pool: Literal["cls", "mean"] = "cls"
    dropout: float = 0.0
    head_layers: int = 1  # fully connected layers of the head (1: one linear layer)
    head_hidden: int = 512  # width of the head's hidden layers (head_layers > 1)

    def __post_init__(self) -> None:
        if self.num_labels < 1:
            raise ValueError(f"num_labels={self.num_labels}: expected >= 1")
        for name in ("head_layers", "head_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: expected a value in [0, 1)")


class MultiLabelModel(nn.Module):
    """ViT + linear head; `forward(batch) -> {"bce_loss", "logits"}`."""

    tokenizer = None  # image only: batches need no text

    def __init__(self, vision_cfg, cfg: MultiLabelConfig, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.loss_weight = loss_weight
        self.visual = VisionTransformer(vision_cfg)
        if cfg.finetune == "linear_probe":
            self.visual.requires_grad_(False)
        # LayerNorm without affine before the probe: features of a pretrained tower are not
        # normalised per channel, and a probe trains far better on normalised inputs.
        layers: list[nn.Module] = [
            nn.LayerNorm(vision_cfg.embed_dim, elementwise_affine=False, eps=1e-6)
        ]
        width = vision_cfg.embed_dim
        for _ in range(cfg.head_layers - 1):
            hidden = nn.Linear(width, cfg.head_hidden)
            nn.init.trunc_normal_(hidden.weight, std=0.02)
            nn.init.zeros_(hidden.bias)
            layers += [hidden, nn.GELU(), nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()]
            width = cfg.head_hidden
        if cfg.head_layers == 1:
            layers.append(nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity())
        linear = nn.Linear(width, cfg.num_labels)
        nn.init.trunc_normal_(linear.weight, std=0.01)  # MAE's probe initialisation
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(*layers, linear)

    def train(self, mode: bool = True) -> MultiLabelModel:
        super().train(mode)
        if self.cfg.finetune == "linear_probe":
            self.visual.eval()  # a frozen tower stays in inference behaviour
        return self

    def features(self, image: Tensor) -> Tensor:
        """(B, C, *spatial) -> pooled image features (B, D)."""
        tokens = self.visual.forward_features(image)  # (B, 1 + N, D)
        return tokens[:, 0] if self.cfg.pool == "cls" else tokens[:, 1:].mean(dim=1)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """batch: image (B, C, *spatial), labels (B, L) targets, label_mask (B, L) 1 = counts."""
        logits = self.head(self.features(batch["image"]))  # (B, L)
        out = {"logits": logits}
        if self.loss_weight:
            loss = masked_bce(logits.float(), batch["labels"].float(), batch["label_mask"])
            out["bce_loss"] = self.loss_weight * loss
        return out

    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n == "visual.cls_token"}
