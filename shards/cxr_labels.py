"""The 14 CheXpert labels (MIMIC-CXR, CheXpert): raw cell values in the shards, uncertainty
policy at load.

Shards store what the labeler wrote (1.0 positive, 0.0 negative, -1.0 uncertain, None for
"not mentioned"); the policy is applied when a sample is loaded, so one set of shards serves
every policy. Uncertain labels follow Irvin et al. 2019 (CheXpert): U-Ignore masks them out of
the loss, U-Zeros reads them as negative, U-Ones as positive. A blank cell is negative by the
common convention, or masked out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

# The label columns of mimic-cxr-2.0.0-chexpert.csv / -negbio.csv, in the files' order.
LABEL_NAMES = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
NUM_LABELS = len(LABEL_NAMES)

UncertainPolicy = Literal["ignore", "zeros", "ones"]
BlankPolicy = Literal["negative", "masked"]
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
BLANK_POLICIES = ("negative", "masked")

_CELLS = {"1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "-1.0": -1.0, "-1": -1.0}


def parse_label_cell(text: str) -> float | None:
    """One labeler CSV cell -> 1.0, 0.0, -1.0, or None for a blank (not mentioned) cell.

    Accepts exactly '1.0', '0.0', '-1.0', '1', '0', '-1' and blank (surrounding spaces
    ignored); anything else raises ValueError naming the value.
    """
    cell = text.strip()
    if not cell:
        return None
    try:
        return _CELLS[cell]
    except KeyError:
        raise ValueError(
            f"label value {text!r} is not one of 1.0, 0.0, -1.0 (or 1, 0, -1) or blank"
        ) from None


def apply_uncertainty(
    raw: np.ndarray, policy: UncertainPolicy = "ones", blank: BlankPolicy = "negative"
) -> tuple[np.ndarray, np.ndarray]:
    """Raw labels (K,) float32 with NaN for blank -> (targets (K,), mask (K,)), both float32.

    ``policy``: what an uncertain (-1) label becomes: "ignore" -> mask 0 (target 0),
    "zeros" -> target 0, "ones" -> target 1. ``blank``: a NaN (not mentioned) label becomes
    target 0 with mask 1 ("negative") or mask 0 ("masked"). Positives and negatives pass
    through with mask 1. A loss multiplies its per-label terms by the mask.
    """
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy {policy!r}: expected one of {UNCERTAIN_POLICIES}")
    if blank not in BLANK_POLICIES:
        raise ValueError(f"blank policy {blank!r}: expected one of {BLANK_POLICIES}")
    raw = np.asarray(raw, dtype=np.float32)
    if raw.ndim != 1:
        raise ValueError(f"expected raw labels of shape (K,), got {raw.shape}")
    is_blank = np.isnan(raw)
    known = np.where(is_blank, 0.0, raw)
    bad = ~is_blank & ~np.isin(known, (-1.0, 0.0, 1.0))
    if bad.any():
        raise ValueError(f"raw labels must be 1, 0, -1 or NaN, got {raw[bad].tolist()}")
    uncertain = known == -1.0
    targets = np.where(uncertain, 1.0 if policy == "ones" else 0.0, known).astype(np.float32)
    mask = np.ones(raw.shape[0], dtype=np.float32)
    if policy == "ignore":
        mask[uncertain] = 0.0
    if blank == "masked":
        mask[is_blank] = 0.0
    return targets, mask


def labels_to_array(
    labels: list[float | None] | tuple[float | None, ...], count: int | None = None
) -> np.ndarray:
    """The shard's json "labels" list (null for blank) -> float32 (K,) with NaN for blank;
    `count`, when given, is the K it must have."""
    if count is not None and len(labels) != count:
        raise ValueError(f"expected {count} labels, got {len(labels)}")
    return np.array([np.nan if v is None else v for v in labels], dtype=np.float32)


@dataclass
class LabelPolicyConfig:
    """How raw CheXpert labels become training targets (applied at load time)."""

    uncertain: UncertainPolicy = "ones"  # U-Ones; "ignore" (U-Ignore) or "zeros" (U-Zeros)
    blank: BlankPolicy = "negative"  # not mentioned = negative, or "masked" out of the loss

    def __post_init__(self) -> None:
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain={self.uncertain!r}: expected one of {UNCERTAIN_POLICIES}")
        if self.blank not in BLANK_POLICIES:
            raise ValueError(f"blank={self.blank!r}: expected one of {BLANK_POLICIES}")

    def apply(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(targets, mask) for one sample's raw labels; see apply_uncertainty."""
        return apply_uncertainty(raw, self.uncertain, self.blank)
