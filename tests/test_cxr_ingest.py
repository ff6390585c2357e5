"""MIMIC-CXR ingestion: labels and their load-time policy, report sections, DICOM and JPEG
decoding, the published layout read into records, and the shards written from it."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
import webdataset as wds
from PIL import Image
from pydicom.data import get_testdata_file
from shard_fixtures import read_samples

from shards.common import RecordError
from shards.cxr_labels import (
    LABEL_NAMES,
    LabelPolicyConfig,
    apply_uncertainty,
    labels_to_array,
    parse_label_cell,
)
from shards.cxr_reports import extract_text, read_report
from shards.mimic_cxr import CxrRecord, cxr_key, read_mimic_cxr, write_cxr_shards
from shards.synthetic.cxr import generate_mimic_cxr
from shards.xray_images import (
    decode_png,
    encode_png,
    load_square,
    read_dicom,
    read_jpeg,
    square_resize,
)

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
SIZE = 32
RG1 = get_testdata_file("RG1_UNCR.dcm")
META_FIELDS = {
    "subject",
    "study",
    "dicom_id",
    "view",
    "split",
    "labels",
    "label_names",
    "report_source",
    "labeler",
    "source_path",
}

# --------------------------------------------------------------------------- labels


def test_label_names_are_the_csv_columns_in_order() -> None:
    assert LABEL_NAMES == (
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


@pytest.mark.parametrize(
    "cell, value",
    [("1.0", 1.0), ("0.0", 0.0), ("-1.0", -1.0), ("1", 1.0), ("0", 0.0), ("-1", -1.0)]
    + [("", None), ("  ", None)],
)
def test_parse_label_cell_accepts_the_published_values(cell: str, value) -> None:
    assert parse_label_cell(cell) == value


@pytest.mark.parametrize("cell", ["2.0", "1.00", "nan", "yes", "+1", "0.5", "-0"])
def test_parse_label_cell_rejects_anything_else(cell: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(cell))):
        parse_label_cell(cell)


NAN = float("nan")
RAW = np.array([1, 0, -1, NAN, 1, 0, -1, NAN, 1, NAN, 0, -1, NAN, 1], dtype=np.float32)
POS, NEG, UNC, BLANK = RAW == 1, RAW == 0, RAW == -1, np.isnan(RAW)


@pytest.mark.parametrize(
    "policy, blank, uncertain_target, uncertain_mask, blank_mask",
    [
        ("ignore", "negative", 0.0, 0.0, 1.0),
        ("ignore", "masked", 0.0, 0.0, 0.0),
        ("zeros", "negative", 0.0, 1.0, 1.0),
        ("zeros", "masked", 0.0, 1.0, 0.0),
        ("ones", "negative", 1.0, 1.0, 1.0),
        ("ones", "masked", 1.0, 1.0, 0.0),
    ],
)
def test_uncertainty_policies(policy, blank, uncertain_target, uncertain_mask, blank_mask) -> None:
    targets, mask = apply_uncertainty(RAW, policy, blank)
    assert targets.dtype == mask.dtype == np.float32 and targets.shape == mask.shape == (14,)
    expected_t = np.select([POS, NEG, UNC, BLANK], [1.0, 0.0, uncertain_target, 0.0])
    expected_m = np.select([POS, NEG, UNC, BLANK], [1.0, 1.0, uncertain_mask, blank_mask])
    np.testing.assert_array_equal(targets, expected_t.astype(np.float32))
    np.testing.assert_array_equal(mask, expected_m.astype(np.float32))
    cfg_t, cfg_m = LabelPolicyConfig(uncertain=policy, blank=blank).apply(RAW)
    np.testing.assert_array_equal(cfg_t, targets)
    np.testing.assert_array_equal(cfg_m, mask)


def test_label_policy_config_defaults_and_bad_values() -> None:
    cfg = LabelPolicyConfig()
    assert (cfg.uncertain, cfg.blank) == ("ones", "negative")
    with pytest.raises(ValueError, match="uncertain='maybe'"):
        LabelPolicyConfig(uncertain="maybe")
    with pytest.raises(ValueError, match="blank='zero'"):
        LabelPolicyConfig(blank="zero")
    with pytest.raises(ValueError, match="1, 0, -1 or NaN"):
        apply_uncertainty(np.full(14, 2.0, dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        apply_uncertainty(np.zeros((2, 14), dtype=np.float32))
    targets, mask = apply_uncertainty(np.array([1.0, -1.0, np.nan], dtype=np.float32))
    assert targets.tolist() == [1.0, 1.0, 0.0] and mask.tolist() == [1.0, 1.0, 1.0]


def test_labels_to_array_reads_the_json_list() -> None:
    values = [1.0, None, -1.0, 0.0] + [None] * 10
    arr = labels_to_array(values)
    assert arr.dtype == np.float32 and arr[0] == 1 and np.isnan(arr[1]) and arr[2] == -1
    assert int(np.isnan(arr).sum()) == 11
    with pytest.raises(ValueError, match="expected 5 labels, got 14"):
        labels_to_array(values, count=5)


# --------------------------------------------------------------------------- reports

# Real reports keep a space on their "blank" lines and after a header's colon.
WRAPPED = "\n".join(
    [
        " WET READ: ___ ___ ___ 8:24 PM",
        "  Small right effusion.",
        " " + "_" * 78,
        " " * 33 + "FINAL REPORT",
        " EXAMINATION:  CHEST (PA AND LAT)",
        " ",
        " INDICATION:  ___F with new onset ascites  // eval for infection",
        " ",
        " TECHNIQUE:  Chest PA and lateral",
        " ",
        " COMPARISON:  None.",
        " ",
        " FINDINGS: ",
        " ",
        " There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral",
        " nodular opacities that most likely represent nipple shadows. Compared to ___,",
        " the cardiomediastinal silhouette is normal.",
        " ",
        " IMPRESSION: ",
        " ",
        " No acute cardiopulmonary process.",
        "",
    ]
)


def test_findings_and_impression_joined_wrapped_lines_and_blanks_kept() -> None:
    text, source = extract_text(WRAPPED)
    assert source == "findings+impression"
    assert text == (
        "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular "
        "opacities that most likely represent nipple shadows. Compared to ___, the "
        "cardiomediastinal silhouette is normal. No acute cardiopulmonary process."
    )
    assert "Small right effusion" not in text and "INDICATION" not in text


@pytest.mark.parametrize(
    "body, text, source",
    [
        (
            " IMPRESSION:  Mild cardiomegaly.\n Small left\n effusion.\n",
            "Mild cardiomegaly. Small left effusion.",
            "impression",
        ),
        (" FINDINGS:\n\n Lungs are clear.\n", "Lungs are clear.", "findings"),
        (" FINDINGS:\n \n IMPRESSION:  Edema.\n", "Edema.", "impression"),
        (" FINDINGS AND IMPRESSION:  Low lung volumes.\n", "Low lung volumes.", "impression"),
        (
            " INDICATION:  cough\n COMPARISON:  ___\n CONCLUSION:  No pneumonia.\n",
            "No pneumonia.",
            "fallback:conclusion",
        ),
        (
            " REPORT:  Tube in place.\n NOTIFICATION:  Dr. ___ was told at ___.\n",
            "Tube in place.",
            "fallback:report",
        ),
        (
            " CHEST RADIOGRAPH PERFORMED ON ___\n\n Heart size is normal.\n",
            "CHEST RADIOGRAPH PERFORMED ON ___ Heart size is normal.",
            "fallback:body",
        ),
    ],
)
def test_section_choice_and_each_fallback(body: str, text: str, source: str) -> None:
    report = " " * 33 + "FINAL REPORT\n" + body
    assert extract_text(report) == (text, source)


def test_requested_sections_and_headerless_text() -> None:
    assert extract_text(WRAPPED, sections=("impression",)) == (
        "No acute cardiopulmonary process.",
        "impression",
    )
    # No FINAL REPORT line: nothing is taken for preamble.
    assert extract_text("Lungs are clear.\n") == ("Lungs are clear.", "fallback:body")


@pytest.mark.parametrize(
    "report",
    [
        "",
        "   \n",
        " " * 33 + "FINAL REPORT\n \n",
        " FINDINGS:\n \n IMPRESSION:\n",
        # header boilerplate only: never training text
        " INDICATION:  ___M with fever\n COMPARISON:  None.\n",
        " CHEST RADIOGRAPH PERFORMED ON ___\n\n EXAMINATION:  CHEST\n FINDINGS:\n",
    ],
)
def test_empty_report_raises(report: str) -> None:
    with pytest.raises(RecordError) as err:
        extract_text(report, path="/x/s5.txt")
    assert err.value.reason == "empty_report" and err.value.path == "/x/s5.txt"


def test_read_report_names_missing_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(RecordError) as err:
        read_report(tmp_path / "s1.txt")
    assert err.value.reason == "missing_report" and err.value.path.endswith("s1.txt")
    (tmp_path / "s2.txt").write_bytes(b"\xff\xfe FINDINGS: \x80\x81")
    with pytest.raises(RecordError) as err:
        read_report(tmp_path / "s2.txt")
    assert err.value.reason == "unreadable_report"


# --------------------------------------------------------------------------- images


def test_dicom_monochrome1_is_inverted_and_16_bit_depth_kept() -> None:
    raw = pydicom.dcmread(RG1).pixel_array
    img = read_dicom(RG1)
    assert img.dtype == np.float32 and img.shape == raw.shape == (1955, 1841)
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0
    assert len(np.unique(img)) > 256 * 16  # 15-bit data, not squeezed to 8 bits
    # Lungs (either side of the spine, upper chest) are dark, the mediastinum bright.
    lungs = np.concatenate([img[450:800, 400:650].ravel(), img[450:800, 1150:1400].ravel()])
    mediastinum = img[450:1100, 860:980]
    assert lungs.mean() + 0.15 < mediastinum.mean()
    assert np.corrcoef(img.ravel()[::97], raw.ravel()[::97].astype(np.float64))[0, 1] < -0.99


def test_dicom_monochrome2_is_not_inverted(tmp_path: Path) -> None:
    ds = pydicom.dcmread(RG1)
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.save_as(tmp_path / "m2.dcm")
    np.testing.assert_allclose(read_dicom(tmp_path / "m2.dcm"), 1.0 - read_dicom(RG1), atol=1e-6)


def test_dicom_stored_as_16_bit_png() -> None:
    array, bits = load_square(RG1, 224)
    assert bits == 16 and array.dtype == np.uint16 and array.shape == (224, 224)
    assert len(np.unique(array)) > 256
    png = encode_png(array)
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "I;16" and im.size == (224, 224)
        assert np.array_equal(np.asarray(im), array)
    decoded = decode_png(png)
    assert decoded.dtype == np.float32 and len(np.unique(decoded)) > 256
    assert abs(float(decoded.max()) - float(array.max()) / 65535) < 1e-6


@pytest.mark.parametrize("kind", ["truncated", "garbage", "missing"])
def test_corrupt_dicom_is_a_record_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bad.dcm"
    if kind == "truncated":
        path.write_bytes(Path(RG1).read_bytes()[:200_000])
    elif kind == "garbage":
        path.write_bytes(b"not a dicom file at all" * 100)
    with pytest.raises(RecordError) as err:
        read_dicom(path)
    assert err.value.path == str(path) and "bad.dcm" in str(err.value)
    assert err.value.reason == ("missing_image" if kind == "missing" else "unreadable_dicom")


def test_jpeg_keeps_aspect_with_a_centre_crop(tmp_path: Path) -> None:
    wide = np.zeros((100, 220), dtype=np.uint8)
    wide[:, 60:160] = 200  # the central square is bright, the sides (cropped away) dark
    Image.fromarray(wide).save(tmp_path / "wide.jpg", quality=95)
    array, bits = load_square(tmp_path / "wide.jpg", 40)
    assert bits == 8 and array.dtype == np.uint8 and array.shape == (40, 40)
    assert array[:, 3:-3].min() > 150  # nothing of the dark sides left, no squashing
    tall = Image.fromarray(wide.T.copy())
    assert square_resize(tall, 40).size == (40, 40)
    assert np.asarray(square_resize(tall, 40))[3:-3, :].min() > 150


@pytest.mark.parametrize(
    "kind, reason", [("truncated", "truncated_image"), ("garbage", "unreadable_image")]
)
def test_bad_jpeg_is_a_record_error(tmp_path: Path, kind: str, reason: str) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (300, 280), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG")
    data = buf.getvalue()[: len(buf.getvalue()) // 2] if kind == "truncated" else b"\x00" * 500
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    with pytest.raises(RecordError) as err:
        read_jpeg(path, 64)
    assert err.value.reason == reason and err.value.path == str(path)


# --------------------------------------------------------------------------- the layout


def read_csv(path: Path) -> list[dict[str, str]]:
    """A table read with the csv module alone (independent of the code under test)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, dict[str, Path]]:
    out = {}
    for name, gz in (("gz", True), ("plain", False)):
        root = tmp_path_factory.mktemp(f"cxr_{name}")
        out[name] = generate_mimic_cxr(root, subjects=20, size=64, seed=3, corrupt=6, gz=gz)
    return out


