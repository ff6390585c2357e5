"""A synthetic CheXpert-v1.0 download: train.csv, valid.csv and the image tree, as published.

Written in the layout of the real download, so shards/chexpert.py reads it with the same code::

    <root>/CheXpert-v1.0/train.csv     Path,Sex,Age,Frontal/Lateral,AP/PA, then the 14 labels in
    <root>/CheXpert-v1.0/valid.csv     CheXpert's column order (shards.chexpert.COLUMNS)
    <root>/CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg   (view2_lateral.jpg, ...)
    <root>/CheXpert-v1.0/valid/patient00061/study1/view1_frontal.jpg
    <root>/chexpert_sources.json   where the CheXpert folder is (scripts/make_chexpert_shards.py)
    <root>/corruptions.json        the injected bad inputs and the reject reason each must give

Path cells start with the folder's name (``CheXpert-v1.0/train/...``) as in the real tables.
Train patients are numbered from patient00001, valid patients after them (the real valid set is
patient64541 to patient64740), so no patient is in both tables.

Each study's findings are drawn as for the synthetic MIMIC-CXR (shards.synthetic.cxr): a state
per finding (1.0 present, 0.0 negated, -1.0 uncertain, blank not mentioned), and every image of the
study is rendered from those findings with the same drawing code (heart size, effusion meniscus,
pneumothorax, opacities, nodules, fractures, devices), so a classifier can learn the labels. The
rows of a study share its labels, as in the real tables. train.csv has uncertain and blank cells;
valid.csv, like the real one (radiologist consensus), has only 1.0 and 0.0: an uncertain or
unmentioned finding is 0.0 there and is not drawn.

``single_finding_share`` of the train studies carry exactly one of the five competition findings
(Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion, in turn, so the classes are
balanced) at 1.0 and every other finding 0.0 or blank: the rows GLoRIA's 5x200 zero-shot protocol
samples from, so a few hundred patients give enough of them for a scaled-down 5xN split.

Corruptions (``corrupt``), each on its own frontal row of a patient none of whose studies is a
5x200 candidate (so the 5x200 selection never moves one out of train): a missing image, a truncated JPEG, a label cell
"2.0", an Age "unknown", a Path without its study folder, and a duplicated row.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from shards.chexpert import (
    COLUMNS,
    COMPETITION_TASKS,
    CSV_LABELS,
    SOURCES_FILE,
    zero_shot_class,
)
from shards.cxr_labels import LABEL_NAMES
from shards.synthetic.cxr import (
    DEVICES,
    FINDINGS,
    NEGATED,
    CxrImage,
    Finding,
    Study,
    _draw_findings,
    _jpeg_bytes,
    render_image,
)

log = logging.getLogger(__name__)

FOLDER = "CheXpert-v1.0"
# corruption kind -> the reject reason shards.chexpert must give it
CORRUPTIONS = {
    "missing_image": "missing_image",
    "truncated_jpeg": "truncated_image",
    "invalid_label": "invalid_label",
    "bad_age": "bad_age",
    "bad_path": "bad_path",
    "duplicate_row": "duplicate_key",
}
IMAGE_LEVEL = ("missing_image", "truncated_jpeg")  # the reject names the image file


@dataclass
class _Row:
    """One image row of a table, before the table is written."""

    table: str  # train.csv / valid.csv
    part: str  # train / valid (the folder)
    patient: str
    study_index: int  # index into the plan's studies
    study: str  # studyN
    view_file: str  # viewN_frontal / viewN_lateral
    view: str  # PA / AP / LATERAL (the renderer's view)
    sex: str
    age: int
    cells: list[str]  # the 14 label cells in CSV order
    single: bool  # the study has exactly one competition finding
    corrupt: str = ""
    path: str = ""  # the Path cell (set when the table is laid out)

    @property
    def rel(self) -> str:
        """The image file below the CheXpert folder."""
        return f"{self.part}/{self.patient}/{self.study}/{self.view_file}.jpg"


@dataclass
class _Plan:
    studies: list[Study] = field(default_factory=list)
    rows: list[_Row] = field(default_factory=list)


def _single_finding(rng: np.random.Generator, task: str) -> dict[str, Finding]:
    """Findings with ``task`` present (1.0, drawn) and every other finding negated or blank."""
    findings = {}
    for name in FINDINGS:
        value = 0.0 if rng.random() < max(NEGATED[name], 0.3) else None
        findings[name] = Finding(value, 0.0, int(rng.choice((-1, 1))), int(rng.integers(3)))
    severity = int(rng.integers(3))
    side = 0 if task in ("Edema", "Cardiomegaly") else int(rng.choice((-1, 1)))
    findings[task] = Finding(1.0, (0.6, 1.0, 1.4)[severity], side, severity)
    return findings


def _valid_findings(findings: dict[str, Finding]) -> dict[str, Finding]:
    """valid.csv has only 1.0 and 0.0: anything not surely present becomes 0.0 and undrawn."""
    return {
        name: f if f.value == 1.0 else Finding(0.0, 0.0, f.side, f.severity)
        for name, f in findings.items()
    }


def _cells(study: Study, valid: bool) -> list[str]:
    """The 14 label cells in CSV order (No Finding as the study's labels() derive it)."""
    by_name = dict(zip(LABEL_NAMES, study.labels(), strict=True))
    cells = []
    for name in CSV_LABELS:
        value = by_name[name]
        if valid and value is None:
            value = 0.0
        cells.append("" if value is None else f"{value:.1f}")
    return cells


def _plan(
    rng: np.random.Generator,
    patients: int,
    valid_patients: int,
    studies_per_patient: Sequence[int],
    single_finding_share: float,
    lateral_share: float,
) -> _Plan:
    plan = _Plan()
    singles = 0
    for n in range(1, patients + valid_patients + 1):
        valid = n > patients
        patient = f"patient{n:05d}"
        sex = str(rng.choice(("Male", "Female"), p=(0.55, 0.45)))
        age = int(rng.integers(18, 88))
        inpatient_rate = rng.uniform(0.2, 1.0)
        count = (
            1 if valid else int(rng.integers(studies_per_patient[0], studies_per_patient[1] + 1))
        )
        for k in range(1, count + 1):
            inpatient = bool(rng.random() < inpatient_rate)
            single = not valid and bool(rng.random() < single_finding_share)
            if single:
                findings = _single_finding(rng, COMPETITION_TASKS[singles % len(COMPETITION_TASKS)])
                singles += 1
            else:
                findings = _draw_findings(rng, inpatient)
                if valid:
                    findings = _valid_findings(findings)
            devices = tuple(d for d in DEVICES if rng.random() < 0.4) or ("cvc",)
            study = Study(
                subject=patient,
                study=f"study{k}",
                inpatient=inpatient,
                day=date(2002, 10, 1),
                findings=findings,
                devices=devices,
                style="both",
                wet_read=False,
            )
            plan.studies.append(study)
            cells = _cells(study, valid)
            frontal = "AP" if inpatient else "PA"
            views = [frontal]
            if rng.random() < 0.1:
                views.append(frontal)
            if rng.random() < lateral_share:
                views.append("LATERAL")
            for v, view in enumerate(views, start=1):
                plan.rows.append(
                    _Row(
                        table="valid.csv" if valid else "train.csv",
                        part="valid" if valid else "train",
                        patient=patient,
                        study_index=len(plan.studies) - 1,
                        study=f"study{k}",
                        view_file=f"view{v}_{'lateral' if view == 'LATERAL' else 'frontal'}",
                        view=view,
                        sex=sex,
                        age=min(age + k - 1, 90),  # the real tables write 90 for 90 and over
                        cells=list(cells),
                        single=single,
                    )
                )
    return plan


def _plan_corruptions(plan: _Plan, count: int, rng: np.random.Generator) -> list[_Row]:
    """Mark ``count`` frontal rows as corrupt, on patients none of whose studies is a 5x200
    candidate (so the 5x200 selection never moves a corrupt row out of train)."""
    if count <= 0:
        return []
    rows = plan.rows
    candidates = {
        r.patient
        for r in rows
        if r.single or zero_shot_class(tuple(plan.studies[r.study_index].labels())) is not None
    }
    free = [r for r in rows if r.view != "LATERAL" and r.patient not in candidates]
    if count > len(free) // 2:
        raise ValueError(
            f"corrupt={count} is too many for {len(free)} eligible frontal rows; use at most "
            f"{len(free) // 2}"
        )
    chosen = [free[int(i)] for i in rng.choice(len(free), size=count, replace=False)]
    kinds = list(CORRUPTIONS)
    for i, row in enumerate(chosen):
        row.corrupt = kinds[i % len(kinds)]
        if row.corrupt == "invalid_label":
            row.cells[int(rng.integers(len(row.cells)))] = "2.0"
    return chosen


def _table_rows(rows: list[_Row], folder: str) -> list[_Row]:
    """The rows as the table lists them: Path cells set, a duplicate after a duplicate_row."""
    out = []
    for row in rows:
        row.path = f"{folder}/{row.rel}"
        if row.corrupt == "bad_path":  # the study folder left out
            row.path = f"{folder}/{row.part}/{row.patient}/{row.view_file}.jpg"
        if row.corrupt == "duplicate_row":
            out.append(replace(row, corrupt="", cells=list(row.cells)))
        out.append(row)
    return out


def _csv_line(row: _Row) -> list[str]:
    frontal = row.view != "LATERAL"
    age = "unknown" if row.corrupt == "bad_age" else str(row.age)
    ap_pa = row.view if frontal else ""
    return [row.path, row.sex, age, "Frontal" if frontal else "Lateral", ap_pa, *row.cells]


def _write_csv(path: Path, rows: list[_Row]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(_csv_line(r) for r in rows)
    path.write_text(text.getvalue())


def generate_chexpert(
    root: str | Path,
    patients: int = 60,
    studies_per_patient: Sequence[int] = (1, 3),
    seed: int = 0,
    valid_patients: int = 10,
    corrupt: int = 0,
    size: int = 256,
    single_finding_share: float = 0.35,
    lateral_share: float = 0.4,
    folder: str = FOLDER,
) -> dict[str, Path]:
    """Write a synthetic CheXpert-v1.0 download under ``root``; see the module docstring.

    ``patients`` in train.csv with ``studies_per_patient`` (inclusive min, max) studies each,
    ``valid_patients`` in valid.csv with one study each (as in the real valid set). Each study
    has a frontal view1, another frontal view one time in ten and a lateral view at
    ``lateral_share``. ``size`` is the image height (widths vary by about +-20%). ``folder`` is
    the CheXpert folder's name and the Path cells' prefix ("CheXpert-v1.0-small" for the small
    release). ``corrupt`` bad inputs are listed in corruptions.json with the reject reason and
    the source (the table:line or the image, relative to the CheXpert folder) each must give.
    Returns the paths: root (the CheXpert folder), train, valid, corruptions, sources.
    """
    if patients < 1 or valid_patients < 1:
        raise ValueError(
            f"patients and valid_patients must be >= 1, got {patients} and {valid_patients}"
        )
    if len(studies_per_patient) != 2 or not 1 <= studies_per_patient[0] <= studies_per_patient[1]:
        raise ValueError(
            f"studies_per_patient must be (min, max) with 1 <= min <= max, got "
            f"{tuple(studies_per_patient)}"
        )
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    for name, share in (
        ("single_finding_share", single_finding_share),
        ("lateral_share", lateral_share),
    ):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {share}")
    if not folder or "/" in folder:
        raise ValueError(f"folder {folder!r}: expected one folder name such as {FOLDER}")
    out = Path(root)
    top = out / folder
    rng = np.random.default_rng(seed)
    plan = _plan(
        rng, patients, valid_patients, studies_per_patient, single_finding_share, lateral_share
    )
    _plan_corruptions(plan, corrupt, rng)

    for i, row in enumerate(plan.rows):
        if row.corrupt in ("missing_image", "bad_path"):
            continue
        study = plan.studies[row.study_index]
        pixels_rng = np.random.default_rng([seed, i, 2])
        aspect = pixels_rng.uniform(0.82, 1.22)
        image = CxrImage(row.view_file, row.view, size, max(8, round(size * aspect)))
        data = _jpeg_bytes(render_image(study, image, pixels_rng))
        if row.corrupt == "truncated_jpeg":
            data = data[: len(data) * 3 // 5]
        path = top / row.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    corruptions: list[dict[str, Any]] = []
    for name in ("train.csv", "valid.csv"):
        rows = _table_rows([r for r in plan.rows if r.table == name], folder)
        _write_csv(top / name, rows)
        for line, row in enumerate(rows, start=2):  # line 1 is the header
            if row.corrupt:
                corruptions.append(
                    {
                        "kind": row.corrupt,
                        "reason": CORRUPTIONS[row.corrupt],
                        "table": name,
                        "line": line,
                        "path": row.path,
                        "source": row.rel if row.corrupt in IMAGE_LEVEL else f"{name}:{line}",
                    }
                )
    paths = {
        "root": top,
        "train": top / "train.csv",
        "valid": top / "valid.csv",
        "corruptions": out / "corruptions.json",
        "sources": out / SOURCES_FILE,
    }
    paths["corruptions"].write_text(json.dumps(corruptions, indent=2) + "\n")
    train_rows = [r for r in plan.rows if r.table == "train.csv"]
    record = {
        "root": folder,
        "generator": {
            "patients": patients,
            "studies_per_patient": list(studies_per_patient),
            "seed": seed,
            "valid_patients": valid_patients,
            "corrupt": corrupt,
            "size": size,
            "single_finding_share": single_finding_share,
            "lateral_share": lateral_share,
        },
        "counts": {
            "patients": patients + valid_patients,
            "studies": len(plan.studies),
            "train_rows": len(train_rows) + sum(r.corrupt == "duplicate_row" for r in train_rows),
            "valid_rows": len(plan.rows)
            - len(train_rows)
            + sum(r.corrupt == "duplicate_row" for r in plan.rows if r.table == "valid.csv"),
            "single_finding_frontal_rows": {
                task: sum(
                    r.single
                    and r.view != "LATERAL"
                    and plan.studies[r.study_index].findings[task].value == 1.0
                    for r in train_rows
                )
                for task in COMPETITION_TASKS
            },
        },
    }
    paths["sources"].write_text(json.dumps(record, indent=2) + "\n")
    log.info(
        "synthetic CheXpert: %d patients, %d studies, %d rows -> %s",
        patients + valid_patients,
        len(plan.studies),
        len(plan.rows),
        top,
    )
    return paths
