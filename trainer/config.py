"""The one config schema: data, model, optim and train sections, each owned by its component.

A preset YAML holds only the values that differ from these defaults; `key.sub=value`
overrides on the command line come last. The resolved config is saved in the run folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from models.alifuse import AlifuseConfig
from shards.reader import DataConfig
from trainer.optim import OptimConfig
from trainer.schema import (
    ConfigError,
    from_dict,
    load_yaml,
    merge,
    parse_override,
    set_path,
    to_dict,
)


@dataclass
class TrainConfig:
    """The loop: length, accumulation, logging, evaluation and checkpoint cadence."""

    output_dir: str = "runs/ad"
    max_steps: int = 1000
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 disables clipping
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 0  # 0: checkpoint only at the end
    keep_last: int = 2  # checkpoints kept on disk
    seed: int = 0
    # Owned here, not by `accelerate launch --mixed_precision`: auto is bf16 where the GPU has it.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    init_from: str = ""  # run folder or .safetensors whose weights start this run (fine-tuning)
    # Splits scored at the end: val, test, or names of data.extra_splits (held-out cohorts).
    eval_splits: list[str] = field(default_factory=lambda: ["val"])
    progress: bool = True
    bootstrap: int = 1000  # resamples for the multi-label AUROC confidence intervals (0: none)
    # Extra evaluation of contrastive pretraining (model.task=pretrain with ITC): image <-> report
    # Recall@1/5/10, and zero-shot 14-label AUROC from prompt pairs (chest X-ray shards).
    retrieval: bool = False
    zero_shot: bool = False
    # Early stopping on a validation metric (a key of the val result: acc, f1, auc, mauc,
    # itc_loss, ...), checked every eval_every steps: training stops after `patience` evals
    # without improvement and the run ends on the best checkpoint's weights. "" = off.
    early_stop_metric: str = ""
    early_stop_mode: Literal["max", "min"] = "max"
    early_stop_patience: int = 3
    # A step whose gradients (or loss) hold NaN / inf never reaches the optimizer. skip: the
    # step is dropped, counted (train/nonfinite_skipped) and logged with its loss terms and
    # sample keys, and the run stops after max_nonfinite_in_row such steps in a row; stop: the
    # run stops at the first one.
    nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite_in_row: int = 3
    # Seconds a rank waits in a collective (all-reduce, barrier) before the job ends naming
    # the stalled rank and step. Covers a checkpoint save or an evaluation on the main rank.
    collective_timeout_s: int = 300

    def __post_init__(self) -> None:
        if not self.output_dir.strip():
            raise ValueError("output_dir is empty: expected the folder a run writes into")
        for name in ("max_steps", "grad_accum", "log_every", "max_nonfinite_in_row"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if self.early_stop_metric and self.eval_every < 1:
            raise ValueError(
                f"early_stop_metric={self.early_stop_metric!r} needs eval_every >= 1 (the "
                "validation runs that it watches)"
            )
        if self.early_stop_patience < 1:
            raise ValueError(f"early_stop_patience={self.early_stop_patience}: expected >= 1")
        for name in ("eval_every", "save_every", "keep_last", "bootstrap"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 0")
        if self.collective_timeout_s < 10:
            raise ValueError(
                f"collective_timeout_s={self.collective_timeout_s}: expected >= 10 (seconds)"
            )
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip}: expected >= 0")
        if "train" in self.eval_splits:
            raise ValueError("eval_splits contains 'train': expected val, test or held-out names")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: AlifuseConfig = field(default_factory=AlifuseConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        itc = self.model.task == "pretrain" and self.model.has_itc
        for name in ("retrieval", "zero_shot"):
            if getattr(self.train, name) and not itc:
                raise ValueError(
                    f"train.{name}=true needs an ITC model: model.task=pretrain with "
                    f"model.itc_weight > 0 (got task={self.model.task}, "
                    f"itc_weight={self.model.itc_weight})"
                )
        known = ["val", "test", *self.data.extra_splits]
        unknown = [s for s in self.train.eval_splits if s not in known]
        if unknown:
            raise ValueError(
                f"train.eval_splits names {unknown}: expected any of {known} "
                "(data.extra_splits names more splits)"
            )


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- preset YAML (a diff) <- `key.sub=value` overrides; raises ConfigError."""
    tree = load_yaml(path) if path else {}
    diff: dict = {}
    for text in overrides:
        keys, value = parse_override(text)
        set_path(diff, keys, value)
    return from_dict(Config, merge(tree, diff))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)


__all__ = ["Config", "ConfigError", "TrainConfig", "load_config", "save_config"]


LABELS_FILE = "labels.json"


def write_label_names(out_dir: str | Path, names: list[str] | None) -> None:
    """Records the run's label (or class) names, as its shards name them, in OUT/labels.json."""
    if names:
        text = json.dumps({"label_names": list(names)}, indent=2) + "\n"
        (Path(out_dir) / LABELS_FILE).write_text(text)


def run_label_names(run_dir: str | Path) -> list[str] | None:
    """The label names a run (or export) folder recorded; None for runs that recorded none."""
    path = Path(run_dir) / LABELS_FILE
    if not path.is_file():
        return None
    names = json.loads(path.read_text()).get("label_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: label_names {names!r}: expected a list of names")
    return names
