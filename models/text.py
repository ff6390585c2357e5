"""BERT-family text tower from a local Hugging Face folder, frozen, LoRA or fully trained.

The model is plain Hugging Face; the training mode is applied from outside by
`build_text_tower` (peft for LoRA). `TextTower` exposes the pass in parts so that the
composed model can insert cross-attention blocks between BERT layers (the image-grounded
text encoder) and reuse the checkpoint's own MLM head.

LoRA and the MLM head: in "lora" mode only the LoRA matrices train; the MLM head stays
frozen too. Its decoder is tied to the word embeddings (training it would train the
embeddings), its transform was pretrained for exactly this task, and keeping it frozen
keeps `hf_model.save_pretrained` an adapter-only checkpoint that loads onto the original
folder. The trainable cross-attention blocks in front of it carry the adaptation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer
from torch import Tensor, nn
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertTokenizerFast,
)
from transformers.masking_utils import create_bidirectional_mask

# Files of which at least one holds a tokenizer's vocabulary; without them AutoTokenizer can
# silently build a tokenizer that knows only the special tokens.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class TextConfig:
    """The text tower: which local checkpoint, how it trains, how text is masked."""

    checkpoint: str = ""  # local Hugging Face folder of a BERT-family model (+ its tokenizer)
    mode: Literal["frozen", "lora", "full"] = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])
    max_length: int = 70
    mlm_probability: float = 0.15
    # How token states become one text vector: the [CLS] state (BERT's habit) or the mean of
    # the non-padding states (more varied across inputs when the tower starts untrained).
    pooling: Literal["cls", "mean"] = "cls"

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise ValueError(f"lora_r={self.lora_r}: expected >= 1")
        if self.lora_alpha < 1:
            raise ValueError(f"lora_alpha={self.lora_alpha}: expected >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout}: expected a value in [0, 1)")
        if self.mode == "lora" and not self.lora_targets:
            raise ValueError("lora_targets=[]: expected module names, e.g. [query, value]")
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length}: expected >= 2 ([CLS] and [SEP])")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability={self.mlm_probability}: expected a value in (0, 1)")


class TextTower(nn.Module):
    """A Hugging Face masked-LM (possibly peft-wrapped) and its tokenizer, exposed in parts.

    `hf_model` is the (possibly peft) model to `save_pretrained`; `layers` are its encoder
    layers; `embed` -> `run_layers` is the encoder; `mlm_logits` is the checkpoint's MLM
    head. Interface like the image tower: `forward_features` -> `pool` (CLS).
    """

    def __init__(self, hf_model: nn.Module, tokenizer, mode: str, pooling: str = "cls") -> None:
        super().__init__()
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.mode = mode
        self.pooling = pooling
        config = self.mlm_model.config
        self.hidden_size: int = config.hidden_size
        self.num_heads: int = config.num_attention_heads
        self.layer_norm_eps: float = getattr(config, "layer_norm_eps", 1e-12)
        self.vocab_size = len(tokenizer)  # random MLM replacements come from the tokenizer
        self.mask_token_id: int = tokenizer.mask_token_id
        special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.register_buffer("special_ids", special, persistent=False)

    @property
    def mlm_model(self) -> nn.Module:
        """The Hugging Face *ForMaskedLM model under the peft wrapper (LoRA layers in place)."""
        get_base = getattr(self.hf_model, "get_base_model", None)
        return get_base() if get_base is not None else self.hf_model

    @property
    def encoder_model(self) -> nn.Module:
        """The bare encoder (e.g. `BertModel`): embeddings + encoder.layer."""
        return self.mlm_model.base_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder_model.encoder.layer

    @property
    def mlm_head(self) -> nn.Module:
        model = self.mlm_model
        return model.cls if hasattr(model, "cls") else model.lm_head

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, L) -> (B, L, H): word + position (+ token type) embeddings, normed."""
        return self.encoder_model.embeddings(input_ids=input_ids)

    def layer_mask(self, h: Tensor, attention_mask: Tensor) -> Tensor | None:
        """The mask the layers take, for the model's attention implementation (None: no padding)."""
        return create_bidirectional_mask(
            config=self.encoder_model.config, inputs_embeds=h, attention_mask=attention_mask
        )

    def run_layers(
        self,
        h: Tensor,
        attention_mask: Tensor,
        start: int = 0,
        end: int | None = None,
        cross_blocks: Mapping[int, nn.Module] | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """Runs layers [start, end) on h (B, L, H) -> (B, L, H); attention_mask (B, L) 1=token.

        `cross_blocks[i]` grounds layer i in `context` (B, M, Dc) with `context_mask` (B, M)
        True=keep: a `CrossBlock` runs right after layer i, a `CrossAttentionLayer`
        (`inside_block`) inside it, between its self-attention and its feed-forward part (where
        BERT's own decoder layers put cross-attention). A CrossBlock at key `start - 1` runs
        first: it continues a pass whose last layer was `start - 1` (a shared trunk).
        """
        cross = {} if cross_blocks is None else cross_blocks
        end = len(self.layers) if end is None else end
        mask = self.layer_mask(h, attention_mask)
        before = cross.get(start - 1)
        if before is not None and not before.inside_block:
            h = before(h, context, context_mask)
        for i in range(start, end):
            layer, inserted = self.layers[i], cross.get(i)
            if inserted is not None and inserted.inside_block:
                h = layer.attention(h, attention_mask=mask)[0]
                h = layer.feed_forward_chunk(inserted(h, context, context_mask))
                continue
            h = layer(h, attention_mask=mask)
            if inserted is not None:
                h = inserted(h, context, context_mask)
        return h

    def supports_inner_cross_attention(self) -> bool:
        """Whether each layer splits into `attention` and `feed_forward_chunk` (BERT-shaped
        layers do), which a cross-attention layer between them needs."""
        return all(
            hasattr(layer, "attention") and hasattr(layer, "feed_forward_chunk")
            for layer in self.layers
        )

    def forward_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) ids and mask -> last hidden states (B, L, H)."""
        return self.run_layers(self.embed(input_ids), attention_mask)

    def pool(self, h: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L, H), (B, L) -> (B, H): the [CLS] state, or the mean over non-padding tokens."""
        if self.pooling == "cls":
            return h[:, 0]
        keep = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return (h * keep).sum(1) / keep.sum(1).clamp(min=1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.pool(self.forward_features(input_ids, attention_mask), attention_mask)

    def mlm_logits(self, h: Tensor) -> Tensor:
        """(B, L, H) -> (B, L, V) through the checkpoint's own MLM head."""
        return self.mlm_head(h)

    def mask_tokens(
        self, input_ids: Tensor, attention_mask: Tensor, probability: float
    ) -> tuple[Tensor, Tensor]:
        """BERT masking: (B, L) ids -> (masked ids, labels), global torch RNG.

        Each real, non-special token is picked with `probability`; a picked token becomes
        [MASK] 80% of the time, a random token 10%, itself 10%. Special tokens ([CLS],
        [SEP], [PAD], ...) and padding are never picked. labels = original id where picked,
        -100 elsewhere.
        """
        shape, device = input_ids.shape, input_ids.device
        never = torch.isin(input_ids, self.special_ids) | (attention_mask == 0)
        probs = torch.full(shape, probability, device=device).masked_fill(never, 0.0)
        picked = torch.bernoulli(probs).bool()
        labels = input_ids.masked_fill(~picked, -100)
        to_mask = torch.bernoulli(torch.full(shape, 0.8, device=device)).bool() & picked
        to_random = (
            torch.bernoulli(torch.full(shape, 0.5, device=device)).bool() & picked & ~to_mask
        )
        random_ids = torch.randint(self.vocab_size, shape, device=device, dtype=input_ids.dtype)
        masked = input_ids.masked_fill(to_mask, self.mask_token_id)
        masked = torch.where(to_random, random_ids, masked)
        return masked, labels

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, Tensor]:
        """Texts -> input_ids and attention_mask (B, max_length), padded and truncated."""
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def apply_lora(model: nn.Module, cfg, section: str) -> nn.Module:
    """peft LoRA from `cfg.lora_*` (r, alpha, dropout, targets); everything else is frozen.

    A target that matches no module is an error naming `<section>.lora_targets`.
    """
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
    )
    try:
        return get_peft_model(model, lora)  # freezes everything but the LoRA matrices
    except ValueError as err:
        raise ValueError(f"{section}.lora_targets={cfg.lora_targets}: {err}") from err