@pytest.fixture(scope="module")
def written(trees, tmp_path_factory) -> tuple[Path, dict]:
    paths = trees["gz"]
    out = tmp_path_factory.mktemp("cxr_shards")
    report = write_cxr_shards(
        paths["root"], paths["reports_root"], out, size=SIZE, samples_per_shard=7
    )
    return out, report


def _relative(rec: CxrRecord, paths: dict[str, Path]) -> tuple:
    return (
        rec.subject,
        rec.study,
        rec.dicom_id,
        rec.view,
        rec.split,
        rec.labels,
        rec.labeler,
        rec.image_path.relative_to(paths["root"]),
        rec.report_path.relative_to(paths["reports_root"]),
        rec.text,
        rec.report_source,
    )


def test_gz_and_plain_tables_give_the_same_records(trees) -> None:
    assert trees["gz"]["metadata"].name.endswith(".csv.gz")
    assert trees["plain"]["metadata"].name.endswith(".csv")
    scans = {name: read_mimic_cxr(p["root"], p["reports_root"]) for name, p in trees.items()}
    gz, plain = scans["gz"], scans["plain"]
    assert len(gz.records) > 20
    assert [_relative(r, trees["gz"]) for r in gz.records] == [
        _relative(r, trees["plain"]) for r in plain.records
    ]
    assert [r.reason for r in gz.rejects] == [r.reason for r in plain.rejects]
    assert gz.filtered == plain.filtered and gz.records_in == plain.records_in


