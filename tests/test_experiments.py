"""The paper preset as a user runs it, evaluate-only on a finished run, and every row of the
Alifuse tables in the quick size."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO, TINY_VISION, run_cmd, train_cmd

from trainer.alifuse_tables import EXPERIMENTS
from trainer.chexpert_transfer import COMPETITION
from trainer.chexpert_transfer import transfer as chexpert_transfer
from trainer.cxr_tables import table1 as mae_llama_table1
from trainer.experiment import finite_table
from trainer.fusion_tables import table1 as fusion_table1

QUICK = {
    "alifuse-table2": lambda: EXPERIMENTS["alifuse-table2"](),
    "alifuse-table3": lambda: EXPERIMENTS["alifuse-table3"](),
    "mae-llama-table1": lambda: mae_llama_table1("quick"),
    "fusion-table1": lambda: fusion_table1("quick"),
}

# Widths only: every other value is the paper preset's (configs/ad_alifuse_joint.yaml).
TINY_WIDTHS = [
    *TINY_VISION,
    "model.text_decoder.depth=1",
    "model.text_decoder.width=32",
    "model.text_decoder.num_heads=2",
    "model.fusion_hidden=32",
    "model.embed_dim=16",
]


def experiment_cmd(name: str, out: Path) -> list[str]:
    """scripts/experiment.py at the quick size, 100 bootstrap resamples, 2 rows at a time."""
    script = str(REPO / "scripts" / "experiment.py")
    return [
        sys.executable, script, name, "--quick", "--bootstrap", "100", "--jobs", "2",
        "--out", str(out),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def paper_run(ad_shards, tiny_bert, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("paper_run")
    run_cmd(
        train_cmd(
            "--config",
            str(REPO / "configs" / "ad_alifuse_joint.yaml"),
            *TINY_WIDTHS,
            f"data.train={ad_shards / 'train'}",
            f"data.val={ad_shards / 'val'}",
            f"data.test={ad_shards / 'test'}",
            "data.batch_size=4",
            "data.eval_batch_size=8",
            f"model.text.checkpoint={tiny_bert}",
            "train.max_steps=3",
            "train.log_every=1",
            "train.eval_every=0",
            "train.save_every=0",
            "train.progress=false",
            "train.eval_splits=[test]",
            f"train.output_dir={out}",
        )
    )
    return out


def test_the_paper_preset_builds_at_tiny_widths_and_trains(paper_run) -> None:
    cfg = yaml.safe_load((paper_run / "config.yaml").read_text())
    model = cfg["model"]
    assert model["task"] == "joint" and model["cross_attention"] == "between"
    assert model["cross_layers_image"] == model["cross_layers_text"] == "all"
    assert model["unimodal_image"] == "full" and model["shared_mask_ratio"] is True
    assert model["vision"]["pos_embed"] == "learnable" and model["vision"]["mask_ratio"] == 0.5
    assert model["text_decoder"]["kind"] == "transformer"
    assert model["fusion_activation"] == "relu" and model["fusion_features"] == "unimodal"
    assert cfg["data"]["clinical"] == {"drop": ["imaging_measures", "other"], "summary_words": 40}
    steps = [json.loads(line) for line in (paper_run / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in steps if "train/loss" in r]
    assert len(trained) == 3
    for key in ("itc_loss", "mae_loss", "mlm_loss", "cls_loss"):
        assert all(r[f"train/{key}"] > 0 for r in trained), key
    test = json.loads((paper_run / "results.json").read_text())["test"]
    assert 0 <= test["acc"] <= 1 and test["n"] > 0
    assert {"itc_loss", "mae_loss", "mlm_loss", "cls_loss"} <= set(test)


def test_evaluate_reproduces_the_runs_own_test_numbers(paper_run, ad_shards, tmp_path) -> None:
    own = json.loads((paper_run / "results.json").read_text())["test"]
    out = tmp_path / "eval"
    proc = run_cmd(
        [
            sys.executable,
            str(REPO / "scripts" / "evaluate.py"),
            str(paper_run),
            "--split",
            str(ad_shards / "test"),
            "--out",
            str(out),
        ]
    )
    assert "test: ACC" in proc.stdout
    again = json.loads((out / "results.json").read_text())["test"]
    assert set(again) == set(own)
    for key, value in own.items():
        if isinstance(value, float):
            assert again[key] == pytest.approx(value, abs=1e-6), key
    assert again["per_cohort"].keys() == own["per_cohort"].keys()
    for cohort, result in own["per_cohort"].items():
        assert again["per_cohort"][cohort]["acc"] == pytest.approx(result["acc"], abs=1e-6)
        assert again["per_cohort"][cohort]["confusion"] == result["confusion"]
    mine = (out / "predictions_test.jsonl").read_text()
    assert mine == (paper_run / "predictions_test.jsonl").read_text()
    assert (out / "roc_test.png").is_file()


def test_evaluate_refuses_what_it_cannot_score(paper_run, tmp_path) -> None:
    cmd = [sys.executable, str(REPO / "scripts" / "evaluate.py"), str(tmp_path), "--split", "x"]
    with pytest.raises(AssertionError, match="not a run folder"):
        run_cmd(cmd)


@pytest.fixture(scope="module")
def quick_tables(tmp_path_factory) -> dict[str, Path]:
    """Both tables at the quick size, sharing one synthetic dataset (written once)."""
    root = tmp_path_factory.mktemp("experiments")
    outs = {}
    for name in QUICK:
        outs[name] = root / name
        run_cmd(experiment_cmd(name, outs[name]), timeout=1200)
    # CheXpert transfer of a run the MAE + LLaMA table trained (ITC with an attention pool)
    run_dir = outs["mae-llama-table1"] / "stages" / "align_margin_frozen" / "seed0"
    outs["chexpert-transfer"] = root / "chexpert-transfer"
    cmd = experiment_cmd("chexpert-transfer", outs["chexpert-transfer"])
    run_cmd([*cmd[:3], str(run_dir), *cmd[3:], "--set", "train.max_steps=10"], timeout=1200)
    outs["chexpert-transfer-run"] = run_dir
    return outs


@pytest.mark.parametrize("name", list(QUICK))
def test_quick_experiment_fills_every_row(quick_tables, name) -> None:
    out = quick_tables[name]
    exp = QUICK[name]()
    results = json.loads((out / "results.json").read_text())
    assert finite_table(results, exp)
    table = (out / "results.md").read_text()
    for row in exp.rows:
        assert f"| {row.label} |" in table, row.label
        if row.skip:
            assert f"- {row.label}: " in table
            continue
        for col in exp.columns:
            entry = results["scores"][row.key][col.name]
            for m in exp.metrics:
                assert entry[f"{m}_ci"] is not None, (row.key, m)
                assert entry[f"{m}_ci"][0] <= entry[m] <= entry[f"{m}_ci"][1], (row.key, m)
                if row.key != exp.reference:
                    assert 0 <= entry[f"{m}_p"] <= 1
    assert (out / "results.png").stat().st_size > 10_000
    for row in exp.rows:
        if not row.skip:
            assert (out / "runs" / row.key / "seed0" / "config.yaml").is_file()
            assert results["scores"][row.key][exp.columns[0].name]["seeds"] == 1
    if name == "alifuse-table2":  # zero-shot columns, binary cohorts scored as binary
        scores = results["scores"]["alifuse"]
        assert scores["OASIS-2"]["scoring"] == scores["MIRIAD"]["scoring"] == "binary"
        assert scores["AIBL"]["scoring"] == "three_class"
        assert "AIBL †" in table
    if name == "mae-llama-table1":  # per-label AUROC, and one shared MAE stage per seed
        assert "## Per-label AUROC (test)" in table and "| Pleural Effusion |" in table
        assert (out / "stages" / "mae" / "seed0" / "model.safetensors").is_file()
        assert len(list((out / "stages").iterdir())) == 4  # mae + three alignments
        scores = results["scores"]["ours"]["test"]
        assert (
            sum(
                k.startswith("auroc:") and not k.endswith(("_ci", "_p", "_sd", "_seed"))
                for k in scores
            )
            >= 14
        )
    if name == "fusion-table1":  # Table I and the Fig. 4 ablations as two tables
        assert "## Table I" in table and "## Fig. 4 ablations" in table
        assert table.count("| Table I | Our (CNN + Transformer + RNN, attention fusion) |") == 2


def test_chexpert_transfer_of_a_mimic_run(quick_tables) -> None:
    out, run_dir = quick_tables["chexpert-transfer"], quick_tables["chexpert-transfer-run"]
    exp = chexpert_transfer(
        "quick", SimpleNamespace(run_dir=run_dir)
    )  # 1 / 10 / 100 % x probe / fine-tune
    results = json.loads((out / "results.json").read_text())
    assert finite_table(results, exp) and len(exp.rows) == 6
    for row in exp.rows:  # every row started from the run's tower, at its vision settings
        config = yaml.safe_load((out / "runs" / row.key / "seed0" / "config.yaml").read_text())
        assert config["train"]["init_from"] == str(run_dir)
        assert config["model"]["vision"]["img_size"] == 32
        fraction = float(row.key.split("_")[1].removesuffix("pct")) / 100
        assert config["data"]["label_fraction"] == pytest.approx(fraction)
    zs = results["zero_shot"]["5x200"]
    assert zs["n"] == 100 and zs["classes"] == list(COMPETITION)  # 5 x 20 at the quick size
    assert sum(map(sum, zs["confusion"])) == 100
    assert all(sum(row) == 20 for row in zs["confusion"])  # 20 images of each class
    assert zs["acc_ci"][0] <= zs["acc"] <= zs["acc_ci"][1]
    labels = results["zero_shot"]["test_14_labels"]
    assert 0.0 <= labels["mauc"] <= 1.0 and labels["mauc_ci"] is not None
    table = (out / "results.md").read_text()
    assert "## Zero-shot (no CheXpert label used)" in table and "CheXpert 5x20 (GLoRIA)" in table
    assert "| Fine-tune, 100 % of the labels |" in table


def test_a_finished_row_is_read_back_not_trained_again(quick_tables) -> None:
    out = quick_tables["alifuse-table3"]
    proc = run_cmd(experiment_cmd("alifuse-table3", out))
    assert proc.stdout.count("(reused)") == len(EXPERIMENTS["alifuse-table3"]().rows)


def test_figures_of_a_run(paper_run, ad_shards, tmp_path) -> None:
    out = tmp_path / "figures"
    proc = run_cmd(
        [
            sys.executable,
            str(REPO / "scripts" / "visualize.py"),
            str(paper_run),
            "--split",
            str(ad_shards / "test"),
            "--out",
            str(out),
            "--per-class",
            "1",
        ]
    )
    record = json.loads((out / "figures.json").read_text())
    assert "modality gap" in proc.stdout
    assert len(record["attention_samples"]) == 3  # one per class
    gaps = record["modality_gap"]
    assert set(gaps) == {"before alignment", "after alignment"}
    assert all(0 <= g <= 2 for g in gaps.values())  # distance of two unit-ball centroids
    for name in ("attention.png", "umap.png"):
        assert (out / name).stat().st_size > 20_000
