"""14-label CXR scoring against scikit-learn and hand computations: masked AUROC, bootstrap CIs,
accuracy, masked BCE, label-fraction subsets and the printed table."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from shards.splits import label_fraction_indices
from trainer.cxr_metrics import (
    CHEXPERT_LABELS,
    bootstrap_ci,
    format_table,
    label_counts,
    masked_bce,
    multilabel_accuracy,
    multilabel_auroc,
    multilabel_metrics,
    weighted_auroc,
)

L = len(CHEXPERT_LABELS)


def _data(n: int, seed: int, rate: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Informative but noisy scores, rounded so that ties occur; about 15 % of entries masked."""
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, L, generator=g) < rate).float()
    probs = (0.6 * torch.rand(n, L, generator=g) + 0.4 * targets).round(decimals=2)
    mask = (torch.rand(n, L, generator=g) > 0.15).float()
    return probs, targets, mask


def _sklearn_auroc(probs, targets, mask) -> list[float | None]:
    out = []
    for j in range(probs.shape[1]):
        keep = mask[:, j] != 0
        y, s = targets[keep, j].numpy(), probs[keep, j].numpy()
        out.append(None if len(np.unique(y)) < 2 else float(roc_auc_score(y, s)))
    return out


def test_label_list_matches_the_chexpert_csv() -> None:
    assert len(CHEXPERT_LABELS) == 14
    assert CHEXPERT_LABELS[0] == "Atelectasis" and CHEXPERT_LABELS[8] == "No Finding"
    assert CHEXPERT_LABELS[-1] == "Support Devices"


def test_auroc_matches_sklearn_on_unmasked_rows() -> None:
    probs, targets, mask = _data(400, seed=1)
    # Label 3: every unmasked row negative -> undefined. Masked entries hold raw CSV values
    # (-1 uncertain, NaN blank) and must not matter.
    targets[:, 3] = 0.0
    targets[mask == 0] = torch.where(torch.rand(int((mask == 0).sum())) < 0.5, -1.0, torch.nan)
    per_label, mauc = multilabel_auroc(probs, targets, mask)
    expected = _sklearn_auroc(probs, torch.nan_to_num(targets, nan=0.0), mask)
    assert per_label[3] is None and expected[3] is None
    for got, want in zip(per_label, expected, strict=True):
        if want is not None:
            assert got == pytest.approx(want, abs=1e-6)
    defined = [a for a in expected if a is not None]
    assert len(defined) == L - 1
    assert mauc == pytest.approx(sum(defined) / len(defined), abs=1e-6)


def test_auroc_ignores_the_scores_of_masked_entries() -> None:
    probs, targets, mask = _data(300, seed=2)
    base, _ = multilabel_auroc(probs, targets, mask)
    scrambled = torch.where(mask == 0, torch.rand(probs.shape), probs)
    assert multilabel_auroc(scrambled, targets, mask)[0] == base
    # Without the mask the same scrambled scores give other values.
    assert multilabel_auroc(scrambled, torch.where(mask == 0, 0.0, targets))[0] != base


def test_unmasked_uncertain_targets_raise() -> None:
    probs, targets, _ = _data(50, seed=3)
    targets[0, 0] = -1.0
    with pytest.raises(ValueError, match="0 or 1"):
        multilabel_auroc(probs, targets)
    with pytest.raises(ValueError, match="must be"):
        multilabel_auroc(probs[:, :5], targets)


def test_no_defined_label_gives_no_mauc() -> None:
    per_label, mauc = multilabel_auroc(torch.rand(10, L), torch.ones(10, L))
    assert per_label == [None] * L and mauc is None


def testweighted_auroc_equals_sklearn_on_repeated_rows() -> None:
    g = torch.Generator().manual_seed(4)
    scores = torch.randint(0, 20, (60,), generator=g).double()  # many ties
    positive = torch.rand(60, generator=g) < 0.4
    weights = torch.randint(0, 4, (5, 60), generator=g).double()
    got = weighted_auroc(scores, positive, weights)
    for b in range(5):
        reps = weights[b].long().numpy()
        y = np.repeat(positive.numpy(), reps)
        s = np.repeat(scores.numpy(), reps)
        assert got[b].item() == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    only_neg = weighted_auroc(scores, positive, torch.where(positive, 0.0, 1.0)[None].double())
    assert only_neg.isnan().all()


def test_bootstrap_ci_contains_point_estimate() -> None:
    probs, targets, mask = _data(500, seed=5)
    result = bootstrap_ci(probs, targets, mask, n_boot=300, seed=0)
    assert result["n_used"] == [300] * L and result["mauc_n_used"] == 300
    for point, (lo, hi) in zip(result["auroc"], result["auroc_ci"], strict=True):
        assert lo < point < hi
    lo, hi = result["mauc_ci"]
    assert lo < result["mauc"] < hi
    assert result["auroc"] == multilabel_auroc(probs, targets, mask)[0]


