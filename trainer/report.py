"""The end-of-run summary a person reads: each split's lines from the run's task."""

from __future__ import annotations

from typing import Any

from accelerate.state import PartialState

from trainer.config import Config
from trainer.tasks import build_task


def format_results(results: dict[str, Any], cfg: Config) -> str:
    task = build_task(cfg)
    lines = [f"run folder: {cfg.train.output_dir}"]
    for split, result in results.items():
        if split == "early_stopping":
            lines.append(
                f"early stopping on val {result['metric']} ({result['mode']}): best "
                f"{result['best']:.4f} at step {result['best_step']}, stopped at step "
                f"{result['stopped_at']}; the weights are the best step's"
            )
            continue
        lines += task.summary(split, result)
    return "\n".join(lines)


def print_results(results: dict[str, Any], cfg: Config) -> None:
    if PartialState().is_main_process:
        print(format_results(results, cfg), flush=True)
