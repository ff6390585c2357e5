"""LLaMA text tower: a tiny local LLaMA-2-style folder, QLoRA on the CPU (4-bit NF4 + LoRA),
adapters saved and loaded back, pooling, bad inputs, model-state memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from model_fixtures import CORPUS, TEXTS
from safetensors.torch import load_file
from transformers import AutoModel, LlamaTokenizer

from models.llama_text import (
    LlamaTextConfig,
    LlamaTower,
    build_llama_tower,
    lora_param_count,
    make_tiny_llama_checkpoint,
    model_state_bytes,
)

HIDDEN, LAYERS, MLP = 128, 4, 384  # 384 = 8/3 x 128 rounded up to a multiple of 64
SENTENCE = "Small left pleural effusion, 5 mm nodule; no pneumothorax (≤ 2 cm)."


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    # Proportions like LLaMA-2-7B's: the layers' linear weights outweigh the embedding.
    return make_tiny_llama_checkpoint(
        tmp_path_factory.mktemp("llama") / "tiny",
        CORPUS * 3,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=4,
        vocab_size=384,
    )


def _tower(llama_dir: str, mode: str = "qlora", seed: int = 0, **kw) -> LlamaTower:
    torch.manual_seed(seed)  # LoRA A matrices are drawn from the global RNG
    kw = {"max_length": 24, "lora_dropout": 0.0, **kw}
    return build_llama_tower(LlamaTextConfig(checkpoint=llama_dir, mode=mode, **kw))


def _lora(tower: LlamaTower) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in tower.named_parameters() if "lora_" in n}


def _randomize_lora_b(tower: LlamaTower, seed: int) -> None:
    """LoRA B starts at 0 (the tower starts as the checkpoint): make the adapter matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in _lora(tower).items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _lora_grads(tower: LlamaTower, batch: dict) -> dict[str, torch.Tensor]:
    tower.train()
    tower.zero_grad(set_to_none=True)
    tower(**batch).square().mean().backward()
    return {n: p.grad.clone() for n, p in _lora(tower).items() if p.grad is not None}


