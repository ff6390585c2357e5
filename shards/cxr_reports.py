"""MIMIC-CXR free-text reports -> the text a sample is trained on, and which part it came from.

A report file (``files/pXX/pSUBJECT/sSTUDY.txt``) looks like::

                                     FINAL REPORT
     EXAMINATION:  CHEST (PA AND LAT)

     INDICATION:  ___F with cough  // eval for pneumonia

     FINDINGS:

     No focal consolidation, pleural effusion or pneumothorax.  The
     cardiomediastinal silhouette is normal.

     IMPRESSION:

     No acute cardiopulmonary process.

Everything up to a ``FINAL REPORT`` line (the wet read, a row of underscores) is the preamble.
A section starts at an upper-case header at the start of a line (``FINDINGS:``) and runs to
the next header; lines are joined and whitespace collapsed; de-identified spans ``___`` stay.

Which text is used (``extract_text``):
  1. the requested sections (findings, then impression) that are present and non-empty,
     joined in that order; source "findings+impression", "findings" or "impression";
  2. else the last non-empty section that is not one of the header-only sections
     (examination, indication, history, technique, comparison, notification, ...), e.g. a
     lone CONCLUSION or REPORT section; source "fallback:<section name>";
  3. else the whole body after the preamble, headers included; source "fallback:body";
  4. a body with no content at all raises RecordError("empty_report").
"""

from __future__ import annotations

import re
from pathlib import Path

from shards.volume import RecordError

PREAMBLE_END = re.compile(r"^[ \t]*FINAL REPORT[ \t]*$", re.MULTILINE)
# An upper-case header at the start of a line, e.g. "FINDINGS:", "PA AND LATERAL VIEWS OF THE
# CHEST:", "RECOMMENDATION(S):"; the text after the colon on that line belongs to the section.
HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&'-]*[A-Z)])[ \t]*:", re.MULTILINE)
# Different spellings of one section.
ALIASES = {
    "finding": "findings",
    "impressions": "impression",
    "conclusions": "conclusion",
    # A combined section is treated as the impression, as MIT-LCP's section parser does.
    "findings and impression": "impression",
    "findings/impression": "impression",
    "impression and findings": "impression",
    "impression/findings": "impression",
}
# Sections that say why and how the exam was done, not what it shows: never a fallback.
HEADER_ONLY = frozenset(
    {
        "examination",
        "exam",
        "type of examination",
        "indication",
        "indications",
        "reason for examination",
        "reason for exam",
        "history",
        "clinical history",
        "clinical information",
        "technique",
        "comparison",
        "comparisons",
        "notification",
        "wet read",
    }
)


def normalize_space(text: str) -> str:
    """Join wrapped lines and collapse runs of whitespace to one space."""
    return " ".join(text.split())


def strip_preamble(report: str) -> str:
    """The report after its FINAL REPORT line (the whole report when there is none)."""
    match = PREAMBLE_END.search(report)
    return report[match.end() :] if match else report


def section_name(header: str) -> str:
    """'FINDINGS' -> 'findings'; 'FINDINGS AND IMPRESSION' -> 'impression' (see ALIASES)."""
    name = normalize_space(header).lower()
    return ALIASES.get(name, name)


def split_sections(body: str) -> tuple[str, list[tuple[str, str]]]:
    """A report body -> (text before the first header, [(section name, content), ...]).

    Content is whitespace-normalised and may be empty (a header with nothing under it).
    """
    headers = list(HEADER.finditer(body))
    lead = normalize_space(body[: headers[0].start()] if headers else body)
    sections = []
    for i, match in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(body)
        sections.append((section_name(match.group(1)), normalize_space(body[match.end() : end])))
    return lead, sections


def extract_text(
    report: str,
    sections: tuple[str, ...] = ("findings", "impression"),
    path: str | Path = "",
) -> tuple[str, str]:
    """The training text of a report and its source (see the module docstring for the order).

    ``sections``: section names to use, in order (lower case). ``path`` only names the file
    in a RecordError("empty_report") raised when the report has no content at all.
    """
    body = strip_preamble(report)
    lead, found = split_sections(body)
    picked = []
    for name in sections:
        parts = [content for sec, content in found if sec == name and content]
        if parts:
            picked.append((name, " ".join(parts)))
    if picked:
        return " ".join(text for _, text in picked), "+".join(name for name, _ in picked)
    for name, content in reversed(found):
        if content and name not in HEADER_ONLY:
            return content, f"fallback:{name}"
    if lead or any(content for _, content in found):
        return normalize_space(body), "fallback:body"
    raise RecordError("empty_report", path, "the report has no text after its preamble and headers")


def read_report(
    path: str | Path, sections: tuple[str, ...] = ("findings", "impression")
) -> tuple[str, str]:
    """Read a report file and extract its text: (text, source).

    Raises RecordError "missing_report" (no file), "unreadable_report" (not UTF-8 text) or
    "empty_report".
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecordError("missing_report", path, "expected the study's report file") from None
    except OSError as exc:
        raise RecordError("unreadable_report", path, str(exc)) from exc
    try:
        report = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError("unreadable_report", path, f"not UTF-8 text ({exc})") from exc
    return extract_text(report, sections, path=path)
