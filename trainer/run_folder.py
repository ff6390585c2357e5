"""A finished run folder as a model: its resolved config and exported weights, scored on any
shard split without training (`scripts/evaluate.py`).

    RUN_DIR/config.yaml          the resolved config the run trained with
    RUN_DIR/model.safetensors    its full weights (trainer.checkpoint.export_weights)

Scoring goes through the run's own task (trainer/tasks.py) on the same code path as the
run's final evaluation, so evaluating the run's test split reproduces its own numbers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import load_file

from models.alifuse import build_model
from models.llama_text import load_quantization_state
from shards.reader import ShardSet
from trainer.config import Config, load_config, run_label_names
from trainer.distributed import build_accelerator, describe, model_device
from trainer.loop import Mover
from trainer.tasks import EvalContext, build_task

log = logging.getLogger("medalign")

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
# The AD shard writer's summary word limit when a manifest does not record one (the paper's 40).
DEFAULT_WORD_LIMIT = 40


def load_run_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The run's resolved config, with `key.sub=value` overrides (e.g. a moved checkpoint
    folder: model.text.checkpoint=/new/path). Its weights come from the run, so
    train.init_from is cleared."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not a run folder (no {CONFIG_FILE}); expected the "
            "train.output_dir of a finished run"
        )
    return load_config(str(path), ["train.init_from=", *overrides])


def load_run_weights(model: torch.nn.Module, run_dir: str | Path) -> None:
    """Loads RUN_DIR/model.safetensors into `model`; every key must match (names and shapes)."""
    path = Path(run_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no exported weights; a run writes them when it finishes")
    state = load_file(str(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit the model its config.yaml builds: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shapes {wrong[:5]}"
        )
    quantized = load_quantization_state(model, state)  # 4-bit weights and their constants
    model.load_state_dict({k: v for k, v in state.items() if k not in quantized}, strict=True)


def summary_word_limit(cfg: Config) -> int:
    """Words of a narrative summary that the run's clinical texts keep: data.clinical.summary_words
    when set, else the word_limit the AD writer recorded in the training split's manifest, else
    the writer's default (scripts/make_ad_shards.py --word-limit)."""
    if cfg.data.clinical.summary_words:
        return cfg.data.clinical.summary_words
    try:
        return ShardSet.load(cfg.data.train).word_limit
    except (FileNotFoundError, ValueError, KeyError) as err:
        log.warning(
            "the training split's manifest cannot be read (%s): clinical summaries are cut to "
            "%d words, the writer's default; pass data.clinical.summary_words=N to match the "
            "run's shards",
            err,
            DEFAULT_WORD_LIMIT,
        )
        return DEFAULT_WORD_LIMIT


def split_name(folder: str) -> str:
    """A split's name: its manifest's "split" (test, AIBL, ...), else the folder's name."""
    return ShardSet.load(folder).name


def evaluate_run(
    run_dir: str | Path,
    splits: list[str],
    out_dir: str | Path | None = None,
    names: list[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Scores the run's exported model on each split folder; writes OUT/results.json and the
    task's plots and predictions (OUT defaults to RUN_DIR/eval). Returns the results."""
    cfg = load_run_config(run_dir, overrides)
    names = list(names) if names else [split_name(folder) for folder in splits]
    if len(names) != len(splits):
        raise ValueError(f"{len(names)} names for {len(splits)} splits: expected one per --split")
    if len(set(names)) != len(names):
        raise ValueError(f"split names {names} repeat; name them with --name")
    task = build_task(cfg)
    task.label_names = run_label_names(run_dir)  # the shards must name the run's labels
    for folder in splits:
        task.check(ShardSet.load(folder))
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "eval"
    accelerator = build_accelerator(cfg)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(
            "evaluation holds the whole model on every rank: launch without --use_deepspeed "
            "(one process, or accelerate launch --multi_gpu)"
        )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    log.info("evaluate %s on %s: %s", run_dir, names, describe(accelerator))
    set_seed(cfg.train.seed)
    model = build_model(cfg.model, model_device(accelerator))
    load_run_weights(model, run_dir)
    model = accelerator.prepare(model)
    ctx = EvalContext(cfg, model, accelerator, Mover(accelerator), model_tokenizer(model), out)
    results = {
        name: task.evaluate(ctx, name, folder, plots=True)
        for name, folder in zip(names, splits, strict=True)
    }
    if accelerator.is_main_process:
        record = {"run": str(run_dir), "splits": dict(zip(names, splits, strict=True))}
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "evaluated.json").write_text(json.dumps(record, indent=2))
    accelerator.wait_for_everyone()
    return results


def model_tokenizer(model: torch.nn.Module) -> Any:
    """The tokenizer a (possibly wrapped) model's batches are tokenized with; None for image-only."""
    bare = getattr(model, "module", model)
    return getattr(bare, "tokenizer", None)