def test_every_record_matches_the_published_tables(trees) -> None:
    paths = trees["plain"]
    scan = read_mimic_cxr(paths["root"], paths["reports_root"])
    meta = {r["dicom_id"]: r for r in read_csv(paths["metadata"])}
    split = {r["dicom_id"]: r["split"] for r in read_csv(paths["split"])}
    labels = {r["study_id"]: r for r in read_csv(paths["chexpert"])}
    folder = {"train": "train", "validate": "val", "test": "test"}
    for rec in scan.records:
        row = meta[rec.dicom_id]
        assert (rec.subject, rec.study, rec.view) == (
            row["subject_id"],
            row["study_id"],
            row["ViewPosition"],
        )
        assert rec.view in ("PA", "AP") and rec.split == folder[split[rec.dicom_id]]
        expected = tuple(
            None if labels[rec.study][n] == "" else float(labels[rec.study][n]) for n in LABEL_NAMES
        )
        assert rec.labels == expected and rec.labeler == "chexpert"
        sid = rec.subject
        assert (
            rec.image_path
            == paths["root"]
            / "files"
            / f"p{sid[:2]}"
            / f"p{sid}"
            / (f"s{rec.study}")
            / f"{rec.dicom_id}.jpg"
        )
        assert rec.report_path == paths["reports_root"] / "files" / f"p{sid[:2]}" / f"p{sid}" / (
            f"s{rec.study}.txt"
        )
        assert (rec.text, rec.report_source) == extract_text(rec.report_path.read_text())
        assert rec.key == f"p{sid}_s{rec.study}_{rec.dicom_id}"


