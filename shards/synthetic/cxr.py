"""A synthetic MIMIC-CXR-JPG download (image tree + four tables) and MIMIC-CXR reports tree.

Everything is written in the published layouts (DATA.md), so the shard writer reads it with
the same code as the real data::

    <root>/mimic-cxr-jpg/files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg
    <root>/mimic-cxr-jpg/mimic-cxr-2.0.0-{chexpert,negbio,metadata,split}.csv.gz (or .csv)
    <root>/mimic-cxr-reports/files/pXX/pSUBJECT/sSTUDY.txt
    <root>/cxr_sources.json   where the two roots are (scripts/make_cxr_shards.py reads it)
    <root>/corruptions.json   the injected bad inputs and the reject reason each must give

Each study first gets a state per finding, as a labeler would record it: present (1.0),
explicitly absent (0.0), uncertain (-1.0) or not mentioned (blank). The report is written from
those states, with the phrases, negations and hedges that give them ("No pleural effusion.",
"Possible small left pleural effusion.", "Moderate cardiomegaly."), and each image is drawn
from them: the heart shadow grows with cardiomegaly, an effusion fills a costophrenic angle
with a meniscus, a pneumothorax removes lung markings at an apex behind a pleural line,
opacity / consolidation / pneumonia / edema / atelectasis add focal, lobar, perihilar or
plate-like density, a nodule is a small round density, a rib fracture breaks a rib, support
devices draw tubes, lines and a pacemaker. Uncertain findings are drawn faintly half of the
time. Noise, exposure and a small pose change vary every image; lateral views (LATERAL, LL)
have their own anatomy. Splits are by subject (70 / 10 / 20, so that val and test are not
empty at small sizes; the real split is about 98 / 1 / 1).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from shards.cxr_labels import LABEL_NAMES
from shards.mimic_cxr import image_file, report_file
from shards.splits import assign_splits

log = logging.getLogger(__name__)

METADATA_COLUMNS = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
LABEL_COLUMNS = ("subject_id", "study_id", *LABEL_NAMES)
OFFICIAL_SPLITS = {"train": "train", "val": "validate", "test": "test"}
VIEW_MEANING = {
    "PA": "postero-anterior",
    "AP": "antero-posterior",
    "LATERAL": "lateral",
    "LL": "left lateral",
}
# corruption kind -> the reject reason the writer must give it
CORRUPTIONS = {
    "truncated_jpeg": "truncated_image",
    "missing_image": "missing_image",
    "image_without_metadata": "image_without_metadata",
    "missing_report": "missing_report",
    "empty_report": "empty_report",
    "invalid_label": "invalid_label",
}
STUDY_LEVEL = ("missing_report", "empty_report", "invalid_label")
REPORT_STYLES = ("both", "impression", "findings", "conclusion", "body")
FINDINGS = tuple(n for n in LABEL_NAMES if n != "No Finding")
# Chance a study has the finding (roughly MIMIC-CXR's, rare ones raised so small synthetic
# test splits still hold positives), outpatient / inpatient.
PREVALENCE = {
    "Atelectasis": (0.12, 0.30),
    "Cardiomegaly": (0.15, 0.30),
    "Consolidation": (0.05, 0.14),
    "Edema": (0.06, 0.25),
    "Enlarged Cardiomediastinum": (0.05, 0.10),
    "Fracture": (0.06, 0.08),
    "Lung Lesion": (0.07, 0.07),
    "Lung Opacity": (0.12, 0.30),
    "Pleural Effusion": (0.10, 0.38),
    "Pleural Other": (0.06, 0.06),
    "Pneumonia": (0.06, 0.14),
    "Pneumothorax": (0.04, 0.10),
    "Support Devices": (0.03, 0.65),
}
# Chance an absent finding is negated in the report (else it is not mentioned: blank).
NEGATED = {
    "Atelectasis": 0.05,
    "Cardiomegaly": 0.45,
    "Consolidation": 0.65,
    "Edema": 0.35,
    "Enlarged Cardiomediastinum": 0.55,
    "Fracture": 0.15,
    "Lung Lesion": 0.10,
    "Lung Opacity": 0.10,
    "Pleural Effusion": 0.75,
    "Pleural Other": 0.0,
    "Pneumonia": 0.25,
    "Pneumothorax": 0.75,
    "Support Devices": 0.0,
}
SEVERITY = ("mild", "moderate", "severe")
DEVICES = ("ett", "ngt", "cvc", "pacer")


@dataclass
class Finding:
    """How one finding appears in a study: labeler value, drawn strength, side, severity."""

    value: float | None
    strength: float = 0.0  # 0 = not drawn
    side: int = 1  # -1 patient right (image left), +1 patient left (image right), 0 both
    severity: int = 0  # index into SEVERITY


@dataclass
class CxrImage:
    """One image file of a study."""

    dicom_id: str
    view: str
    rows: int
    columns: int
    corrupt: str = ""


@dataclass
class Study:
    """One study: findings, its report, its images."""

    subject: str
    study: str
    inpatient: bool
    day: date
    findings: dict[str, Finding]
    devices: tuple[str, ...]
    style: str
    wet_read: bool
    images: list[CxrImage] = field(default_factory=list)
    corrupt: str = ""
    report: str = ""

    def labels(self) -> list[float | None]:
        """The labeler row in LABEL_NAMES order (No Finding derived from the others)."""
        pathology = any(
            f.value in (1.0, -1.0) for name, f in self.findings.items() if name != "Support Devices"
        )
        values = []
        for name in LABEL_NAMES:
            if name == "No Finding":
                values.append(None if pathology else 1.0)
            else:
                values.append(self.findings[name].value)
        return values


# --------------------------------------------------------------------------- labels


def _draw_findings(rng: np.random.Generator, inpatient: bool) -> dict[str, Finding]:
    present = {n: bool(rng.random() < PREVALENCE[n][int(inpatient)]) for n in FINDINGS}
    if present["Pneumonia"]:  # pneumonia shows as consolidation or opacity
        present["Consolidation" if rng.random() < 0.5 else "Lung Opacity"] = True
    if present["Edema"] and rng.random() < 0.5:
        present["Cardiomegaly"] = True
    findings = {}
    for name in FINDINGS:
        side = int(rng.choice((-1, 1)))
        severity = int(rng.integers(3))
        if present[name]:
            sure = name == "Support Devices" or rng.random() < 0.8
            value = 1.0 if sure else -1.0
            strength = (0.6, 1.0, 1.4)[severity] if sure else 0.5 * (rng.random() < 0.5)
        else:
            u = rng.random()
            value = (
                0.0
                if u < NEGATED[name]
                else (-1.0 if u > 0.96 and name != "Support Devices" else None)
            )
            strength = 0.0
        if name in ("Edema", "Cardiomegaly", "Enlarged Cardiomediastinum"):
            side = 0
        elif name == "Pleural Effusion" and present[name] and rng.random() < 0.3:
            side = 0
        findings[name] = Finding(value, float(strength), side, severity)
    return findings


def _negbio(labels: list[float | None], rng: np.random.Generator) -> list[float | None]:
    """The other labeler: mostly the same calls, some hedges and negations read differently."""
    out = []
    for value in labels:
        u = rng.random()
        if value == -1.0 and u < 0.25:
            value = None
        elif value == 0.0 and u < 0.05:
            value = None
        elif value == 1.0 and u < 0.03:
            value = -1.0
        out.append(value)
    return out


# --------------------------------------------------------------------------- reports

SIDE_WORD = {-1: "right", 1: "left", 0: "bilateral"}
ADVERB = ("mildly", "moderately", "severely")
SIZE_WORD = ("small", "moderate", "large")
INDICATIONS = (
    "___ year old woman with cough and fever  // eval for pneumonia",
    "___M with shortness of breath",
    "___F with chest pain, evaluate for acute process",
    "History: ___M with hypoxia",
    "___ year old man with fall, rib pain  // fracture?",
    "Evaluate for interval change.",
)
INPATIENT_INDICATIONS = (
    "___ year old man intubated for respiratory failure  // ETT placement",
    "___F with fluid overload, assess for edema",
    "___M s/p line placement  // line position?",
    "Intubated patient, assess tube positions and interval change",
)


def _sentences(study: Study, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(findings sentences, impression sentences) that give the study's label values."""
    f = study.findings
    findings: list[str] = []
    impression: list[str] = []

    def say(text: str, important: bool) -> None:
        findings.append(text)
        if important:
            impression.append(text)

    cm, ecm = f["Cardiomegaly"], f["Enlarged Cardiomediastinum"]
    if cm.value == 1.0:
        word = SEVERITY[cm.severity]
        say(
            f"{word.capitalize()} cardiomegaly."
            if rng.random() < 0.5
            else f"The heart is {ADVERB[cm.severity]} enlarged.",
            True,
        )
    elif cm.value == -1.0:
        say("The heart size is borderline enlarged.", True)
    elif cm.value == 0.0:
        say("Heart size is normal.", False)
    if ecm.value == 1.0:
        say("The mediastinum is widened.", True)
    elif ecm.value == -1.0:
        say("The mediastinal contours are possibly widened, which may be due to technique.", True)
    elif ecm.value == 0.0:
        say("The cardiomediastinal silhouette is normal.", False)

    # One sentence negates several findings, as radiologists write it.
    words = {
        "Consolidation": "focal consolidation",
        "Pleural Effusion": "pleural effusion",
        "Pneumothorax": "pneumothorax",
    }
    negated = [name for name in words if f[name].value == 0.0]
    if len(negated) >= 2:
        listed = [words[n] for n in negated]
        say(f"No {', '.join(listed[:-1])} or {listed[-1]}.", False)
    elif negated:
        say(f"No {words[negated[0]]}.", False)

    def phrase(name: str, pos: str, unc: str, neg: str) -> None:
        value = f[name].value
        if value == 1.0:
            say(pos, True)
        elif value == -1.0:
            say(unc, True)
        elif value == 0.0 and neg and name not in negated:
            say(neg, False)

    side = SIDE_WORD[f["Pleural Effusion"].side]
    sev = f["Pleural Effusion"].severity
    plural = "s" if f["Pleural Effusion"].side == 0 else ""
    phrase(
        "Pleural Effusion",
        f"{SIZE_WORD[sev].capitalize()} {side} pleural effusion{plural}.",
        f"Possible small {side} pleural effusion{plural}.",
        "",
    )
    s = SIDE_WORD[f["Pneumothorax"].side]
    phrase(
        "Pneumothorax",
        f"{SIZE_WORD[f['Pneumothorax'].severity].capitalize()} {s} apical pneumothorax.",
        f"Possible tiny {s} apical pneumothorax.",
        "",
    )
    s = SIDE_WORD[f["Consolidation"].side]
    phrase(
        "Consolidation",
        f"Focal consolidation in the {s} lower lobe.",
        f"Possible early consolidation at the {s} lung base.",
        "",
    )
    phrase(
        "Edema",
        f"{SEVERITY[f['Edema'].severity].capitalize()} pulmonary edema.",
        "There may be mild pulmonary edema.",
        "No pulmonary edema.",
    )
    s = SIDE_WORD[f["Lung Opacity"].side]
    phrase(
        "Lung Opacity",
        f"Patchy opacity in the {s} mid lung.",
        f"Subtle {s} mid lung opacity may be artifactual.",
        "No focal opacity.",
    )
    s = SIDE_WORD[f["Atelectasis"].side]
    phrase(
        "Atelectasis",
        f"{SEVERITY[f['Atelectasis'].severity].capitalize()} {s} basilar atelectasis.",
        f"Possible {s} basilar atelectasis.",
        "No atelectasis.",
    )
    s = SIDE_WORD[f["Lung Lesion"].side]
    size_cm = 0.8 + 0.6 * f["Lung Lesion"].severity
    phrase(
        "Lung Lesion",
        f"A {size_cm:.1f} cm nodule in the {s} upper lobe.",
        f"Possible small {s} upper lobe nodule, which could be a nipple shadow.",
        "No suspicious pulmonary nodules.",
    )
    s = SIDE_WORD[f["Pleural Other"].side]
    phrase(
        "Pleural Other",
        f"{s.capitalize()} apical pleural thickening.",
        f"Possible {s} pleural thickening.",
        "",
    )
    phrase(
        "Pneumonia",
        "Findings are consistent with pneumonia.",
        "Pneumonia cannot be excluded.",
        "No evidence of pneumonia.",
    )
    s = SIDE_WORD[f["Fracture"].side]
    rib = ("fifth", "sixth", "seventh")[f["Fracture"].severity]
    phrase(
        "Fracture",
        f"Acute fracture of the {s} {rib} rib.",
        f"Possible nondisplaced fracture of the {s} {rib} rib.",
        "No displaced rib fracture is seen.",
    )
    if f["Support Devices"].value == 1.0:
        device_text = {
            "ett": "Endotracheal tube terminates ___ cm above the carina.",
            "ngt": "Nasogastric tube courses below the diaphragm, tip in the stomach.",
            "cvc": "Right internal jugular central venous catheter tip in the mid SVC.",
            "pacer": "Left-sided pacemaker with leads in the right atrium and ventricle.",
        }
        say(" ".join(device_text[d] for d in study.devices), rng.random() < 0.5)
    if not impression:
        impression.append(
            "No acute cardiopulmonary process."
            if all(x.value != 1.0 for x in f.values())
            else "No acute cardiopulmonary process other than as above."
        )
    return findings, impression


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=78, initial_indent=" ", subsequent_indent=" ")