def test_bootstrap_ci_narrows_with_more_data() -> None:
    def widths(n: int) -> tuple[float, float]:
        result = bootstrap_ci(*_data(n, seed=6), n_boot=200, seed=0)
        per_label = [hi - lo for lo, hi in result["auroc_ci"]]
        return sum(per_label) / L, result["mauc_ci"][1] - result["mauc_ci"][0]

    small_label, small_mauc = widths(200)
    large_label, large_mauc = widths(3200)
    # Width scales like 1/sqrt(n): 16x the rows should give about a quarter of the width.
    assert large_label < 0.4 * small_label
    assert large_mauc < 0.4 * small_mauc


def test_bootstrap_ci_is_deterministic_for_a_seed() -> None:
    probs, targets, mask = _data(300, seed=7)
    a = bootstrap_ci(probs, targets, mask, n_boot=100, seed=3)
    b = bootstrap_ci(probs, targets, mask, n_boot=100, seed=3)
    c = bootstrap_ci(probs, targets, mask, n_boot=100, seed=4)
    assert a == b
    assert a["auroc_ci"] != c["auroc_ci"]


def test_perfect_classifier_has_ci_one_one() -> None:
    g = torch.Generator().manual_seed(8)
    targets = (torch.rand(200, L, generator=g) < 0.3).float()
    probs = 0.5 * torch.rand(200, L, generator=g) + 0.5 * targets  # positives all above 0.5
    result = bootstrap_ci(probs, targets, n_boot=200)
    # torchmetrics builds the ROC in float32, so its point estimate is 1 to within ~1e-7;
    # the bootstrap replicates are exact rank statistics in float64.
    assert result["auroc"] == pytest.approx([1.0] * L, abs=1e-6)
    assert result["mauc"] == pytest.approx(1.0, abs=1e-6)
    assert result["auroc_ci"] == [(1.0, 1.0)] * L
    assert result["mauc_ci"] == (1.0, 1.0)


def test_bootstrap_skips_one_class_resamples_per_label_only() -> None:
    probs, targets, mask = _data(200, seed=9)
    mask[:] = 1.0
    targets[:, 2] = 0.0
    targets[17, 2] = 1.0  # a single positive: absent from about e^-1 of the resamples
    targets[:, 5] = 1.0  # one class everywhere: undefined
    result = bootstrap_ci(probs, targets, mask, n_boot=400, seed=0)
    assert 0.25 * 400 < 400 - result["n_used"][2] < 0.5 * 400
    assert result["n_used"][5] == 0 and result["auroc_ci"][5] is None and result["auroc"][5] is None
    others = [n for j, n in enumerate(result["n_used"]) if j not in (2, 5)]
    assert others == [400] * (L - 2)
    # mAUC rests on the resamples where every defined label is defined.
    assert result["mauc_n_used"] == result["n_used"][2]


def test_grouped_bootstrap_moves_a_study_as_one() -> None:
    probs, targets, mask = _data(150, seed=10)
    # Each study has two identical image rows: resampling studies must give exactly the
    # intervals of resampling the single rows.
    doubled = [torch.cat([t, t]) for t in (probs, targets, mask)]
    study = torch.cat([torch.arange(150), torch.arange(150)])
    grouped = bootstrap_ci(*doubled, n_boot=150, seed=1, groups=study)
    single = bootstrap_ci(probs, targets, mask, n_boot=150, seed=1)
    for got, want in zip(grouped["auroc_ci"], single["auroc_ci"], strict=True):
        assert got == pytest.approx(want, abs=1e-12)
    assert grouped["mauc_ci"] == pytest.approx(single["mauc_ci"], abs=1e-12)
    # Treating the duplicated rows as independent understates the spread.
    rows = bootstrap_ci(*doubled, n_boot=150, seed=1)
    assert rows["mauc_ci"][1] - rows["mauc_ci"][0] < grouped["mauc_ci"][1] - grouped["mauc_ci"][0]


def test_bootstrap_of_3000_rows_is_vectorised() -> None:
    probs, targets, mask = _data(3000, seed=11)
    start = time.perf_counter()
    result = bootstrap_ci(probs, targets, mask, n_boot=1000, seed=0)
    elapsed = time.perf_counter() - start
    assert result["n_used"] == [1000] * L
    assert elapsed < 20.0, f"bootstrap took {elapsed:.1f} s"


