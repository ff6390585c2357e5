"""Scoring of 14-label chest X-ray heads: masked per-label AUROC, mAUC, bootstrap CIs, accuracy.

Every function takes `probs` (N, L), `targets` (N, L) and an optional `mask` (N, L) where a
nonzero entry means "this label of this study counts". Masked entries (uncertain under
U-Ignore, or blank when blanks are masked) never enter any metric or loss, and their target
value may be anything (-1, NaN). Unmasked targets must be 0 or 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_accuracy, binary_auroc

from models.losses import masked_bce  # noqa: F401 - re-exported: the loss the scores pair with
from shards.cxr_labels import LABEL_NAMES

# The CheXpert labeler's columns, in the order of mimic-cxr-2.0.0-chexpert.csv.
CHEXPERT_LABELS: tuple[str, ...] = LABEL_NAMES  # the CSV's column order, defined once

# Bootstrap chunks hold about this many (resample, row) weights at once (float64: 32 MiB).
_CHUNK_ELEMENTS = 1 << 22


def _prepare(probs: Tensor, targets: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Checks shapes and values; returns float64 scores, {0,1} targets (0 where masked), bool mask."""
    probs, targets = torch.as_tensor(probs), torch.as_tensor(targets)
    if probs.ndim != 2 or probs.shape != targets.shape:
        raise ValueError(
            f"probs {tuple(probs.shape)} and targets {tuple(targets.shape)} must be (N, L)"
        )
    if mask is None:
        mask_b = torch.ones(probs.shape, dtype=torch.bool)
    else:
        mask = torch.as_tensor(mask)
        if mask.shape != probs.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must match probs {tuple(probs.shape)}")
        mask_b = mask != 0
    targets = targets.double()
    kept = targets[mask_b]
    if not bool(((kept == 0) | (kept == 1)).all()):
        raise ValueError("unmasked targets must be 0 or 1; mask uncertain (-1) and blank entries")
    scores = probs.detach().double()
    if bool(scores[mask_b].isnan().any()):
        raise ValueError("probs hold NaN in unmasked entries")
    return scores, torch.where(mask_b, targets, 0.0).long(), mask_b


def multilabel_auroc(
    probs: Tensor, targets: Tensor, mask: Tensor | None = None
) -> tuple[list[float | None], float | None]:
    """Per-label AUROC on each label's unmasked rows, and mAUC (their mean over defined labels).

    probs (N, L) scores (probabilities, or logits: AUROC only uses their order); targets (N, L);
    mask (N, L). A label whose unmasked rows hold one class (or none) has AUROC None and is
    left out of the mean; mAUC is None when no label is defined.
    """
    scores, targets, mask = _prepare(probs, targets, mask)
    per_label: list[float | None] = []
    for j in range(scores.shape[1]):
        s, y = scores[mask[:, j], j], targets[mask[:, j], j]
        if y.numel() == 0 or y.min() == y.max():
            per_label.append(None)
            continue
        per_label.append(binary_auroc(s, y).item())
    defined = [a for a in per_label if a is not None]
    return per_label, (sum(defined) / len(defined) if defined else None)


def multilabel_accuracy(
    probs: Tensor, targets: Tensor, mask: Tensor | None = None, threshold: float = 0.5
) -> tuple[list[float | None], float | None]:
    """Per-label accuracy of `probs >= threshold` on unmasked rows, and its mean over labels.

    A label with no unmasked row has accuracy None and is left out of the mean.
    """
    scores, targets, mask = _prepare(probs, targets, mask)
    per_label: list[float | None] = []
    for j in range(scores.shape[1]):
        s, y = scores[mask[:, j], j], targets[mask[:, j], j]
        if y.numel() == 0:
            per_label.append(None)
            continue
        # Thresholding here, not in torchmetrics, which would apply a sigmoid to logits.
        per_label.append(binary_accuracy((s >= threshold).long(), y).item())
    defined = [a for a in per_label if a is not None]
    return per_label, (sum(defined) / len(defined) if defined else None)


def label_counts(targets: Tensor, mask: Tensor | None = None) -> tuple[list[int], list[int]]:
    """(positives, unmasked rows) per label."""
    targets = torch.as_tensor(targets)
    _, y, m = _prepare(torch.zeros(targets.shape), targets, mask)
    return y.sum(0).tolist(), m.sum(0).tolist()


def weighted_auroc(scores: Tensor, positive: Tensor, weights: Tensor) -> Tensor:
    """AUROC of one label under B row weightings, as the Mann-Whitney statistic with ties at 1/2.

    scores (n,), positive (n,) bool, weights (B, n) (bootstrap multiplicities) -> (B,) float64,
    NaN where a weighting leaves no positive or no negative. With unit weights this equals the
    trapezoidal ROC AUC (scikit-learn, torchmetrics).
    """
    order = scores.argsort()
    _, group = scores[order].unique_consecutive(return_inverse=True)  # tie groups, ascending
    n_groups = int(group.max()) + 1
    w = weights[:, order]
    pos_w = torch.where(positive[order], w, 0.0)
    pos = w.new_zeros(w.shape[0], n_groups).index_add_(1, group, pos_w)
    neg = w.new_zeros(w.shape[0], n_groups).index_add_(1, group, w - pos_w)
    below = neg.cumsum(1) - neg  # negative weight strictly below each tie group
    wins = (pos * (below + 0.5 * neg)).sum(1)
    pairs = pos.sum(1) * neg.sum(1)
    return torch.where(pairs > 0, wins / pairs, torch.nan)


