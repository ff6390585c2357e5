"""The synthetic MIMIC-CXR download: the published layout and tables, reports whose wording
gives the labels, images whose appearance follows the labels, and the injected bad inputs."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.cxr_labels import LABEL_NAMES
from shards.cxr_reports import extract_text
from shards.synthetic.cxr import (
    FINDINGS,
    CxrImage,
    Finding,
    Study,
    generate_mimic_cxr,
    render_image,
)

METADATA_HEADER = [
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
]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic_cxr")
    return generate_mimic_cxr(root, subjects=24, size=64, seed=1)


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic_cxr_bad")
    return generate_mimic_cxr(root, subjects=12, size=48, seed=2, corrupt=6, gz=False)


def test_tables_have_the_published_headers(clean) -> None:
    assert read_csv(clean["metadata"])[0] == METADATA_HEADER
    assert read_csv(clean["split"])[0] == ["dicom_id", "study_id", "subject_id", "split"]
    for labeler in ("chexpert", "negbio"):
        assert read_csv(clean[labeler])[0] == ["subject_id", "study_id", *LABEL_NAMES]
        assert clean[labeler].name == f"mimic-cxr-2.0.0-{labeler}.csv.gz"
    for _, rows in (read_csv(clean["chexpert"]), read_csv(clean["negbio"])):
        cells = {row[name] for row in rows for name in LABEL_NAMES}
        assert cells == {"1.0", "0.0", "-1.0", ""}


def test_tree_layout_and_ids(clean) -> None:
    _, meta = read_csv(clean["metadata"])
    root = clean["root"]
    for row in meta:
        sid, study, dicom_id = row["subject_id"], row["study_id"], row["dicom_id"]
        assert re.fullmatch(r"1\d{7}", sid) and re.fullmatch(r"5\d{7}", study)
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", dicom_id)
        path = root / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{study}" / f"{dicom_id}.jpg"
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "L"
            assert im.size == (int(row["Columns"]), int(row["Rows"])) and im.height == 64
        report = clean["reports_root"] / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{study}.txt"
        assert report.read_text().lstrip().startswith(("FINAL REPORT", "WET READ"))
        assert re.fullmatch(r"2\d{7}", row["StudyDate"])
    n_images = len(list(root.glob("files/p1*/p1*/s5*/*.jpg")))
    assert n_images == len(meta) == len({r["dicom_id"] for r in meta})
    sources = json.loads(clean["sources"].read_text())
    assert clean["sources"].parent / sources["root"] == clean["root"]
    assert sources["counts"]["images"] == n_images


def test_views_studies_and_splits(clean) -> None:
    _, meta = read_csv(clean["metadata"])
    _, splits = read_csv(clean["split"])
    views = Counter(r["ViewPosition"] for r in meta)
    assert set(views) == {"PA", "AP", "LATERAL", "LL"}
    by_study = defaultdict(list)
    for r in meta:
        by_study[r["study_id"]].append(r)
    assert all(rows[0]["ViewPosition"] in ("PA", "AP") for rows in by_study.values())
    assert {len(rows) for rows in by_study.values()} == {1, 2, 3}
    per_subject = Counter(r["subject_id"] for r in read_csv(clean["chexpert"])[1])
    assert set(per_subject.values()) == {1, 2, 3}
    assert {r["dicom_id"] for r in splits} == {r["dicom_id"] for r in meta}
    owner: dict[str, str] = {}
    for r in splits:
        assert owner.setdefault(r["subject_id"], r["split"]) == r["split"]
    assert set(owner.values()) == {"train", "validate", "test"}


def test_reports_word_the_labels(clean) -> None:
    _, labels = read_csv(clean["chexpert"])
    sources = Counter()
    checked = Counter()
    blanked = 0
    for row in labels:
        sid, study = row["subject_id"], row["study_id"]
        path = clean["reports_root"] / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{study}.txt"
        text, source = extract_text(path.read_text())
        sources[source] += 1
        blanked += "___" in path.read_text()
        rules = {
            ("Cardiomegaly", "1.0"): r"[Cc]ardiomegaly\.|heart is \w+ enlarged",
            ("Cardiomegaly", "0.0"): r"Heart size is normal",
            ("Pleural Effusion", "0.0"): r"No [a-z ,]*pleural effusion",
            ("Pleural Effusion", "-1.0"): r"Possible small \w+ pleural effusion",
            ("Pleural Effusion", "1.0"): r"(Small|Moderate|Large) \w+ pleural effusion",
            ("Edema", "-1.0"): r"There may be mild pulmonary edema",
            ("Pneumothorax", "0.0"): r"No [a-z ,]*pneumothorax",
            ("Pneumonia", "-1.0"): r"Pneumonia cannot be excluded",
            ("Support Devices", "1.0"): r"tube|catheter|pacemaker",
        }
        for (name, value), pattern in rules.items():
            if row[name] == value:
                assert re.search(pattern, text, flags=re.IGNORECASE), (name, value, text)
                checked[name, value] += 1
        if row["No Finding"] == "1.0":
            assert all(row[n] not in ("1.0", "-1.0") for n in FINDINGS if n != "Support Devices")
            assert "No acute cardiopulmonary process" in text
    assert set(sources) == {
        "findings+impression",
        "impression",
        "findings",
        "fallback:conclusion",
        "fallback:body",
    }
    assert len(checked) == len(rules)  # every rule was exercised
    assert blanked > 0.7 * len(labels)  # de-identified spans in most reports


def _render(view: str = "PA", **present: float) -> np.ndarray:
    findings = {n: Finding(None) for n in FINDINGS}
    for name, side in present.items():
        findings[name.replace("_", " ")] = Finding(1.0, 1.4, int(side), 2)
    study = Study(
        "10000001", "50000001", False, date(2150, 1, 1), findings, ("ett", "ngt"), "both", False
    )
    # The same rng seed: same pose, noise and texture, only the finding differs.
    return render_image(study, CxrImage("x", view, 128, 128), np.random.default_rng(7)).astype(
        np.float32
    )


def test_images_follow_the_findings() -> None:
    normal = _render()
    # Cardiomegaly: the heart shadow widens into the lower lung fields.
    assert (_render(Cardiomegaly=0) - normal)[75:105, 25:105].mean() > 8
    # Left effusion (image right): the left lung base fills, the right one does not.
    effusion = _render(Pleural_Effusion=1) - normal
    assert effusion[70:95, 85:115].mean() > 10 and abs(effusion[70:95, 13:43].mean()) < 2
    # Right pneumothorax (image left apex): hyperlucent, no lung markings; the left apex as it was.
    ptx = _render(Pneumothorax=-1) - normal
    assert ptx[24:44, 22:36].mean() < -10 and abs(ptx[24:44, 92:106].mean()) < 2
    # Support devices: a bright tube down the midline.
    assert (_render(Support_Devices=1) - normal)[5:40, 60:68].max() > 40
    # Edema: bilateral perihilar density.
    edema = _render(Edema=0) - normal
    assert edema[45:75, 25:50].mean() > 5 and edema[45:75, 80:105].mean() > 5
    # Frontal: a bright midline (spine, mediastinum) between two dark lungs. Lateral: one lung
    # field across the middle, the spine behind it (image right; image left for LL).
    mid, left, right = np.s_[30:80, 58:70], np.s_[30:80, 22:32], np.s_[30:80, 96:106]
    assert normal[mid].mean() > max(normal[left].mean(), normal[right].mean()) + 80
    lateral, ll = _render("LATERAL"), _render("LL")
    assert lateral[mid].mean() + 40 < lateral[right].mean()
    assert ll[mid].mean() + 40 < ll[left].mean()


def test_label_dependent_intensity_across_the_generated_set(clean) -> None:
    """Cardiomegaly studies are brighter in the lower central field, on the real files."""
    _, meta = read_csv(clean["metadata"])
    labels = {r["study_id"]: r for r in read_csv(clean["chexpert"])[1]}
    groups: dict[str, list[float]] = {"1.0": [], "no": []}
    for row in meta:
        if row["ViewPosition"] != "PA":
            continue
        sid = row["subject_id"]
        path = clean["root"] / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{row['study_id']}"
        img = np.asarray(Image.open(path / f"{row['dicom_id']}.jpg"), dtype=np.float32)
        h, w = img.shape
        value = labels[row["study_id"]]["Cardiomegaly"]
        band = img[int(0.58 * h) : int(0.78 * h), int(0.3 * w) : int(0.75 * w)].mean()
        groups["1.0" if value == "1.0" else "no"].append(band / img.mean())
    assert len(groups["1.0"]) >= 2 and len(groups["no"]) >= 5
    assert np.mean(groups["1.0"]) > np.mean(groups["no"])


def test_same_seed_same_bytes_and_plain_equals_gz(clean, tmp_path: Path) -> None:
    again = generate_mimic_cxr(tmp_path / "a", subjects=24, size=64, seed=1, gz=False)
    for kind in ("metadata", "split", "chexpert", "negbio"):
        assert gzip.decompress(clean[kind].read_bytes()) == again[kind].read_bytes()
    first = sorted(clean["root"].glob("files/*/*/*/*.jpg"))[:5]
    for path in first:
        assert path.read_bytes() == (again["root"] / path.relative_to(clean["root"])).read_bytes()
    other = generate_mimic_cxr(tmp_path / "b", subjects=24, size=64, seed=9, gz=True)
    assert other["metadata"].read_bytes() != clean["metadata"].read_bytes()


def test_corruptions_are_injected_as_recorded(corrupt) -> None:
    entries = json.loads(corrupt["corruptions"].read_text())
    assert [e["kind"] for e in entries] == [
        "truncated_jpeg",
        "missing_image",
        "image_without_metadata",
        "missing_report",
        "empty_report",
        "invalid_label",
    ]
    assert corrupt["metadata"].name == "mimic-cxr-2.0.0-metadata.csv"
    _, meta = read_csv(corrupt["metadata"])
    in_meta = {r["dicom_id"] for r in meta}
    assert len({e["study"] for e in entries}) == 6  # one study each

    def image(e: dict, i: int = 0) -> Path:
        sid = e["subject"]
        folder = corrupt["root"] / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{e['study']}"
        return folder / f"{e['images'][i]['dicom_id']}.jpg"

    def report(e: dict) -> Path:
        sid = e["subject"]
        return corrupt["reports_root"] / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{e['study']}.txt"

    kinds = {e["kind"]: e for e in entries}
    with pytest.raises(OSError, match="truncated"):
        Image.open(image(kinds["truncated_jpeg"])).load()
    assert kinds["truncated_jpeg"]["images"][0]["view"] in ("PA", "AP")
    assert not image(kinds["missing_image"]).exists()
    assert kinds["missing_image"]["images"][0]["dicom_id"] in in_meta
    orphan = image(kinds["image_without_metadata"])
    assert orphan.is_file() and orphan.stem not in in_meta
    assert not report(kinds["missing_report"]).exists()
    assert report(kinds["empty_report"]).read_text().split() == ["FINAL", "REPORT"]
    _, labels = read_csv(corrupt["chexpert"])
    bad = [r for r in labels if "2.0" in r.values()]
    assert len(bad) == 1 and bad[0]["study_id"] == kinds["invalid_label"]["study"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"subjects": 0}, "subjects must be >= 1"),
        ({"size": 16}, "size must be >= 32"),
        ({"images_per_study": (2, 1)}, "images_per_study must be"),
        ({"images_per_study": (1, 4)}, "max is 3"),
        ({"subjects": 2, "corrupt": 6}, "corrupt=6 is too many"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        generate_mimic_cxr(tmp_path, **kwargs)


def test_images_are_plausible_radiographs(clean) -> None:
    path = sorted(clean["root"].glob("files/*/*/*/*.jpg"))[0]
    img = np.asarray(Image.open(io.BytesIO(path.read_bytes())), dtype=np.float32)
    assert img.min() < 30 and img.max() > 220 and img.std() > 30
