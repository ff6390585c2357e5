"""ITC, MAE and MLM losses against plain reference implementations written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.losses import ClipLoss, mlm_loss
from models.mae import mae_loss, patchify


def _clip_reference(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """Symmetric InfoNCE with explicit loops and log-sum-exp in float64."""
    n = image.shape[0]
    sim = [[scale * float(image[i] @ text[j]) for j in range(n)] for i in range(n)]
    image_to_text = text_to_image = 0.0
    for i in range(n):
        row = sim[i]
        col = [sim[j][i] for j in range(n)]
        image_to_text += math.log(sum(math.exp(s) for s in row)) - row[i]
        text_to_image += math.log(sum(math.exp(s) for s in col)) - col[i]
    return (image_to_text / n + text_to_image / n) / 2


@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_matches_reference(local_loss: bool) -> None:
    torch.manual_seed(0)
    image = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    scale = torch.tensor([1 / 0.07], dtype=torch.float64)
    loss = ClipLoss(local_loss=local_loss)(image, text, scale)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(_clip_reference(image, text, scale.item()), rel=1e-10)


def test_clip_loss_rewards_aligned_pairs_and_trains_the_scale() -> None:
    torch.manual_seed(0)
    feats = F.normalize(torch.randn(5, 8), dim=-1)
    log_scale = torch.zeros(1, requires_grad=True)
    aligned = ClipLoss()(feats, feats, log_scale.exp() * 10)
    shuffled = ClipLoss()(feats, feats.roll(1, dims=0), torch.tensor([10.0]))
    assert aligned < shuffled
    aligned.backward()
    assert log_scale.grad is not None and log_scale.grad.abs().item() > 0


def _mae_reference(image: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int, norm: bool):
    """Per-patch loop: cut each patch from the image by slicing, in row-major grid order."""
    B, C, *spatial = image.shape
    grid = [s // p for s in spatial]
    total, count = 0.0, 0
    for b in range(B):
        for n in range(math.prod(grid)):
            if mask[b, n] != 1:
                continue
            coords, rest = [], n
            for g in reversed(grid):
                coords.append(rest % g)
                rest //= g
            coords.reverse()
            index = (b, slice(None)) + tuple(slice(c * p, (c + 1) * p) for c in coords)
            patch = image[index]  # (C, p, p[, p])
            target = patch.permute(*range(1, patch.ndim), 0).reshape(-1)  # (p.., C) like MAE
            if norm:
                target = (target - target.mean()) / math.sqrt(target.var().item() + 1e-6)
            total += ((pred[b, n] - target) ** 2).mean().item()
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize(("spatial", "chans"), [((8, 8), 3), ((8, 8, 8), 1)])
def test_mae_loss_matches_reference(norm_pix: bool, spatial: tuple, chans: int) -> None:
    torch.manual_seed(0)
    p = 4
    image = torch.randn((2, chans, *spatial), dtype=torch.float64)
    n = math.prod(s // p for s in spatial)
    pred = torch.randn(2, n, p ** len(spatial) * chans, dtype=torch.float64)
    mask = (torch.rand(2, n) < 0.6).double()
    mask[0, 0] = 1.0
    loss = mae_loss(pred, patchify(image, p), mask, norm_pix)
    assert loss.item() == pytest.approx(_mae_reference(image, pred, mask, p, norm_pix), rel=1e-5)


def test_mae_loss_ignores_visible_patches() -> None:
    torch.manual_seed(0)
    target, pred = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.float32)
    changed = pred.clone()
    changed[mask == 0] = 1e3
    assert mae_loss(changed, target, mask, True) == mae_loss(pred, target, mask, True)
    assert mae_loss(pred, target, torch.zeros(2, 6), False) == 0  # no masked patch: 0, not NaN


def test_mlm_loss_matches_reference() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, -100, 0, -100], [6, -100, -100, -100, 2]])
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(5):
            if labels[b, t] == -100:
                continue
            row = logits[b, t].tolist()
            expected += math.log(sum(math.exp(v) for v in row)) - row[labels[b, t]]
            count += 1
    assert mlm_loss(logits, labels).item() == pytest.approx(expected / count, rel=1e-6)
    nothing = torch.full((2, 5), -100)
    assert mlm_loss(logits, nothing).item() == 0.0


def test_binary_cohort_rows_train_as_nc_vs_impaired():
    from models.losses import classification_loss

    logits = torch.tensor([[0.2, 1.0, -0.5], [1.5, 0.1, 0.3], [0.0, 0.4, 0.9]], requires_grad=True)
    labels = torch.tensor([2, 0, 1])
    binary = torch.tensor([True, True, False])
    loss = classification_loss(logits, labels, binary)
    p = logits.softmax(-1)
    expected = -(torch.log(p[0, 1] + p[0, 2]) + torch.log(p[1, 0]) + torch.log(p[2, 1])) / 3
    assert torch.allclose(loss, expected)
    loss.backward()
    # an impaired row of a binary cohort is pushed away from NC, not towards AD over MCI
    g = logits.grad[0]
    assert g[0] > 0 and g[1] < 0 and g[2] < 0
    assert torch.allclose(g[1] / g[2], p[0, 1] / p[0, 2])
    # no binary row, or a two-class model: plain cross-entropy
    plain = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(
        classification_loss(logits, labels, torch.zeros(3, dtype=torch.bool)), plain
    )
    assert torch.allclose(classification_loss(logits, labels), plain)


def test_margin_loss_matches_a_plain_pairwise_reference():
    from models.losses import ClipLoss, MarginLoss

    gen = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(5, 4, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(5, 4, generator=gen, dtype=torch.float64), dim=-1)
    margin = 1.2

    def one_way(a, b):  # eq. (1), pair by pair: y_ij = 1 for i == j
        pos, neg = [], []
        for i in range(len(a)):
            for j in range(len(b)):
                d = torch.linalg.vector_norm(a[i] - b[j])
                if i == j:
                    pos.append(d**2)
                else:
                    neg.append(torch.clamp(margin - d, min=0) ** 2)
        return torch.stack(pos).mean() + torch.stack(neg).mean()

    expected = (one_way(image, text) + one_way(text, image)) / 2
    got = ClipLoss(criterion=MarginLoss(margin))(image, text, torch.ones(1, dtype=image.dtype))
    torch.testing.assert_close(got, expected)
    # aligned pairs far from every other pair: no loss left
    eye = torch.eye(4, dtype=torch.float64)
    assert ClipLoss(criterion=MarginLoss(1.0))(eye, eye, torch.ones(1)).item() == 0.0
    with pytest.raises(ValueError, match="margin=3"):
        MarginLoss(3)
