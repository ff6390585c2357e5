"""Evaluation: gather predictions from every rank, score them (torchmetrics), per cohort too.

Binary cohorts (OASIS-2 and MIRIAD publish NC vs demented only) are scored from a three-class
model as NC vs impaired: P(impaired) = P(MCI) + P(AD), predicted impaired when it exceeds
P(NC) (i.e. 0.5); ACC, AUC, precision / recall / F1 of the impaired class.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_confusion_matrix,
    binary_f1_score,
    binary_precision,
    binary_recall,
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


def binary_metrics(p_impaired: torch.Tensor, impaired: torch.Tensor) -> dict[str, Any]:
    """NC vs impaired: ACC at 0.5, AUC of P(impaired), P / R / F1 of the impaired class and the
    2 x 2 confusion matrix. AUC is None where the labels hold a single class."""
    target = impaired.long()
    out: dict[str, Any] = {
        "n": int(target.numel()),
        "acc": binary_accuracy(p_impaired, target).item(),
        "precision": binary_precision(p_impaired, target).item(),
        "recall": binary_recall(p_impaired, target).item(),
        "f1": binary_f1_score(p_impaired, target).item(),
        "confusion": binary_confusion_matrix(p_impaired, target).tolist(),
        "scoring": "binary_collapse",
    }
    out["auc"] = binary_auroc(p_impaired, target).item() if target.unique().numel() > 1 else None
    return out


def collapse_to_binary(logits: torch.Tensor) -> torch.Tensor:
    """Three-class logits (N, 3) of NC / MCI / AD -> P(MCI) + P(AD) (N,), in [0, 1].

    Clamped: a sum that rounds to 1.0000001 would make torchmetrics read the whole tensor as
    logits and squash every score above 0.5."""
    probs = logits.double().softmax(dim=-1)
    return probs[:, 1:].sum(dim=-1).clamp(0.0, 1.0).float()


@contextmanager
def isolated_rng(seed: int, device: torch.device):
    """Runs the block on RNG streams seeded with `seed` and restores the previous ones after
    (the CPU generator, and the device's on CUDA), so an evaluation's random masks neither
    depend on nor move the training RNG."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def reduce_mean(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """Averages a dict of floats across ranks (same keys on every rank)."""
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], device=accelerator.device, dtype=torch.float64)
    tensor = accelerator.reduce(tensor, reduction="mean")
    return dict(zip(keys, tensor.tolist(), strict=True))


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: Iterable[dict],
    accelerator: Accelerator,
    move,
    tensor_keys: tuple[str, ...] = ("label",),
    list_keys: tuple[str, ...] = ("cohort", "key"),
    seed: int = 0,
) -> dict[str, Any]:
    """Runs the model on this rank's share and gathers logits, `tensor_keys` and `list_keys`
    of every rank; padding rows (`valid` False) are dropped, so each sample counts once.

    "losses" holds the mean of any `*_loss` the model also returns (joint training's terms),
    averaged over batches and ranks; the random masks they draw come from `seed`, on a forked
    RNG, so evaluating never moves the training RNG.
    """
    model.eval()
    tensors: dict[str, list[torch.Tensor]] = {k: [] for k in ("logits", "valid", *tensor_keys)}
    lists: dict[str, list] = {k: [] for k in list_keys}
    sums: dict[str, float] = defaultdict(float)
    batches = 0
    with isolated_rng(seed, accelerator.device):
        for batch in loader:
            out = model(move(batch))
            tensors["logits"].append(out["logits"].float())
            for key in ("valid", *tensor_keys):
                tensors[key].append(batch[key])
            for key in list_keys:
                lists[key] += batch[key]
            for key, value in out.items():
                if key.endswith("_loss"):
                    sums[key] += float(value)
            batches += 1
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
    means = {k: v / max(batches, 1) for k, v in sums.items()}
    result["losses"] = reduce_mean(accelerator, means) if means else {}
    return result


def _metrics(logits: torch.Tensor, labels: torch.Tensor, binary: torch.Tensor | None, k: int):
    """Three-class metrics, or binary ones when every sample is of a binary cohort."""
    if binary is not None and len(binary) and bool(binary.all()):
        return binary_metrics(collapse_to_binary(logits), labels > 0)
    out = classification_metrics(logits, labels, k)
    out["scoring"] = "three_class" if k == 3 else "multiclass"
    return out


def score(pred: dict[str, Any], num_classes: int, collapse_binary: bool = False) -> dict[str, Any]:
    """Overall and per-cohort metrics from `predict`'s output.

    With `collapse_binary` (a three-class model) a split or cohort whose samples are all of
    binary cohorts (`pred["binary"]`) is scored as NC vs impaired (see the module docstring);
    a split that mixes both is scored three-class overall, and binary per binary cohort.
    """
    binary = pred.get("binary") if collapse_binary else None
    result = _metrics(pred["logits"], pred["label"], binary, num_classes)
    result["per_cohort"] = {}
    for cohort in sorted(set(pred["cohort"])):
        idx = torch.tensor([i for i, c in enumerate(pred["cohort"]) if c == cohort])
        result["per_cohort"][cohort] = _metrics(
            pred["logits"][idx],
            pred["label"][idx],
            None if binary is None else binary[idx],
            num_classes,
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
