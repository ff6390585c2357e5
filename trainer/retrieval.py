"""Image-report retrieval recall and CheXzero-style zero-shot label scores from embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.cxr_metrics import CHEXPERT_LABELS

# Query rows scored at once, so an (N, N) similarity matrix is never held whole.
_QUERY_CHUNK = 1024

# (positive, negative) prompt per label, written the way MIMIC-CXR reports phrase findings.
_PROMPTS: dict[str, tuple[str, str]] = {
    "Atelectasis": ("There is atelectasis.", "There is no atelectasis."),
    "Cardiomegaly": ("There is cardiomegaly.", "There is no cardiomegaly."),
    "Consolidation": ("There is consolidation.", "There is no consolidation."),
    "Edema": ("There is edema.", "There is no edema."),
    "Enlarged Cardiomediastinum": (
        "The cardiomediastinal silhouette is enlarged.",
        "The cardiomediastinal silhouette is normal.",
    ),
    "Fracture": ("There is a fracture.", "There is no fracture."),
    "Lung Lesion": ("There is a lung lesion.", "There is no lung lesion."),
    "Lung Opacity": ("There is a lung opacity.", "There is no lung opacity."),
    # "No Finding" is positive for a normal study, so its positive prompt is the normal one.
    "No Finding": (
        "No acute cardiopulmonary process.",
        "There is an acute cardiopulmonary process.",
    ),
    "Pleural Effusion": ("There is a pleural effusion.", "There is no pleural effusion."),
    "Pleural Other": ("There is a pleural abnormality.", "There is no pleural abnormality."),
    "Pneumonia": ("There is pneumonia.", "There is no pneumonia."),
    "Pneumothorax": ("There is a pneumothorax.", "There is no pneumothorax."),
    "Support Devices": ("There are support devices.", "There are no support devices."),
}


def _group_ids(groups: Tensor | Sequence[Any] | None, n: int) -> Tensor:
    """(n,) integer ids, equal where `groups` are equal; each row its own group when None."""
    if groups is None:
        return torch.arange(n)
    keys = list(groups.tolist() if isinstance(groups, Tensor) else groups)
    if len(keys) != n:
        raise ValueError(f"groups has {len(keys)} entries for {n} rows")
    index: dict[Any, int] = {}
    return torch.tensor([index.setdefault(k, len(index)) for k in keys])


def _recall_at(
    sim: Tensor, query_group: Tensor, gallery_group: Tensor, ks: Sequence[int]
) -> Tensor:
    """sim (q, M) -> (len(ks),) number of queries with a correct item in their top k.

    The rank of a query is the number of wrong gallery items scoring at least as high as its
    best correct item: ties count against the model, so the result never depends on order.
    """
    correct = query_group[:, None] == gallery_group[None, :]  # (q, M)
    best = sim.masked_fill(~correct, -torch.inf).amax(1, keepdim=True)  # (q, 1)
    rank = ((sim >= best) & ~correct).sum(1)  # (q,)
    return torch.stack([(rank < k).sum() for k in ks])


@torch.no_grad()
def retrieval_recall(
    image_emb: Tensor,
    text_emb: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    groups: Tensor | Sequence[Any] | None = None,
    normalize: bool = True,
) -> dict[str, float]:
    """Recall@k both ways for paired embeddings: row i of `image_emb` (N, D) goes with row i of
    `text_emb` (N, D); every row is a query and the other modality's N rows are the gallery.

    With `groups` (N,) (e.g. study ids when a study has several images, each row carrying its
    study's report) any gallery row of the query's group counts as correct. Similarity is the
    cosine (dot product when `normalize` is False). Ties with wrong items count against the
    model (see `_recall_at`). Returns {"i2t_r1", "i2t_r5", ..., "t2i_r10"}, fractions in [0, 1].
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} must be (N, D)"
        )
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    n = image_emb.shape[0]
    group = _group_ids(groups, n)
    image, text = image_emb.float(), text_emb.float()
    if normalize:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    out: dict[str, float] = {}
    for name, queries, gallery in (("i2t", image, text), ("t2i", text, image)):
        hits = torch.zeros(len(ks), dtype=torch.long)
        for start in range(0, n, _QUERY_CHUNK):
            sim = queries[start : start + _QUERY_CHUNK] @ gallery.T  # (q, N)
            hits += _recall_at(sim, group[start : start + _QUERY_CHUNK], group, ks)
        for k, h in zip(ks, hits.tolist(), strict=True):
            out[f"{name}_r{k}"] = h / n
    return out


