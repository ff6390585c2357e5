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
    """Every `train/*_loss` and `val/*_loss` series against the step."""
    records = read_metrics(metrics_path)
    series: dict[str, tuple[list[int], list[float]]] = {}
    for rec in records:
        for key, value in rec.items():
            if key.endswith("loss") and isinstance(value, (int, float)):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(rec["step"])
                ys.append(value)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, marker="o" if key.startswith("val/") else None, ms=3, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Losses")
    if series:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
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