def test_tiny_checkpoint_is_a_llama_2_style_folder(llama_dir: str) -> None:
    folder = Path(llama_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    tokenizer = LlamaTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert 3 + 256 < len(tokenizer) == config["vocab_size"] <= 384
    assert config["intermediate_size"] == MLP and config["hidden_size"] == HIDDEN
    assert [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    ids = tokenizer(SENTENCE)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == SENTENCE  # "≤" by byte fallback
    assert len(tokenizer(CORPUS[1])["input_ids"]) < 0.7 * len(CORPUS[1])  # merges were learned
    # The base model (no LM head) loads from the causal-LM folder with the saved weights.
    model = AutoModel.from_pretrained(folder)
    saved = load_file(folder / "model.safetensors")
    assert torch.equal(model.embed_tokens.weight, saved["model.embed_tokens.weight"])


def test_tiny_checkpoint_rejects_sizes_4bit_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="intermediate_size=688: expected a positive multiple of 64"
    ):
        make_tiny_llama_checkpoint(tmp_path / "a", CORPUS, hidden_size=64, intermediate_size=688)
    with pytest.raises(
        ValueError, match=r"vocab_size=200: expected >= 303 \(3 special \+ 256 byte"
    ):
        make_tiny_llama_checkpoint(tmp_path / "b", CORPUS, vocab_size=200)
    with pytest.raises(ValueError, match="corpus is empty"):
        make_tiny_llama_checkpoint(tmp_path / "c", [])


def test_tokenize_bos_text_eos_then_right_padding(llama_dir: str) -> None:
    tower = _tower(llama_dir, "frozen")
    tok = tower.tokenizer
    batch = tower.tokenize([TEXTS[0], "no acute process", SENTENCE * 5], 24)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (3, 24)
    lengths = mask.sum(1)
    assert lengths[2] == 24  # truncated ...
    for row, n in zip(ids, lengths.tolist(), strict=True):
        assert row[0] == tok.bos_token_id and row[n - 1] == tok.eos_token_id  # ... EOS kept
        assert (row[n:] == tok.pad_token_id).all() and row[1 : n - 1].ne(tok.eos_token_id).all()
    assert torch.equal(mask, (torch.arange(24) < lengths[:, None]).long())  # right padding
    assert tok.pad_token_id == tok.unk_token_id != tok.eos_token_id


def test_modes_set_what_is_quantized_and_what_trains(llama_dir: str) -> None:
    qlora = _tower(llama_dir, "qlora")
    quantized = [m for m in qlora.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * LAYERS  # q k v o gate up down in every layer
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_type == "nf4" for m in quantized)
    trainable = {n: p for n, p in qlora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"q_proj", "v_proj"}
    n_trainable = sum(p.numel() for p in trainable.values())
    assert n_trainable == lora_param_count(HIDDEN, LAYERS, 8, 2) == 4 * 2 * 8 * (128 + 128)
    assert (
        qlora.hidden_size == HIDDEN and qlora.base_model.embed_tokens.weight.dtype == torch.float32
    )

    frozen_4bit = _tower(llama_dir, "frozen_4bit")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in frozen_4bit.modules()) == 7 * LAYERS
    assert not any(p.requires_grad for p in frozen_4bit.parameters())
    lora = _tower(llama_dir, "lora", lora_targets=["k_proj"])
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in lora.modules())
    assert all(".k_proj.lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    frozen = _tower(llama_dir, "frozen")
    assert not any(p.requires_grad for p in frozen.parameters())


def test_qlora_forward_backward_and_a_step_on_cpu(llama_dir: str) -> None:
    tower = _tower(llama_dir, "qlora")
    batch = tower.tokenize(TEXTS, 24)
    packed = {n: p.detach().clone() for n, p in tower.named_parameters() if p.dtype == torch.uint8}
    out = tower(**batch)
    assert out.shape == (len(TEXTS), HIDDEN) and out.dtype == torch.float32
    out.square().mean().backward()
    lora = _lora(tower)
    assert all(p.grad is not None for p in lora.values())
    # B = 0 at the start: B gets gradient, A gets exactly 0 until B moves.
    assert all(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    assert all(p.grad.abs().sum() == 0 for n, p in lora.items() if "lora_A" in n)
    optimizer = torch.optim.AdamW([p for p in tower.parameters() if p.requires_grad], lr=1e-2)
    optimizer.step()
    optimizer.zero_grad()
    after = tower(**batch)
    assert (after - out.detach()).abs().max() > 1e-3
    after.square().mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in lora.values())  # now A too
    for name, param in tower.named_parameters():  # the 4-bit base never changes
        if name in packed:
            assert torch.equal(param, packed[name])


def test_evaluation_between_steps_keeps_lora_gradients(llama_dir: str) -> None:
    """An eval-mode no_grad pass must not switch 4-bit layers to a kernel without autograd."""
    batch = _tower(llama_dir, "frozen").tokenize(TEXTS, 24)
    fresh, evaluated = _tower(llama_dir, seed=3), _tower(llama_dir, seed=3)
    for tower in (fresh, evaluated):
        _randomize_lora_b(tower, seed=1)
    evaluated.eval()
    with torch.no_grad():
        eval_out = evaluated(**batch)
    want, got = _lora_grads(fresh, batch), _lora_grads(evaluated, batch)
    assert len(got) == len(want) == len(_lora(fresh))
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad)
        assert grad.abs().sum() > 0
    fresh.train()
    torch.testing.assert_close(eval_out, fresh(**batch).detach())  # one numerics for both


