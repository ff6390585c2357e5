"""Evaluation: gather predictions from every rank, score them (torchmetrics), per cohort too."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from trainer.cxr_metrics import multilabel_metrics


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """ACC, macro-AUC (one-vs-rest), macro precision / recall / F1, per-class AUC and the
    confusion matrix.

    AUC is None where the labels hold a single class (it is undefined there).
    """
    probs = logits.float().softmax(dim=-1)
    present = labels.unique().numel()
    per_class = multiclass_auroc(probs, labels, num_classes, average="none")
    out: dict[str, Any] = {
        "n": int(labels.numel()),
        "acc": multiclass_accuracy(probs, labels, num_classes, average="micro").item(),
        "precision": multiclass_precision(probs, labels, num_classes, average="macro").item(),
        "recall": multiclass_recall(probs, labels, num_classes, average="macro").item(),
        "f1": multiclass_f1_score(probs, labels, num_classes, average="macro").item(),
        "confusion": multiclass_confusion_matrix(probs, labels, num_classes).tolist(),
    }
    if present < 2:
        out["auc"], out["auc_per_class"] = None, [None] * num_classes
        return out
    # Classes absent from `labels` have no ROC; macro-AUC averages the classes present.
    has = torch.bincount(labels, minlength=num_classes) > 0
    out["auc"] = per_class[has].mean().item()
    out["auc_per_class"] = [v.item() if h else None for v, h in zip(per_class, has, strict=True)]
    return out


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: Iterable[dict],
    accelerator: Accelerator,
    move,
    tensor_keys: tuple[str, ...] = ("label",),
    list_keys: tuple[str, ...] = ("cohort", "key"),
) -> dict[str, Any]:
    """Runs the model on this rank's share and gathers logits, `tensor_keys` and `list_keys`
    of every rank; padding rows (`valid` False) are dropped, so each sample counts once."""
    model.eval()
    tensors: dict[str, list[torch.Tensor]] = {k: [] for k in ("logits", "valid", *tensor_keys)}
    lists: dict[str, list] = {k: [] for k in list_keys}
    for batch in loader:
        out = model(move(batch))
        tensors["logits"].append(out["logits"].float())
        for key in ("valid", *tensor_keys):
            tensors[key].append(batch[key])
        for key in list_keys:
            lists[key] += batch[key]
    model.train()
    gathered = {
        k: accelerator.gather(torch.cat(v).to(accelerator.device)).cpu() for k, v in tensors.items()
    }
    valid = gathered.pop("valid").bool()
    keep = valid.nonzero().squeeze(1).tolist()
    result: dict[str, Any] = {k: v[valid] for k, v in gathered.items()}
    for key, values in lists.items():
        every = gather_object(values)
        result[key] = [every[i] for i in keep]
    return result


def score(pred: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Overall and per-cohort metrics from `predict`'s output."""
    result = classification_metrics(pred["logits"], pred["label"], num_classes)
    result["per_cohort"] = {}
    for cohort in sorted(set(pred["cohort"])):
        idx = torch.tensor([i for i, c in enumerate(pred["cohort"]) if c == cohort])
        result["per_cohort"][cohort] = classification_metrics(
            pred["logits"][idx], pred["label"][idx], num_classes
        )
    return result


def score_multilabel(pred: dict[str, Any], label_names: list[str], n_boot: int) -> dict[str, Any]:
    """Per-label AUROC and mAUC with bootstrap CIs (images of one study resampled together)."""
    return multilabel_metrics(
        pred["logits"].sigmoid(),
        pred["labels"],
        pred["label_mask"],
        labels=label_names,
        n_boot=n_boot,
        groups=pred["group"],
    )
