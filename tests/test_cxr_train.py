"""Chest X-ray path end to end through `python train.py`: 2D MAE + text pretraining on
MIMIC-CXR-layout shards, then 14-label heads (full and linear probe) scored by AUROC."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CXR_VISION, run_cmd, train_cmd
from safetensors.torch import load_file

from models.alifuse import build_model
from models.heads import MultiLabelConfig, MultiLabelModel
from models.vit import VisionConfig
from shards.reader import build_eval_loader
from trainer.config import load_config
from trainer.cxr_metrics import multilabel_auroc
from trainer.retrieval import default_prompts, retrieval_recall, zero_shot_scores

VISION = CXR_VISION


@pytest.fixture(scope="module")
def cxr(tmp_path_factory):
    from models.text import make_tiny_bert_checkpoint
    from shards.mimic_cxr import write_cxr_shards
    from shards.reader import read_texts
    from shards.synthetic.cxr import generate_mimic_cxr

    root = tmp_path_factory.mktemp("cxr")
    paths = generate_mimic_cxr(root / "raw", subjects=24, size=64, seed=1)
    write_cxr_shards(
        paths["root"], paths["reports_root"], root / "shards", size=32, samples_per_shard=8
    )
    bert = make_tiny_bert_checkpoint(
        str(root / "bert"),
        read_texts(str(root / "shards" / "train")),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        vocab_size=600,
    )
    data = [f"data.{s}={root / 'shards' / s}" for s in ("train", "val", "test")]
    return {"root": root, "data": data, "bert": bert}


def _common(cxr, out) -> list[str]:
    return [*cxr["data"], "data.batch_size=4", "data.eval_batch_size=8", "data.shuffle_buffer=8",
            *VISION, "optim.lr=1e-3", "train.log_every=1", "train.progress=false",
            f"train.output_dir={out}"]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(cxr, tmp_path_factory):
    out = tmp_path_factory.mktemp("cxr_pretrain")
    run_cmd(
        train_cmd(
            *_common(cxr, out),
            "model.task=pretrain",
            f"model.text.checkpoint={cxr['bert']}",
            "model.text.mode=full",
            "model.text.max_length=64",
            "model.embed_dim=16",
            "model.cross_layers_image=1",
            "model.cross_layers_text=1",
            "train.max_steps=3",
            "train.retrieval=true",
            "train.zero_shot=true",
            "train.bootstrap=20",
            "train.eval_splits=[val,test]",
        )
    )
    return out


def test_2d_pretraining_with_report_text(pretrained):
    results = json.loads((pretrained / "results.json").read_text())
    assert {"itc_loss", "mae_loss", "mlm_loss", "i2t_r1", "t2i_r10", "zero_shot"} <= set(
        results["val"]
    )
    weights = load_file(str(pretrained / "model.safetensors"))
    assert weights["visual.patch_embed.proj.weight"].ndim == 4  # Conv2d: a 2D tower


@pytest.mark.parametrize("finetune", ["full", "linear_probe"])
def test_14_label_heads_from_pretrained_tower(cxr, pretrained, tmp_path, finetune):
    proc = run_cmd(
        train_cmd(
            *_common(cxr, tmp_path),
            "model.task=multilabel",
            f"model.multilabel.finetune={finetune}",
            f"train.init_from={pretrained}",
            "train.max_steps=3",
            "train.eval_splits=[test]",
            "train.bootstrap=50",
            "data.labels.uncertain=ignore",
        )
    )
    test = json.loads((tmp_path / "results.json").read_text())["test"]
    n_test = json.loads((cxr["root"] / "shards" / "test" / "manifest.json").read_text())[
        "num_samples"
    ]
    assert len(test["labels"]) == 14 and len(test["auroc"]) == 14
    assert max(test["n"]) <= n_test  # masked entries (U-Ignore) are left out per label
    assert test["mauc"] is not None and 0.0 <= test["mauc"] <= 1.0
    lo, hi = test["mauc_ci"]  # percentile bootstrap: on tiny data it may exclude the estimate
    assert 0.0 <= lo < hi <= 1.0
    assert f"test: mAUC {test['mauc']:.4f}" in proc.stdout
    assert (tmp_path / "auroc_test.png").is_file()
    before = load_file(str(pretrained / "model.safetensors"))
    after = load_file(str(tmp_path / "model.safetensors"))
    key = "visual.blocks.0.attn.qkv.weight"
    if finetune == "linear_probe":  # the tower is frozen: its weights are the pretrained ones
        assert torch.equal(before[key], after[key])
    else:
        assert not torch.equal(before[key], after[key])


def test_retrieval_and_zero_shot_match_a_recomputation(cxr, pretrained):
    """The run's test-split retrieval and zero-shot numbers, recomputed in one process from
    the exported weights with the plain embedding functions."""
    result = json.loads((pretrained / "results.json").read_text())["test"]
    # The run used one thread (run_cmd sets OMP_NUM_THREADS=1): the same here, so the float
    # sums match bit for bit and near-tied scores of the tiny model order the same way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _recompute_and_compare(cxr, pretrained, result)
    finally:
        torch.set_num_threads(threads)


def _recompute_and_compare(cxr, pretrained, result) -> None:
    cfg = load_config(str(pretrained / "config.yaml"))
    model = build_model(cfg.model)
    model.load_state_dict(load_file(str(pretrained / "model.safetensors")))
    model.eval()
    loader = build_eval_loader(cfg.data.test, cfg.data, model.tokenizer, 64, 0, 1)
    image, text, labels, mask, groups, keys = [], [], [], [], [], []
    with torch.no_grad():
        for batch in loader:
            keep = batch["valid"]
            out = model(batch, embed=True)
            image.append(out["image"]["emb"][keep])
            text.append(out["text"]["emb"][keep])
            labels.append(batch["labels"][keep])
            mask.append(batch["label_mask"][keep])
            groups += [g for g, k in zip(batch["group"], keep.tolist(), strict=True) if k]
            keys += [g for g, k in zip(batch["key"], keep.tolist(), strict=True) if k]
        pos, neg = default_prompts()
        prompts = model({**model.text.tokenize(pos + neg, 64)}, embed=True)["text"]["emb"]
        scale = float(model.scale())
    image, text = torch.cat(image), torch.cat(text)
    n_test = json.loads((cxr["root"] / "shards" / "test" / "manifest.json").read_text())
    assert result["retrieval_n"] == image.shape[0] == n_test["num_samples"]
    recall = retrieval_recall(image, text, groups=groups)
    for key, value in recall.items():  # float noise may reorder a near-tied pair or two
        assert result[key] == pytest.approx(value, abs=2.0 / len(keys) + 1e-9), key
    probs = zero_shot_scores(image, prompts[:14], prompts[14:], temperature=1.0 / scale)
    # The run's per-image probabilities match the recomputation to float precision; its AUROCs
    # are exactly those of its own probabilities. (AUROCs of the two are not compared directly:
    # after 3 steps the image embeddings are nearly tied, and float noise between processes
    # can reorder them.)
    rows = [json.loads(line) for line in (pretrained / "zero_shot_test.jsonl").open()]
    run_probs = torch.tensor([r["probs"] for r in rows])
    assert [r["key"] for r in rows] == keys
    torch.testing.assert_close(run_probs, probs, rtol=0, atol=1e-4)
    per_label, mauc = multilabel_auroc(run_probs, torch.cat(labels), torch.cat(mask))
    assert result["zero_shot"]["mauc"] == pytest.approx(mauc, abs=1e-6)
    assert result["zero_shot"]["auroc"] == pytest.approx(per_label, abs=1e-6)


def test_linear_probe_trains_only_the_head():
    vision = VisionConfig(
        spatial_dims=2, img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2
    )
    model = MultiLabelModel(vision, MultiLabelConfig(finetune="linear_probe"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.2.weight", "head.2.bias"}
    batch = {
        "image": torch.rand(3, 1, 16, 16),
        "labels": torch.tensor([[1.0] * 14, [0.0] * 14, [1.0] * 14]),
        "label_mask": torch.tensor([[1.0] * 14, [1.0] * 14, [0.0] * 14]),
    }
    out = model(batch)
    out["bce_loss"].backward()
    assert model.head[2].weight.grad.abs().sum() > 0
    # The third row is fully masked: changing its targets changes nothing.
    batch["labels"][2] = 0.0
    assert torch.equal(model(batch)["bce_loss"], out["bce_loss"].detach())