@torch.no_grad()
def similarity_recall(
    sim: Tensor, ks: Sequence[int] = (1, 5, 10), groups: Tensor | Sequence[Any] | None = None
) -> dict[str, float]:
    """`retrieval_recall` from a similarity matrix (N, N): sim[i, j] scores image i against
    text j (models whose pair scores are not dot products, e.g. attention pooling)."""
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim {tuple(sim.shape)} must be (N, N)")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    n = sim.shape[0]
    group = _group_ids(groups, n)
    out: dict[str, float] = {}
    for name, matrix in (("i2t", sim.float()), ("t2i", sim.float().T)):
        hits = _recall_at(matrix, group, group, ks)
        for k, h in zip(ks, hits.tolist(), strict=True):
            out[f"{name}_r{k}"] = h / n
    return out


def default_prompts(labels: Sequence[str] = CHEXPERT_LABELS) -> tuple[list[str], list[str]]:
    """(positive prompts, negative prompts), one per label; unknown labels get
    "There is <label>." / "There is no <label>." with the label in lower case."""
    pos, neg = [], []
    for label in labels:
        p, q = _PROMPTS.get(label, (f"There is {label.lower()}.", f"There is no {label.lower()}."))
        pos.append(p)
        neg.append(q)
    return pos, neg


@torch.no_grad()
def zero_shot_scores(
    image_emb: Tensor,
    pos_text_emb: Tensor,
    neg_text_emb: Tensor,
    temperature: float = 1.0,
    normalize: bool = True,
) -> Tensor:
    """Per-label probability from a softmax over the [positive, negative] prompt similarities.

    image_emb (N, D); pos_text_emb, neg_text_emb (L, D), the encoded `default_prompts` ->
    probs (N, L) with probs[i, j] = softmax([s_pos, s_neg] / temperature)[0], s the cosine
    similarity (dot product when `normalize` is False). Pass the model's learned temperature
    (1 / logit_scale) for calibrated values; AUROC does not depend on it.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if image_emb.ndim != 2 or pos_text_emb.ndim != 2 or pos_text_emb.shape != neg_text_emb.shape:
        raise ValueError(
            f"image_emb {tuple(image_emb.shape)} must be (N, D) and the prompt embeddings "
            f"{tuple(pos_text_emb.shape)}, {tuple(neg_text_emb.shape)} both (L, D)"
        )
    if image_emb.shape[1] != pos_text_emb.shape[1]:
        raise ValueError(
            f"embedding widths differ: {image_emb.shape[1]} vs {pos_text_emb.shape[1]}"
        )
    image, pos, neg = image_emb.float(), pos_text_emb.float(), neg_text_emb.float()
    if normalize:
        image, pos, neg = (F.normalize(t, dim=-1) for t in (image, pos, neg))
    return zero_shot_from_similarity(image @ pos.T, image @ neg.T, temperature)


def zero_shot_from_similarity(pos_sim: Tensor, neg_sim: Tensor, temperature: float = 1.0) -> Tensor:
    """pos_sim, neg_sim (N, L): each image's similarity to each label's positive and negative
    prompt -> probs (N, L) = softmax([pos, neg] / temperature)[0]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if pos_sim.shape != neg_sim.shape or pos_sim.ndim != 2:
        raise ValueError(
            f"pos_sim {tuple(pos_sim.shape)} and neg_sim {tuple(neg_sim.shape)} must be (N, L)"
        )
    logits = torch.stack([pos_sim.float(), neg_sim.float()], dim=-1) / temperature  # (N, L, 2)
    return logits.softmax(dim=-1)[..., 0]