def local_checkpoint(checkpoint: str, key: str, what: str) -> Path:
    """The local Hugging Face folder `checkpoint` (config key `key`), or an error naming it.

    The model hub is never used: a hub name such as "bert-base-uncased" is refused.
    """
    if not checkpoint:
        raise ValueError(
            f"{key} is empty: set it to a local Hugging Face folder of {what} and its tokenizer"
        )
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{key}={checkpoint}: not a local folder (the model hub is not used; point it to "
            "a folder with config.json, the weights and the tokenizer files)"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{key}={checkpoint}: no config.json in the folder")
    return folder


def _load(cfg: TextConfig):
    """(masked-LM model, tokenizer) from the local folder, with errors that name the folder."""
    folder = local_checkpoint(cfg.checkpoint, "text.checkpoint", "a BERT-family model")
    tokenizer = load_tokenizer(folder, "text.checkpoint")
    try:
        model = AutoModelForMaskedLM.from_pretrained(
            folder, attn_implementation="sdpa", local_files_only=True
        )
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"text.checkpoint={cfg.checkpoint}: cannot load a masked-LM model: {err}"
        ) from err
    return model, tokenizer


def load_tokenizer(folder: Path, key: str):
    """The tokenizer saved in a local checkpoint folder; errors name `key` and the folder."""
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{key}={folder}: no tokenizer in the folder "
            f"(expected one of {', '.join(_TOKENIZER_FILES)})"
        )
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise FileNotFoundError(f"{key}={folder}: cannot load the tokenizer: {err}") from err


