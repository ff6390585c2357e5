"""End to end through `python train.py`: artifacts, exact resume, fine-tuning from pretraining."""

from __future__ import annotations

import json

import pytest
from conftest import run_cmd, tiny_overrides, train_cmd
from safetensors.torch import load_file

from trainer.metrics_log import read_metrics


def losses(run_dir) -> dict[int, dict[str, float]]:
    return {
        r["step"]: {k: v for k, v in r.items() if k.startswith("train/") and k.endswith("loss")}
        for r in read_metrics(run_dir / "metrics.jsonl")
        if "train/loss" in r
    }


@pytest.fixture(scope="module")
def pretrained(ad_shards, tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    run_cmd(
        train_cmd(
            *tiny_overrides(ad_shards, tiny_bert, out), "train.max_steps=6", "train.save_every=3"
        )
    )
    return out


def test_pretrain_run_folder(pretrained):
    for name in (
        "config.yaml",
        "launch.json",
        "metrics.jsonl",
        "losses.png",
        "model.safetensors",
        "results.json",
    ):
        assert (pretrained / name).is_file(), name
    assert (pretrained / "tensorboard").is_dir()
    steps = losses(pretrained)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert set(steps[1]) == {"train/loss", "train/itc_loss", "train/mae_loss", "train/mlm_loss"}
    results = json.loads((pretrained / "results.json").read_text())
    assert set(results["val"]) == {"itc_loss", "mae_loss", "mlm_loss"}
    assert json.loads((pretrained / "launch.json").read_text())["num_processes"] == 1
    assert (pretrained / "checkpoints" / "step_0000006" / "trainer_state.json").is_file()


def test_resume_gives_identical_following_losses(pretrained, ad_shards, tiny_bert, tmp_path):
    ckpt = pretrained / "checkpoints" / "step_0000003"
    # keep_last=2 keeps step 3 next to the final step 6.
    assert ckpt.is_dir()
    run_cmd(
        train_cmd(
            *tiny_overrides(ad_shards, tiny_bert, tmp_path),
            "train.max_steps=6",
            "train.save_every=3",
            "--resume",
            str(ckpt),
        )
    )
    first, resumed = losses(pretrained), losses(tmp_path)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        for key, value in first[step].items():
            assert resumed[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)


def test_finetune_classifier_from_pretrained(pretrained, ad_shards, tiny_bert, tmp_path):
    proc = run_cmd(
        train_cmd(
            *tiny_overrides(ad_shards, tiny_bert, tmp_path, task="classify"),
            "train.max_steps=4",
            f"train.init_from={pretrained}",
            "train.eval_splits=[val, test]",
        )
    )
    assert "init_from" in proc.stderr and "loaded" in proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    test = results["test"]
    assert 0.0 <= test["acc"] <= 1.0 and 0.0 <= test["f1"] <= 1.0
    assert sum(map(sum, test["confusion"])) == test["n"]
    n_test = json.loads((ad_shards / "test" / "manifest.json").read_text())["num_samples"]
    assert test["n"] == n_test  # every test sample scored once, padding excluded
    assert set(test["per_cohort"]) <= {"ADNI", "OASIS-2", "NACC", "AIBL", "MIRIAD"}
    assert f"test: ACC {test['acc']:.4f}" in proc.stdout
    for name in ("roc_test.png", "confusion_test.png", "predictions_test.jsonl"):
        assert (tmp_path / name).is_file()
    # The image tower came from the pretraining run: its weights start equal, then train.
    before = load_file(str(pretrained / "model.safetensors"))
    after = load_file(str(tmp_path / "model.safetensors"))
    shared = [k for k in after if k in before and k.startswith("visual.")]
    assert shared, "no image-tower weights shared with pretraining"
