"""Retrieval recall on hand-made embeddings and against a brute-force reference; zero-shot scores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.cxr_metrics import CHEXPERT_LABELS
from trainer.retrieval import (
    default_prompts,
    retrieval_recall,
    similarity_recall,
    zero_shot_scores,
)

KEYS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]


def _reference_recall(sim: torch.Tensor, groups: list[int], k: int) -> float:
    """Loops: a query hits if fewer than k wrong items score >= its best correct item."""
    n = sim.shape[0]
    hits = 0
    for i in range(n):
        correct = [j for j in range(n) if groups[j] == groups[i]]
        best = max(sim[i, j].item() for j in correct)
        ahead = sum(1 for j in range(n) if j not in correct and sim[i, j].item() >= best)
        hits += ahead < k
    return hits / n


def test_identity_gives_perfect_recall() -> None:
    emb = torch.randn(20, 32)
    assert retrieval_recall(emb, emb.clone()) == {key: 1.0 for key in KEYS}
    assert retrieval_recall(torch.eye(12), torch.eye(12)) == {key: 1.0 for key in KEYS}


def test_known_permutation_gives_known_recall() -> None:
    # Texts are the one-hot images shuffled so that exactly 3 of 12 pairs stay matched. Every
    # other image's own text has similarity 0, tied with 10 more wrong texts and behind the one
    # text at 1: ties count against the model, so those images rank 11th and never hit in the
    # top 10.
    perm = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 3])
    out = retrieval_recall(torch.eye(12), torch.eye(12)[perm], normalize=False)
    assert out == {key: 0.25 for key in KEYS}
    assert retrieval_recall(torch.eye(12), torch.eye(12)[perm], ks=(12,))["i2t_r12"] == 1.0


def test_graded_similarities_give_known_recall() -> None:
    # Circulant similarities: each row's own item has the third-largest score, each column's too.
    c = torch.tensor([3.0, 5.0, 4.0, 2.0, 1.0, 0.0])
    sim = torch.stack([c.roll(i) for i in range(6)])
    out = retrieval_recall(torch.eye(6), sim, ks=(1, 2, 3), normalize=False)
    assert out == {
        "i2t_r1": 0.0,
        "i2t_r2": 0.0,
        "i2t_r3": 1.0,
        "t2i_r1": 0.0,
        "t2i_r2": 0.0,
        "t2i_r3": 1.0,
    }


def test_groups_count_the_study_report_as_correct() -> None:
    study = [0, 0, 0, 1, 2, 3]  # study 0 has three images, each row carrying its report
    text = torch.eye(4)[study]
    image = text + 0.1 * torch.eye(6, 4).roll(1, dims=1)  # a little per-image variation
    plain = retrieval_recall(image, text, ks=(1, 5))
    # Without groups the study's other two copies of its report rank ahead of the own copy.
    assert plain["i2t_r1"] == pytest.approx(0.5) and plain["i2t_r5"] == 1.0
    assert plain["t2i_r1"] == pytest.approx(0.5)
    grouped = retrieval_recall(image, text, ks=(1, 5), groups=study)
    assert grouped == {"i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0}
    named = retrieval_recall(image, text, ks=(1, 5), groups=["s0", "s0", "s0", "s1", "s2", "s3"])
    assert named == grouped


def test_recall_matches_brute_force_with_ties_and_groups() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.randint(-2, 3, (40, 3), generator=g).float()  # coarse: many exact ties
    text = image + torch.randint(-1, 2, (40, 3), generator=g).float()
    groups = torch.randint(0, 25, (40,), generator=g).tolist()
    out = retrieval_recall(image, text, ks=(1, 5, 10), groups=groups, normalize=False)
    sim = image @ text.T
    for k in (1, 5, 10):
        assert out[f"i2t_r{k}"] == pytest.approx(_reference_recall(sim, groups, k))
        assert out[f"t2i_r{k}"] == pytest.approx(_reference_recall(sim.T, groups, k))


def test_recall_is_the_same_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    image, text = torch.randn(50, 8), torch.randn(50, 8)
    whole = retrieval_recall(image, text)
    monkeypatch.setattr("trainer.retrieval._QUERY_CHUNK", 7)
    assert retrieval_recall(image, text) == whole


def test_recall_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        retrieval_recall(torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError):
        retrieval_recall(torch.randn(4, 8), torch.randn(4, 8), ks=(0,))
    with pytest.raises(ValueError, match="groups"):
        retrieval_recall(torch.randn(4, 8), torch.randn(4, 8), groups=[0, 1])


def test_default_prompts_cover_the_labels() -> None:
    pos, neg = default_prompts()
    assert len(pos) == len(neg) == 14
    assert pos[1] == "There is cardiomegaly." and neg[1] == "There is no cardiomegaly."
    assert len(set(pos) | set(neg)) == 28
    no_finding = CHEXPERT_LABELS.index("No Finding")
    assert "no finding" not in pos[no_finding].lower() and "no " in pos[no_finding].lower()
    assert default_prompts(["Hernia"]) == (["There is hernia."], ["There is no hernia."])


def test_zero_shot_prefers_the_aligned_prompt() -> None:
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(14, 16, generator=g), torch.randn(14, 16, generator=g)
    # Image 0 is label 2's positive prompt, image 1 its negative prompt.
    image = torch.stack([pos[2], neg[2], torch.randn(16, generator=g)])
    probs = zero_shot_scores(image, pos, neg, temperature=0.1)
    assert probs.shape == (3, 14)
    assert probs[0, 2] > 0.5 and probs[1, 2] < 0.5
    assert ((probs > 0) & (probs < 1)).all()


def test_zero_shot_is_a_two_way_softmax_of_cosines() -> None:
    g = torch.Generator().manual_seed(2)
    image = torch.randn(5, 8, generator=g)
    pos, neg = torch.randn(14, 8, generator=g), torch.randn(14, 8, generator=g)
    cos = torch.nn.functional.cosine_similarity
    s_pos = cos(image[:, None], pos[None], dim=-1)
    s_neg = cos(image[:, None], neg[None], dim=-1)
    for temperature in (1.0, 0.07):
        expected = torch.sigmoid((s_pos - s_neg) / temperature)
        got = zero_shot_scores(image, pos, neg, temperature=temperature)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # A lower temperature moves every probability further from 1/2, on the same side.
    warm = zero_shot_scores(image, pos, neg, temperature=1.0) - 0.5
    cold = zero_shot_scores(image, pos, neg, temperature=0.07) - 0.5
    assert (cold.abs() >= warm.abs()).all() and (cold.sign() == warm.sign()).all()


def test_zero_shot_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        zero_shot_scores(torch.randn(2, 8), torch.randn(14, 8), torch.randn(14, 8), temperature=0)
    with pytest.raises(ValueError):
        zero_shot_scores(torch.randn(2, 8), torch.randn(14, 8), torch.randn(13, 8))
    with pytest.raises(ValueError):
        zero_shot_scores(torch.randn(2, 6), torch.randn(14, 8), torch.randn(14, 8))


def test_similarity_recall_matches_embedding_recall() -> None:
    gen = torch.Generator().manual_seed(3)
    image, text = torch.randn(20, 8, generator=gen), torch.randn(20, 8, generator=gen)
    groups = [i // 3 for i in range(20)]
    sim = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    assert similarity_recall(sim, groups=groups) == retrieval_recall(image, text, groups=groups)
    # A pair score that is not a dot product: only the matrix matters.
    assert similarity_recall(torch.eye(5) + 0.1 * torch.ones(5, 5), ks=(1,)) == {
        "i2t_r1": 1.0,
        "t2i_r1": 1.0,
    }
    with pytest.raises(ValueError, match=r"sim \(4, 5\) must be \(N, N\)"):
        similarity_recall(torch.zeros(4, 5))
