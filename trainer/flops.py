"""Model FLOPs of a training step, from the built model's shapes, and the device's peak (MFU).

Counted: the matmuls of the towers' transformer layers, of the MAE decoder and of the
attention scores (QK^T and AV), which are the bulk of the work; embeddings, norms, heads and
losses are left out. A pass over T tokens through layers holding W multiply-accumulates per
token (the in x out sizes of their linear layers; a 4-bit layer counts as its full shape) of
width D costs 2 W T + 4 L T^2 D forward FLOPs. A pass whose weights train costs 3x its forward
(forward, input gradients, weight gradients); a LoRA tower 2x (input gradients run through
every layer, the adapters' weight gradients are negligible); a frozen tower 1x; a tower whose
states come from the text cache 0. Text passes are counted at the batch's real token count,
so padding lowers MFU rather than raising it.

    MFU = model FLOPs per second / the device's peak dense bf16 tensor FLOPs (PEAK_BF16_FLOPS)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Dense bf16 tensor-core peak per device (vendor data sheets, no sparsity), matched against
# torch.cuda.get_device_name in order.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A6000", 155e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("V100", 125e12),  # fp16: V100 has no bf16
)


def peak_flops(device: torch.device) -> float | None:
    """The device's peak dense bf16 FLOPs, or None (a CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for tag, flops in PEAK_BF16_FLOPS:
        if tag in name:
            return flops
    return None


def linear_macs(module: nn.Module | None) -> int:
    """Multiply-accumulates per token of a module's linear layers (in x out each)."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


@dataclass
class Pass:
    """One pass of every sample through a stack: its per-token MACs, layers, width, tokens."""

    macs: int
    layers: int
    width: int
    tokens: float  # per sample; None-like 0 for text passes, filled from the batch
    factor: float  # 3 trained, 2 LoRA, 1 frozen, 0 cached
    text: bool = False

    def flops(self, tokens: float) -> float:
        return self.factor * (2 * self.macs * tokens + 4 * self.layers * tokens**2 * self.width)


def _tower_factor(module: nn.Module, mode: str) -> float:
    if mode in ("lora", "qlora"):
        return 2.0
    return 3.0 if any(p.requires_grad for p in module.parameters()) else 1.0


class StepFlops:
    """Training FLOPs per sample of an Alifuse or multi-label model (None for other archs).

    `per_sample(text_tokens)`: text_tokens is the mean real token count of the batch's texts.
    """

    def __init__(self, model: nn.Module, text_cached: bool = False) -> None:
        self.passes: list[Pass] = []
        visual = getattr(model, "visual", None)
        if visual is None or not hasattr(visual, "blocks"):
            self.supported = False
            return
        self.supported = True
        cfg = visual.cfg
        full = cfg.num_patches + 1
        visible = round(cfg.num_patches * (1 - cfg.mask_ratio)) + 1
        vit = (linear_macs(visual.blocks), len(visual.blocks), cfg.embed_dim)
        image_factor = 3.0 if any(p.requires_grad for p in visual.parameters()) else 1.0
        if not hasattr(model, "use_mae"):  # the multi-label model: one full pass
            self.passes.append(Pass(*vit, full, image_factor))
            return
        uses_masked = model.use_mae or (model.use_itc and model.cfg.unimodal_image == "masked")
        if uses_masked:
            self.passes.append(Pass(*vit, visible, image_factor))
        if model.use_cls or (model.use_itc and model.cfg.unimodal_image == "full"):
            self.passes.append(Pass(*vit, full, image_factor))
        if model.use_mae:
            decoder = model.decoder
            depth = len(getattr(decoder, "blocks", ()))
            self.passes.append(Pass(linear_macs(decoder), depth, cfg.decoder_embed_dim, full, 3.0))
        text = getattr(model, "text", None)
        if text is not None:
            macs = linear_macs(text.layers)
            factor = 0.0 if text_cached else _tower_factor(text, text.mode)
            shape = (macs, len(text.layers), text.hidden_size)
            self.passes.append(Pass(*shape, 0, factor, text=True))
            if model.use_mlm:
                self.passes.append(Pass(*shape, 0, _tower_factor(text, text.mode), text=True))

    def per_sample(self, text_tokens: float) -> float | None:
        if not self.supported:
            return None
        return sum(p.flops(text_tokens if p.text else p.tokens) for p in self.passes)
