"""Image-text contrastive loss (open_clip semantics, gathered across ranks) and the MLM loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn


def infonce(per_image: Tensor, per_text: Tensor, labels: Tensor) -> Tensor:
    """Symmetric InfoNCE: rows (b, B) of scaled image -> text and text -> image scores, and
    the column of each row's positive."""
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


class MarginLoss:
    """The margin-based pairwise contrastive loss (Hadsell et al.; eq. (1) of the MAE + LLaMA
    chest X-ray report), on L2-normalised embeddings f (image) and g (text):

        L = mean over positive pairs  ||f_i - g_i||^2
          + mean over negative pairs  max(0, margin - ||f_i - g_j||)^2

    Pairs within a batch: image i and its own report are the positive pair; image i and every
    other report of the batch (the global batch across ranks, as in `ClipLoss`) are negatives,
    and so are report i and every other image. Called like `infonce` with rows of *cosine
    similarities* (logit scale 1): for unit vectors ||f - g||^2 = 2 - 2 cos. The two means are
    taken separately (B positives against B(B - 1) negatives would otherwise drown the
    positives), and the loss is averaged over both directions. Rows of a rank's share give
    the rank's part; the mean over ranks equals the single-process loss on the whole batch.
    """

    def __init__(self, margin: float) -> None:
        if not 0.0 < margin <= 2.0:
            raise ValueError(f"margin={margin}: expected a value in (0, 2] (unit-vector distances)")
        self.margin = margin

    def one_way(self, sim: Tensor, labels: Tensor) -> Tensor:
        if sim.dtype in (torch.float16, torch.bfloat16):
            sim = sim.float()
        sq = (2.0 - 2.0 * sim).clamp(min=0.0)  # squared distances (b, B)
        positive = torch.zeros_like(sq, dtype=torch.bool)
        positive[torch.arange(sq.shape[0], device=sq.device), labels] = True
        pos = sq[positive].mean()
        neg = sq[~positive]
        if neg.numel() == 0:  # a batch of one pair has no negative
            return pos
        # sqrt of 0 has no gradient: a pair at distance 0 is far inside the hinge anyway
        dist = neg.clamp(min=1e-12).sqrt()
        return pos + F.relu(self.margin - dist).pow(2).mean()

    def __call__(self, per_image: Tensor, per_text: Tensor, labels: Tensor) -> Tensor:
        return (self.one_way(per_image, labels) + self.one_way(per_text, labels)) / 2


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(features: Tensor, gather_with_grad: bool, rank: int, world_size: int) -> Tensor:
    """(b, D) on each rank -> (world_size * b, D), rank-major; every rank must hold b rows.

    With `gather_with_grad` the gather is differentiable: the backward sums, onto each rank's
    own rows, the gradients that every rank's loss sends them. Without it the gathered copy
    is a constant except for this rank's own slot, which is the local (graph-attached) tensor.
    """
    if gather_with_grad:
        return torch.cat(dist_fn.all_gather(features), dim=0)
    gathered = [torch.zeros_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features.contiguous())
    gathered[rank] = features
    return torch.cat(gathered, dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE between paired image and text features (CLIP), as open_clip does it.

    forward(image_features (b, D), text_features (b, D), logit_scale) -> scalar loss, where
    the features are L2-normalised and `logit_scale` is the multiplier exp(learned log scale)
    ((1,) or scalar). The i-th image and the i-th text are the positive pair; every other
    text (image) in the batch is a negative. Loss = (CE(image->text) + CE(text->image)) / 2.

    In a single process the batch is the local one. When `torch.distributed` is initialised
    with world_size > 1, features are all-gathered so the negatives are the global batch
    (every rank must pass the same b):

    - `local_loss=False`: every rank computes the full (B, B) logits, B = world_size * b,
      and the same loss as one process on the concatenated batch.
    - `local_loss=True`: every rank computes only its own b rows against all B columns,
      (b, B) logits with labels offset by rank * b: O(b * B) instead of O(B^2) memory.
      Each rank's loss is then its share; their mean equals the full-batch loss.
    - `gather_with_grad=True` (default): gradients flow through the gather to the rank
      that produced each feature. With either `local_loss`, the parameter gradients averaged
      across ranks (what DDP / ZeRO do) equal the single-process full-batch gradient.
    - `gather_with_grad=False`: other ranks' features are constants; only this rank's slot
      carries gradient. With `local_loss=False` the averaged gradient of the towers is
      exactly 1 / world_size of the full-batch one (logit_scale's is the full one); with
      `local_loss=True` cross-rank terms are missing. Cheaper backward, open_clip's
      default, but not the full-batch gradient.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        criterion: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.criterion = criterion or infonce

    def logits(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """logits_per_image, logits_per_text (rows, columns) and the target column per row."""
        rank, world = _rank_and_world()
        if world > 1:
            all_image = gather_features(image_features, self.gather_with_grad, rank, world)
            all_text = gather_features(text_features, self.gather_with_grad, rank, world)
        else:
            all_image, all_text = image_features, text_features
        if self.local_loss:
            per_image = logit_scale * image_features @ all_text.T  # (b, B)
            per_text = logit_scale * text_features @ all_image.T  # (b, B)
            offset = rank * image_features.shape[0]
        else:
            per_image = logit_scale * all_image @ all_text.T  # (B, B)
            per_text = per_image.T
            offset = 0
        labels = torch.arange(per_image.shape[0], device=per_image.device) + offset
        return per_image, per_text, labels

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        per_image, per_text, labels = self.logits(image_features, text_features, logit_scale)
        return self.criterion(per_image, per_text, labels)


class PairwiseClipLoss(nn.Module):
    """Symmetric InfoNCE where each (image, text) score comes from a function of the pair.

    `score(image_state, text_state) -> (bi, bt)` logits for every image of the first
    argument against every text of the second (e.g. a report's tokens attention-pooled over
    the image's tokens, compared with the report's own embedding), so a pair's score is not
    a dot product of two independent vectors. States are dicts of tensors with the batch
    first; every rank must pass the same shapes.

    With world_size > 1 the states are all-gathered (text / image states with gradient when
    `gather_with_grad`), and each rank scores its b images against all B texts (rows) and
    its b texts against all B images (columns): `local_loss` semantics, O(b * B) pair scores
    per rank; the mean over ranks of the loss equals the single-process loss on the
    concatenated batch. In one process it is one (b, b) matrix read both ways.
    """

    def __init__(
        self,
        gather_with_grad: bool = True,
        criterion: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.gather_with_grad = gather_with_grad
        self.criterion = criterion or infonce

    def _gather(self, state: dict[str, Tensor], rank: int, world: int) -> dict[str, Tensor]:
        return {
            key: gather_features(
                value, self.gather_with_grad and value.is_floating_point(), rank, world
            )
            for key, value in state.items()
        }

    def forward(
        self,
        score: Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor],
        image_state: dict[str, Tensor],
        text_state: dict[str, Tensor],
    ) -> Tensor:
        rank, world = _rank_and_world()
        if world == 1:
            per_image = score(image_state, text_state)  # (b, b)
            labels = torch.arange(per_image.shape[0], device=per_image.device)
            return self.criterion(per_image, per_image.T, labels)
        per_image = score(image_state, self._gather(text_state, rank, world))  # (b, B)
        per_text = score(self._gather(image_state, rank, world), text_state).T  # (b, B)
        b = per_image.shape[0]
        labels = torch.arange(b, device=per_image.device) + rank * b
        return self.criterion(per_image, per_text, labels)


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over the masked positions: logits (B, L, V), labels (B, L), -100 = ignore.

    Mean over the positions with a label; a batch without any gives 0 (not NaN).
    """
    total = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
    )
    return total / (labels != -100).sum().clamp_min(1)


def masked_bce(
    logits: Tensor, targets: Tensor, mask: Tensor | None = None, pos_weight: Tensor | None = None
) -> Tensor:
    """BCE-with-logits averaged over unmasked entries; 0 (still attached to the graph) if none.

    logits, targets, mask: (N, L); pos_weight (L,) multiplies the positive term per label.
    Masked targets may hold anything (-1, NaN): they are replaced before the loss is formed,
    so neither they nor the masked logits reach the value or the gradient.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    keep = (
        torch.ones_like(logits, dtype=torch.bool) if mask is None else mask.to(logits.device) != 0
    )
    if keep.shape != logits.shape:
        raise ValueError(f"mask {tuple(keep.shape)} must match logits {tuple(logits.shape)}")
    safe_targets = torch.where(keep, targets.to(logits.dtype), 0.0)
    safe_logits = torch.where(keep, logits, 0.0)
    loss = F.binary_cross_entropy_with_logits(
        safe_logits, safe_targets, pos_weight=pos_weight, reduction="none"
    )
    return torch.where(keep, loss, 0.0).sum() / keep.sum().clamp(min=1)


def classification_loss(logits: Tensor, labels: Tensor, binary: Tensor | None = None) -> Tensor:
    """Mean cross-entropy over the batch.

    Rows flagged in ``binary`` come from a cohort published as NC vs impaired only (OASIS-2,
    MIRIAD): their label says NC (0) or impaired (> 0) and nothing finer. With more than two
    classes such a row's loss is the negative log-likelihood of that binary outcome, with
    P(impaired) = 1 - P(NC) (the sum of the impaired classes' probabilities), the same collapse
    the evaluation scores them with; it never trains them as any one impaired class.
    """
    logits = logits.float()
    if binary is None or logits.shape[-1] <= 2 or not bool(binary.any()):
        return F.cross_entropy(logits, labels)
    logp = F.log_softmax(logits, dim=-1)
    exact = -logp.gather(1, labels[:, None]).squeeze(1)
    collapsed = torch.where(labels > 0, -torch.logsumexp(logp[:, 1:], dim=-1), -logp[:, 0])
    return torch.where(binary.bool(), collapsed, exact).mean()
