"""Text tower: loading a local BERT folder, training modes, the pass in parts, MLM masking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_fixtures import CORPUS, TEXTS, tiny_bert
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from models.attention import CrossBlock
from models.text import TextConfig, TextTower, build_text_tower


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    return tiny_bert(tmp_path_factory.mktemp("text"))


def _tower(bert_dir: str, mode: str = "lora", **kw) -> TextTower:
    return build_text_tower(TextConfig(checkpoint=bert_dir, mode=mode, max_length=16, **kw))


def test_tiny_checkpoint_is_a_plain_hugging_face_folder(bert_dir: str) -> None:
    folder = Path(bert_dir)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [
        tokenizer.convert_tokens_to_ids(t) for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ]
    assert ids == [0, 1, 2, 3, 4]
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer) <= 2000
    assert config["hidden_size"] == 32 and config["num_hidden_layers"] == 2
    enc = tokenizer(CORPUS[0])
    assert enc["input_ids"][0] == 2 and enc["input_ids"][-1] == 3
    assert 1 not in enc["input_ids"]  # the corpus's own words are in the vocabulary


def test_modes_set_what_trains(bert_dir: str) -> None:
    lora = _tower(bert_dir, "lora")
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == {"query", "value"}
    assert not any(p.requires_grad for p in lora.mlm_head.parameters())
    frozen = _tower(bert_dir, "frozen")
    assert not any(p.requires_grad for p in frozen.parameters())
    full = _tower(bert_dir, "full")
    assert all(p.requires_grad for p in full.parameters())
    other = _tower(bert_dir, "lora", lora_targets=["key"])
    assert all(".key.lora_" in n for n, p in other.named_parameters() if p.requires_grad)


def test_lora_saves_an_adapter(bert_dir: str, tmp_path: Path) -> None:
    tower = _tower(bert_dir, "lora")
    tower.hf_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_parts_equal_the_hugging_face_forward(bert_dir: str, mode: str) -> None:
    torch.manual_seed(0)
    tower = _tower(bert_dir, mode).eval()
    for name, param in tower.named_parameters():  # LoRA B starts at 0: make LoRA matter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    batch = tower.tokenize(TEXTS, 16)
    with torch.no_grad():
        h = tower.forward_features(batch["input_ids"], batch["attention_mask"])
        ref = tower.hf_model(**batch, output_hidden_states=True)
        torch.testing.assert_close(h, ref.hidden_states[-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tower.mlm_logits(h), ref.logits, atol=1e-5, rtol=1e-5)
        assert tower(**batch).shape == (len(TEXTS), tower.hidden_size)
        # In parts: [0, 1) then [1, end) is the same pass.
        first = tower.run_layers(tower.embed(batch["input_ids"]), batch["attention_mask"], 0, 1)
        torch.testing.assert_close(tower.run_layers(first, batch["attention_mask"], 1), h)


def test_padding_is_masked_in_the_layers(bert_dir: str) -> None:
    tower = _tower(bert_dir, "frozen").eval()
    short = tower.tokenize(["no acute process"], 8)
    long = tower.tokenize(["no acute process"], 16)
    with torch.no_grad():
        a = tower.forward_features(**short)
        b = tower.forward_features(**long)
    n = int(short["attention_mask"].sum())
    torch.testing.assert_close(a[:, :n], b[:, :n], atol=1e-5, rtol=1e-5)


def test_cross_blocks_inserted_after_chosen_layers(bert_dir: str) -> None:
    torch.manual_seed(0)
    tower = _tower(bert_dir, "frozen").eval()
    batch = tower.tokenize(TEXTS, 16)
    image = torch.randn(len(TEXTS), 5, 48)
    cross = {1: CrossBlock(tower.hidden_size, 2, context_dim=48)}
    with torch.no_grad():
        h = tower.forward_features(**batch)
        same = tower.run_layers(
            tower.embed(batch["input_ids"]), batch["attention_mask"], 0, None, cross, image
        )
        torch.testing.assert_close(same, h)  # zero-initialised gates: unchanged
        cross[1].gate_attn.fill_(1.0)
        grounded = tower.run_layers(
            tower.embed(batch["input_ids"]), batch["attention_mask"], 0, None, cross, image
        )
        assert not torch.allclose(grounded, h)
        # continuing a trunk that ended with layer 1 runs cross[1] first
        trunk = tower.run_layers(tower.embed(batch["input_ids"]), batch["attention_mask"], 0, 2)
        torch.testing.assert_close(
            tower.run_layers(trunk, batch["attention_mask"], 2, None, cross, image), grounded
        )


def test_mask_tokens_never_masks_special_or_padding(bert_dir: str) -> None:
    tower = _tower(bert_dir, "frozen")
    batch = tower.tokenize(TEXTS, 16)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    special = torch.isin(ids, torch.tensor(tower.tokenizer.all_special_ids)) | (attention == 0)
    assert special.any() and (~special).any()
    torch.manual_seed(0)
    masked, labels = tower.mask_tokens(ids, attention, 1.0)  # every eligible token is picked
    assert torch.equal(labels == -100, special)
    assert torch.equal(labels[~special], ids[~special])
    assert torch.equal(masked[special], ids[special])
    torch.manual_seed(0)
    again, labels_again = tower.mask_tokens(ids, attention, 1.0)
    assert torch.equal(again, masked) and torch.equal(labels_again, labels)  # global RNG


def test_mask_tokens_80_10_10(bert_dir: str) -> None:
    tower = _tower(bert_dir, "frozen")
    torch.manual_seed(0)
    ids = torch.randint(5, tower.vocab_size, (400, 50))  # no special ids
    attention = torch.ones_like(ids)
    attention[:, 45:] = 0
    masked, labels = tower.mask_tokens(ids, attention, 0.15)
    picked = labels != -100
    assert not picked[:, 45:].any()
    assert picked[:, :45].float().mean().item() == pytest.approx(0.15, abs=0.01)
    n = picked.sum().item()
    as_mask = (masked[picked] == tower.mask_token_id).sum().item() / n
    unchanged = (masked[picked] == ids[picked]).sum().item() / n
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert unchanged == pytest.approx(0.1, abs=0.02)
    assert torch.equal(masked[~picked], ids[~picked])


def test_tokenizer_larger_than_the_embedding_raises(bert_dir: str, tmp_path: Path) -> None:
    folder = tmp_path / "mismatch"
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(tokenizer) - 10,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    BertForMaskedLM(config).save_pretrained(folder)
    with pytest.raises(
        ValueError, match=rf"mismatch.*{len(tokenizer)} tokens.*{len(tokenizer) - 10} rows"
    ):
        build_text_tower(TextConfig(checkpoint=str(folder)))


def test_missing_or_bad_checkpoints_raise_clear_errors(bert_dir: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="text.checkpoint is empty"):
        build_text_tower(TextConfig())
    with pytest.raises(FileNotFoundError, match="bert-base-uncased: not a local folder"):
        build_text_tower(TextConfig(checkpoint="bert-base-uncased"))  # never the hub
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_text_tower(TextConfig(checkpoint=str(missing)))
    no_tokenizer = tmp_path / "model_only"
    BertForMaskedLM.from_pretrained(bert_dir).save_pretrained(no_tokenizer)
    with pytest.raises(FileNotFoundError, match=f"{no_tokenizer}: no tokenizer"):
        build_text_tower(TextConfig(checkpoint=str(no_tokenizer)))
    with pytest.raises(ValueError, match="lora_targets"):
        _tower(bert_dir, "lora", lora_targets=["no_such_module"])
    with pytest.raises(ValueError, match="max_length=600"):
        build_text_tower(TextConfig(checkpoint=bert_dir, max_length=600))


def test_bad_text_config_raises() -> None:
    with pytest.raises(ValueError, match="mlm_probability=0.0"):
        TextConfig(mlm_probability=0.0)
    with pytest.raises(ValueError, match="lora_r=0"):
        TextConfig(lora_r=0)
    with pytest.raises(ValueError, match="lora_targets"):
        TextConfig(lora_targets=[])
    with pytest.raises(ValueError, match="max_length=1"):
        TextConfig(max_length=1)
