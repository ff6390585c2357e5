"""The training run: build -> (resume) -> steps with periodic eval and checkpoints -> export -> report.

One function per concern, read top to bottom: `run` wires the parts, `train_step` does one
optimizer step (with accumulation), `evaluate` scores a split.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from models.alifuse import build_model
from shards.reader import ShardSet, build_train_loader
from trainer import checkpoint as ckpt
from trainer.config import Config, save_config
from trainer.distributed import (
    build_accelerator,
    describe,
    fill_deepspeed_hidden_auto,
    model_device,
    model_hidden_size,
    optimizer_offloaded,
)
from trainer.evaluate import reduce_mean
from trainer.metrics_log import MetricLogger
from trainer.optim import build_optimizer, lr_at, set_lr
from trainer.plots import plot_losses
from trainer.tasks import EvalContext, Task, build_task

log = logging.getLogger("medalign")


_DEEPSPEED_INPUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Mover:
    """Moves a batch's tensors to the device, then casts floats to the model's input dtype.

    Float inputs are float32, or bfloat16 / float16 under DeepSpeed bf16 / fp16 (the engine casts the model,
    not the inputs). The cast runs after the copy, so float16 volumes cross to the GPU at half
    the bytes and are converted there.
    """

    def __init__(self, accelerator: Accelerator) -> None:
        self.device = accelerator.device
        self.float_dtype = torch.float32
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            self.float_dtype = _DEEPSPEED_INPUT_DTYPES.get(
                accelerator.mixed_precision, torch.float32
            )

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                value = value.to(self.device, non_blocking=True)
                if value.is_floating_point():
                    value = value.to(self.float_dtype)
            out[key] = value
        return out


def train_step(
    task: Task,
    model: torch.nn.Module,
    batches: list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    grad_clip: float,
) -> dict[str, float]:
    """One optimizer step over `len(batches)` micro-batches; returns this rank's mean losses."""
    totals: dict[str, float] = defaultdict(float)
    for batch in batches:
        with accelerator.accumulate(model):
            losses, extras = task.losses(model, batch)
            loss = sum(losses.values())
            accelerator.backward(loss)
            # DeepSpeed clips inside its step from the JSON's gradient_clipping (set from ours).
            if (
                grad_clip > 0
                and accelerator.sync_gradients
                and accelerator.distributed_type != DistributedType.DEEPSPEED
            ):
                accelerator.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for key, value in losses.items():
            totals[key] += value.detach().float().item() / len(batches)
        totals["loss"] += loss.detach().float().item() / len(batches)
        totals.update(extras)
    return dict(totals)


class EarlyStopping:
    """Watches one validation metric: records the best value and step, counts evals without
    improvement, and says when `patience` of them have passed."""

    def __init__(self, metric: str, mode: str, patience: int) -> None:
        self.metric, self.mode, self.patience = metric, mode, patience
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def update(self, step: int, result: dict[str, Any]) -> bool:
        """Takes a validation result; True when it is the best so far."""
        value = result.get(self.metric)
        if not isinstance(value, (int, float)):
            scalars = sorted(k for k, v in result.items() if isinstance(v, (int, float)))
            raise KeyError(
                f"train.early_stop_metric={self.metric!r}: the validation result has no such "
                f"number (it has: {', '.join(scalars)})"
            )
        better = self.best is None or (
            value > self.best if self.mode == "max" else value < self.best
        )
        if better:
            self.best, self.best_step, self.bad_evals = float(value), step, 0
        else:
            self.bad_evals += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.bad_evals >= self.patience

    def summary(self, stopped_at: int) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "best": self.best,
            "best_step": self.best_step,
            "stopped_at": stopped_at,
        }