def _check(cfg: TextConfig, model: nn.Module, tokenizer) -> None:
    """The tokenizer must fit the model, and the model must be a BERT-shaped masked LM."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"text.checkpoint={cfg.checkpoint}: the tokenizer has {len(tokenizer)} tokens but the "
            f"model's embedding has only {rows} rows; use the tokenizer saved with this model"
        )
    for name in ("mask_token_id", "pad_token_id", "cls_token_id"):
        if getattr(tokenizer, name) is None:
            raise ValueError(f"text.checkpoint={cfg.checkpoint}: the tokenizer has no {name[:-3]}")
    base = model.base_model
    if not (hasattr(base, "embeddings") and hasattr(getattr(base, "encoder", None), "layer")):
        raise ValueError(
            f"text.checkpoint={cfg.checkpoint}: {type(model).__name__} is not BERT-shaped "
            "(expected embeddings and encoder.layer)"
        )
    if not (hasattr(model, "cls") or hasattr(model, "lm_head")):
        raise ValueError(
            f"text.checkpoint={cfg.checkpoint}: {type(model).__name__} has no MLM head (cls / lm_head)"
        )
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and cfg.max_length > max_positions:
        raise ValueError(
            f"text.max_length={cfg.max_length}: expected <= {max_positions}, "
            f"the model's max_position_embeddings"
        )


def build_text_tower(cfg: TextConfig) -> TextTower:
    """Loads the local checkpoint with SDPA attention and applies `cfg.mode`.

    frozen: no parameter trains. lora: peft LoRA on `cfg.lora_targets`; only the LoRA
    matrices train (the MLM head stays frozen, see the module docstring). full: all train.
    """
    model, tokenizer = _load(cfg)
    _check(cfg, model, tokenizer)
    if cfg.mode == "frozen":
        model.requires_grad_(False)
    elif cfg.mode == "lora":
        model = apply_lora(model, cfg, "text")
    else:
        model.requires_grad_(True)
    return TextTower(model, tokenizer, cfg.mode, cfg.pooling)


def make_tiny_bert_checkpoint(
    out_dir: str | Path,
    corpus: list[str],
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    vocab_size: int = 2000,
    seed: int = 0,
) -> str:
    """Writes a small random-init BERT masked LM and a WordPiece tokenizer trained on `corpus`.

    For tests and the demo (no model hub). `vocab_size` caps the trained vocabulary; the
    model's embedding gets exactly the tokenizer's size. Special tokens [PAD] [UNK] [CLS]
    [SEP] [MASK] take ids 0-4. The global torch RNG is left untouched. Returns out_dir.
    """
    if not corpus:
        raise ValueError("corpus is empty: expected sentences to train the tokenizer on")
    wordpiece = Tokenizer(WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    wordpiece.train_from_iterator(corpus, trainer)
    # BertTokenizerFast rebuilds normalizer, pre-tokenizer and [CLS] .. [SEP] template itself.
    tokenizer = BertTokenizerFast(vocab=wordpiece.get_vocab())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForMaskedLM(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
