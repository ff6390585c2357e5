"""Subject-wise train / val / test splits, stratified by (cohort, first diagnosis).

A subject's visits all land in one split, so no test subject's anatomy is seen in training.
"""

from __future__ import annotations

import random
import re
from collections.abc import Hashable, Iterable, Mapping

from shards.ad_tables import AdRecord

SPLITS = ("train", "val", "test")

SubjectKey = tuple[str, str]  # (cohort, subject): subject ids may repeat across cohorts


def check_ratios(ratios: tuple[float, ...]) -> tuple[float, float, float]:
    """Validate (train, val, test) fractions: three non-negative numbers summing to 1."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(
            f"split ratios must be three non-negative fractions (train, val, test) summing "
            f"to 1, got {tuple(ratios)}"
        )
    return (float(ratios[0]), float(ratios[1]), float(ratios[2]))


def visit_order(visit: str) -> tuple[int, str]:
    """Sort key for visit codes: bl/sc first, then month (m06, m12) or visit number (1, 2)."""
    code = visit.strip().lower()
    if code in ("", "bl", "sc", "scmri", "init", "baseline"):
        return (0, code)
    match = re.fullmatch(r"m?0*(\d+)", code)
    if match:
        return (int(match.group(1)), code)
    return (10**6, code)


def subject_strata(records: Iterable[AdRecord]) -> dict[SubjectKey, tuple[str, str]]:
    """(cohort, subject) -> (cohort, diagnosis at the subject's earliest visit).

    "Earliest" is by visit code then image id, so the result does not depend on input order.
    """
    first: dict[SubjectKey, tuple[tuple[int, str], str, str]] = {}
    for rec in records:
        key = (rec.cohort, rec.subject)
        candidate = (visit_order(rec.visit), rec.image_id, rec.diagnosis)
        if key not in first or candidate < first[key]:
            first[key] = candidate
    return {key: (key[0], value[2]) for key, value in first.items()}


def assign_splits(
    strata: Mapping[SubjectKey, Hashable],
    ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> dict[SubjectKey, str]:
    """Assign every subject to train / val / test, deterministically for a seed.

    Within each stratum subjects are shuffled (seeded by seed and stratum) and laid on
    [0, 1) at evenly spaced points with a random start; the point's position in the ratio
    intervals picks the split. Each stratum's counts are then within one of ratio * n, and
    small strata still reach val and test with the right probability.
    """
    ratios = check_ratios(ratios)
    bounds = (ratios[0], ratios[0] + ratios[1])
    groups: dict[str, list[SubjectKey]] = {}
    for key, stratum in strata.items():
        groups.setdefault(repr(stratum), []).append(key)
    assignment: dict[SubjectKey, str] = {}
    for name in sorted(groups):
        members = sorted(groups[name])
        rng = random.Random(f"{seed}|{name}")  # str seeds hash stably across runs
        rng.shuffle(members)
        start = rng.random()
        for i, key in enumerate(members):
            u = (i + start) / len(members)
            assignment[key] = "train" if u < bounds[0] else "val" if u < bounds[1] else "test"
    return assignment


def label_fraction_indices(n: int, fraction: float, seed: int = 0) -> list[int]:
    """Sorted indices of a `fraction` of n training rows for label-fraction runs (1/10/100 %).

    Takes the first round(fraction * n) (at least 1) rows of one seeded permutation of range(n),
    so for a fixed (n, seed) a smaller fraction's subset lies inside every larger one's.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    k = max(1, round(fraction * n))
    order = list(range(n))
    random.Random(f"label-fraction-{seed}").shuffle(order)
    return sorted(order[:k])