def test_adapter_saved_and_loaded_into_a_fresh_4bit_tower(llama_dir: str, tmp_path: Path) -> None:
    trained = _tower(llama_dir, seed=0)
    _randomize_lora_b(trained, seed=2)
    batch = trained.tokenize(TEXTS, 24)
    trained.save_adapter(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files  # the adapter only, never the base weights
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == lora_param_count(HIDDEN, LAYERS, 8, 2)

    fresh = _tower(llama_dir, seed=1)  # other LoRA A draws, B = 0
    trained.eval()
    fresh.eval()
    with torch.no_grad():
        want = trained(**batch)
        assert not torch.allclose(fresh(**batch), want)
        fresh.load_adapter(tmp_path / "adapter")
        assert torch.equal(fresh(**batch), want)
    assert all(p.requires_grad for p in _lora(fresh).values())  # still trainable

    with pytest.raises(ValueError, match="r=8 but this tower has r=4"):
        _tower(llama_dir, lora_r=4).load_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match="mode=frozen_4bit: no adapter"):
        _tower(llama_dir, "frozen_4bit").save_adapter(tmp_path / "none")


def test_pool_last_and_mean_by_hand() -> None:
    h = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    tower = LlamaTower.__new__(LlamaTower)
    torch.nn.Module.__init__(tower)
    tower.pooling = "last"
    torch.testing.assert_close(tower.pool(h, mask), torch.stack([h[0, 2], h[1, 4]]))
    tower.pooling = "mean"
    torch.testing.assert_close(tower.pool(h, mask), torch.stack([h[0, :3].mean(0), h[1].mean(0)]))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooling_with_right_padding_matches_a_hand_computation(
    llama_dir: str, pooling: str
) -> None:
    tower = _tower(llama_dir, "frozen", pooling=pooling).eval()
    short = tower.tokenize(TEXTS, 24)
    long = tower.tokenize(TEXTS, 40)
    with torch.no_grad():
        h = tower.forward_features(**short)
        pooled = tower(**short)
        pooled_long = tower(**long)
    for i, n in enumerate(short["attention_mask"].sum(1).tolist()):
        want = h[i, n - 1] if pooling == "last" else h[i, :n].mean(0)
        torch.testing.assert_close(pooled[i], want)
    # More right padding changes nothing: causal attention never looks right, padding is masked.
    torch.testing.assert_close(pooled_long, pooled, atol=1e-5, rtol=1e-5)


def test_compute_dtype_bf16_still_gives_float32_states(llama_dir: str) -> None:
    tower = _tower(llama_dir, "lora", compute_dtype="bf16")
    assert tower.base_model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    out = tower(**tower.tokenize(TEXTS, 24))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_gradient_checkpointing_gives_the_same_gradients(llama_dir: str) -> None:
    batch = _tower(llama_dir, "frozen").tokenize(TEXTS, 24)
    plain = _tower(llama_dir, seed=5)
    checkpointed = _tower(llama_dir, seed=5, gradient_checkpointing=True)
    assert checkpointed.base_model.is_gradient_checkpointing
    for tower in (plain, checkpointed):
        _randomize_lora_b(tower, seed=4)
    want, got = _lora_grads(plain, batch), _lora_grads(checkpointed, batch)
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_fp4_single_quant_and_bf16_storage_train(llama_dir: str) -> None:
    nf4 = _tower(llama_dir)
    tower = _tower(llama_dir, quant_type="fp4", double_quant=False, quant_storage="bf16")
    layer = tower.base_model.layers[0].mlp.down_proj
    assert layer.weight.quant_type == "fp4" and layer.weight.dtype == torch.bfloat16
    assert layer.weight.quant_state.nested is False
    assert model_state_bytes(tower) > model_state_bytes(nf4)  # fp32 absmax per block
    _randomize_lora_b(tower, seed=0)
    grads = _lora_grads(tower, tower.tokenize(TEXTS, 24))
    assert len(grads) == len(_lora(tower)) and all(g.abs().sum() > 0 for g in grads.values())


