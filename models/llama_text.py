"""LLaMA text tower from a local Hugging Face folder: QLoRA (4-bit NF4 + LoRA), LoRA, or frozen.

The model is the plain Hugging Face `LlamaModel` (no LM head: the tower only needs hidden
states). Quantization (bitsandbytes), the k-bit training preparation and LoRA (peft) are
applied from outside by `build_llama_tower`; `LlamaTower` only runs the model and pools.

    mode         weights                      trains
    qlora        4-bit (NF4 / FP4)            LoRA matrices on `lora_targets`
    lora         compute dtype (bf16 / fp32)  LoRA matrices on `lora_targets`
    frozen       compute dtype                nothing
    frozen_4bit  4-bit                        nothing

Text -> vector: the tokenizer adds BOS and always ends a text with EOS (kept under
truncation), pads on the right, and `pool` takes the state of the last real token (EOS, the
one position that has seen the whole text in a causal model) or the mean of the real
tokens. Hidden states leave the tower as float32 whatever the compute dtype.

Memory plan for LLaMA-2-7B (hidden 4096, 32 layers, MLP 11008, vocab 32000), QLoRA:

    linear weights in the layers  32 x (4 x 4096^2 + 3 x 4096 x 11008) = 6,476,005,376 params
      NF4, 4 bits each                                                 3,238,002,688 B  3.24 GB
      absmax per 64-weight block, double-quantized to 8 bits
      (101,187,584 B) + one fp32 per 256 blocks (1,581,056 B)            102,768,640 B  0.10 GB
    embed_tokens 32000 x 4096 = 131,072,000 params, upcast to fp32 by
      `prepare_model_for_kbit_training` (0.26 GB if left in bf16)        524,288,000 B  0.52 GB
    RMSNorm weights 65 x 4096 = 266,240 params, fp32                       1,064,960 B  0.00 GB
    total model state                                                                   ~3.9 GB
    (the same base model in bf16: 6,607,343,616 params x 2 B = 13.2 GB)

    LoRA r=8 on q_proj and v_proj: 32 layers x 2 modules x r x (4096 + 4096) = 4,194,304
    params (`lora_param_count(4096, 32, 8, 2)`); fp32 weights + grads + AdamW moments
    = 16 B/param = 67 MB. Activations come on top and scale with batch x length; with
    `gradient_checkpointing` one fp32 (B, L, 4096) state per layer is kept (batch 8, length
    128: 0.54 GB), without it several times that.

On the CPU (with AVX512-BF16), bitsandbytes would run a 4-bit layer in eval mode under
`no_grad` by repacking its weight, in place and for good, for a kernel without autograd:
every later training step then silently gets no LoRA gradient. `build_llama_tower` turns
that path off (see `_keep_4bit_layers_differentiable`), so training and evaluation share
one 4-bit kernel. The repack also needs each quantized layer's output size to be a
multiple of 32 and its input size a multiple of the 64-weight quantization block (an MLP
size of 688 fails, 704 works); `make_tiny_llama_checkpoint` keeps to multiples of 64, so
its folders work on that path too. Real LLaMA shapes (4096, 11008, ...) satisfy both.
Under DeepSpeed ZeRO-3, 4-bit weights trained wrongly on the CPU here (outputs drift even
at learning rate 0, for every `quant_storage`), and ZeRO-3 refuses a `device_map`: use
ZeRO-2 or DDP for qlora and frozen_4bit.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from peft import prepare_model_for_kbit_training
from torch import Tensor, nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
)

from models.text import apply_lora, local_checkpoint

# A LLaMA folder holds its tokenizer in one of these (SentencePiece model or tokenizers JSON);
# without them AutoTokenizer can silently build one that knows only the special tokens.
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "uint8": torch.uint8}
# bitsandbytes' CPU inference repack needs output sizes divisible by 32 and input sizes by the
# quantization block (64); tiny checkpoints keep every width a multiple of 64.
CPU_4BIT_MULTIPLE = 64


@dataclass
class LlamaTextConfig:
    """The LLaMA text tower: which local checkpoint, how it is quantized, what trains, pooling."""

    checkpoint: str = ""  # local folder: config.json, weights, tokenizer (tokenizer.model, ...)
    mode: Literal["qlora", "lora", "frozen", "frozen_4bit"] = "qlora"
    # None follows the mode (True for qlora and frozen_4bit); a contradiction is an error.
    load_in_4bit: bool | None = None
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True  # quantize the per-block absmax constants too (~0.37 bit/param saved)
    # Dtype the 4-bit layers compute in and the non-quantized weights load in.
    # auto: bf16 where CUDA supports it, else fp32 (bf16 on CPU is slow and needs casts).
    compute_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    # Dtype the packed 4-bit weights are stored in (bnb_4bit_quant_storage). Sharding that
    # flattens parameters (ZeRO-3, FSDP) wants one dtype: match the other weights' dtype
    # (fp32 after qlora's upcast). Read the ZeRO-3 caveat in the module docstring first.
    quant_storage: Literal["uint8", "bf16", "fp32"] = "uint8"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    pooling: Literal["last", "mean"] = "last"
    max_length: int = 128
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        choices = {
            "mode": ("qlora", "lora", "frozen", "frozen_4bit"),
            "quant_type": ("nf4", "fp4"),
            "compute_dtype": ("auto", "bf16", "fp32"),
            "quant_storage": ("uint8", "bf16", "fp32"),
            "pooling": ("last", "mean"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name}={getattr(self, name)}: expected one of {', '.join(allowed)}"
                )
        wants_4bit = self.mode in ("qlora", "frozen_4bit")
        if self.load_in_4bit is None:
            self.load_in_4bit = wants_4bit
        elif self.load_in_4bit != wants_4bit:
            raise ValueError(
                f"load_in_4bit={self.load_in_4bit}: expected {wants_4bit} for mode={self.mode} "
                "(qlora and frozen_4bit are 4-bit, lora and frozen are not)"
            )
        if self.lora_r < 1:
            raise ValueError(f"lora_r={self.lora_r}: expected >= 1")
        if self.lora_alpha < 1:
            raise ValueError(f"lora_alpha={self.lora_alpha}: expected >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout}: expected a value in [0, 1)")
        if self.mode in ("qlora", "lora") and not self.lora_targets:
            raise ValueError("lora_targets=[]: expected module names, e.g. [q_proj, v_proj]")
        if self.max_length < 3:
            raise ValueError(f"max_length={self.max_length}: expected >= 3 (BOS, a token, EOS)")

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        """The resolved compute dtype (auto -> bf16 on a bf16-capable CUDA device, else fp32)."""
        if self.compute_dtype == "auto":
            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if cuda_bf16 else torch.float32
        return _DTYPES[self.compute_dtype]


class LlamaTower(nn.Module):
    """A Hugging Face `LlamaModel` (possibly 4-bit, possibly peft-wrapped) and its tokenizer.

    Interface like the other towers: `forward_features` (B, L) -> (B, L, H) float32,
    `pool` (B, L, H) -> (B, H), `forward` = both. `hf_model` is what to save: a
    `PeftModel` in the LoRA modes (`save_adapter` writes the adapter only), else the base.
    """

    def __init__(self, hf_model: nn.Module, tokenizer, mode: str, pooling: str = "last") -> None:
        super().__init__()
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.mode = mode
        self.pooling = pooling
        config = self.base_model.config
        self.hidden_size: int = config.hidden_size
        self.num_heads: int = config.num_attention_heads

    @property
    def base_model(self) -> nn.Module:
        """The `LlamaModel` under the peft wrapper (LoRA layers in place)."""
        get_base = getattr(self.hf_model, "get_base_model", None)
        return get_base() if get_base is not None else self.hf_model

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers (their count bounds the composed model's text cross layers)."""
        return self.base_model.layers

    def forward_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) ids and mask (1 = token, right padding) -> last hidden states (B, L, H) float32."""
        out = self.hf_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state.float()

    def pool(self, h: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L, H), (B, L) -> (B, H): the last real token's state, or the real tokens' mean."""
        keep = attention_mask.to(torch.bool)
        if self.pooling == "last":
            # Index of the last 1 in each row (right padding: length - 1); an empty row gives 0.
            positions = torch.arange(h.shape[1], device=h.device)
            last = (keep * positions).argmax(dim=1)  # (B,)
            return h[torch.arange(h.shape[0], device=h.device), last]
        weights = keep.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) ids and mask -> pooled text vectors (B, H) float32."""
        return self.pool(self.forward_features(input_ids, attention_mask), attention_mask)

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, Tensor]:
        """Texts -> input_ids and attention_mask (B, max_length): BOS .. EOS, right-padded."""
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def save_adapter(self, out_dir: str | Path) -> str:
        """Writes the LoRA adapter in peft format (adapter_config.json + safetensors)."""
        if self.mode not in ("qlora", "lora"):
            raise ValueError(
                f"mode={self.mode}: no adapter to save (only qlora and lora train one)"
            )
        self.hf_model.save_pretrained(str(out_dir))
        return str(out_dir)

    def load_adapter(self, adapter_dir: str | Path) -> None:
        """Loads a peft adapter saved by `save_adapter` into this tower's adapter, in place.

        The adapter must have this tower's rank and target modules; trainability is kept.
        """
        if self.mode not in ("qlora", "lora"):
            raise ValueError(f"mode={self.mode}: no adapter to load into (use qlora or lora)")
        folder = Path(adapter_dir)
        config_file = folder / "adapter_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"adapter={adapter_dir}: no adapter_config.json in the folder")
        saved = json.loads(config_file.read_text())
        ours = self.hf_model.peft_config["default"]
        for key, mine in (("r", ours.r), ("target_modules", ours.target_modules)):
            theirs = saved.get(key)
            if isinstance(mine, (set, list)):
                mine, theirs = sorted(mine), sorted(theirs or [])
            if theirs != mine:
                raise ValueError(
                    f"adapter={adapter_dir}: {key}={theirs} but this tower has {key}={mine}"
                )
        trainable = any(p.requires_grad for p in self.parameters())
        device = next(self.parameters()).device
        result = self.hf_model.load_adapter(
            str(folder), adapter_name="default", is_trainable=trainable, torch_device=str(device)
        )
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing:
            raise ValueError(f"adapter={adapter_dir}: missing {len(missing)} LoRA weights")


def _load_tokenizer(cfg: LlamaTextConfig, folder: Path):
    """The folder's tokenizer, set to BOS .. EOS (kept under truncation) with right padding."""
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"llama.checkpoint={cfg.checkpoint}: no tokenizer in the folder "
            f"(expected one of {', '.join(_TOKENIZER_FILES)})"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise FileNotFoundError(
            f"llama.checkpoint={cfg.checkpoint}: cannot load the tokenizer: {err}"
        ) from err
    if tokenizer.eos_token is None:
        raise ValueError(f"llama.checkpoint={cfg.checkpoint}: the tokenizer has no EOS token")
    if tokenizer.pad_token is None:  # LLaMA ships without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    # The last real token is EOS for every text, so "last" pooling reads the same kind of
    # position everywhere; the post-processor adds it after truncation.
    tokenizer.add_bos_token = tokenizer.bos_token is not None
    tokenizer.add_eos_token = True
    update = getattr(tokenizer, "update_post_processor", None)
    if update is not None:
        update()
    probe = tokenizer("no acute process", truncation=True, max_length=3)["input_ids"]
    if probe[-1] != tokenizer.eos_token_id:
        raise ValueError(
            f"llama.checkpoint={cfg.checkpoint}: {type(tokenizer).__name__} cannot be set to end "
            "every text with EOS (expected a tokenizers-backed tokenizer)"
        )
    return tokenizer


