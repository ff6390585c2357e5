"""Clinical fields -> one sentence each (Alifuse-style text), with missing values left out.

The diagnosis is the label, so it is never rendered: a text tower must not read the answer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from shards.common import RecordError
from shards.cxr_reports import normalize_deid

# Cells that mean "no value" in the tables people actually have.
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "none", "null", "-"})

# Columns that carry (or are) the label; rendering them would leak the answer.
LEAKY_FIELDS = frozenset(
    {"diagnosis", "dx", "dx_bl", "group", "label", "class", "diagnosis_code", "dxcurren"}
)

SEX_WORDS = {"f": "female", "female": "female", "m": "male", "male": "male"}
HAND_WORDS = {"r": "right-handed", "l": "left-handed", "a": "ambidextrous"}

# Known fields in the order they are rendered; the summary always comes last.
SENTENCES: dict[str, str] = {
    "age": "The patient is {} years old.",
    "sex": "The patient is {}.",
    "handedness": "The patient is {}.",
    "education_years": "The patient has {} years of education.",
    "ses": "The socioeconomic status is {}.",
    "mmse": "The MMSE score is {}.",
    "cdr": "The CDR global score is {}.",
    "cdr_sb": "The CDR sum of boxes is {}.",
    "logical_memory": "The logical memory delayed recall score is {}.",
    "ventricles": "The ventricular volume is {} mm3.",
    "hippocampus": "The hippocampal volume is {} mm3.",
    "whole_brain": "The whole brain volume is {} mm3.",
    "icv": "The intracranial volume is {} mm3.",
    "etiv": "The estimated total intracranial volume is {} cm3.",
    "nwbv": "The normalized whole brain volume is {}.",
    "asf": "The atlas scaling factor is {}.",
}

# Volumes in mm3 (ADNIMERGE FreeSurfer columns): whole numbers with thousands separators.
VOLUME_FIELDS = frozenset({"ventricles", "hippocampus", "whole_brain", "icv"})

# The kinds of clinical information (the Alifuse paper's Tables I and III): a field belongs to
# one group; fields of no listed group (other table columns) are "other". SES counts as a lab
# result, as the paper counts it; image-derived measures (FreeSurfer volumes, OASIS eTIV /
# nWBV / ASF) are a group of their own, so an ablation can keep them out of the text.
FIELD_GROUPS: dict[str, frozenset[str]] = {
    "demographics": frozenset({"age", "sex", "handedness", "education_years"}),
    "lab_results": frozenset(
        {"mmse", "cdr", "cdr_sb", "logical_memory", "ses", "apoe4_alleles", "apoe_genotype"}
    ),
    "summary": frozenset({"summary"}),
    "imaging_measures": frozenset(
        {"ventricles", "hippocampus", "whole_brain", "icv", "etiv", "nwbv", "asf"}
    ),
}
GROUP_NAMES = (*FIELD_GROUPS, "other")


def field_group(key: str) -> str:
    """The group a clinical field belongs to (see FIELD_GROUPS); "other" for any other column."""
    name = key.strip().lower()
    return next((group for group, keys in FIELD_GROUPS.items() if name in keys), "other")


def check_groups(groups: Iterable[str], key: str) -> None:
    """Raises ValueError naming `key` for a name that is not a field group."""
    unknown = [g for g in groups if g not in GROUP_NAMES]
    if unknown:
        raise ValueError(f"{key}: unknown field group(s) {unknown}; expected any of {GROUP_NAMES}")


def is_missing(value: Any) -> bool:
    """True for None, empty / placeholder strings and NaN."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, str):
        return value.strip().lower() in MISSING_TOKENS
    return False


def parse_number(value: Any) -> int | float | None:
    """Parse a table cell as a number: integers as int ("29.0" -> 29), None when missing/not numeric."""
    if is_missing(value) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    return int(number) if number.is_integer() else number


def parse_cell(value: Any) -> int | float | str | None:
    """A cell as a number when it is one, else its stripped text; None when missing."""
    if is_missing(value):
        return None
    number = parse_number(value)
    return number if number is not None else str(value).strip()


def format_value(value: Any) -> str:
    """Format a value for text: integral numbers without ".0", other floats at most 3 decimals."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return repr(round(value, 3))
    return str(value).strip()


def clean_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-safe copy of the fields with the missing ones omitted (numbers kept as numbers,
    de-identification markers in text as shards.cxr_reports.DEID_TOKEN)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if is_missing(value):
            continue
        if isinstance(value, str):
            out[key] = normalize_deid(value)  # one marker for every source's de-identified spans
        elif isinstance(value, bool | int):
            out[key] = value
        elif isinstance(value, float):
            out[key] = int(value) if value.is_integer() else value
        else:  # numpy scalars and the like
            number = parse_number(value)
            out[key] = number if number is not None else str(value)
    return out


def cut_words(text: str, word_limit: int) -> str:
    """Keep the first ``word_limit`` whitespace-separated words of a narrative."""
    words = text.split()
    return " ".join(words[:word_limit])


def format_volume(value: Any) -> str:
    """A volume as a whole number with thousands separators (41234.6 -> "41,235")."""
    number = parse_number(value)
    return f"{round(number):,}" if number is not None else format_value(value)


def _sentence(key: str, value: Any) -> str:
    text = format_volume(value) if key in VOLUME_FIELDS else format_value(value)
    if key == "sex":
        word = SEX_WORDS.get(text.lower())
        return SENTENCES["sex"].format(word) if word else f"The patient's sex is {text}."
    if key == "handedness":
        word = HAND_WORDS.get(text.lower())
        return SENTENCES["handedness"].format(word) if word else f"The handedness is {text}."
    if key in SENTENCES:
        return SENTENCES[key].format(text)
    return f"The {key.replace('_', ' ').strip()} is {text}."


def render_text(
    fields: Mapping[str, Any],
    word_limit: int = 40,
    source: str | Path = "",
    drop: Iterable[str] = (),
    allow_empty: bool = False,
) -> str:
    """Render clinical fields as sentences: known fields in a fixed order, then other columns
    ("The <column> is <value>."), then the narrative ``summary`` cut to ``word_limit`` words.

    Missing values are left out; label-like columns (diagnosis, DX, group) are never rendered;
    fields of the groups in ``drop`` (FIELD_GROUPS names) are left out too. Raises
    RecordError("empty_text") when nothing is left to say, unless ``allow_empty``.
    """
    if word_limit < 1:
        raise ValueError(f"word_limit must be >= 1, got {word_limit}")
    dropped = set(drop)
    check_groups(dropped, "drop")
    present = {
        k: v
        for k, v in fields.items()
        if not is_missing(v) and k.lower() not in LEAKY_FIELDS and field_group(k) not in dropped
    }
    sentences = [_sentence(k, present[k]) for k in SENTENCES if k in present]
    sentences += [
        _sentence(k, v) for k, v in present.items() if k not in SENTENCES and k != "summary"
    ]
    if "summary" in present:
        summary = cut_words(str(present["summary"]), word_limit)
        if summary:
            sentences.append(summary)
    text = " ".join(sentences)
    if not text.strip() and not allow_empty:
        raise RecordError("empty_text", source, "expected at least one clinical field with a value")
    return text
