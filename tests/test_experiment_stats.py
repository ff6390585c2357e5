"""The experiment statistics: subject bootstrap, seed averaging, paired p-values."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from trainer.experiment import Predictions, paired_p, score_column, subject_weights


def _pred(logits: torch.Tensor, labels: list[int], binary: bool = False) -> Predictions:
    n = len(labels)
    return Predictions(
        keys=[f"k{i}" for i in range(n)],
        subjects=[f"s{i // 2}" for i in range(n)],  # two scans per subject
        logits=logits.double(),
        labels=torch.tensor(labels),
        binary=binary,
    )


def test_subject_bootstrap_moves_a_subjects_scans_together() -> None:
    w = subject_weights(["a", "a", "b", "c", "c"], n_boot=50, seed=0)
    assert w.shape == (51, 5) and torch.equal(w[0], torch.ones(5, dtype=torch.float64))
    assert torch.equal(w[1:, 0], w[1:, 1]) and torch.equal(w[1:, 3], w[1:, 4])
    assert torch.all(w[1:].sum(1) == w[1:, [0, 2, 3]].sum(1) + w[1:, [1, 4]].sum(1))


def test_seed_mean_and_spread_and_p_values() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]
    seeds = [_pred(torch.randn(12, 3, generator=gen), labels) for _ in range(2)]
    other = [_pred(torch.randn(12, 3, generator=gen), labels)]
    scores = score_column({"full": seeds, "other": other}, "full", n_boot=200, seed=0)
    full = scores["full"]
    accs = [float((p.logits.argmax(1) == p.labels).double().mean()) for p in seeds]
    assert full["acc"] == pytest.approx(sum(accs) / 2) and full["acc_by_seed"] == pytest.approx(
        accs
    )
    assert full["acc_seed_sd"] == pytest.approx(torch.tensor(accs).std().item())
    auc = roc_auc_score(labels, seeds[0].logits.softmax(1).numpy(), multi_class="ovr")
    assert full["auc_by_seed"][0] == pytest.approx(auc)
    assert "acc_p" not in full and 0 <= scores["other"]["acc_p"] <= 1
    same = score_column({"a": seeds, "b": seeds}, "a", n_boot=100, seed=0)
    assert same["b"]["acc_p"] == 1.0 and same["b"]["auc_p"] == 1.0


def test_binary_columns_score_p_impaired() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    pred = _pred(logits, [0, 2, 2, 2], binary=True)
    entry = score_column({"r": [pred]}, "r", n_boot=10, seed=0)["r"]
    p = logits.softmax(1)[:, 1:].sum(1)
    assert entry["scoring"] == "binary"
    assert entry["acc"] == pytest.approx(
        float(((p > 0.5) == torch.tensor([0, 1, 1, 1]).bool()).double().mean())
    )
    assert entry["auc"] == pytest.approx(roc_auc_score([0, 1, 1, 1], p))


def test_paired_p_is_two_sided() -> None:
    better = torch.tensor([0.1, 0.2, 0.15, 0.3])
    assert paired_p(better + 1, better) == 0.0
    assert paired_p(better, better + 1) == 0.0
    assert paired_p(torch.tensor([1.0, -1.0]), torch.zeros(2)) == 1.0


def test_multilabel_scores_leave_undefined_resamples_out():
    from trainer.experiment import Predictions, subject_weights, weighted_scores

    # 6 studies; label 1 is kept in study 0 only, and every prediction is right
    labels = torch.tensor([[1, 1], [0, 0], [1, 0], [0, 0], [1, 0], [0, 0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0], [1, 0], [1, 0], [1, 0], [1, 0]], dtype=torch.float64)
    logits = torch.where(labels > 0, 3.0, -3.0).double()
    pred = Predictions(
        [f"k{i}" for i in range(6)], [f"s{i}" for i in range(6)], logits, labels, False, mask
    )
    weights = subject_weights(pred.subjects, 200, seed=0)
    scores = weighted_scores(pred, weights)
    assert scores["mean_acc"][0] == 1.0
    # a resample without study 0 has no entry of label 1: it is left out, not scored 0
    assert torch.all(scores["mean_acc"][~scores["mean_acc"].isnan()] == 1.0)
    # label 1 has no negative: its AUROC is undefined, mAUC is label 0's everywhere defined
    assert scores["auroc:1"].isnan().all() and scores["mauc"][0] == 1.0
