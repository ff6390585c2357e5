"""Retrieval and zero-shot evaluation of a contrastive (ITC) model on a split.

Every sample of the split is embedded once, in the evaluation pass that computes the losses
(each rank its share, padding rows dropped after the gather), then every rank scores the whole
split from the model's own `similarity`, so
models whose pair scores are not dot products (attention pooling) are scored the same way
they were trained:

- retrieval: image -> report and report -> image Recall@k over the split; images of one
  study (CXR) share a report, so any image of the right study counts;
- zero-shot (chest X-ray shards): per label, the softmax over the image's similarity to a
  positive and a negative prompt (`trainer.retrieval.default_prompts`) at the model's
  learned temperature, scored like the fine-tuned heads (per-label AUROC, mAUC, CIs).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor

from trainer.cxr_metrics import multilabel_metrics
from trainer.retrieval import default_prompts, similarity_recall, zero_shot_from_similarity


def _split_state(flat: dict[str, Tensor], side: str) -> dict[str, Tensor]:
    prefix = f"{side}."
    return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}


class SplitEmbeddings:
    """Collects the image / text states of an evaluation pass batch by batch (each rank its
    share, during the same pass that computes the losses, so the split is read once);
    `gather` returns the whole split's."""

    def __init__(self, max_length: int = 0) -> None:
        # Text tokens (attention pooling) are padded to this width, so batches padded to their
        # own longest text concatenate (and gather across ranks).
        self.max_length = max_length
        self.parts: dict[str, list[Tensor]] = defaultdict(list)
        self.groups: list[Any] = []
        self.keys: list[str] = []
        self.scale = 1.0

    @torch.no_grad()
    def add(self, model: torch.nn.Module, batch: dict[str, Any]) -> None:
        """One moved batch through `model(batch, embed=True)` (the model in eval mode)."""
        out = model(batch, embed=True)
        for side in ("image", "text"):
            for key, value in out.get(side, {}).items():
                value = value.float() if value.is_floating_point() else value
                if side == "text" and key in ("tokens", "mask") and self.max_length:
                    pad = [0, 0] * (value.ndim - 2) + [0, self.max_length - value.shape[1]]
                    value = torch.nn.functional.pad(value, pad)  # zeros: masked out
                self.parts[f"{side}.{key}"].append(value)
        for key in ("valid", "labels", "label_mask"):
            if key in batch:
                self.parts[key].append(batch[key])
        self.groups += batch["group"] if "group" in batch else batch["key"]
        self.keys += batch["key"]
        self.scale = float(out["logit_scale"])

    def gather(self, accelerator: Accelerator) -> dict[str, Any]:
        """image / text states of every sample of the split (all ranks, padding dropped),
        labels where the batches carry them, the retrieval groups (study for CXR, sample key
        otherwise) and the model's logit scale."""
        gathered = {
            k: accelerator.gather(torch.cat(v).to(accelerator.device)).cpu()
            for k, v in self.parts.items()
        }
        valid = gathered.pop("valid").bool()
        every, keys = gather_object(self.groups), gather_object(self.keys)
        kept = {k: v[valid] for k, v in gathered.items()}
        index = valid.nonzero().squeeze(1).tolist()
        return {
            "image": _split_state(kept, "image"),
            "text": _split_state(kept, "text"),
            "labels": kept.get("labels"),
            "label_mask": kept.get("label_mask"),
            "group": [every[i] for i in index],
            "key": [keys[i] for i in index],
            "logit_scale": self.scale,
        }


def _on(state: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in state.items()}


@torch.no_grad()
def retrieval_metrics(
    model: torch.nn.Module, emb: dict[str, Any], device: torch.device, ks: Sequence[int]
) -> dict[str, float]:
    """Recall@k both ways over the embedded split."""
    sim = model.similarity(_on(emb["image"], device), _on(emb["text"], device)).cpu()
    return {**similarity_recall(sim, ks, emb["group"]), "retrieval_n": len(emb["group"])}


@torch.no_grad()
def zero_shot_metrics(
    model: torch.nn.Module,
    wrapped: torch.nn.Module,
    emb: dict[str, Any],
    tokenizer,
    max_length: int,
    move,
    label_names: Sequence[str],
    n_boot: int,
    prompted: Callable[[str], str] = str,
) -> tuple[dict[str, Any], Tensor]:
    """Per-label zero-shot AUROC from positive / negative prompt pairs, and the probabilities
    (N, labels) it scored.

    `model` is the bare model (its `similarity`), `wrapped` what the accelerator prepared
    (the prompts go through its forward, which ZeRO-3 needs to gather the weights).
    `prompted`: the data's prompt template (`DataConfig.prompted`), so label prompts are
    embedded the way training reports were.
    """
    if emb["labels"] is None:
        raise ValueError(
            "train.zero_shot needs chest X-ray shards (medalign-cxr-v1) with the 14 labels; "
            "this split has none"
        )
    pos, neg = default_prompts(label_names)
    tokens = tokenizer(
        [prompted(text) for text in pos + neg],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    wrapped.eval()
    prompts = wrapped(
        move({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}),
        embed=True,
    )["text"]
    wrapped.train()
    n = len(pos)
    device = next(iter(prompts.values())).device
    image = _on(emb["image"], device)
    pos_sim = model.similarity(image, {k: v[:n] for k, v in prompts.items()})
    neg_sim = model.similarity(image, {k: v[n:] for k, v in prompts.items()})
    probs = zero_shot_from_similarity(pos_sim.cpu(), neg_sim.cpu(), 1.0 / emb["logit_scale"])
    metrics = multilabel_metrics(
        probs, emb["labels"], emb["label_mask"], list(label_names), n_boot, groups=emb["group"]
    )
    return metrics, probs
