"""PNG plots for the run folder: loss curves, ROC curves, confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import multiclass_roc  # noqa: E402

from trainer.metrics_log import read_metrics  # noqa: E402


def plot_losses(metrics_path: str | Path, out_path: str | Path) -> Path:
    """One panel per loss (total, itc, mae, ...), train and val series together, by step."""
    records = read_metrics(metrics_path)
    panels: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for rec in records:
        for key, value in rec.items():
            if "/" in key and key.endswith("loss") and isinstance(value, (int, float)):
                split, name = key.split("/", 1)
                xs, ys = panels.setdefault(name, {}).setdefault(split, ([], []))
                xs.append(rec["step"])
                ys.append(value)
    names = sorted(panels, key=lambda n: (n != "loss", n)) or ["loss"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for split, (xs, ys) in sorted(panels.get(name, {}).items()):
            ax.plot(xs, ys, marker="o" if split != "train" else None, ms=3, label=split)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if panels.get(name):
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)


def plot_roc(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    out_path: str | Path,
    title: str,
) -> Path:
    """One-vs-rest ROC curve per class."""
    probs = logits.float().softmax(-1)
    fpr, tpr, _ = multiclass_roc(probs, labels, num_classes=len(class_names))
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, name in enumerate(class_names):
        if (labels == i).any():
            ax.plot(fpr[i].numpy(), tpr[i].numpy(), label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)


def plot_confusion(
    confusion: list[list[int]], class_names: list[str], out_path: str | Path, title: str
) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(confusion, cmap="Blues")
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names)
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)


def plot_label_auroc(result: dict, out_path: str | Path, title: str) -> Path:
    """Per-label AUROC with its bootstrap interval, and the mean (mAUC) as a line."""
    names, aucs = result["labels"], result["auroc"]
    cis = result.get("auroc_ci") or [None] * len(names)
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(names) + 1.2))
    for i, (auc, ci) in enumerate(zip(aucs, cis, strict=True)):
        if auc is None:
            continue
        err = None if ci is None else [[auc - ci[0]], [ci[1] - auc]]
        ax.errorbar(auc, i, xerr=err, fmt="o", color="C0", capsize=3)
    if result.get("mauc") is not None:
        ax.axvline(result["mauc"], color="C1", ls="--", label=f"mAUC {result['mauc']:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.axvline(0.5, color="k", lw=0.6)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("AUROC")
    ax.invert_yaxis()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)