def test_view_filter_counts(trees) -> None:
    paths = trees["gz"]
    views = Counter(r["ViewPosition"] for r in read_csv(paths["metadata"]))
    frontal = read_mimic_cxr(paths["root"], paths["reports_root"])
    assert dict(frontal.filtered) == {v: n for v, n in views.items() if v not in ("PA", "AP")}
    assert sum(frontal.filtered.values()) > 0
    every = read_mimic_cxr(paths["root"], paths["reports_root"], views=None)
    assert sum(every.filtered.values()) == 0 and every.records_in == frontal.records_in
    assert {r.view for r in every.records} >= {"PA", "AP", "LATERAL"}
    lateral = read_mimic_cxr(paths["root"], paths["reports_root"], views=["lateral", "LL"])
    assert sum(lateral.filtered.values()) == views["PA"] + views["AP"]
    assert {r.view for r in lateral.records} <= {"LATERAL", "LL"}
    for scan in (frontal, every, lateral):
        n_filtered = sum(scan.filtered.values())
        assert scan.records_in == len(scan.records) + len(scan.rejects) + n_filtered
    # records_in: every metadata row plus every image on disk that no row names
    assert frontal.records_in == sum(views.values()) + frontal.stats["images_without_metadata"]


def test_negbio_labeler_reads_its_own_table(trees) -> None:
    paths = trees["plain"]
    scan = read_mimic_cxr(paths["root"], paths["reports_root"], labeler="negbio")
    negbio = {r["study_id"]: r for r in read_csv(paths["negbio"])}
    assert scan.records and all(r.labeler == "negbio" for r in scan.records)
    for rec in scan.records:
        row = negbio[rec.study]
        assert rec.labels == tuple(None if row[n] == "" else float(row[n]) for n in LABEL_NAMES)
    # The '2.0' was injected in the chexpert table only.
    assert "invalid_label" not in {r.reason for r in scan.rejects}
    with pytest.raises(ValueError, match="labeler 'chexbert'"):
        read_mimic_cxr(paths["root"], paths["reports_root"], labeler="chexbert")