def test_model_state_bytes_4bit_is_under_half_of_bf16(llama_dir: str) -> None:
    linear = torch.nn.Linear(10, 5)
    assert model_state_bytes(linear) == (50 + 5) * 4
    qlora = _tower(llama_dir, "qlora")
    bf16 = _tower(llama_dir, "lora", compute_dtype="bf16")
    for module in qlora.modules():
        if isinstance(module, bnb.nn.Linear4bit):  # packed: two weights per byte
            weights = module.in_features * module.out_features
            assert module.weight.numel() * 2 == weights
            # + one 8-bit absmax per 64 weights (double quant) + small tables
            packed = weights // 2 + weights // 64
            assert packed < model_state_bytes(module) < packed + 2048
    ratio = model_state_bytes(qlora) / model_state_bytes(bf16)
    frozen_ratio = model_state_bytes(_tower(llama_dir, "frozen_4bit")) / model_state_bytes(
        _tower(llama_dir, "frozen", compute_dtype="bf16")
    )
    print(f"model state, 4-bit / bf16: qlora {ratio:.3f}, frozen {frozen_ratio:.3f}")
    assert ratio < 0.5 and frozen_ratio < 0.5


def test_lora_param_count_for_llama_2_7b() -> None:
    assert lora_param_count(4096, 32, 8, 2) == 4_194_304
    assert lora_param_count(4096, 32, 16, 4) == 4 * 4_194_304


def test_tokenizer_that_does_not_match_the_checkpoint_raises(
    llama_dir: str, tmp_path: Path
) -> None:
    folder = Path(make_tiny_llama_checkpoint(tmp_path / "mismatch", CORPUS, vocab_size=320))
    rows = json.loads((folder / "config.json").read_text())["vocab_size"]
    for name in ("tokenizer.model", "tokenizer_config.json"):  # the 384-token tokenizer
        shutil.copy(Path(llama_dir) / name, folder / name)
    with pytest.raises(ValueError, match=rf"checkpoint={folder}: .*384 tokens.* {rows} rows"):
        build_llama_tower(LlamaTextConfig(checkpoint=str(folder)))


def test_missing_or_bad_checkpoints_raise_clear_errors(llama_dir: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="llama.checkpoint is empty"):
        build_llama_tower(LlamaTextConfig())
    with pytest.raises(FileNotFoundError, match="meta-llama/Llama-2-7b-hf: not a local folder"):
        build_llama_tower(LlamaTextConfig(checkpoint="meta-llama/Llama-2-7b-hf"))
    no_tokenizer = tmp_path / "model_only"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(llama_dir) / name, no_tokenizer / name)
    with pytest.raises(FileNotFoundError, match=f"{no_tokenizer}: no tokenizer"):
        build_llama_tower(LlamaTextConfig(checkpoint=str(no_tokenizer)))
    with pytest.raises(ValueError, match="lora_targets"):
        _tower(llama_dir, lora_targets=["no_such_module"])
    with pytest.raises(ValueError, match="max_length=600: expected <= 512"):
        _tower(llama_dir, max_length=600)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "full"}, "mode=full: expected one of qlora"),
        ({"mode": "qlora", "load_in_4bit": False}, "load_in_4bit=False: expected True"),
        ({"mode": "lora", "load_in_4bit": True}, "load_in_4bit=True: expected False"),
        ({"quant_type": "int4"}, "quant_type=int4"),
        ({"compute_dtype": "fp16"}, "compute_dtype=fp16"),
        ({"quant_storage": "int8"}, "quant_storage=int8"),
        ({"pooling": "cls"}, "pooling=cls"),
        ({"lora_r": 0}, "lora_r=0"),
        ({"lora_dropout": 1.0}, "lora_dropout=1.0"),
        ({"lora_targets": []}, "lora_targets"),
        ({"max_length": 2}, "max_length=2"),
    ],
)
def test_bad_llama_config_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LlamaTextConfig(**kwargs)


def test_load_in_4bit_and_compute_dtype_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    assert LlamaTextConfig(mode="qlora").load_in_4bit is True
    assert LlamaTextConfig(mode="frozen_4bit").load_in_4bit is True
    assert LlamaTextConfig(mode="lora").load_in_4bit is False
    assert LlamaTextConfig(compute_dtype="bf16").torch_compute_dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert LlamaTextConfig().torch_compute_dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert LlamaTextConfig().torch_compute_dtype == torch.bfloat16