def write_report(study: Study, rng: np.random.Generator) -> str:
    """The report text of a study in MIMIC-CXR's layout and wording."""
    findings, impression = _sentences(study, rng)
    lines: list[str] = []
    if study.wet_read:
        lines += [
            f" WET READ: ___ ___ ___ {int(rng.integers(1, 12))}:{int(rng.integers(60)):02d} PM"
        ]
        lines += [_wrap(" ".join(impression)), " " + "_" * 78]
    lines.append(" " * 33 + "FINAL REPORT")
    if study.style == "body":
        lines.append(" CHEST RADIOGRAPH PERFORMED ON ___")
        lines.append(" ")
        lines.append(_wrap(" ".join(findings + [x for x in impression if x not in findings])))
        return "\n".join(lines) + "\n"
    exam = "CHEST (PORTABLE AP)" if study.inpatient else "CHEST (PA AND LAT)"
    reasons = INPATIENT_INDICATIONS if study.inpatient else INDICATIONS
    header = "HISTORY" if rng.random() < 0.2 else "INDICATION"
    lines.append(f" EXAMINATION:  {exam}")
    lines.append(" ")
    lines.append(_wrap(f"{header}:  {reasons[int(rng.integers(len(reasons)))]}"))
    lines.append(" ")
    technique = (
        "Portable AP upright chest radiograph" if study.inpatient else "Chest PA and lateral"
    )
    lines.append(f" TECHNIQUE:  {technique}")
    lines.append(" ")
    lines.append(f" COMPARISON:  {'___' if rng.random() < 0.6 else 'None.'}")
    lines.append(" ")
    sections: list[tuple[str, list[str]]] = []
    if study.style == "both":
        if rng.random() < 0.4:
            findings = [
                f"Compared to the prior study from ___, {findings[0][0].lower()}{findings[0][1:]}"
            ] + findings[1:]
        sections = [("FINDINGS", findings), ("IMPRESSION", impression)]
    elif study.style == "impression":
        sections = [("IMPRESSION", findings + [s for s in impression if s not in findings])]
    elif study.style == "findings":
        sections = [("FINDINGS", findings + [s for s in impression if s not in findings])]
    elif study.style == "conclusion":
        sections = [("CONCLUSION", findings + [s for s in impression if s not in findings])]
    for name, sentences in sections:
        lines.append(f" {name}: ")
        lines.append(" ")
        lines.append(_wrap("  ".join(sentences)))
        lines.append(" ")
    if study.findings["Pneumothorax"].value == 1.0:
        lines.append(
            _wrap(
                "NOTIFICATION:  The findings were discussed with Dr. ___ by Dr. ___ on the "
                "telephone on ___ at 10:15 AM, 2 minutes after discovery of the findings."
            )
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- images


def _soft(distance: np.ndarray, width: float) -> np.ndarray:
    """1 inside (distance < 0), 0 outside, a smooth edge of about ``width``."""
    return 0.5 * (1.0 - np.tanh(distance / width))


def _ellipse(
    X: np.ndarray,
    Y: np.ndarray,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    p: float = 2.0,
    edge: float = 0.02,
) -> np.ndarray:
    r = (np.abs((X - cx) / rx) ** p + np.abs((Y - cy) / ry) ** p) ** (1.0 / p)
    return _soft((r - 1.0) * min(rx, ry), edge)


def _blob(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return np.exp(-(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2))


def _polyline(
    X: np.ndarray, Y: np.ndarray, points: Sequence[tuple[float, float]], width: float
) -> np.ndarray:
    """A tube of about ``width`` along the polyline (a bright line on the radiograph)."""
    best = np.full(X.shape, np.inf, dtype=np.float32)
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((X - x0) * dx + (Y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        np.minimum(best, (X - x0 - t * dx) ** 2 + (Y - y0 - t * dy) ** 2, out=best)
    return np.exp(-best / (width * width))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean noise with features about 1/cells of the image (bicubic upsampled)."""
    low = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(low).resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _frame(rows: int, cols: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Canonical body coordinates of every pixel after a small random pose (scale, turn, shift)."""
    half = rows / 2.0
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    x = (x - cols / 2.0) / half
    y = (y - rows / 2.0) / half
    angle = math.radians(rng.uniform(-3.0, 3.0))
    scale = rng.uniform(0.86, 1.0)
    c, s = math.cos(angle), math.sin(angle)
    X = (c * x + s * y) / scale - rng.uniform(-0.04, 0.04)
    Y = (-s * x + c * y) / scale - rng.uniform(-0.03, 0.05)
    return X.astype(np.float32), Y.astype(np.float32)


def _lung(X: np.ndarray, Y: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(lung mask, diaphragm height at each X) of one lung on a frontal view."""
    cx = 0.42 * side
    base = 0.52 + (0.04 if side > 0 else 0.0)
    dome = base - 0.16 * (1.0 - ((X - cx) / 0.36) ** 2)
    shape = _ellipse(X, Y, cx, -0.08, 0.33, 0.66, p=2.6)
    return shape * _soft(Y - dome, 0.015), dome


def _frontal(
    X: np.ndarray, Y: np.ndarray, study: Study, ap: bool, rng: np.random.Generator
) -> np.ndarray:
    f = study.findings
    img = np.full(X.shape, 0.03, dtype=np.float32)
    body = _ellipse(X, Y, 0.0, 0.2, 0.97, 1.25, p=4.0, edge=0.03)
    img += 0.30 * body
    right, dome_r = _lung(X, Y, -1)
    left, dome_l = _lung(X, Y, 1)
    lungs = np.maximum(right, left)

    cm = f["Cardiomegaly"].strength
    # Cardiothoracic ratio about 0.42 normal, up to about 0.65 with severe cardiomegaly; an AP
    # projection magnifies the heart.
    width = (0.31 + 0.11 * cm) * (1.08 if ap else 1.0)
    heart = _ellipse(X, Y, 0.09 + 0.04 * cm, 0.30, width, 0.24 + 0.03 * cm, p=2.2, edge=0.025)
    ecm = f["Enlarged Cardiomediastinum"].strength
    half_width = 0.11 + 0.07 * ecm
    mediastinum = (
        _soft(np.abs(X) - half_width, 0.02) * _soft(-0.78 - Y, 0.03) * _soft(Y - 0.35, 0.03)
    )
    soft_tissue = np.maximum(heart, mediastinum)
    air = lungs * (1.0 - soft_tissue)

    # Vessel-like markings: the zero crossings of smooth noise, denser towards the hila.
    texture = 0.6 * _smooth_noise(rng, X.shape, 20) + 0.4 * _smooth_noise(rng, X.shape, 40)
    hila = _blob(X, Y, -0.2, -0.05, 0.35, 0.4) + _blob(X, Y, 0.2, -0.05, 0.35, 0.4)
    markings = np.exp(-((texture / 0.25) ** 2)) * (0.35 + hila)
    ptx = f["Pneumothorax"]
    ptx_mask = np.zeros_like(X)
    if ptx.strength:
        lung = right if ptx.side < 0 else left
        depth = -0.55 + 0.22 * ptx.strength
        lateral = _soft(-(X * ptx.side) + 0.3, 0.05)
        ptx_mask = lung * _soft(Y - depth - 0.6 * (X * ptx.side - 0.75) ** 2, 0.01) * lateral
    img -= 0.25 * air
    img += 0.06 * markings * air * (1.0 - ptx_mask)
    img -= 0.04 * ptx_mask
    if ptx.strength:  # the visceral pleural line at the edge of the collapsed lung
        edge = ptx_mask * (1.0 - ptx_mask) * 4.0
        img += 0.12 * edge * (air > 0.5)

    img += 0.10 * mediastinum + 0.12 * heart
    spine = _soft(np.abs(X) - 0.06, 0.01) * body
    img += 0.08 * spine * (1.0 + 0.4 * np.cos(2 * np.pi * Y / 0.09))
    img -= 0.08 * _soft(np.abs(X) - 0.025, 0.005) * _soft(Y + 0.2, 0.02) * _soft(-1.0 - Y, 0.02)

    # Posterior ribs: curved bands over the thorax; a fracture breaks and offsets one.
    phase = (Y + 0.68 - 0.3 * X * X) / 0.105
    fx = f["Fracture"]
    if fx.strength:
        x0 = 0.62 * fx.side
        y0 = -0.68 + 0.3 * x0 * x0 + 0.105 * (4 + fx.severity)
        window = np.exp(-(((Y - y0) / 0.08) ** 2))
        phase = phase + 0.35 * fx.strength * _soft(-(X - x0) * fx.side, 0.004) * window
        gap = np.exp(-(((X - x0) / 0.012) ** 2)) * window
    else:
        gap = 0.0
    ribs = np.maximum(np.cos(2 * np.pi * phase), 0.0) ** 6 * (1.0 - gap)
    thorax = _ellipse(X, Y, 0.0, -0.05, 0.86, 0.72, p=3.0) * _soft(-0.78 - Y, 0.03)
    img += 0.07 * ribs * thorax * (0.4 + 0.6 * lungs)
    for side in (-1, 1):  # clavicles
        img += 0.14 * _polyline(X, Y, [(0.08 * side, -0.68), (0.72 * side, -0.80)], 0.035)
        if ap:  # scapulae project over the lungs on an AP film
            img += 0.05 * _ellipse(X, Y, 0.78 * side, -0.35, 0.16, 0.32, edge=0.03)
    abdomen = body * _soft(np.minimum(dome_r, dome_l) - Y + 0.02, 0.03) * (1.0 - lungs)
    img += 0.06 * abdomen
    img -= 0.12 * _ellipse(X, Y, 0.38, 0.66, 0.11, 0.06)  # gastric bubble

    # Lung findings, all confined to the lungs.
    eff = f["Pleural Effusion"]
    if eff.strength:
        for side in (-1, 1) if eff.side == 0 else (eff.side,):
            lung, dome = (right, dome_r) if side < 0 else (left, dome_l)
            # A meniscus: the fluid line climbs along the lateral chest wall.
            level = dome - (0.08 + 0.14 * eff.strength) - 0.5 * np.maximum(X * side - 0.45, 0.0)
            img += 0.23 * _soft(level - Y, 0.04) * lung * (1.0 - soft_tissue)
    op = f["Lung Opacity"]
    if op.strength:
        cx = 0.42 * op.side if op.side else 0.42
        img += (
            0.12 * op.strength * _blob(X, Y, cx + rng.uniform(-0.08, 0.08), 0.0, 0.16, 0.18) * air
        )
    cons = f["Consolidation"]
    pna = f["Pneumonia"]
    if cons.strength or pna.strength:
        strength = max(cons.strength, pna.strength)
        side = cons.side or 1
        lobe = _ellipse(X, Y, 0.45 * side, 0.28, 0.2, 0.16, edge=0.04)
        img += 0.16 * strength * lobe * air * (1.0 - 0.4 * (markings > 0.6))
    edema = f["Edema"].strength
    if edema:  # perihilar "bat-wing" haze with indistinct vessels
        img += 0.11 * edema * (hila / hila.max()) * air
        img += 0.03 * edema * markings * air
    atel = f["Atelectasis"]
    if atel.strength:
        for side in (-1, 1) if atel.side == 0 else (atel.side,):
            dome = dome_r if side < 0 else dome_l
            band = np.exp(-(((Y - dome + 0.12) / 0.02) ** 2)) * _soft(
                np.abs(X - 0.42 * side) - 0.2, 0.03
            )
            img += 0.14 * atel.strength * band * air
    les = f["Lung Lesion"]
    if les.strength:
        radius = 0.03 + 0.015 * les.severity
        img += (
            0.22
            * min(les.strength, 1.0)
            * _ellipse(X, Y, 0.4 * les.side, -0.35, radius, radius, edge=0.006)
        )
    po = f["Pleural Other"]
    if po.strength:  # an apical pleural cap
        lung = right if po.side < 0 else left
        cap = _soft(Y + 0.62 - 0.3 * (X - 0.42 * po.side) ** 2, 0.01)
        img += 0.14 * min(po.strength, 1.0) * cap * lung
    if f["Support Devices"].strength:
        img += 0.35 * _devices(X, Y, study.devices)
    # A radiopaque side marker in a corner.
    img += 0.6 * _ellipse(X, Y, 0.8 if ap else -0.8, -0.9, 0.03, 0.04, p=8, edge=0.004)
    return img


def _devices(X: np.ndarray, Y: np.ndarray, devices: Sequence[str]) -> np.ndarray:
    out = np.zeros_like(X)
    lines = {
        "ett": [(0.0, -1.3), (0.01, -0.9), (0.015, -0.38)],
        "ngt": [(-0.03, -1.3), (-0.01, -0.6), (0.03, 0.2), (0.1, 0.55), (0.34, 0.66)],
        "cvc": [(-0.62, -0.74), (-0.3, -0.64), (-0.08, -0.45), (-0.06, -0.28)],
        "pacer": [(0.55, -0.58), (0.25, -0.45), (0.05, 0.0), (-0.02, 0.2), (0.12, 0.38)],
    }
    for name in devices:
        out = np.maximum(out, _polyline(X, Y, lines[name], 0.011))
        if name == "pacer":
            out = np.maximum(out, 1.6 * _ellipse(X, Y, 0.57, -0.6, 0.09, 0.06, p=4, edge=0.006))
    return out


def _lateral(X: np.ndarray, Y: np.ndarray, study: Study, rng: np.random.Generator) -> np.ndarray:
    """A lateral view, patient facing image left: heart in front, spine behind, one lung field."""
    f = study.findings
    img = np.full(X.shape, 0.03, dtype=np.float32)
    body = _ellipse(X, Y, 0.0, 0.15, 0.78, 1.2, p=3.0, edge=0.03)
    img += 0.30 * body
    dome = 0.5 - 0.16 * (1.0 - (X / 0.6) ** 2)
    lung = _ellipse(X, Y, 0.02, -0.08, 0.56, 0.7, p=2.4) * _soft(Y - dome, 0.02)
    cm = f["Cardiomegaly"].strength
    heart = _ellipse(X, Y, -0.22 - 0.03 * cm, 0.25, 0.28 + 0.07 * cm, 0.26 + 0.03 * cm, edge=0.03)
    markings = np.exp(-((_smooth_noise(rng, X.shape, 20) / 0.25) ** 2))
    air = lung * (1.0 - heart)
    img -= 0.22 * air
    img += 0.03 * markings * air
    img += 0.10 * heart * body
    spine = _soft(np.abs(X - 0.6) - 0.09, 0.01) * body
    img += 0.15 * spine * (1.0 + 0.5 * np.cos(2 * np.pi * Y / 0.1))
    img += 0.08 * _soft(np.abs(X + 0.66) - 0.02, 0.005) * _soft(np.abs(Y + 0.1) - 0.45, 0.02)
    img += 0.14 * _ellipse(X, Y, -0.05, -0.95, 0.4, 0.22, edge=0.05)  # raised arms
    if f["Pleural Effusion"].strength:  # fluid in the posterior costophrenic sulcus
        level = dome - 0.08 - 0.12 * f["Pleural Effusion"].strength
        img += 0.22 * _soft(level - Y, 0.03) * _soft(-(X - 0.15), 0.05) * lung
    haze = max(f["Lung Opacity"].strength, f["Consolidation"].strength, f["Pneumonia"].strength)
    if haze:
        img += 0.12 * haze * _blob(X, Y, 0.15, 0.05, 0.2, 0.2) * air
    if f["Edema"].strength:
        img += 0.08 * f["Edema"].strength * _blob(X, Y, 0.05, -0.05, 0.4, 0.4) * air
    if f["Support Devices"].strength:
        tubes = [d for d in study.devices if d in ("ett", "ngt")]
        for name in tubes:
            x = -0.1 if name == "ett" else 0.05
            img += 0.3 * _polyline(X, Y, [(x, -1.3), (x + 0.02, -0.35)], 0.011)
    return img


def render_image(study: Study, image: CxrImage, rng: np.random.Generator) -> np.ndarray:
    """An 8-bit radiograph (rows, columns) of one image of a study."""
    X, Y = _frame(image.rows, image.columns, rng)
    if image.view in ("LATERAL", "LL"):
        img = _lateral(X if image.view == "LATERAL" else -X, Y, study, rng)
    else:
        img = _frontal(X, Y, study, image.view == "AP", rng)
    img += rng.normal(0.0, 0.012, img.shape).astype(np.float32)  # quantum noise
    lo, hi = np.percentile(img, (0.5, 99.8))
    img = np.clip((img - lo) / max(hi - lo, 1e-3), 0.0, 1.0)
    img = img ** rng.uniform(0.8, 1.25)  # exposure / processing curve
    pil = Image.fromarray(np.rint(img * 255.0).astype(np.uint8))
    pil = pil.filter(ImageFilter.GaussianBlur(radius=0.5 * image.rows / 256))
    return np.asarray(pil)


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


# --------------------------------------------------------------------------- layout


def _hex_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, size=5))


def _views(rng: np.random.Generator, inpatient: bool, count: int) -> list[str]:
    if inpatient:
        views = ["AP"] + ["AP" if rng.random() < 0.6 else "LATERAL" for _ in range(count - 1)]
    else:
        second = "LL" if rng.random() < 0.25 else "LATERAL"
        views = (["PA", second, "PA"] if count == 3 else ["PA", second])[:count]
    return views


def _styles(rng: np.random.Generator, n: int) -> list[str]:
    """Report layouts: mostly both sections; every rare layout present once n >= 5."""
    p = np.array([0.72, 0.12, 0.08, 0.04, 0.04])
    styles = list(REPORT_STYLES[1:]) if n >= len(REPORT_STYLES) else []
    styles += [REPORT_STYLES[int(i)] for i in rng.choice(len(p), size=n - len(styles), p=p)]
    rng.shuffle(styles)
    return styles


def _plan(
    rng: np.random.Generator,
    subjects: int,
    studies_per_subject: Sequence[int],
    images_per_study: Sequence[int],
    size: int,
) -> list[Study]:
    ids = np.sort(rng.choice(9 * 10**6, size=subjects, replace=False)) + 10**7
    study_total = 0
    plan: list[Study] = []
    for sid in ids:
        inpatient_rate = rng.uniform(0.0, 1.0)
        day = date(2110, 1, 1) + timedelta(days=int(rng.integers(0, 365 * 60)))
        for _ in range(int(rng.integers(studies_per_subject[0], studies_per_subject[1] + 1))):
            inpatient = bool(rng.random() < inpatient_rate)
            findings = _draw_findings(rng, inpatient)
            devices = tuple(d for d in DEVICES if rng.random() < (0.6 if inpatient else 0.3)) or (
                "cvc",
            )
            plan.append(
                Study(
                    subject=str(sid),
                    study="",
                    inpatient=inpatient,
                    day=day,
                    findings=findings,
                    devices=devices,
                    style="",
                    wet_read=inpatient and rng.random() < 0.3,
                )
            )
            day += timedelta(days=int(rng.integers(1, 400)))
            study_total += 1
    study_ids = np.sort(rng.choice(9 * 10**6, size=study_total, replace=False)) + 5 * 10**7
    order = rng.permutation(study_total)  # study ids are not in date order in MIMIC-CXR
    for study, style, idx in zip(plan, _styles(rng, study_total), order, strict=True):
        study.study = str(study_ids[idx])
        study.style = style
        count = int(rng.integers(images_per_study[0], images_per_study[1] + 1))
        for view in _views(rng, study.inpatient, count):
            aspect = rng.uniform(0.82, 1.22)
            study.images.append(CxrImage(_hex_id(rng), view, size, max(8, round(size * aspect))))
    return plan


def _plan_corruptions(
    plan: list[Study], count: int, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """Mark ``count`` bad inputs, each in its own study, on frontal images (kept by the filter)."""
    kinds = list(CORRUPTIONS)
    free = [s for s in plan if any(im.view in ("PA", "AP") for im in s.images)]
    if count > len(free) // 2:
        raise ValueError(
            f"corrupt={count} is too many for {len(free)} studies; use at most {len(free) // 2}"
        )
    chosen = [free[int(i)] for i in rng.choice(len(free), size=count, replace=False)]
    out = []
    for i, study in enumerate(chosen):
        kind = kinds[i % len(kinds)]
        entry: dict[str, Any] = {
            "kind": kind,
            "reason": CORRUPTIONS[kind],
            "subject": study.subject,
            "study": study.study,
        }
        if kind in STUDY_LEVEL:
            study.corrupt = kind
            entry["images"] = [{"dicom_id": im.dicom_id, "view": im.view} for im in study.images]
        elif kind == "image_without_metadata":
            extra = CxrImage(
                _hex_id(rng), "PA", study.images[0].rows, study.images[0].columns, kind
            )
            study.images.append(extra)
            entry["images"] = [{"dicom_id": extra.dicom_id, "view": ""}]
        else:
            image = next(im for im in study.images if im.view in ("PA", "AP"))
            image.corrupt = kind
            entry["images"] = [{"dicom_id": image.dicom_id, "view": image.view}]
        out.append(entry)
    return out


def _write_csv(path: Path, header: Sequence[str], rows: list[Sequence[Any]], gz: bool) -> Path:
    path = path.with_name(path.name + ".gz") if gz else path
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    data = text.getvalue().encode("utf-8")
    if gz:  # mtime 0: the same seed gives the same bytes
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as fh:
            fh.write(data)
        data = buf.getvalue()
    path.write_bytes(data)
    return path


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def generate_mimic_cxr(
    root: str | Path,
    subjects: int = 60,
    studies_per_subject: Sequence[int] = (1, 3),
    images_per_study: Sequence[int] = (1, 3),
    size: int = 256,
    seed: int = 0,
    corrupt: int = 0,
    gz: bool = True,
) -> dict[str, Path]:
    """Write a synthetic MIMIC-CXR-JPG + reports download under ``root``; see the module doc.

    ``studies_per_subject`` and ``images_per_study`` are inclusive (min, max); ``size`` is the
    image height (widths vary by about +-20%). ``corrupt`` bad inputs (truncated JPEG, missing
    image, image without metadata row, missing report, empty report, label '2.0') are listed
    in corruptions.json with the reject reason each must give. ``gz=False`` writes plain CSVs.
    Returns the paths: root, reports_root, chexpert, negbio, metadata, split, corruptions,
    sources.
    """
    if subjects < 1:
        raise ValueError(f"subjects must be >= 1, got {subjects}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    for name, span in (
        ("studies_per_subject", studies_per_subject),
        ("images_per_study", images_per_study),
    ):
        if len(span) != 2 or not 1 <= span[0] <= span[1]:
            raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {tuple(span)}")
    if images_per_study[1] > 3:
        raise ValueError(
            f"images_per_study max is 3 (frontal, lateral, frontal), got {images_per_study[1]}"
        )
    out = Path(root)
    jpg_root, reports_root = out / "mimic-cxr-jpg", out / "mimic-cxr-reports"
    jpg_root.mkdir(parents=True, exist_ok=True)
    reports_root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    plan = _plan(rng, subjects, studies_per_subject, images_per_study, size)
    corruptions = _plan_corruptions(plan, corrupt, rng)
    strata: dict[tuple[str, str], bool] = {}
    for s in plan:  # stratified by the setting of the subject's first study
        strata.setdefault(("MIMIC-CXR", s.subject), s.inpatient)
    split_of = assign_splits(strata, (0.7, 0.1, 0.2), seed)

    metadata_rows, split_rows, chexpert_rows, negbio_rows = [], [], [], []
    for si, study in enumerate(plan):
        text_rng = np.random.default_rng([seed, si, 1])
        study.report = write_report(study, text_rng)
        report = report_file(reports_root, study.subject, study.study)
        report.parent.mkdir(parents=True, exist_ok=True)
        if study.corrupt == "empty_report":
            report.write_text(" " * 33 + "FINAL REPORT\n \n \n")
        elif study.corrupt != "missing_report":
            report.write_text(study.report)
        labels = study.labels()
        cells = [_cell(v) for v in labels]
        if study.corrupt == "invalid_label":
            cells[int(text_rng.integers(len(cells)))] = "2.0"
        chexpert_rows.append([study.subject, study.study, *cells])
        negbio_rows.append(
            [study.subject, study.study, *(_cell(v) for v in _negbio(labels, text_rng))]
        )
        minutes = int(text_rng.integers(0, 24 * 60))
        for ii, image in enumerate(study.images):
            path = image_file(jpg_root, study.subject, study.study, image.dicom_id, dicom=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            if image.corrupt != "missing_image":
                pixels = render_image(study, image, np.random.default_rng([seed, si, ii, 2]))
                data = _jpeg_bytes(pixels)
                if image.corrupt == "truncated_jpeg":
                    data = data[: len(data) * 3 // 5]
                path.write_bytes(data)
            if image.corrupt == "image_without_metadata":
                continue
            seconds = minutes * 60 + ii * 37
            metadata_rows.append(
                [
                    image.dicom_id,
                    study.subject,
                    study.study,
                    "CHEST (PORTABLE AP)" if study.inpatient else "CHEST (PA AND LAT)",
                    image.view,
                    image.rows,
                    image.columns,
                    study.day.strftime("%Y%m%d"),
                    f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}.{ii * 125:03d}",
                    "CHEST (PORTABLE AP)" if study.inpatient else "CHEST (PA AND LAT)",
                    VIEW_MEANING[image.view],
                    "Recumbent" if study.inpatient else "Erect",
                ]
            )
            official = OFFICIAL_SPLITS[split_of[("MIMIC-CXR", study.subject)]]
            split_rows.append([image.dicom_id, study.study, study.subject, official])

    chexpert_rows.sort(key=lambda r: (r[0], r[1]))
    negbio_rows.sort(key=lambda r: (r[0], r[1]))
    paths = {
        "root": jpg_root,
        "reports_root": reports_root,
        "chexpert": _write_csv(
            jpg_root / "mimic-cxr-2.0.0-chexpert.csv", LABEL_COLUMNS, chexpert_rows, gz
        ),
        "negbio": _write_csv(
            jpg_root / "mimic-cxr-2.0.0-negbio.csv", LABEL_COLUMNS, negbio_rows, gz
        ),
        "metadata": _write_csv(
            jpg_root / "mimic-cxr-2.0.0-metadata.csv", METADATA_COLUMNS, metadata_rows, gz
        ),
        "split": _write_csv(jpg_root / "mimic-cxr-2.0.0-split.csv", SPLIT_COLUMNS, split_rows, gz),
        "corruptions": out / "corruptions.json",
        "sources": out / "cxr_sources.json",
    }
    paths["corruptions"].write_text(json.dumps(corruptions, indent=2) + "\n")
    record = {
        "root": "mimic-cxr-jpg",
        "reports_root": "mimic-cxr-reports",
        "generator": {
            "subjects": subjects,
            "studies_per_subject": list(studies_per_subject),
            "images_per_study": list(images_per_study),
            "size": size,
            "seed": seed,
            "corrupt": corrupt,
            "gz": gz,
        },
        "counts": {
            "subjects": subjects,
            "studies": len(plan),
            "images": sum(len(s.images) for s in plan),
            "metadata_rows": len(metadata_rows),
        },
    }
    paths["sources"].write_text(json.dumps(record, indent=2) + "\n")
    log.info(
        "synthetic MIMIC-CXR: %d subjects, %d studies, %d images -> %s",
        subjects,
        len(plan),
        record["counts"]["images"],
        out,
    )
    return paths
