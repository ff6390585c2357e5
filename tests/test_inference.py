"""Inference on new files (trainer/inference.py, scripts/predict.py): a finished run, fed the
source files its shards were written from, reproduces its own test predictions and zero-shot
scores; clinical records render as the AD writer rendered them; bad inputs name what is wrong."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    cxr_overrides,
    run_cmd,
    shard_samples,
    tiny_overrides,
    train_cmd,
)
from pydicom.data import get_testdata_file
from safetensors import safe_open

from shards.ad_writer import _preprocess
from shards.cxr_labels import LABEL_NAMES as CXR_LABEL_NAMES
from shards.xray_images import decode_png, png_job
from trainer.inference import Predictor

ATOL = 1e-5  # batches differ from the run's (size, text padding): equal up to float noise


def _predict_main():
    spec = importlib.util.spec_from_file_location("predict_cli", REPO / "scripts" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


predict_main = _predict_main()


@pytest.fixture(scope="module")
def ad_classify_run(ad_shards, tiny_bert, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ad_classify")
    overrides = tiny_overrides(ad_shards, tiny_bert, out, task="classify")
    run_cmd(train_cmd(*overrides, "train.max_steps=3", "train.eval_splits=[test]"))
    return out


@pytest.fixture(scope="module")
def cxr_zero_shot_run(cxr_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cxr_zero_shot")
    overrides = cxr_overrides(cxr_data, out, "pretrain")
    extra = ["model.cross_layers_image=1", "model.cross_layers_text=1", "train.zero_shot=true"]
    run_cmd(train_cmd(*overrides, *extra))
    return out


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _logits(path: Path) -> dict[str, list[float]]:
    return {r["key"]: r["logits"] for r in map(json.loads, path.read_text().splitlines())}


def _assert_same_logits(ours: Path, run: Path) -> None:
    mine, own = _logits(ours), _logits(run)
    assert sorted(mine) == sorted(own)
    keys = sorted(own)
    torch.testing.assert_close(
        torch.tensor([mine[k] for k in keys]),
        torch.tensor([own[k] for k in keys]),
        rtol=0,
        atol=ATOL,
    )


def test_multilabel_run_reproduced_from_source_images(cxr_multilabel_run, cxr_data, tmp_path):
    samples = shard_samples(cxr_data["shards"] / "test")
    rows = [[s["key"], s["meta"]["source_path"]] for s in samples]
    table = _write_csv(tmp_path / "images.csv", ["key", "image"], rows)
    out = tmp_path / "pred"
    assert predict_main([str(cxr_multilabel_run), "--csv", str(table), "--out", str(out)]) == 0
    _assert_same_logits(out / "predictions.jsonl", cxr_multilabel_run / "predictions_test.jsonl")
    first = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert list(first["probs"]) == list(CXR_LABEL_NAMES)
    expected = torch.tensor(first["logits"]).sigmoid()
    torch.testing.assert_close(torch.tensor(list(first["probs"].values())), expected)
    with safe_open(str(out / "embeddings.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["keys"]) == [s["key"] for s in samples]
        assert fh.get_tensor("image_emb").shape == (len(samples), 32)  # the head's input


def test_ad_classify_run_reproduced_from_volumes_texts_and_records(
    ad_classify_run, ad_shards, tmp_path
):
    samples = shard_samples(ad_shards / "test")
    own = ad_classify_run / "predictions_test.jsonl"
    run = str(ad_classify_run)
    # The volumes' NIfTI / Analyze files with the stored texts ...
    rows = [[s["key"], s["meta"]["source_path"], s["text"]] for s in samples]
    texts = _write_csv(tmp_path / "texts.csv", ["key", "image", "text"], rows)
    assert predict_main([run, "--csv", str(texts), "--out", str(tmp_path / "a")]) == 0
    _assert_same_logits(tmp_path / "a" / "predictions.jsonl", own)
    # ... the clinical fields instead of the texts, rendered as the writer renders them ...
    fields = sorted({f for s in samples for f in s["meta"]["fields"]})
    rows = [
        [s["key"], s["meta"]["source_path"], *(s["meta"]["fields"].get(f, "") for f in fields)]
        for s in samples
    ]
    records = _write_csv(tmp_path / "records.csv", ["key", "image", *fields], rows)
    assert predict_main([run, "--csv", str(records), "--out", str(tmp_path / "b")]) == 0
    _assert_same_logits(tmp_path / "b" / "predictions.jsonl", own)
    # ... and the shards themselves, decoded by the reader.
    shards = ["--shards", str(ad_shards / "test"), "--batch-size", "5", "--npy"]
    assert predict_main([run, *shards, "--out", str(tmp_path / "c")]) == 0
    _assert_same_logits(tmp_path / "c" / "predictions.jsonl", own)
    row = json.loads((tmp_path / "c" / "predictions.jsonl").read_text().splitlines()[0])
    assert list(row["probs"]) == ["NC", "MCI", "AD"]
    assert sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-6)
    keys = json.loads((tmp_path / "c" / "keys.json").read_text())
    assert len(keys) == len(samples) and (tmp_path / "c" / "image_emb.npy").is_file()


def test_clinical_records_render_as_the_writer(ad_classify_run, ad_shards):
    predictor = Predictor.from_run(ad_classify_run)
    assert predictor.word_limit == 40  # recorded in the training split's manifest
    for sample in shard_samples(ad_shards / "test"):
        fields = sample["meta"]["fields"]
        assert predictor.clinical_text(fields) == sample["text"]
        as_cells = {key: str(value) for key, value in fields.items()}  # a CSV row's strings
        as_cells.update(subject_id="x", diagnosis="AD")  # bookkeeping, never rendered
        assert predictor.clinical_text(as_cells) == sample["text"]


def test_zero_shot_equals_the_runs_own(cxr_zero_shot_run, cxr_data):
    predictor = Predictor.from_run(cxr_zero_shot_run)
    rows = [json.loads(line) for line in (cxr_zero_shot_run / "zero_shot_test.jsonl").open()]
    sources = {
        s["key"]: s["meta"]["source_path"] for s in shard_samples(cxr_data["shards"] / "test")
    }
    probs = predictor.zero_shot([sources[r["key"]] for r in rows])
    torch.testing.assert_close(probs, torch.tensor([r["probs"] for r in rows]), rtol=0, atol=ATOL)
    # Image and report embeddings are the ITC ones: unit vectors of model.embed_dim.
    emb = predictor.embed_images([sources[rows[0]["key"]]])
    assert emb.shape == (1, 16) and float(emb.norm()) == pytest.approx(1.0, abs=1e-5)
    assert predictor.embed_texts(["No acute process.", "Small effusion."]).shape == (2, 16)


def test_images_are_what_the_writer_stored_and_the_reader_reads(
    cxr_multilabel_run, ad_classify_run, cxr_data, ad_shards, tmp_path
):
    cxr = Predictor.from_run(cxr_multilabel_run)
    dicom = get_testdata_file("RG1_UNCR.dcm")  # MONOCHROME1, 15-bit: a 16-bit PNG sample
    jpeg = shard_samples(cxr_data["shards"] / "test")[0]["meta"]["source_path"]
    for path in (dicom, jpeg):
        _, png, reason, _ = png_job((path, 32))
        assert png is not None, reason
        assert np.array_equal(cxr.load_image(path), decode_png(png)[None]), path
    ad = Predictor.from_run(ad_classify_run)
    volume = shard_samples(ad_shards / "test")[0]["meta"]["source_path"]
    _, stored, reason, _ = _preprocess((volume, 16))  # the AD writer's float16 cube
    assert stored is not None, reason
    expected = np.load(io.BytesIO(stored)).astype(np.float32)[None]
    assert np.array_equal(ad.load_image(volume), expected)


def test_bad_inputs_name_the_file_or_column(
    cxr_multilabel_run, ad_classify_run, ad_shards, tmp_path, capsys
):
    cxr = Predictor.from_run(cxr_multilabel_run)
    with pytest.raises(FileNotFoundError, match="missing.jpg: no such image file"):
        cxr.predict(images=[tmp_path / "missing.jpg"])
    volume = shard_samples(ad_shards / "test")[0]["meta"]["source_path"]
    with pytest.raises(ValueError, match=rf"{volume}: the model is 2D .* got a 3D volume"):
        cxr.embed_images([volume])
    with pytest.raises(ValueError, match="reads no text"):
        cxr.embed_texts(["a report"])
    ad = Predictor.from_run(ad_classify_run)
    with pytest.raises(ValueError, match="logits of this model needs texts"):
        ad.predict(images=[volume])
    with pytest.raises(ValueError, match=r"scan.png: the model is 3D"):
        ad.predict(images=[tmp_path / "scan.png"], texts=["a text"])
    table = _write_csv(tmp_path / "t.csv", ["key", "image", "report"], [["a", "a.jpg", "x"]])
    out = str(tmp_path / "out")
    assert predict_main([str(cxr_multilabel_run), "--csv", str(table), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "t.csv: unknown column(s) ['report']; this model reads key, image" in err
    assert predict_main([str(cxr_multilabel_run), "--images", "nope.dcm", "--out", out]) == 2
    assert "nope.dcm: no such image file" in capsys.readouterr().err
