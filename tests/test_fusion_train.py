"""The CNN + recurrent-text fusion classifier through `python train.py` (model.arch=fusion):
each preset's fusion mode trains, precision / recall / F1 / accuracy are reported (checked
against scikit-learn), and early stopping ends the run on the best validation weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, run_cmd, train_cmd
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from trainer.config import load_config
from trainer.evaluate import classification_metrics

MODES = ("early", "late", "intermediate")


def _overrides(ad_shards, tiny_bert, out) -> list[str]:
    return [
        *(f"data.{s}={ad_shards / s}" for s in ("train", "val", "test")),
        "data.batch_size=4",
        "data.shuffle_buffer=16",
        f"model.text.checkpoint={tiny_bert}",
        "model.text.max_length=48",
        "model.fusion.image.widths=[8,16]",
        "model.fusion.image.blocks_per_stage=[1,1]",
        "train.progress=false",
        "train.log_every=1",
        f"train.output_dir={out}",
    ]


@pytest.mark.parametrize("mode", MODES)
def test_fusion_preset_trains_and_reports_prf(ad_shards, tiny_bert, tmp_path, mode):
    preset = REPO / "configs" / f"ad_fusion_{mode}.yaml"
    cfg = load_config(str(preset))
    assert cfg.model.arch == "fusion" and cfg.model.fusion.mode == mode
    assert cfg.train.early_stop_metric == "f1"
    proc = run_cmd(
        train_cmd(
            "--config",
            str(preset),
            *_overrides(ad_shards, tiny_bert, tmp_path),
            "train.max_steps=2",
            "train.eval_every=1",
            "train.eval_splits=[test]",
        )
    )
    test = json.loads((tmp_path / "results.json").read_text())["test"]
    n_test = json.loads((ad_shards / "test" / "manifest.json").read_text())["num_samples"]
    assert test["n"] == n_test
    assert all(0.0 <= test[k] <= 1.0 for k in ("acc", "precision", "recall", "f1"))
    assert f"P {test['precision']:.4f}  R {test['recall']:.4f}  F1 {test['f1']:.4f}" in proc.stdout
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("image.") for k in weights) and "text.embed.weight" in weights


def test_early_stopping_restores_the_best_weights(ad_shards, tiny_bert, tmp_path):
    # "n" (the sample count) never improves: the run stops after `patience` evaluations and
    # must end on the first evaluation's weights although training went on after it.
    run_cmd(
        train_cmd(
            "--config",
            str(REPO / "configs" / "ad_fusion_late.yaml"),
            *_overrides(ad_shards, tiny_bert, tmp_path),
            "train.max_steps=20",
            "train.eval_every=1",
            "train.save_every=1",
            "train.keep_last=10",
            "train.early_stop_metric=n",
            "train.early_stop_patience=2",
            "train.eval_splits=[val]",
        )
    )
    summary = json.loads((tmp_path / "results.json").read_text())["early_stopping"]
    assert summary["best_step"] == 1 and summary["stopped_at"] == 3
    exported = load_file(str(tmp_path / "model.safetensors"))
    best = load_file(str(tmp_path / "checkpoints" / "best" / "model.safetensors"))
    step2 = load_file(str(tmp_path / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert all(torch.equal(exported[k], best[k]) for k in best)
    assert any(not torch.equal(exported[k], step2[k]) for k in step2)


def test_early_stopping_names_a_missing_metric(ad_shards, tiny_bert, tmp_path):
    cmd = train_cmd(
        "--config",
        str(REPO / "configs" / "ad_fusion_late.yaml"),
        *_overrides(ad_shards, tiny_bert, tmp_path),
        "train.max_steps=2",
        "train.eval_every=1",
        "train.early_stop_metric=f2",
    )
    with pytest.raises(
        AssertionError,
        match=r"early_stop_metric='f2'.*expected one of \['acc', 'auc', 'cls_loss', 'f1'",
    ):
        run_cmd(cmd)


def test_classification_metrics_match_scikit_learn():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 3, generator=gen)
    labels = torch.randint(0, 3, (40,), generator=gen)
    got = classification_metrics(logits, labels, 3)
    pred = logits.argmax(1).numpy()
    y = labels.numpy()
    assert got["acc"] == pytest.approx(accuracy_score(y, pred))
    for key, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        assert got[key] == pytest.approx(fn(y, pred, average="macro", zero_division=0)), key
