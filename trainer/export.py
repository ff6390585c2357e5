"""A finished run as parts other libraries load: the ViT as safetensors + its config, the text
tower in Hugging Face layout, the LoRA adapter in peft layout, and every other weight
(projections, temperature, pools, fusion and label heads) in one safetensors file.

    OUT/image_tower/model.safetensors   the ViT's state dict (models.vit.VisionTransformer)
    OUT/image_tower/config.json         its VisionConfig
    OUT/text_tower/                     save_pretrained of the text tower and its tokenizer:
                                        BERT as its masked-LM model, LLaMA as the base
                                        LlamaModel (a 4-bit tower as bitsandbytes serializes it);
                                        the base without LoRA for a LoRA tower
    OUT/text_adapter/                   the LoRA adapter (peft) of text.mode lora, llama.mode
                                        qlora / lora
    OUT/text_merged/                    with merge_lora: the adapter merged into its base (a
                                        4-bit base dequantised to bf16 first)
    OUT/heads.safetensors               every weight of the composed model outside both towers
    OUT/config.yaml, results.json       the run's
    OUT/export.json                     what the folder holds (read by `load_export`)
    OUT/README.md                       a model card: config, results, files, how to load each

`load_export` builds the run's model from such a folder (trainer.inference.Predictor.from_export).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

from models.alifuse import build_model
from models.llama_text import LlamaTower
from trainer.config import LABELS_FILE, Config, load_config
from trainer.run_folder import (
    CONFIG_FILE,
    load_run_config,
    load_run_weights,
    summary_word_limit,
)

FORMAT = "medalign-export-v1"
MANIFEST = "export.json"
IMAGE_DIR, TEXT_DIR, ADAPTER_DIR, MERGED_DIR = (
    "image_tower",
    "text_tower",
    "text_adapter",
    "text_merged",
)
IMAGE_WEIGHTS = "model.safetensors"
HEADS_FILE = "heads.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOWERS = ("visual.", "text.")  # state-dict prefixes of the two towers
# transformers warns that a pre-quantized folder's own quantization_config wins over the one
# models/llama_text.py passes again: it is the same config, so the warning says nothing here.
_REQUANTIZE_WARNING = r".*already has a `quantization_config` attribute.*"


def _towers(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    return getattr(model, "visual", None), getattr(model, "text", None)


def _is_4bit(module: nn.Module) -> bool:
    return any(getattr(p, "quant_state", None) is not None for p in module.parameters())


def export_run(
    run_dir: str | Path, out_dir: str | Path, merge_lora: bool = False, device: str = "cpu"
) -> dict[str, Any]:
    """Writes the export folder of a finished run (see the module docstring); returns what
    export.json records. The model is built and loaded here, on `device`, for this alone.
    OUT must be empty, new, or an earlier export (whose parts are replaced)."""
    run, out = Path(run_dir), Path(out_dir)
    cfg = load_run_config(run)
    if cfg.model.arch != "alifuse":
        raise ValueError(
            f"{run / CONFIG_FILE}: model.arch={cfg.model.arch}; export writes the towers of "
            "model.arch=alifuse models (every task); use RUN_DIR/model.safetensors for the others"
        )
    model = build_model(cfg.model, device)
    load_run_weights(model, run)
    visual, text = _towers(model)
    if merge_lora and not isinstance(getattr(text, "hf_model", None), PeftModel):
        mode = "none" if text is None else text.mode
        raise ValueError(f"--merge-lora: the run's text tower ({mode}) has no LoRA adapter")
    _clear(out)
    state = model.state_dict()
    heads = {k: v.detach().cpu().clone() for k, v in state.items() if not k.startswith(TOWERS)}
    save_file(heads, str(out / HEADS_FILE), metadata={"format": "pt"})
    if visual is not None:
        (out / IMAGE_DIR).mkdir()
        weights = {k: v.detach().cpu().contiguous() for k, v in visual.state_dict().items()}
        save_file(weights, str(out / IMAGE_DIR / IMAGE_WEIGHTS), metadata={"format": "pt"})
        config = json.dumps(dataclasses.asdict(cfg.model.vision), indent=2)
        (out / IMAGE_DIR / "config.json").write_text(config + "\n")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "run": str(run.resolve()),
        "task": cfg.model.task,
        "image_tower": visual is not None,
        "text_tower": None,
        "text_mode": None,
        "quantized_4bit": False,
        "adapter": False,
        "merged": merge_lora,
        "word_limit": summary_word_limit(cfg),
    }
    if text is not None:
        manifest.update(_export_text(text, out))
    if merge_lora:
        merge_adapter(out, manifest["text_tower"], manifest["quantized_4bit"])
    shutil.copy(run / CONFIG_FILE, out / CONFIG_FILE)
    for name in ("results.json", LABELS_FILE):
        if (run / name).is_file():
            shutil.copy(run / name, out / name)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    manifest["files"] = [*written, MANIFEST, "README.md"]
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").write_text(model_card(cfg, manifest, out))
    return manifest


def _clear(out: Path) -> None:
    """Makes OUT ready: created when missing; an earlier export's parts removed; any other
    non-empty folder refused (nothing of a user's is deleted)."""
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise ValueError(f"{out}: not empty and not an export folder; expected a new folder")
        for name in json.loads((out / MANIFEST).read_text()).get("files", []):
            (out / name).unlink(missing_ok=True)
        for folder in (IMAGE_DIR, TEXT_DIR, ADAPTER_DIR, MERGED_DIR):
            shutil.rmtree(out / folder, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _export_text(tower: nn.Module, out: Path) -> dict[str, Any]:
    """text_tower/ (+ text_adapter/): the base model in Hugging Face layout, the LoRA adapter
    apart, and the tokenizer beside the base."""
    kind = "llama" if isinstance(tower, LlamaTower) else "bert"
    hf = tower.hf_model
    adapter = isinstance(hf, PeftModel)
    if adapter:
        # The adapter's base is the exported tower (peft's AutoPeftModel loads it from there).
        hf.peft_config["default"].base_model_name_or_path = str((out / TEXT_DIR).resolve())
        # LoRA modes never train the embeddings: the adapter holds the LoRA matrices only.
        hf.save_pretrained(str(out / ADAPTER_DIR), save_embedding_layers=False)
        hf = hf.unload()  # the LoRA layers taken out, nothing merged: the base as trained
    hf.save_pretrained(str(out / TEXT_DIR))
    tokenizer = tower.tokenizer
    # The towers pool the last real token of right-padded text; a LLaMA tokenizer loads with
    # left padding unless its config says otherwise.
    tokenizer.init_kwargs["padding_side"] = tokenizer.padding_side
    tokenizer.save_pretrained(str(out / TEXT_DIR))
    return {
        "text_tower": kind,
        "text_mode": tower.mode,
        "adapter": adapter,
        "quantized_4bit": _is_4bit(hf),
    }


def merge_adapter(out: Path, kind: str, quantized: bool) -> Path:
    """text_merged/: text_tower/ + text_adapter/ loaded as a user would, the adapter merged
    in (peft merge_and_unload). A 4-bit base is dequantised to bf16 first, and the merged
    model is saved in bf16."""
    auto = AutoModelForMaskedLM if kind == "bert" else AutoModel
    dtype = torch.bfloat16 if quantized else None
    base = auto.from_pretrained(str(out / TEXT_DIR), dtype=dtype, local_files_only=True)
    if quantized:
        base = base.dequantize(dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(base, str(out / ADAPTER_DIR)).merge_and_unload()
    if quantized:
        merged = merged.to(torch.bfloat16)
    folder = out / MERGED_DIR
    merged.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(out / TEXT_DIR)).save_pretrained(str(folder))
    return folder


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """EXPORT_DIR/export.json, checked."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not an export folder (no {MANIFEST}); write one with scripts/export.py"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_export(
    export_dir: str | Path, device: str | torch.device = "cpu", merged: bool = False
) -> tuple[Config, nn.Module, dict[str, Any]]:
    """(config, model, export.json) of an export folder: the run's model rebuilt from its
    parts (the text tower from text_tower/ or, with `merged`, text_merged/), in eval mode."""
    folder = Path(export_dir)
    manifest = read_manifest(folder)
    overrides = ["train.init_from="]
    kind = manifest["text_tower"]
    if kind is not None:
        section = "llama" if kind == "llama" else "text"
        source = folder / (MERGED_DIR if merged else TEXT_DIR)
        if not source.is_dir():
            raise FileNotFoundError(
                f"{source}: not in the export" + (" (export with --merge-lora)" if merged else "")
            )
        overrides.append(f"model.{section}.checkpoint={source}")
        if merged:  # full-precision merged weights: nothing to quantize, no adapter to add
            overrides.append(f"model.{section}.mode=frozen")
            if section == "llama":
                overrides.append("model.llama.load_in_4bit=false")
    elif merged:
        raise ValueError(f"{folder}: merged=True, but the export has no text tower")
    cfg = load_config(str(folder / CONFIG_FILE), overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_REQUANTIZE_WARNING)
        model = build_model(cfg.model, device)
    visual, text = _towers(model)
    if visual is not None:
        visual.load_state_dict(load_file(str(folder / IMAGE_DIR / IMAGE_WEIGHTS)))
    result = model.load_state_dict(load_file(str(folder / HEADS_FILE)), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(TOWERS)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{folder / HEADS_FILE} does not fit the model its config.yaml builds: missing "
            f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if manifest["adapter"] and not merged:
        path = folder / ADAPTER_DIR / ADAPTER_WEIGHTS
        loaded = set_peft_model_state_dict(text.hf_model, load_file(str(path)))
        if loaded.unexpected_keys:
            raise ValueError(
                f"{path}: weights the tower has no place for: {loaded.unexpected_keys[:5]}"
            )
    return cfg, model.eval(), manifest


def model_card(cfg: Config, manifest: dict[str, Any], out: Path) -> str:
    """README.md of an export folder: what the run was, the files, how to load each part, its
    results and its config."""
    results = out / "results.json"
    scores = json.dumps(json.loads(results.read_text()), indent=2) if results.is_file() else "{}"
    kind = manifest["text_tower"]
    image = f"{cfg.model.vision.spatial_dims}D ViT" if manifest["image_tower"] else "none"
    text = "none"
    if kind:
        text = f"{kind} ({manifest['text_mode']}{', 4-bit' if manifest['quantized_4bit'] else ''})"
    imports = ["import json", "", "from safetensors.torch import load_file"]
    code = [f'heads = load_file("{HEADS_FILE}")  # every weight outside the two towers']
    if manifest["image_tower"]:
        imports.append("from models.vit import VisionConfig, VisionTransformer")
        code += [
            f'vit = VisionTransformer(VisionConfig(**json.load(open("{IMAGE_DIR}/config.json"))))',
            f'vit.load_state_dict(load_file("{IMAGE_DIR}/{IMAGE_WEIGHTS}"))',
        ]
    if kind:
        auto = "AutoModelForMaskedLM" if kind == "bert" else "AutoModel"
        imports.append(f"from transformers import AutoTokenizer, {auto}")
        code += [
            f'tokenizer = AutoTokenizer.from_pretrained("{TEXT_DIR}")',
            f'text = {auto}.from_pretrained("{TEXT_DIR}")'
            + ("  # needs bitsandbytes" if manifest["quantized_4bit"] else ""),
        ]
        if manifest["adapter"]:
            imports.append("from peft import PeftModel")
            code.append(f'text = PeftModel.from_pretrained(text, "{ADAPTER_DIR}")')
        if manifest["merged"]:
            code.append(f'merged = {auto}.from_pretrained("{MERGED_DIR}")  # the adapter merged in')
    notes = []
    if cfg.model.has_itc:
        notes.append(
            "ITC embeddings: an image's is `normalize(image_proj(vit.pool(vit.forward_features"
            "(image))))`, a text's `normalize(text_proj(pooled))` with the text tower's last "
            "hidden states pooled as `model.text.pooling` / `model.llama.pooling` says ([CLS] "
            "or the mean for BERT, the last real token or the mean for LLaMA); image_proj and "
            "text_proj are the `image_proj.*` / `text_proj.*` weights of heads.safetensors."
        )
    notes.append(
        "Inputs must be preprocessed as in training: images and volumes as "
        "`trainer.inference.Predictor.load_image` does, texts in `data.prompt_template` and "
        "right-padded (docs/INFERENCE.md)."
    )
    if manifest["quantized_4bit"]:
        notes.append(
            "The 4-bit tower computes as in training only with bitsandbytes' CPU inference "
            "repack off (on CPUs with AVX512-BF16 it rounds through bf16): set "
            "`module.support_avx512bf16_for_cpu = False` on every module that has the "
            "attribute. `Predictor.from_export` does."
        )
    lines = [
        f"# medalign export: a {cfg.model.task} model",
        "",
        f"Exported from `{manifest['run']}`. Image tower: {image}. Text tower: {text}.",
        "",
        "## Files",
        "",
        *(f"- `{name}`" for name in manifest["files"]),
        "",
        "## Loading",
        "",
        "The whole model with the run's preprocessing (medalign's `trainer/inference.py`):",
        "",
        "```python",
        "from trainer.inference import Predictor",
        "",
        f'predictor = Predictor.from_export("{out.name}")',
        "```",
        "",
        "Each part with the library it was written for:",
        "",
        "```python",
        *imports,
        "",
        *code,
        "```",
        "",
        *(line for note in notes for line in (note, "")),
        "## Results",
        "",
        "```json",
        scores,
        "```",
        "",
        "## Config",
        "",
        "```yaml",
        (out / CONFIG_FILE).read_text().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