def test_missing_tables_and_columns_fail_at_start(tmp_path: Path, trees) -> None:
    (tmp_path / "files").mkdir()
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-metadata.csv.gz"):
        read_mimic_cxr(tmp_path, tmp_path)
    for kind in ("chexpert", "negbio", "split"):
        shutil.copy(trees["plain"][kind], tmp_path)
    (tmp_path / "mimic-cxr-2.0.0-metadata.csv").write_text("dicom_id,subject_id,study_id\n")
    with pytest.raises(ValueError, match="ViewPosition"):
        read_mimic_cxr(tmp_path, tmp_path)


# --------------------------------------------------------------------------- shards


def test_every_record_is_written_rejected_or_filtered(trees, written) -> None:
    out, report = written
    total = report["written"]["total"] + report["rejected"]["total"] + report["filtered"]["total"]
    assert report["records_in"] == total
    assert report["written"]["total"] == sum(report["written"][s] for s in SPLITS)
    meta = read_csv(trees["gz"]["metadata"])
    samples = read_samples(out)
    keys = {s["__key__"] for split in SPLITS for s in samples[split]}
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == report["rejected"]["total"]
    rejected_text = " ".join(r["source"] + " " + r["detail"] for r in rejects)
    for row in meta:
        key = cxr_key(row["subject_id"], row["study_id"], row["dicom_id"])
        frontal = row["ViewPosition"] in ("PA", "AP")
        assert (key in keys) == (frontal and row["dicom_id"] not in rejected_text), key
    assert report["filtered"]["total"] == sum(r["ViewPosition"] not in ("PA", "AP") for r in meta)


def test_each_corruption_gives_its_reason_and_path(trees, written) -> None:
    out, report = written
    corruptions = json.loads(trees["gz"]["corruptions"].read_text())
    assert [c["reason"] for c in corruptions] == [
        "truncated_image",
        "missing_image",
        "image_without_metadata",
        "missing_report",
        "empty_report",
        "invalid_label",
    ]
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    expected: Counter[str] = Counter()
    for c in corruptions:
        hit = [r for r in rejects if r["reason"] == c["reason"]]
        for image in c["images"]:
            if image["view"] in ("LATERAL", "LL"):
                continue  # filtered by view before anything is read
            expected[c["reason"]] += 1
            mine = [r for r in hit if image["dicom_id"] in r["source"] + r["detail"]]
            assert len(mine) == 1, (c, hit)
            source = mine[0]["source"]
            if c["reason"] in ("missing_report", "empty_report"):
                assert source.endswith(f"p{c['subject']}/s{c['study']}.txt")
            elif c["reason"] == "invalid_label":
                assert re.search(r"mimic-cxr-2\.0\.0-chexpert\.csv\.gz:\d+$", source)
                assert "'2.0'" in mine[0]["detail"]
            else:
                assert source.endswith(f"s{c['study']}/{image['dicom_id']}.jpg")
    assert report["rejected"]["by_reason"] == dict(expected)