def test_bootstrap_rejects_bad_arguments() -> None:
    probs, targets, mask = _data(20, seed=12)
    with pytest.raises(ValueError):
        bootstrap_ci(probs, targets, mask, n_boot=0)
    with pytest.raises(ValueError):
        bootstrap_ci(probs, targets, mask, alpha=1.5)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci(probs, targets, mask, groups=[0, 1])


def test_accuracy_and_counts_are_masked() -> None:
    probs = torch.tensor([[0.9, 0.2], [0.4, 0.7], [0.6, 0.1], [0.1, 0.8]])
    targets = torch.tensor([[1.0, 0.0], [1.0, -1.0], [0.0, 0.0], [0.0, float("nan")]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]])
    per_label, mean = multilabel_accuracy(probs, targets, mask)
    # Label 0 rows 0..2: right, wrong (0.4 < 0.5), wrong (0.6 >= 0.5) -> 1/3. Label 1 rows 0, 2: 2/2.
    assert per_label == pytest.approx([1 / 3, 1.0])
    assert mean == pytest.approx((1 / 3 + 1.0) / 2)
    assert label_counts(targets, mask) == ([2, 0], [3, 2])
    none_kept, mean_none = multilabel_accuracy(probs, targets, torch.tensor([[1, 0]] * 4))
    assert none_kept[1] is None and mean_none == pytest.approx(0.5)


def test_masked_bce_equals_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [0.0, float("nan")]])
    mask = torch.tensor([[1, 1], [1, 0]])

    def bce(x: float, y: float, w: float = 1.0) -> float:
        p = 1 / (1 + math.exp(-x))
        return -(w * y * math.log(p) + (1 - y) * math.log(1 - p))

    expected = (bce(2.0, 1) + bce(-1.0, 0) + bce(0.5, 0)) / 3
    loss = masked_bce(logits, targets, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[1, 1] == 0.0 and logits.grad[0, 0] != 0.0

    pos_weight = torch.tensor([3.0, 2.0])
    expected_w = (bce(2.0, 1, 3.0) + bce(-1.0, 0) + bce(0.5, 0)) / 3
    assert masked_bce(logits, targets, mask, pos_weight).item() == pytest.approx(
        expected_w, rel=1e-6
    )


def test_masked_bce_ignores_masked_logits() -> None:
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(8, L, generator=g)
    targets = (torch.rand(8, L, generator=g) < 0.5).float()
    mask = torch.rand(8, L, generator=g) > 0.3
    base = masked_bce(logits, targets, mask)
    changed = torch.where(mask, logits, torch.randn(8, L, generator=g) * 50)
    assert masked_bce(changed, targets, mask).item() == pytest.approx(base.item(), rel=1e-6)
    assert masked_bce(changed, targets).item() != pytest.approx(base.item(), rel=1e-3)
    assert masked_bce(logits, targets).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, targets).item(), rel=1e-6
    )


def test_masked_bce_with_nothing_unmasked_is_zero_and_differentiable() -> None:
    logits = torch.randn(3, L, requires_grad=True)
    loss = masked_bce(logits, torch.full((3, L), -1.0), torch.zeros(3, L))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(3, L))


def test_label_fractions_are_nested_and_sized() -> None:
    n = 2345
    one, ten, full = (label_fraction_indices(n, f, seed=0) for f in (0.01, 0.1, 1.0))
    assert (len(one), len(ten), len(full)) == (23, 234, n)
    assert set(one) <= set(ten) <= set(full) == set(range(n))
    assert one == sorted(set(one)) and ten == sorted(set(ten))
    assert label_fraction_indices(n, 0.1, seed=0) == ten
    assert label_fraction_indices(n, 0.1, seed=1) != ten
    assert len(label_fraction_indices(10, 0.01, seed=0)) == 1
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            label_fraction_indices(n, bad)


def test_table_is_readable() -> None:
    probs, targets, mask = _data(300, seed=14)
    targets[:, 4] = 0.0
    result = multilabel_metrics(probs, targets, mask, n_boot=100)
    table = format_table(result)
    lines = table.splitlines()
    assert len(lines) == L + 2 and "95% CI" in lines[0]
    row = next(line for line in lines if line.startswith("Cardiomegaly"))
    lo, hi = result["auroc_ci"][1]
    assert f"{result['auroc'][1]:.3f}" in row and f"[{lo:.3f}, {hi:.3f}]" in row
    assert f"{result['n_pos'][1]}" in row.split()
    assert "n/a" in next(line for line in lines if line.startswith("Enlarged Cardiomediastinum"))
    assert lines[-1].startswith("mean (mAUC)") and f"{result['mauc']:.3f}" in lines[-1]
    no_ci = format_table(multilabel_metrics(probs, targets, mask, n_boot=0))
    assert "[" not in no_ci and "Pneumothorax" in no_ci
