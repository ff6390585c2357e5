"""Export (trainer/export.py, scripts/export.py): each part of a finished run loads with the
library a user would reach for (safetensors + VisionTransformer, transformers AutoModel /
AutoTokenizer, peft PeftModel) and gives the run's embeddings; Predictor.from_export gives
the same embeddings as Predictor.from_run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, llama_overrides, run_cmd, shard_samples, tiny_overrides, train_cmd
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

from models.vit import VisionConfig, VisionTransformer
from shards.cxr_labels import LABEL_NAMES
from trainer.export import export_run
from trainer.inference import Predictor

ATOL = 1e-5
# The merged LLaMA tower: NF4 weights dequantised to bf16, the adapter merged in, saved in bf16.
# Measured on the tiny run's test texts: max |difference| of the unit-norm text embeddings
# 1.4e-3 (bf16 weights computed in fp32) and 3.4e-3 (in bf16), cosine >= 0.99998.
MERGED_BF16_ATOL = 1e-2


def _export_main():
    spec = importlib.util.spec_from_file_location("export_cli", REPO / "scripts" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


export_main = _export_main()


def _train(tmp_path_factory, name: str, *overrides: str) -> Path:
    out = tmp_path_factory.mktemp(name)
    run_cmd(train_cmd(*overrides, f"train.output_dir={out}", "train.max_steps=3"))
    return out


@pytest.fixture(scope="module")
def bert_lora_run(ad_shards, tiny_bert, tmp_path_factory) -> Path:
    overrides = tiny_overrides(ad_shards, tiny_bert, Path("unused"), "pretrain")
    return _train(tmp_path_factory, "bert_lora", *overrides, "model.text.mode=lora")


@pytest.fixture(scope="module")
def qlora_run(ad_shards, tiny_bert, tiny_llama, tmp_path_factory) -> Path:
    overrides = tiny_overrides(ad_shards, tiny_bert, Path("unused"), "pretrain")
    return _train(
        tmp_path_factory,
        "qlora",
        *overrides,
        *llama_overrides(tiny_llama),
        "model.cross_layers_text=0",
    )


@pytest.fixture(scope="module")
def ad_test(ad_shards) -> dict[str, list[str]]:
    samples = shard_samples(ad_shards / "test")
    return {
        "images": [s["meta"]["source_path"] for s in samples],
        "texts": [s["text"] for s in samples],
    }


def _image_embeddings(out: Path, image: torch.Tensor, heads: dict) -> torch.Tensor:
    """The ITC image embedding from image_tower/ and heads.safetensors alone."""
    config = json.loads((out / "image_tower" / "config.json").read_text())
    vit = VisionTransformer(VisionConfig(**config)).eval()
    vit.load_state_dict(load_file(str(out / "image_tower" / "model.safetensors")))
    with torch.no_grad():
        pooled = vit.pool(vit.forward_features(image))
    return F.normalize(
        F.linear(pooled, heads["image_proj.weight"], heads["image_proj.bias"]), dim=-1
    )


def _text_embeddings(
    hidden: torch.Tensor, mask: torch.Tensor, heads: dict, pool: str
) -> torch.Tensor:
    """Pooled text states ([CLS], or the last real token) -> the ITC text embedding."""
    if pool == "cls":
        pooled = hidden[:, 0]
    else:
        pooled = hidden[torch.arange(hidden.shape[0]), mask.sum(1) - 1]
    return F.normalize(
        F.linear(pooled.float(), heads["text_proj.weight"], heads["text_proj.bias"]), dim=-1
    )


def _tokens(folder: Path, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    enc = tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_bert_lora_export_loads_with_safetensors_transformers_and_peft(
    bert_lora_run, ad_test, tmp_path
):
    out = tmp_path / "export"
    assert export_main([str(bert_lora_run), "--out", str(out), "--merge-lora"]) == 0
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["text_tower"] == "bert" and manifest["adapter"] and manifest["merged"]
    for name in manifest["files"]:
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and '"itc_loss"' in card and "text_merged" in card
    heads = load_file(str(out / "heads.safetensors"))
    assert {"image_proj.weight", "text_proj.weight", "logit_scale"} <= set(heads)
    assert not any(k.startswith(("visual.", "text.")) for k in heads)

    run = Predictor.from_run(bert_lora_run)
    image_emb = run.embed_images(ad_test["images"])
    text_emb = run.embed_texts(ad_test["texts"])
    image = run.batch(images=ad_test["images"])["image"]
    torch.testing.assert_close(_image_embeddings(out, image, heads), image_emb, rtol=0, atol=ATOL)

    tokens = _tokens(out / "text_tower", ad_test["texts"], 48)
    base = AutoModelForMaskedLM.from_pretrained(out / "text_tower")
    assert not any("lora" in name for name, _ in base.named_parameters())  # the plain base
    text = PeftModel.from_pretrained(base, out / "text_adapter").eval()
    merged = AutoModelForMaskedLM.from_pretrained(out / "text_merged").eval()
    for model in (text, merged):
        with torch.no_grad():
            hidden = model(**tokens, output_hidden_states=True).hidden_states[-1]
        emb = _text_embeddings(hidden, tokens["attention_mask"], heads, "cls")
        torch.testing.assert_close(emb, text_emb, rtol=0, atol=ATOL)
    assert type(AutoModel.from_pretrained(out / "text_tower")).__name__ == "BertModel"

    exported = Predictor.from_export(out)
    torch.testing.assert_close(
        exported.embed_images(ad_test["images"]), image_emb, rtol=0, atol=ATOL
    )
    torch.testing.assert_close(exported.embed_texts(ad_test["texts"]), text_emb, rtol=0, atol=ATOL)
    merged_predictor = Predictor.from_export(out, merged=True)
    torch.testing.assert_close(
        merged_predictor.embed_texts(ad_test["texts"]), text_emb, rtol=0, atol=ATOL
    )


def test_qlora_llama_export_keeps_the_4bit_base_and_merges_in_bf16(qlora_run, ad_test, tmp_path):
    out = tmp_path / "export"
    manifest = export_run(qlora_run, out, merge_lora=True)
    assert manifest["text_tower"] == "llama" and manifest["quantized_4bit"] and manifest["adapter"]
    config = json.loads((out / "text_tower" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    heads = load_file(str(out / "heads.safetensors"))
    run = Predictor.from_run(qlora_run)
    text_emb = run.embed_texts(ad_test["texts"])
    tokens = _tokens(out / "text_tower", ad_test["texts"], 48)

    base = AutoModel.from_pretrained(out / "text_tower")  # the 4-bit checkpoint as serialized
    assert type(base.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    for module in base.modules():  # as the README says: the kernel the run computed with
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    text = PeftModel.from_pretrained(base, out / "text_adapter").eval()
    with torch.no_grad():
        hidden = text(**tokens).last_hidden_state
    emb = _text_embeddings(hidden, tokens["attention_mask"], heads, "last")
    torch.testing.assert_close(emb, text_emb, rtol=0, atol=ATOL)

    assert "quantization_config" not in json.loads(
        (out / "text_merged" / "config.json").read_text()
    )
    for dtype in (torch.float32, torch.bfloat16):  # the bf16 weights computed in fp32, in bf16
        merged = AutoModel.from_pretrained(out / "text_merged", dtype=dtype).eval()
        with torch.no_grad():
            hidden = merged(**tokens).last_hidden_state
        emb = _text_embeddings(hidden, tokens["attention_mask"], heads, "last")
        diff = (emb - text_emb).abs().max().item()
        cosine = (emb * text_emb).sum(-1).min().item()
        print(f"merged LLaMA in {dtype} vs the 4-bit run: max |diff| {diff:.2e}, cos {cosine:.6f}")
        assert diff < MERGED_BF16_ATOL and cosine > 0.999

    exported = Predictor.from_export(out)  # the 4-bit folder through models/llama_text.py
    torch.testing.assert_close(exported.embed_texts(ad_test["texts"]), text_emb, rtol=0, atol=ATOL)
    image_emb = run.embed_images(ad_test["images"][:4])
    torch.testing.assert_close(
        exported.embed_images(ad_test["images"][:4]), image_emb, rtol=0, atol=ATOL
    )
    merged_emb = Predictor.from_export(out, merged=True).embed_texts(ad_test["texts"])
    torch.testing.assert_close(merged_emb, text_emb, rtol=0, atol=MERGED_BF16_ATOL)


def test_multilabel_export_gives_the_runs_logits(cxr_multilabel_run, cxr_data, tmp_path):
    out = tmp_path / "export"
    manifest = export_run(cxr_multilabel_run, out)
    assert manifest["text_tower"] is None and not (out / "text_tower").exists()
    images = [s["meta"]["source_path"] for s in shard_samples(cxr_data["shards"] / "test")]
    run = Predictor.from_run(cxr_multilabel_run)
    logits = run.predict(images=images).logits

    config = json.loads((out / "image_tower" / "config.json").read_text())
    vit = VisionTransformer(VisionConfig(**config)).eval()
    vit.load_state_dict(load_file(str(out / "image_tower" / "model.safetensors")))
    heads = load_file(str(out / "heads.safetensors"))
    assert set(heads) == {"head.2.weight", "head.2.bias"}  # LayerNorm (no weights), linear
    with torch.no_grad():
        features = vit.forward_features(run.batch(images=images)["image"])[:, 0]
    mine = F.linear(
        F.layer_norm(features, features.shape[-1:], eps=1e-6),
        heads["head.2.weight"],
        heads["head.2.bias"],
    )
    torch.testing.assert_close(mine, logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(
        Predictor.from_export(out).predict(images=images).logits, logits, rtol=0, atol=ATOL
    )
    # the label names the run's shards gave, recorded by the run and carried by the export
    names = json.loads((cxr_multilabel_run / "labels.json").read_text())["label_names"]
    assert names == list(LABEL_NAMES) == run.label_names
    assert Predictor.from_export(out).label_names == names
    (out / "labels.json").write_text(json.dumps({"label_names": ["a"] * 13 + ["b"]}))
    assert Predictor.from_export(out).label_names[-1] == "b"  # read from the folder


def test_export_refuses_what_it_cannot_write(cxr_multilabel_run, tmp_path, capsys):
    out = str(tmp_path / "export")
    assert export_main([str(cxr_multilabel_run), "--out", out, "--merge-lora"]) == 2
    assert (
        "--merge-lora: the run's text tower (none) has no LoRA adapter" in capsys.readouterr().err
    )
    assert export_main([str(tmp_path), "--out", out]) == 2
    assert "config.yaml: not a run folder" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert export_main([str(cxr_multilabel_run), "--out", str(tmp_path / "busy")]) == 2
    assert "busy: not empty and not an export folder" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="export.json: not an export folder"):
        Predictor.from_export(tmp_path)