def test_sample_format_round_trip(trees, written) -> None:
    out, report = written
    labels = {r["study_id"]: r for r in read_csv(trees["gz"]["chexpert"])}
    sources = Counter()
    for split, rows in read_samples(out).items():
        assert len(rows) == report["written"][split]
        for s in rows:
            assert set(s) == {"__key__", "__shard__", "img.png", "txt", "json"}
            assert re.fullmatch(r"p\d{8}_s\d{8}_[0-9a-f]{8}(-[0-9a-f]{8}){4}", s["__key__"])
            with Image.open(io.BytesIO(s["img.png"])) as im:
                assert im.format == "PNG" and im.mode == "L" and im.size == (SIZE, SIZE)
                pixels = np.asarray(im)
            assert pixels.std() > 10  # an image, not a blank
            meta = json.loads(s["json"])
            assert set(meta) == META_FIELDS
            assert meta["split"] == split and meta["labeler"] == "chexpert"
            assert meta["label_names"] == list(LABEL_NAMES) and meta["view"] in ("PA", "AP")
            assert s["__key__"] == cxr_key(meta["subject"], meta["study"], meta["dicom_id"])
            row = labels[meta["study"]]
            assert meta["labels"] == [None if row[n] == "" else float(row[n]) for n in LABEL_NAMES]
            sub, study = meta["subject"], meta["study"]
            folder = Path("files") / f"p{sub[:2]}" / f"p{sub}"
            source = trees["gz"]["root"] / folder / f"s{study}" / f"{meta['dicom_id']}.jpg"
            assert meta["source_path"] == str(source) and source.is_file()
            report_path = trees["gz"]["reports_root"] / folder / f"s{study}.txt"
            text, src = extract_text(report_path.read_text())
            assert s["txt"].decode("utf-8") == text and meta["report_source"] == src
            sources[src] += 1
    assert (
        sources["findings+impression"] > 0 and sum(sources.values()) == report["written"]["total"]
    )
    assert dict(sources) == report["report_sources"]


def test_webdataset_decodes_the_shards(written) -> None:
    out, report = written
    urls = [str(p) for p in sorted((out / "train").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("l"))
    assert len(samples) == report["written"]["train"]
    first = samples[0]
    assert first["img.png"].shape == (SIZE, SIZE) and first["img.png"].dtype == np.float32
    assert isinstance(first["json"], dict) and isinstance(first["txt"], str)
    raw = labels_to_array(first["json"]["labels"])
    targets, mask = apply_uncertainty(raw, "ignore", "masked")
    assert mask.sum() == np.isin(raw, (0.0, 1.0)).sum()


def test_manifests_match_the_files(written) -> None:
    out, report = written
    samples = read_samples(out)
    for split in SPLITS:
        manifest = json.loads((out / split / "manifest.json").read_text())
        assert manifest["format"] == "medalign-cxr-v1" and manifest["split"] == split
        assert manifest["image_size"] == SIZE and manifest["bit_depth"] == 8
        assert manifest["label_names"] == list(LABEL_NAMES)
        assert manifest["num_samples"] == report["written"][split]
        names = [s["name"] for s in manifest["shards"]]
        assert names == sorted(p.name for p in (out / split).glob("*.tar"))
        assert names == [f"{split}-{i:06d}.tar" for i in range(len(names))]
        per_shard = Counter(s["__shard__"] for s in samples[split])
        for shard in manifest["shards"]:
            data = (out / split / shard["name"]).read_bytes()
            assert shard["bytes"] == len(data)
            assert shard["sha256"] == hashlib.sha256(data).hexdigest()
            assert shard["num_samples"] == per_shard[shard["name"]] <= 7
    assert report["written"]["train"] > 7  # several shards were exercised


def test_subjects_never_cross_splits(written) -> None:
    out, _ = written
    owner: dict[str, str] = {}
    for split, rows in read_samples(out).items():
        for s in rows:
            subject = json.loads(s["json"])["subject"]
            assert owner.setdefault(subject, split) == split, subject
    assert set(owner.values()) == set(SPLITS)


def test_same_inputs_give_identical_shards_with_two_workers(trees, written, tmp_path) -> None:
    out, report = written
    paths = trees["gz"]
    again = write_cxr_shards(
        paths["root"], paths["reports_root"], tmp_path, size=SIZE, samples_per_shard=7, workers=2
    )
    for split in SPLITS:
        first = json.loads((out / split / "manifest.json").read_text())
        second = json.loads((tmp_path / split / "manifest.json").read_text())
        assert first["shards"] == second["shards"]
    assert again["rejected"] == report["rejected"]
    assert (tmp_path / "rejects.jsonl").read_text() == (out / "rejects.jsonl").read_text()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": 4}, "size must be >= 8"),
        ({"samples_per_shard": 0}, "samples_per_shard must be >= 1"),
        ({"labeler": "chexbert"}, "labeler 'chexbert'"),
    ],
)
def test_bad_arguments_raise(trees, tmp_path: Path, kwargs, message) -> None:
    paths = trees["gz"]
    with pytest.raises(ValueError, match=message):
        write_cxr_shards(paths["root"], paths["reports_root"], tmp_path, **kwargs)