def _flat(prefix: str, result: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of an eval result, prefixed for logging."""
    return {
        f"{prefix}/{k}": v
        for k, v in result.items()
        if isinstance(v, (int, float)) and v is not None
    }


def run(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Trains as configured; returns the final eval results (on every rank)."""
    accelerator = build_accelerator(cfg)
    main = accelerator.is_main_process
    logging.basicConfig(
        level=logging.INFO if main else logging.WARNING,
        format=f"%(asctime)s [rank {accelerator.process_index}] %(levelname)s %(name)s: %(message)s",
    )
    out_dir = Path(cfg.train.output_dir)
    task = build_task(cfg)
    for split in ("train", *cfg.train.eval_splits):  # before anything is built or trained
        task.check(ShardSet.load(cfg.data.split_dir(split)))
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        (out_dir / "launch.json").write_text(json.dumps(describe(accelerator), indent=2))
    log.info("launch: %s", describe(accelerator))
    set_seed(cfg.train.seed)  # same seed on every rank: identical initial weights

    model = build_model(cfg.model, model_device(accelerator))
    tokenizer = model.tokenizer  # None for image-only models
    if cfg.train.init_from:
        report = ckpt.load_init_weights(model, cfg.train.init_from)
        log.info(
            "init_from %s: loaded %d tensors; newly initialised: %s; not used: %s",
            cfg.train.init_from,
            len(report["loaded"]),
            report["missing"] or "none",
            report["unexpected"] or "none",
        )
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("parameters: %.2fM trainable of %.2fM", n_train / 1e6, n_all / 1e6)
    fill_deepspeed_hidden_auto(accelerator, model_hidden_size(model))
    optimizer = build_optimizer(model, cfg.optim, optimizer_offloaded(accelerator))
    model, optimizer = accelerator.prepare(model, optimizer)
    move = Mover(accelerator)
    ctx = EvalContext(cfg, model, accelerator, move, tokenizer, out_dir)

    step, batches_consumed = 0, 0
    resume_from = ckpt.resolve_resume(resume, cfg.train.output_dir)
    if resume_from is not None:
        state = ckpt.load_checkpoint(accelerator, resume_from)
        step, batches_consumed = state["step"], state["batches_consumed"]
        log.info(
            "resumed from %s at step %d (%d batches consumed)", resume_from, step, batches_consumed
        )

    loader = build_train_loader(
        cfg.data.train,
        cfg.data,
        tokenizer,
        cfg.model.text_max_length,
        accelerator.process_index,
        accelerator.num_processes,
        cfg.train.seed,
        start_batch=batches_consumed,
    )
    logger = MetricLogger(cfg.train.output_dir, main)
    tc = cfg.train
    data = iter(loader)
    window: dict[str, float] = defaultdict(float)
    window_steps, window_start = 0, time.perf_counter()
    skipped_by_worker: dict[int, int] = {}
    stopper = (
        EarlyStopping(tc.early_stop_metric, tc.early_stop_mode, tc.early_stop_patience)
        if tc.early_stop_metric
        else None
    )
    pbar = tqdm(total=tc.max_steps, initial=step, disable=not (main and tc.progress), desc="train")
    model.train()
    while step < tc.max_steps:
        lr = lr_at(step, cfg.optim, tc.max_steps)
        set_lr(optimizer, lr)
        micro = [move(next(data)) for _ in range(tc.grad_accum)]
        batches_consumed += tc.grad_accum
        for batch in micro:  # cumulative per loader worker
            skipped_by_worker[batch["worker"]] = batch["skipped"]
        losses = train_step(task, model, micro, optimizer, accelerator, tc.grad_clip)
        step += 1
        pbar.update(1)
        for key, value in losses.items():
            window[key] += value
        window_steps += 1
        if step % tc.log_every == 0 or step == tc.max_steps:
            means = reduce_mean(accelerator, {k: v / window_steps for k, v in window.items()})
            if not all(math.isfinite(v) for v in means.values()):
                raise FloatingPointError(f"non-finite loss at step {step}: {means}")
            elapsed = time.perf_counter() - window_start
            samples = window_steps * tc.grad_accum * cfg.data.batch_size * accelerator.num_processes
            metrics = {f"train/{k}": v for k, v in means.items()}
            metrics["train/lr"] = lr
            metrics["train/samples_per_s"] = samples / max(elapsed, 1e-9)
            skipped = torch.tensor(sum(skipped_by_worker.values()), device=accelerator.device)
            metrics["data/skipped"] = int(accelerator.reduce(skipped, reduction="sum"))
            logger.log(step, metrics)
            pbar.set_postfix(loss=f"{means['loss']:.4f}")
            window, window_steps, window_start = defaultdict(float), 0, time.perf_counter()
        if tc.eval_every and step % tc.eval_every == 0 and (step < tc.max_steps or stopper):
            result = task.evaluate(ctx, "val", cfg.data.val, plots=False)
            logger.log(step, _flat("val", result))
            if stopper is not None:
                if stopper.update(step, result):
                    ckpt.save_best(accelerator, tc.output_dir, step, batches_consumed)
                if stopper.should_stop:
                    log.info(
                        "early stopping at step %d: val %s has not improved on %.6g (step %d) "
                        "for %d evaluations",
                        step,
                        stopper.metric,
                        stopper.best,
                        stopper.best_step,
                        stopper.bad_evals,
                    )
                    break
        if tc.save_every and step % tc.save_every == 0 and step < tc.max_steps:
            ckpt.save_checkpoint(accelerator, tc.output_dir, step, batches_consumed, tc.keep_last)
    pbar.close()
    if stopper is not None and stopper.best_step is not None and stopper.best_step != step:
        # The run ends on the best validation weights (optimizer and RNG state included).
        ckpt.load_checkpoint(accelerator, ckpt.best_dir(tc.output_dir))
        log.info("restored the best val %s checkpoint (step %d)", stopper.metric, stopper.best_step)

    ckpt.save_checkpoint(accelerator, tc.output_dir, step, batches_consumed, tc.keep_last)
    ckpt.export_weights(accelerator, model, tc.output_dir)
    results: dict[str, Any] = {}
    for split in tc.eval_splits:
        results[split] = task.evaluate(ctx, split, cfg.data.split_dir(split), plots=True)
        logger.log(step, _flat(split, results[split]))
    logger.close()
    if stopper is not None:
        results["early_stopping"] = stopper.summary(step)
    if main:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        plot_losses(out_dir / "metrics.jsonl", out_dir / "losses.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
