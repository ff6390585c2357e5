"""Alzheimer's cohort tables in their published layouts -> typed records (or rejects).

Three adapters, one per table layout a user actually has:
  generic    the project's own CSV, one row per image (NACC, AIBL, MIRIAD, ... exports)
  adnimerge  ADNI ADNIMERGE.csv + the ADNI image download tree
  oasis2     OASIS-2 oasis_longitudinal.csv + the OAS2_RAW_PART* folders

Each adapter checks the table header at call time (ValueError naming the missing columns)
and returns a lazy iterator of ``AdRecord | Reject``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from shards.clinical import is_missing, parse_cell, parse_number
from shards.common import Reject, read_table
from shards.formats.volume_class import AD_LABEL_NAMES
from shards.volume import is_volume_file

log = logging.getLogger(__name__)

DIAGNOSES = AD_LABEL_NAMES  # the label names of the shards (NC, MCI, AD)
LABELS = {d: i for i, d in enumerate(DIAGNOSES)}
# Cohorts published as controls vs patients only: the reader collapses MCI+AD.
BINARY_COHORTS = frozenset({"OASIS-2", "MIRIAD"})

GENERIC_DX = {"nc": "NC", "cn": "NC", "mci": "MCI", "ad": "AD", "dementia": "AD"}
# ADNIMERGE DX (CN / MCI / Dementia), DX_bl-style codes, and the older "X to Y" conversions.
ADNI_DX = {
    "cn": "NC",
    "nl": "NC",
    "smc": "NC",
    "mci": "MCI",
    "emci": "MCI",
    "lmci": "MCI",
    "dementia": "AD",
    "ad": "AD",
}
OASIS_GROUPS = ("Nondemented", "Demented", "Converted")

GENERIC_REQUIRED = ("subject_id", "image_path", "diagnosis")
GENERIC_KNOWN = (
    "age",
    "sex",
    "education_years",
    "mmse",
    "cdr",
    "cdr_sb",
    "logical_memory",
    "summary",
)
# Columns of the generic table that identify the row rather than describe the patient.
GENERIC_META = frozenset({"subject_id", "image_path", "cohort", "diagnosis", "visit", "image_id"})

ADNI_REQUIRED = ("PTID", "VISCODE", "EXAMDATE", "DX")
# ADNIMERGE column -> our field name; everything else in ADNIMERGE is ignored.
ADNI_FIELDS = {
    "AGE": "age",
    "PTGENDER": "sex",
    "PTEDUCAT": "education_years",
    "MMSE": "mmse",
    "CDRSB": "cdr_sb",
    "LDELTOTAL": "logical_memory",
    # FreeSurfer volumes (mm3) measured from the visit's MRI; empty at visits without one.
    "Ventricles": "ventricles",
    "Hippocampus": "hippocampus",
    "WholeBrain": "whole_brain",
    "ICV": "icv",
}
ADNI_MAX_DAYS = 180

OASIS_REQUIRED = (
    "Subject ID",
    "MRI ID",
    "Group",
    "Visit",
    "MR Delay",
    "M/F",
    "Hand",
    "Age",
    "EDUC",
    "SES",
    "MMSE",
    "CDR",
    "eTIV",
    "nWBV",
    "ASF",
)
OASIS_FIELDS = {
    "Age": "age",
    "M/F": "sex",
    "Hand": "handedness",
    "EDUC": "education_years",
    "SES": "ses",
    "MMSE": "mmse",
    "CDR": "cdr",
    "eTIV": "etiv",
    "nWBV": "nwbv",
    "ASF": "asf",
}

FORMATS = ("generic", "adnimerge", "oasis2")


@dataclass(frozen=True)
class AdRecord:
    """One T1 volume with its subject, visit, diagnosis (NC / MCI / AD) and clinical fields."""

    subject: str
    cohort: str
    image_path: Path
    diagnosis: str
    binary: bool
    visit: str
    image_id: str
    fields: dict[str, Any] = field(default_factory=dict)


Stats = MutableMapping[str, int]


def _require(path: Path, header: list[str], required: tuple[str, ...], fmt: str) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(
            f"{path}: {fmt} table is missing required columns {missing}; "
            f"expected at least {list(required)}, found {header}"
        )


def _bump(stats: Stats | None, key: str, n: int = 1) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + n


def _binary(cohort: str) -> bool:
    return cohort.upper() in BINARY_COHORTS


def _image_id_from_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".img"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# --------------------------------------------------------------------------- generic


def read_generic(
    table: str | Path,
    images_root: str | Path | None = None,
    cohort: str | None = None,
    stats: Stats | None = None,
) -> Iterator[AdRecord | Reject]:
    """Records from the project's generic table (one row per image).

    Relative ``image_path`` cells resolve against ``images_root`` (default: the table's
    folder). ``cohort`` overrides the table's cohort column (then the column is optional).
    Columns beyond the known ones become clinical fields rendered "The <column> is <value>.".
    """
    table = Path(table)
    header, rows = read_table(table)
    required = GENERIC_REQUIRED + (() if cohort else ("cohort",))
    _require(table, header, required, "generic")
    root = Path(images_root) if images_root is not None else table.parent
    extras = [c for c in header if c not in GENERIC_META and c not in GENERIC_KNOWN and c]
    return _generic_rows(table, rows, root, cohort, extras, stats)


def _generic_rows(
    table: Path,
    rows: Iterator[tuple[int, dict[str, str]]],
    root: Path,
    cohort_override: str | None,
    extras: list[str],
    stats: Stats | None,
) -> Iterator[AdRecord | Reject]:
    for line, row in rows:
        source = f"{table}:{line}"
        _bump(stats, "rows")
        subject = row["subject_id"].strip()
        if not subject:
            yield Reject(
                source, "missing_subject", "empty subject_id; expected a subject identifier"
            )
            continue
        cohort = cohort_override or row.get("cohort", "").strip()
        if not cohort:
            yield Reject(source, "missing_cohort", "empty cohort; expected a cohort name")
            continue
        raw_dx = row["diagnosis"].strip()
        if is_missing(raw_dx):
            yield Reject(source, "missing_diagnosis", "empty diagnosis; expected NC, MCI or AD")
            continue
        diagnosis = GENERIC_DX.get(raw_dx.lower())
        if diagnosis is None:
            yield Reject(
                source,
                "unknown_diagnosis",
                f"diagnosis {raw_dx!r} is not one of NC, CN, MCI, AD, Dementia (any case)",
            )
            continue
        cell = row["image_path"].strip()
        if not cell:
            yield Reject(source, "missing_image", "empty image_path; expected a volume file path")
            continue
        image = Path(cell) if Path(cell).is_absolute() else root / cell
        if not image.is_file():
            yield Reject(source, "missing_image", f"image file {image} does not exist")
            continue
        fields: dict[str, Any] = {}
        for key in GENERIC_KNOWN:
            value = row.get(key, "")
            if is_missing(value):
                continue
            fields[key] = value.strip() if key in ("sex", "summary") else parse_cell(value)
        for key in extras:
            value = parse_cell(row.get(key, ""))
            if value is not None:
                fields[key] = value
        yield AdRecord(
            subject=subject,
            cohort=cohort,
            image_path=image,
            diagnosis=diagnosis,
            binary=_binary(cohort),
            visit=row.get("visit", "").strip(),
            image_id=row.get("image_id", "").strip() or _image_id_from_name(image),
            fields=fields,
        )


# --------------------------------------------------------------------------- ADNI


def parse_date(text: str) -> date | None:
    """Parse the date formats ADNI uses (2006-04-18, 4/18/2006, and image folder stamps)."""
    text = text.strip()
    if not text:
        return None
    head = text[:10]
    for fmt in ("%Y-%m-%d", "%m/%d/%Y", "%Y/%m/%d"):
        for candidate in (head, text.split()[0]):
            try:
                return datetime.strptime(candidate, fmt).date()
            except ValueError:
                continue
    return None


def adni_diagnosis(raw: str) -> str | None:
    """ADNI DX to NC / MCI / AD; "MCI to Dementia"-style conversions take the current state."""
    value = raw.strip().lower()
    if " to " in value:
        value = value.rsplit(" to ", 1)[1].strip()
    return ADNI_DX.get(value)


@dataclass(frozen=True)
class _AdniImage:
    ptid: str
    acquired: date | None
    image_id: str
    path: Path | None
    folder: Path


def _adni_images(root: Path) -> Iterator[_AdniImage]:
    """Walk <root>/<PTID>/<series>/<date_time>/I<id>/ in sorted order."""
    for image_dir in sorted(root.glob("*/*/*/I*")):
        if not image_dir.is_dir():
            continue
        ptid = image_dir.parents[2].name
        acquired = parse_date(image_dir.parent.name)
        volumes = sorted(p for p in image_dir.iterdir() if p.is_file() and is_volume_file(p))
        yield _AdniImage(ptid, acquired, image_dir.name, volumes[0] if volumes else None, image_dir)


def read_adnimerge(
    table: str | Path,
    images_root: str | Path,
    cohort: str | None = None,
    stats: Stats | None = None,
) -> Iterator[AdRecord | Reject]:
    """Records from ADNIMERGE.csv and an ADNI image tree, one per image.

    Each image is matched to the same PTID's visit with the nearest EXAMDATE within 180 days.
    ``stats["adnimerge_rows_without_image"]`` counts visits that had no image (normal in
    ADNIMERGE, so not a reject); it is filled once the iterator is exhausted.
    """
    table = Path(table)
    header, rows = read_table(table)
    _require(table, header, ADNI_REQUIRED, "adnimerge")
    root = Path(images_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: ADNI images root not found")
    return _adnimerge_records(table, rows, root, cohort or "ADNI", stats)


def _adnimerge_records(
    table: Path,
    rows: Iterator[tuple[int, dict[str, str]]],
    root: Path,
    cohort: str,
    stats: Stats | None,
) -> Iterator[AdRecord | Reject]:
    visits: dict[str, list[tuple[date, int, dict[str, str]]]] = {}
    n_rows = 0
    for line, row in rows:
        n_rows += 1
        exam = parse_date(row["EXAMDATE"])
        if exam is not None:
            visits.setdefault(row["PTID"].strip(), []).append((exam, line, row))
    used: set[int] = set()
    n_images = 0
    for image in _adni_images(root):
        n_images += 1
        source = str(image.path or image.folder)
        if image.path is None:
            yield Reject(
                source,
                "missing_image",
                "no .nii/.nii.gz in the image folder; expected a NIfTI download "
                "(convert DICOM series first)",
            )
            continue
        if image.acquired is None:
            yield Reject(
                source,
                "no_visit_match",
                f"cannot read an acquisition date from folder {image.folder.parent.name!r}; "
                "expected YYYY-MM-DD_hh_mm_ss.s",
            )
            continue
        candidates = visits.get(image.ptid, [])
        if not candidates:
            yield Reject(source, "no_visit_match", f"PTID {image.ptid} has no dated row in {table}")
            continue
        gap, _, line, row = min(
            (abs((exam - image.acquired).days), exam, line, row) for exam, line, row in candidates
        )
        if gap > ADNI_MAX_DAYS:
            yield Reject(
                source,
                "no_visit_match",
                f"nearest {table.name} visit of {image.ptid} is {gap} days from the scan "
                f"({image.acquired}); expected within {ADNI_MAX_DAYS} days",
            )
            continue
        used.add(line)
        raw_dx = row["DX"].strip()
        if not raw_dx:
            yield Reject(
                source,
                "missing_diagnosis",
                f"{table.name} line {line} ({image.ptid} {row['VISCODE']}) has an empty DX",
            )
            continue
        diagnosis = adni_diagnosis(raw_dx)
        if diagnosis is None:
            yield Reject(
                source,
                "unknown_diagnosis",
                f"DX {raw_dx!r} at {table.name} line {line} is not one of CN, MCI, Dementia "
                "(or SMC, EMCI, LMCI, AD, NL)",
            )
            continue
        fields = _adni_fields(row)
        yield AdRecord(
            subject=image.ptid,
            cohort=cohort,
            image_path=image.path,
            diagnosis=diagnosis,
            binary=_binary(cohort),
            visit=row["VISCODE"].strip(),
            image_id=image.image_id,
            fields=fields,
        )
    if n_images == 0:
        log.warning(
            "%s: no image folders found; expected <root>/<PTID>/<series>/<date>/I<id>/*.nii",
            root,
        )
    _bump(stats, "adnimerge_rows", n_rows)
    _bump(stats, "adnimerge_rows_without_image", n_rows - len(used))


def _adni_fields(row: dict[str, str]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for column, key in ADNI_FIELDS.items():
        value = row.get(column, "")
        if is_missing(value):
            continue
        fields[key] = value.strip() if key == "sex" else parse_cell(value)
    # ADNIMERGE AGE is the age at baseline; Years_bl moves it to this visit.
    years = parse_number(row.get("Years_bl", ""))
    if isinstance(fields.get("age"), int | float) and years:
        fields["age"] = round(fields["age"] + years, 1)
    return fields


# --------------------------------------------------------------------------- OASIS-2


def oasis_diagnosis(group: str, cdr: Any) -> str | None:
    """OASIS-2 Group to NC / AD; a "Converted" visit is NC while its CDR is 0, else AD."""
    group = group.strip().lower()
    if group == "nondemented":
        return "NC"
    if group == "demented":
        return "AD"
    if group == "converted":
        score = parse_number(cdr)
        if score is None:
            return None
        return "NC" if score == 0 else "AD"
    return None


def _oasis_volume(root: Path, mri_id: str) -> Path | None:
    folder = root / mri_id
    if not folder.is_dir():
        # Users often keep OAS2_RAW_PART1 and OAS2_RAW_PART2 side by side under one root.
        nested = sorted(p for p in root.glob(f"*/{mri_id}") if p.is_dir())
        if not nested:
            return None
        folder = nested[0]
    volumes = sorted(
        (p for p in folder.rglob("*") if p.is_file() and is_volume_file(p)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    return volumes[0] if volumes else None


def read_oasis2(
    table: str | Path,
    images_root: str | Path,
    cohort: str | None = None,
    stats: Stats | None = None,
) -> Iterator[AdRecord | Reject]:
    """Records from OASIS-2 oasis_longitudinal.csv, one per MRI session.

    The volume is the first (sorted) .nii/.nii.gz/.img under <images_root>/<MRI ID>/,
    i.e. RAW/mpr-1.nifti.img in the published download. All records are binary.
    """
    table = Path(table)
    header, rows = read_table(table)
    _require(table, header, OASIS_REQUIRED, "oasis2")
    return _oasis_records(table, rows, Path(images_root), cohort or "OASIS-2", stats)


def _oasis_records(
    table: Path,
    rows: Iterator[tuple[int, dict[str, str]]],
    root: Path,
    cohort: str,
    stats: Stats | None,
) -> Iterator[AdRecord | Reject]:
    for line, row in rows:
        source = f"{table}:{line}"
        _bump(stats, "rows")
        subject, mri_id = row["Subject ID"].strip(), row["MRI ID"].strip()
        if not subject or not mri_id:
            yield Reject(source, "missing_subject", "empty Subject ID or MRI ID")
            continue
        group = row["Group"].strip()
        if not group:
            yield Reject(
                source, "missing_diagnosis", f"empty Group; expected one of {OASIS_GROUPS}"
            )
            continue
        diagnosis = oasis_diagnosis(group, row["CDR"])
        if diagnosis is None:
            reason = "missing_diagnosis" if group.lower() == "converted" else "unknown_diagnosis"
            detail = (
                f"Group 'Converted' needs a CDR to tell NC from AD, CDR is {row['CDR']!r}"
                if reason == "missing_diagnosis"
                else f"Group {group!r} is not one of {', '.join(OASIS_GROUPS)}"
            )
            yield Reject(source, reason, detail)
            continue
        image = _oasis_volume(root, mri_id)
        if image is None:
            yield Reject(
                source,
                "missing_image",
                f"no .nii/.nii.gz/.img volume under {root / mri_id}; expected RAW/mpr-1.nifti.img",
            )
            continue
        fields: dict[str, Any] = {}
        for column, key in OASIS_FIELDS.items():
            value = row.get(column, "")
            if is_missing(value):
                continue
            fields[key] = value.strip() if key in ("sex", "handedness") else parse_cell(value)
        yield AdRecord(
            subject=subject,
            cohort=cohort,
            image_path=image,
            diagnosis=diagnosis,
            binary=True,
            visit=row["Visit"].strip(),
            image_id=mri_id,
            fields=fields,
        )


# --------------------------------------------------------------------------- dispatch


def read_source(
    fmt: str,
    table: str | Path,
    images_root: str | Path | None,
    cohort: str | None = None,
    stats: Stats | None = None,
) -> Iterator[AdRecord | Reject]:
    """Dispatch to the adapter for ``fmt`` (generic, adnimerge, oasis2).

    Raises ValueError for an unknown format or a table without the required columns,
    FileNotFoundError for a missing table or images root.
    """
    if fmt == "generic":
        return read_generic(table, images_root, cohort=cohort, stats=stats)
    if fmt == "adnimerge":
        if images_root is None:
            raise ValueError(f"{table}: adnimerge needs an images root (the ADNI download folder)")
        return read_adnimerge(table, images_root, cohort=cohort, stats=stats)
    if fmt == "oasis2":
        if images_root is None:
            raise ValueError(f"{table}: oasis2 needs an images root (OAS2_RAW_PART* folder)")
        return read_oasis2(table, images_root, cohort=cohort, stats=stats)
    raise ValueError(f"{table}: unknown source format {fmt!r}; expected one of {list(FORMATS)}")