# --------------------------------------------------------------------------- DICOM tree

SUBJECT, STUDY = "10000032", "50414267"
DICOM_ID = "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"
REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:

 Mild cardiomegaly.  Possible small left
 pleural effusion.

 IMPRESSION:

 Possible small left pleural effusion.
"""


def _dicom_tree(root: Path) -> None:
    """A one-study MIMIC-CXR (DICOM) tree: the real RG1 radiograph, a corrupt file, a lateral."""
    study = root / "files" / "p10" / f"p{SUBJECT}" / f"s{STUDY}"
    study.mkdir(parents=True)
    shutil.copy(RG1, study / f"{DICOM_ID}.dcm")
    (study / "bad-dicom.dcm").write_bytes(b"\x00" * 1000)
    (study / "lateral-1.dcm").write_bytes(b"\x00" * 10)  # filtered before it is read
    (study.parent / f"s{STUDY}.txt").write_text(REPORT)
    head = "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,"
    head += "Columns,StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,"
    head += "ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning\n"
    rows = [
        f"{DICOM_ID},{SUBJECT},{STUDY},CHEST (PA AND LAT),PA,1955,1841,21800506,213014.531,"
        "CHEST (PA AND LAT),postero-anterior,Erect",
        f"bad-dicom,{SUBJECT},{STUDY},CHEST (PA AND LAT),PA,2000,2000,21800506,213015,,,",
        f"lateral-1,{SUBJECT},{STUDY},CHEST (PA AND LAT),LATERAL,2000,2000,21800506,213016,,,",
    ]
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text(head + "\n".join(rows) + "\n")
    splits = [f"{d},{STUDY},{SUBJECT},validate" for d in (DICOM_ID, "bad-dicom", "lateral-1")]
    (root / "mimic-cxr-2.0.0-split.csv").write_text(
        "dicom_id,study_id,subject_id,split\n" + "\n".join(splits) + "\n"
    )
    cells = ["", "1.0", "", "", "", "", "", "", "", "-1.0", "", "", "0.0", ""]
    text = ",".join(["subject_id", "study_id", *LABEL_NAMES]) + "\n"
    text += ",".join([SUBJECT, STUDY, *cells]) + "\n"
    with gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "wt") as fh:
        fh.write(text)


def test_dicom_tree_exact_record_and_16_bit_shards(tmp_path: Path) -> None:
    _dicom_tree(tmp_path / "mimic")
    scan = read_mimic_cxr(tmp_path / "mimic", dicom=True)
    study = tmp_path / "mimic" / "files" / "p10" / f"p{SUBJECT}"
    assert scan.records[0] == CxrRecord(
        subject=SUBJECT,
        study=STUDY,
        dicom_id=DICOM_ID,
        view="PA",
        split="val",
        labels=(None, 1.0, None, None, None, None, None, None, None, -1.0, None, None, 0.0, None),
        labeler="chexpert",
        image_path=study / f"s{STUDY}" / f"{DICOM_ID}.dcm",
        report_path=study / f"s{STUDY}.txt",
        text="Mild cardiomegaly. Possible small left pleural effusion. "
        "Possible small left pleural effusion.",
        report_source="findings+impression",
    )
    assert len(scan.records) == 2 and dict(scan.filtered) == {"LATERAL": 1}

    out = tmp_path / "shards"
    report = write_cxr_shards(tmp_path / "mimic", None, out, size=224, dicom=True)
    assert report["records_in"] == 3 and report["written"]["val"] == 1
    assert report["rejected"]["by_reason"] == {"unreadable_dicom": 1}
    assert report["filtered"] == {"total": 1, "by_view": {"LATERAL": 1}}
    reject = json.loads((out / "rejects.jsonl").read_text())
    assert reject["source"].endswith("bad-dicom.dcm") and reject["reason"] == "unreadable_dicom"
    (sample,) = read_samples(out)["val"]
    with Image.open(io.BytesIO(sample["img.png"])) as im:
        assert im.mode == "I;16" and im.size == (224, 224)
        stored = np.asarray(im)
    assert stored.dtype == np.uint16 and len(np.unique(stored)) > 256
    assert stored[40:80, 50:90].mean() < stored[40:120, 106:118].mean()  # lung < mediastinum
    assert json.loads((out / "val" / "manifest.json").read_text())["bit_depth"] == 16


# --------------------------------------------------------------------------- command line


def test_command_line_round_trip(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "shards"
    gen = [sys.executable, str(REPO / "scripts" / "make_synthetic_cxr.py"), "--root", str(raw)]
    gen += ["--subjects", "4", "--size", "48", "--corrupt", "1", "--seed", "5", "--plain-csv"]
    subprocess.run(gen, check=True, capture_output=True, text=True, cwd=tmp_path)
    assert (raw / "mimic-cxr-jpg" / "mimic-cxr-2.0.0-split.csv").is_file()
    make = [sys.executable, str(REPO / "scripts" / "make_cxr_shards.py"), "--synthetic-root"]
    make += [str(raw), "--out", str(out), "--size", "16", "--views", "all"]
    done = subprocess.run(make, check=True, capture_output=True, text=True, cwd=tmp_path)
    report = json.loads((out / "report.json").read_text())
    assert f"{report['records_in']} records in -> {report['written']['total']} written" in (
        done.stdout
    )
    assert report["rejected"]["by_reason"] == {"truncated_image": 1}
    assert report["filtered"]["total"] == 0 and report["views"] is None
    bad = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_cxr_shards.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "--synthetic-root" in bad.stderr


def test_a_wrapped_line_is_not_taken_for_a_header() -> None:
    # "NG TUBE:" starts a wrapped line inside the findings: not a section (no blank line
    # before it, not a section name), so the findings keep their second half.
    report = (
        " FINDINGS:\n\n The lungs are clear. Support devices are in place, the\n"
        " NG TUBE: tip in the stomach. No effusion.\n\n IMPRESSION:  No acute process.\n"
    )
    text, source = extract_text(report)
    assert source == "findings+impression"
    assert "tip in the stomach. No effusion." in text
    # findings left without a header after a header-only section are kept, not rejected
    report = (
        " EXAMINATION:  CHEST (PA AND LAT)\n\n INDICATION:\n\n ___F with cough\n\n"
        " COMPARISON:  ___\n\n The lungs are clear. No effusion.\n"
    )
    assert extract_text(report) == ("The lungs are clear. No effusion.", "fallback:unlabeled")
    # an unknown upper-case name at a paragraph start is a section, as before
    text, source = extract_text(" PA AND LATERAL VIEWS OF THE CHEST:\n\n Lungs are clear.\n")
    assert (text, source) == ("Lungs are clear.", "fallback:pa and lateral views of the chest")


@pytest.mark.parametrize(
    "marker", ["___", "_____", "XXXX", "XX", "[**Hospital 1234**]", "[** First Name **]"]
)
def test_deidentification_markers_become_one_token(marker: str) -> None:
    text, _ = extract_text(f" FINDINGS:  Compared to {marker}, the lungs are clear.\n")
    assert text == "Compared to ___, the lungs are clear."
    # words that merely contain X are untouched
    assert extract_text(" FINDINGS:  XR of the chest, LEXX.\n")[0] == "XR of the chest, LEXX."
