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
the next header; lines are joined and whitespace collapsed. A header is recognised by name:
one of the section names below (``KNOWN_SECTIONS``) starts a section wherever it starts a
line; another upper-case name followed by a colon (``PA AND LATERAL VIEWS OF THE CHEST:``)
starts one only where a paragraph starts (at the top of the body or after a blank line), so a
wrapped line of prose that happens to begin ``NG TUBE: ...`` stays in its section.

De-identification markers are written differently by each source (MIMIC ``___``, Open-i /
IU X-ray ``XXXX``, older MIMIC ``[** ... **]``); every one becomes ``DEID_TOKEN`` (``___``),
so one concept is one string for the tokenizer whatever the source.

Which text is used (``extract_text``):
  1. the requested sections (findings, then impression) that are present and non-empty,
     joined in that order; source "findings+impression", "findings" or "impression";
  2. else the last non-empty section that is not one of the header-only sections
     (examination, indication, history, technique, comparison, notification, ...), e.g. a
     lone CONCLUSION or REPORT section; source "fallback:<section name>". Paragraphs that
     follow a header-only section's first paragraph after a blank line (findings written
     without a header under COMPARISON) count as a section of their own, "unlabeled";
  3. else, for a report with no section header at all, the whole body after the preamble;
     source "fallback:body";
  4. anything else raises RecordError("empty_report"): no text at all, or headers whose
     sections are all empty or say only why and how the exam was done (never trained on as
     if it were a finding).
"""

from __future__ import annotations

import re
from pathlib import Path

from shards.common import RecordError

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
BLANK_LINE = re.compile(r"\n[ \t]*\n")
DEID_TOKEN = "___"
# MIMIC's ___ (and longer runs of underscores), Open-i's XXXX (a word of 2+ X's), [** ... **].
DEID = re.compile(r"\[\*\*.*?\*\*\]|_{2,}|\bX{2,}\b")


def normalize_deid(text: str) -> str:
    """Every de-identification marker as DEID_TOKEN (see the module docstring)."""
    return DEID.sub(DEID_TOKEN, text)


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


# Section names that start a section wherever they start a line (after ALIASES).
KNOWN_SECTIONS = (
    frozenset(
        {
            "findings",
            "impression",
            "conclusion",
            "report",
            "recommendation",
            "recommendations",
            "recommendation(s)",
            "addendum",
            "procedure",
            "opinion",
            "summary",
            "final report",
            "study",
            "provisional findings impression (pfi)",
        }
    )
    | HEADER_ONLY
    | frozenset(ALIASES)
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


def _is_header(body: str, match: re.Match) -> bool:
    """A known section name anywhere at a line start; another name only at a paragraph start."""
    if section_name(match.group(1)) in KNOWN_SECTIONS:
        return True
    before = body[: match.start()].rstrip(" \t")
    if not before.strip():
        return True  # the first line of the body
    lines = before.split("\n")
    return len(lines) >= 2 and not lines[-2].strip()  # a blank line before this one


def split_sections(body: str) -> tuple[str, list[tuple[str, str]]]:
    """A report body -> (text before the first header, [(section name, content), ...]).

    Content is whitespace-normalised and may be empty (a header with nothing under it).
    """
    headers = [m for m in HEADER.finditer(body) if _is_header(body, m)]
    lead = normalize_space(body[: headers[0].start()] if headers else body)
    sections = []
    for i, match in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(body)
        name, raw = section_name(match.group(1)), body[match.end() : end]
        if name in HEADER_ONLY:
            # Its first paragraph says why / how; paragraphs after a blank line are text the
            # report left without a header (often the findings): an "unlabeled" section.
            paragraphs = [p for p in BLANK_LINE.split(raw) if p.strip()]
            sections.append((name, normalize_space(paragraphs[0]) if paragraphs else ""))
            if len(paragraphs) > 1:
                sections.append(("unlabeled", normalize_space(" ".join(paragraphs[1:]))))
        else:
            sections.append((name, normalize_space(raw)))
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
    body = normalize_deid(strip_preamble(report))
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
    if lead and not found:
        return normalize_space(body), "fallback:body"
    if any(content for _, content in found):
        names = sorted({name for name, content in found if content})
        raise RecordError(
            "empty_report",
            path,
            f"only sections that say why and how the exam was done have text ({', '.join(names)})",
        )
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