def _load_model(cfg: LlamaTextConfig, folder: Path, device_map: dict | None) -> nn.Module:
    """The base `LlamaModel` from the folder, quantized to 4 bits when the mode says so."""
    dtype = cfg.torch_compute_dtype
    quantization = None
    if cfg.load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=_DTYPES[cfg.quant_storage],
        )
    try:
        model = AutoModel.from_pretrained(
            folder,
            dtype=dtype,
            quantization_config=quantization,
            attn_implementation="sdpa",
            device_map=device_map,
            local_files_only=True,
        )
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"llama.checkpoint={cfg.checkpoint}: cannot load a LLaMA model: {err}"
        ) from err
    model.config.use_cache = False
    if cfg.load_in_4bit:
        _keep_4bit_layers_differentiable(model)
    return model


def _keep_4bit_layers_differentiable(model: nn.Module) -> None:
    """Stops bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, a `Linear4bit` called in eval mode on an input that needs no
    gradient rewrites its weight, once and in place, into a layout for a kernel without
    autograd. Every later call, in training mode too, goes through that kernel: gradients
    stop at each 4-bit layer, so after the first evaluation no LoRA matrix receives a
    gradient again (only a UserWarning says so), and outputs shift by the kernel's bf16
    rounding. `from_pretrained` returns the model in eval mode, so a forward before
    `.train()` is enough to trigger it. Turning the fast path off keeps one numerics for
    training and evaluation (CPU evaluation is slower; GPUs never take this path).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def build_llama_tower(cfg: LlamaTextConfig, device: str | torch.device | None = None) -> LlamaTower:
    """Loads the local checkpoint (4-bit where the mode says) and applies `cfg.mode`.

    qlora: `prepare_model_for_kbit_training` (freezes the base, upcasts its non-quantized
    weights to fp32) then peft LoRA; lora: peft LoRA on the compute-dtype model; frozen and
    frozen_4bit: nothing trains. `device` places the weights at load time (`device_map`),
    so 4-bit weights are quantized there without a full-precision copy; leave it None
    under ZeRO-3, which refuses a device map.
    """
    folder = local_checkpoint(cfg.checkpoint, "llama.checkpoint", "a LLaMA model")
    tokenizer = _load_tokenizer(cfg, folder)
    device_map = None if device is None else {"": str(device)}
    model = _load_model(cfg, folder, device_map)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"llama.checkpoint={cfg.checkpoint}: the tokenizer has {len(tokenizer)} tokens but "
            f"the model's embedding has only {rows} rows; use the tokenizer saved with this model"
        )
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and cfg.max_length > max_positions:
        raise ValueError(
            f"llama.max_length={cfg.max_length}: expected <= {max_positions}, "
            "the model's max_position_embeddings"
        )
    checkpointing = {"use_reentrant": False}  # reentrant checkpointing needs grad-requiring inputs
    if cfg.mode in ("frozen", "frozen_4bit"):
        model.requires_grad_(False)
    else:
        if cfg.mode == "qlora":
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.gradient_checkpointing,
                gradient_checkpointing_kwargs=checkpointing,
            )
        elif cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model = apply_lora(model, cfg, "llama")
    return LlamaTower(model, tokenizer, cfg.mode, cfg.pooling)


def load_quantization_state(model: nn.Module, state: dict[str, Tensor]) -> set[str]:
    """Restores every 4-bit weight of `model` from a state dict its `state_dict()` wrote.

    bitsandbytes writes a 4-bit weight as the packed weight plus its quantization constants
    (`<weight>.absmax`, `.quant_map`, the nested statistics, `.quant_state.bitsandbytes__nf4`),
    but `load_state_dict` accepts only the packed weight. Each such weight is rebuilt here from
    both, exactly as saved. Returns the constants' keys, for the caller to leave out of
    `load_state_dict` (the packed weights stay in: loading them again copies equal data).
    """
    used: set[str] = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if getattr(weight, "quant_state", None) is None:
            continue
        from bitsandbytes.nn import Params4bit  # only 4-bit models reach this

        key = f"{name}.weight" if name else "weight"
        stats = {k[len(key) + 1 :]: v for k, v in state.items() if k.startswith(key + ".")}
        if key not in state or not stats:
            continue  # the caller's key check names what is missing
        used |= {f"{key}.{k}" for k in stats}  # before from_prequantized consumes `stats`
        module.weight = Params4bit.from_prequantized(
            state[key], stats, requires_grad=False, device=weight.device, module=module
        )
    return used


def lora_param_count(hidden: int, layers: int, r: int, modules: int) -> int:
    """Trainable LoRA parameters for `modules` square (hidden -> hidden) projections per layer.

    Each adapted `hidden x hidden` linear gets A (r x hidden) and B (hidden x r). True of
    q, k, v, o in LLaMA-2-7B/13B; not of k, v under grouped-query attention or the MLP.
    LLaMA-2-7B with r=8 on q and v: 32 x 2 x 8 x (4096 + 4096) = 4,194,304.
    """
    return layers * modules * r * (hidden + hidden)


def model_state_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored, each tensor counted once.

    A 4-bit weight counts as its packed storage plus its quantization constants (absmax,
    the double-quantization state, the code table), as bitsandbytes keeps them.
    """
    seen: set[int] = set()
    total = 0

    def add(t: Tensor | None) -> None:
        nonlocal total
        if t is None or t.data_ptr() in seen:
            return
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()

    for tensor in [*module.parameters(), *module.buffers()]:
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        while state is not None:  # the state of the absmax, when double-quantized
            add(state.absmax)
            add(state.code)
            add(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
    return total


def make_tiny_llama_checkpoint(
    out_dir: str | Path,
    corpus: list[str],
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    seed: int = 0,
) -> str:
    """Writes a small random-init `LlamaForCausalLM` and a SentencePiece tokenizer from `corpus`.

    For tests and the demo (no model hub); laid out like a LLaMA-2 folder (config.json,
    model.safetensors, tokenizer.model, tokenizer_config.json), loadable by
    `LlamaTokenizer.from_pretrained(out_dir)` and `AutoModel.from_pretrained(out_dir)`.

    The tokenizer is a LLaMA-2-style SentencePiece BPE with byte fallback: <unk>=0, <s>=1,
    </s>=2, then the 256 byte pieces, so `vocab_size` must leave room for those plus the
    corpus's characters (it is an upper bound; the model gets exactly the tokenizer's size).
    `intermediate_size` defaults to LLaMA's 8/3 x hidden, rounded up to a multiple of 64:
    hidden_size and intermediate_size must be multiples of 64, the widths bitsandbytes' CPU
    inference repack of 4-bit layers accepts (see the module docstring). The global torch
    RNG is left untouched. Returns out_dir.
    """
    import sentencepiece as spm  # only needed to train a tokenizer

    if not corpus:
        raise ValueError("corpus is empty: expected sentences to train the tokenizer on")
    if intermediate_size is None:
        intermediate_size = math.ceil(8 * hidden_size / 3 / CPU_4BIT_MULTIPLE) * CPU_4BIT_MULTIPLE
    for name, size in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if size < 1 or size % CPU_4BIT_MULTIPLE:
            raise ValueError(
                f"{name}={size}: expected a positive multiple of {CPU_4BIT_MULTIPLE} "
                "(bitsandbytes' CPU kernel for 4-bit layers needs widths divisible by 64)"
            )
    if hidden_size % num_heads:
        raise ValueError(f"num_heads={num_heads}: expected a divisor of hidden_size={hidden_size}")
    chars = len(set("".join(corpus)))
    minimum = 3 + 256 + chars  # specials + byte pieces + one piece per character
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size}: expected >= {minimum} "
            f"(3 special + 256 byte-fallback pieces + {chars} characters of the corpus)"
        )
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model_file,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not fill vocab_size
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model_file.getvalue())
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": None,
                "add_bos_token": True,
                "add_eos_token": False,
            },
            indent=2,
        )
    )
    tokenizer = LlamaTokenizer.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    return str(out)