def bootstrap_ci(
    probs: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Tensor | Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Percentile bootstrap CIs for each label's AUROC and for mAUC.

    Each resample draws the N rows with replacement (or, with `groups` (N,), e.g. study ids
    when rows are images, draws whole groups with replacement, so rows of one study move
    together). A resample where a label's unmasked rows hold one class is skipped for that
    label only; a resample counts for mAUC only if every label defined on the full data is
    defined in it, so the mean is always over the same labels. `n_used` / `mauc_n_used` say how
    many resamples each interval rests on. Point estimates come from `multilabel_auroc`.

    Returns {"auroc", "auroc_ci", "n_used", "mauc", "mauc_ci", "mauc_n_used", "n_boot",
    "alpha"}; a CI is (lo, hi), or None where the label is undefined or no resample was usable.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    point, mauc = multilabel_auroc(probs, targets, mask)
    scores, targets, mask = _prepare(probs, targets, mask)
    n_rows, n_labels = scores.shape
    if groups is None:
        unit = torch.arange(n_rows)
    else:
        keys = list(groups.tolist() if isinstance(groups, Tensor) else groups)
        if len(keys) != n_rows:
            raise ValueError(f"groups has {len(keys)} entries for {n_rows} rows")
        index: dict[Any, int] = {}
        unit = torch.tensor([index.setdefault(k, len(index)) for k in keys])
    n_units = int(unit.max()) + 1 if n_rows else 0

    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(n_rows, 1))
    replicates = torch.full((n_boot, n_labels), torch.nan, dtype=torch.float64)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = torch.randint(n_units, (b, n_units), generator=gen)
        counts = torch.zeros(b, n_units, dtype=torch.float64)
        counts.scatter_add_(1, draws, torch.ones(b, n_units, dtype=torch.float64))
        weights = counts[:, unit]  # (b, N) multiplicity of each row
        for j in range(n_labels):
            if point[j] is None:
                continue
            rows = mask[:, j]
            replicates[start : start + b, j] = weighted_auroc(
                scores[rows, j], targets[rows, j] == 1, weights[:, rows]
            )

    lo_q, hi_q = alpha / 2, 1 - alpha / 2

    def interval(values: Tensor) -> tuple[float, float] | None:
        values = values[~values.isnan()]
        if values.numel() == 0:
            return None
        q = torch.quantile(values, torch.tensor([lo_q, hi_q], dtype=values.dtype))
        return float(q[0]), float(q[1])

    defined = [j for j in range(n_labels) if point[j] is not None]
    n_used = [
        int((~replicates[:, j].isnan()).sum()) if j in defined else 0 for j in range(n_labels)
    ]
    auroc_ci = [interval(replicates[:, j]) if j in defined else None for j in range(n_labels)]
    mauc_ci, mauc_used = None, 0
    if defined:
        sub = replicates[:, defined]
        usable = ~sub.isnan().any(1)
        mauc_used = int(usable.sum())
        mauc_ci = interval(sub[usable].mean(1))
    return {
        "auroc": point,
        "auroc_ci": auroc_ci,
        "n_used": n_used,
        "mauc": mauc,
        "mauc_ci": mauc_ci,
        "mauc_n_used": mauc_used,
        "n_boot": n_boot,
        "alpha": alpha,
    }


def multilabel_metrics(
    probs: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    labels: Sequence[str] = CHEXPERT_LABELS,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Tensor | Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Everything `format_table` prints: counts, AUROC (+ CIs unless n_boot=0), accuracy."""
    probs = torch.as_tensor(probs)
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise ValueError(
            f"probs {tuple(probs.shape)} must have one column per label ({len(labels)})"
        )
    positives, unmasked = label_counts(targets, mask)
    acc, mean_acc = multilabel_accuracy(probs, targets, mask)
    out: dict[str, Any] = {
        "labels": list(labels),
        "n_pos": positives,
        "n": unmasked,
        "acc": acc,
        "mean_acc": mean_acc,
    }
    if n_boot > 0:
        out.update(bootstrap_ci(probs, targets, mask, n_boot, alpha, seed, groups))
    else:
        out["auroc"], out["mauc"] = multilabel_auroc(probs, targets, mask)
        out["auroc_ci"], out["mauc_ci"] = [None] * len(labels), None
    return out


def format_table(result: dict[str, Any]) -> str:
    """A fixed-width table from `multilabel_metrics`: label, n+, n, AUROC [lo, hi], acc."""

    def num(v: float | None) -> str:
        return "  n/a" if v is None else f"{v:.3f}"

    def ci(v: tuple[float, float] | None) -> str:
        return "" if v is None else f"[{v[0]:.3f}, {v[1]:.3f}]"

    alpha = result.get("alpha")
    ci_head = f"{100 * (1 - alpha):g}% CI" if alpha is not None else "CI"
    width = max(len("mean (mAUC)"), *(len(name) for name in result["labels"]))
    lines = [f"{'label':<{width}}  {'n+':>6}  {'n':>6}  {'AUROC':>5}  {ci_head:<14}  {'acc':>5}"]
    for j, name in enumerate(result["labels"]):
        lines.append(
            f"{name:<{width}}  {result['n_pos'][j]:>6}  {result['n'][j]:>6}  "
            f"{num(result['auroc'][j])}  {ci(result['auroc_ci'][j]):<14}  {num(result['acc'][j])}"
        )
    lines.append(
        f"{'mean (mAUC)':<{width}}  {'':>6}  {'':>6}  "
        f"{num(result['mauc'])}  {ci(result['mauc_ci']):<14}  {num(result['mean_acc'])}"
    )
    return "\n".join(lines)
