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
)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """ACC, macro-AUC (one-vs-rest), macro-F1, per-class AUC and the confusion matrix.

    AUC is None where the labels hold a single class (it is undefined there).
    """
    probs = logits.float().softmax(dim=-1)
    present = labels.unique().numel()
    per_class = multiclass_auroc(probs, labels, num_classes, average="none")
    out: dict[str, Any] = {
        "n": int(labels.numel()),
        "acc": multiclass_accuracy(probs, labels, num_classes, average="micro").item(),
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
    model: torch.nn.Module, loader: Iterable[dict], accelerator: Accelerator, move
) -> dict[str, Any]:
    """Runs the classifier on this rank's share and gathers (logits, labels, cohorts) everywhere."""
    model.eval()
    logits, labels, valid, cohorts, keys = [], [], [], [], []
    for batch in loader:
        out = model(move(batch))
        logits.append(out["logits"].float())
        labels.append(batch["label"])
        valid.append(batch["valid"])
        cohorts += batch["cohort"]
        keys += batch["key"]
    model.train()
    logits_t = accelerator.gather(torch.cat(logits).to(accelerator.device)).cpu()
    labels_t = accelerator.gather(torch.cat(labels).to(accelerator.device)).cpu()
    valid_t = accelerator.gather(torch.cat(valid).to(accelerator.device)).cpu().bool()
    cohorts_all = gather_object(cohorts)
    keys_all = gather_object(keys)
    keep = valid_t.nonzero().squeeze(1).tolist()
    return {
        "logits": logits_t[valid_t],
        "labels": labels_t[valid_t],
        "cohorts": [cohorts_all[i] for i in keep],
        "keys": [keys_all[i] for i in keep],
    }


def score(pred: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Overall and per-cohort metrics from `predict`'s output."""
    result = classification_metrics(pred["logits"], pred["labels"], num_classes)
    result["per_cohort"] = {}
    for cohort in sorted(set(pred["cohorts"])):
        idx = torch.tensor([i for i, c in enumerate(pred["cohorts"]) if c == cohort])
        result["per_cohort"][cohort] = classification_metrics(
            pred["logits"][idx], pred["labels"][idx], num_classes
        )
    return result
