"""The training run: build -> (resume) -> steps with periodic eval and checkpoints -> export -> report.

One function per concern, read top to bottom: `run` wires the parts, `train_step` does one
optimizer step (with accumulation), `evaluate` scores a split.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from tqdm.auto import tqdm

from models.alifuse import build_model
from shards.integrity import check_shards
from shards.reader import ShardSet, build_train_loader
from trainer import checkpoint as ckpt
from trainer.config import Config, save_config, write_label_names
from trainer.distributed import (
    all_ranks_ok,
    build_accelerator,
    describe,
    fill_deepspeed_hidden_auto,
    model_device,
    model_hidden_size,
    optimizer_offloaded,
    sum_over_ranks,
)
from trainer.evaluate import reduce_mean
from trainer.flops import StepFlops, peak_flops
from trainer.metrics_log import MetricLogger
from trainer.optim import build_optimizer, lr_at, set_lr
from trainer.plots import plot_losses
from trainer.run_state import EarlyStopping, RunState, check_resume, data_fingerprint
from trainer.tasks import EvalContext, Task, build_task
from trainer.text_cache import TextCache, prepare_text_cache, tower_digest
from trainer.watchdog import Heartbeat, is_collective_timeout, watch_parent

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


@dataclass
class StepResult:
    """One optimizer step: this rank's mean losses, and whether the optimizer stepped."""

    losses: dict[str, float]
    stepped: bool
    keys: list[str] = field(default_factory=list)  # this rank's sample keys (for messages)


def train_step(
    task: Task,
    model: torch.nn.Module,
    batches: list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    grad_clip: float,
) -> StepResult:
    """One optimizer step over `len(batches)` micro-batches, unless its gradients hold NaN / inf.

    The gradients are checked after the last backward and before the optimizer: their global
    norm is computed on the synchronised (all-reduced) gradients, so every rank sees the same
    verdict and skips or steps together; a non-finite loss on any rank makes every rank's
    gradients non-finite. Under DeepSpeed the engine steps inside backward and skips a step
    whose gradient norm is not finite itself (bf16: with `check_grad_overflow`, which
    trainer.distributed sets); its skip counter says what happened. Under fp16 autocast the
    loss scaler owns gradient overflows (skipping is how it finds its scale), so only a
    non-finite loss counts there.
    """
    totals: dict[str, float] = defaultdict(float)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    skips_before = getattr(model, "skipped_steps", 0)
    loss_finite, stepped = True, True
    for batch in batches:
        with accelerator.accumulate(model):
            losses, extras = task.losses(model, batch)
            loss = sum(losses.values())
            if accelerator.scaler is not None:  # only the fp16 path decides on the loss
                loss_finite &= bool(torch.isfinite(loss.detach()).all())
            accelerator.backward(loss)
            if accelerator.sync_gradients and not deepspeed:
                if accelerator.scaler is not None:  # the scaler skips overflowing steps
                    if grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), grad_clip)  # unscales
                    stepped = all_ranks_ok(accelerator, loss_finite)
                else:
                    clip = grad_clip if grad_clip > 0 else float("inf")
                    norm = accelerator.clip_grad_norm_(model.parameters(), clip)
                    stepped = bool(torch.isfinite(torch.as_tensor(norm)).all())
                if stepped:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for key, value in losses.items():
            totals[key] += value.detach().float().item() / len(batches)
        totals["loss"] += loss.detach().float().item() / len(batches)
        totals.update(extras)
    if deepspeed:
        stepped = getattr(model, "skipped_steps", 0) == skips_before
    keys = [k for b in batches for k in b.get("key", [])]
    return StepResult(dict(totals), stepped, keys)


class StepSpeed:
    """What a cluster user watches, over a logging window: samples/s and real text tokens/s
    (all ranks), the padded / real text token ratio, the fraction of the window spent waiting
    for the loader, and with a known GPU the MFU (trainer/flops.py)."""

    def __init__(self) -> None:
        self.samples = self.tokens = self.padded = 0
        self.wait = 0.0
        self.flop_samples = 0.0  # sum over samples of their mean-token model FLOPs

    def add_batches(self, batches: list[dict[str, Any]], waited: float) -> None:
        self.wait += waited
        for batch in batches:
            n = len(batch["key"])
            self.samples += n
            if "text_tokens" in batch:
                self.tokens += int(batch["text_tokens"].sum())
                mask = batch.get("attention_mask")
                self.padded += mask.numel() if mask is not None else int(batch["text_tokens"].sum())

    def metrics(
        self, accelerator: Accelerator, elapsed: float, flops: StepFlops, peak: float | None
    ) -> dict[str, float]:
        elapsed = max(elapsed, 1e-9)
        samples, tokens, padded = sum_over_ranks(
            accelerator, [self.samples, self.tokens, self.padded]
        )
        out = {
            "train/samples_per_s": samples / elapsed,
            "train/data_wait": self.wait / elapsed,  # this rank's share of the window
        }
        if tokens:
            out["train/text_tokens_per_s"] = tokens / elapsed
            out["train/padded_per_real_tokens"] = padded / tokens
        per_sample = flops.per_sample(tokens / max(samples, 1))
        if per_sample is not None:
            out["train/tflops_per_s"] = per_sample * samples / elapsed / 1e12
            if peak is not None:
                out["train/mfu"] = (
                    per_sample * samples / elapsed / (peak * accelerator.num_processes)
                )
        return out

    @staticmethod
    def postfix(rates: dict[str, float]) -> dict[str, str]:
        """The progress bar's short form."""
        bar = {"smp/s": f"{rates['train/samples_per_s']:.1f}"}
        if "train/text_tokens_per_s" in rates:
            bar["tok/s"] = f"{rates['train/text_tokens_per_s']:.0f}"
        bar["wait"] = f"{rates['train/data_wait']:.0%}"
        if "train/mfu" in rates:
            bar["mfu"] = f"{rates['train/mfu']:.1%}"
        return bar


def build_text_caches(
    cfg: Config, model: torch.nn.Module, accelerator: Accelerator
) -> dict[str, TextCache]:
    """data.text_cache: every split the run reads (train, val, the eval splits) -> its cache."""
    if not cfg.data.text_cache:
        return {}
    splits = ["train", *cfg.train.eval_splits]
    if cfg.train.eval_every and "val" not in splits:
        splits.append("val")
    caches = {}
    tower = tower_digest(model.text) if getattr(model, "text", None) is not None else None
    for split in splits:
        folder = cfg.data.split_dir(split)
        if folder not in caches:
            caches[folder] = prepare_text_cache(
                model,
                cfg.data,
                folder,
                cfg.model.text_max_length,
                accelerator,
                cfg.data.eval_batch_size,
                tower,
            )
    return caches


def _flat(prefix: str, result: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of an eval result, prefixed for logging."""
    return {
        f"{prefix}/{k}": v
        for k, v in result.items()
        if isinstance(v, (int, float)) and v is not None
    }


def verify_data(cfg: Config, accelerator: Accelerator) -> None:
    """Checks every shard this run reads against its manifest (data.verify_shards): each rank
    hashes every world-size-th file; any problem on any rank stops every rank at start."""
    if cfg.data.verify_shards == "off":
        return
    splits = ["train", *cfg.train.eval_splits]
    if cfg.train.eval_every and "val" not in splits:
        splits.append("val")
    digests: dict[str, tuple[int, str]] = {}
    unchecked = []
    for split in splits:
        shards = ShardSet.load(cfg.data.split_dir(split))
        if shards.remote:  # hashing would download every shard before the first step
            log.warning(
                "%s is remote: its shards are not hashed at start (a cut or damaged stream is "
                "retried, then counted against the manifest)",
                shards.folder,
            )
            continue
        digests.update(shards.digests)
        if len(shards.digests) < len(shards.shards):
            unchecked.append(str(shards.folder))
    if unchecked:
        log.warning("manifests without sha256 (not verified): %s", ", ".join(unchecked))
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = dict(sorted(digests.items())[rank::world])
    start = time.perf_counter()
    cache = Path(cfg.train.output_dir) / "verified" / f"rank_{rank}.json"
    problems, hashed = check_shards(mine, cache)
    seconds = time.perf_counter() - start
    log.info(
        "verified %d shards (%.1f MB hashed in %.1f s on rank %d)",
        len(mine),
        hashed / 1e6,
        seconds,
        rank,
    )
    for problem in problems:
        log.error("damaged shard: %s", problem)
    total = sum_over_ranks(accelerator, len(problems))
    if total:
        raise ValueError(
            f"{total} shard file(s) differ from their manifest (data.verify_shards=start)"
            + (f": {'; '.join(problems[:5])}" if problems else "; see the other ranks' logs")
            + ". Write the shards again, or set data.verify_shards=off to train on them as they are"
        )


def _nonfinite_message(step: int, result: StepResult, rank: int) -> str:
    terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.losses.items()))
    keys = ", ".join(result.keys[:16]) + (" ..." if len(result.keys) > 16 else "")
    return (
        f"step {step}: NaN / inf gradients, the optimizer did not step. Rank {rank}'s loss terms: "
        f"{terms}; its batch's sample keys: {keys}"
    )


def run(
    cfg: Config,
    resume: str | None = None,
    *,
    trust_checkpoint: bool = False,
    allow_resume_changes: bool = False,
) -> dict[str, Any]:
    """Trains as configured; returns the final eval results (on every rank).

    `resume`: "latest" or a checkpoint folder (see trainer.checkpoint); a resume whose data
    fingerprint differs is refused unless `allow_resume_changes` (trainer.run_state)."""
    watch_parent()
    task = build_task(cfg)
    task.check_settings()  # before anything is built or launched
    for split in ("train", *cfg.train.eval_splits):
        task.check(ShardSet.load(cfg.data.split_dir(split)))
    accelerator = build_accelerator(cfg)
    main = accelerator.is_main_process
    logging.basicConfig(
        level=logging.INFO if main else logging.WARNING,
        format=f"%(asctime)s [rank {accelerator.process_index}] %(levelname)s %(name)s: %(message)s",
    )
    out_dir = Path(cfg.train.output_dir)
    if main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out_dir / "config.yaml")
            write_label_names(out_dir, task.label_names)
            (out_dir / "launch.json").write_text(json.dumps(describe(accelerator), indent=2))
        except OSError as err:
            raise ckpt.CheckpointError(ckpt.write_failure(out_dir, err)) from err
    accelerator.wait_for_everyone()
    heart = Heartbeat(cfg.train.output_dir, accelerator.process_index, accelerator.num_processes)
    log.info("launch: %s", describe(accelerator))
    verify_data(cfg, accelerator)
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
    caches = build_text_caches(cfg, accelerator.unwrap_model(model), accelerator)
    ctx = EvalContext(cfg, model, accelerator, move, tokenizer, out_dir, caches)
    flops = StepFlops(accelerator.unwrap_model(model), text_cached=bool(caches))
    peak = peak_flops(accelerator.device)

    tc = cfg.train
    stopper = (
        EarlyStopping(tc.early_stop_metric, tc.early_stop_mode, tc.early_stop_patience)
        if tc.early_stop_metric
        else None
    )
    fingerprint = data_fingerprint(cfg, accelerator.num_processes)
    state = RunState()
    loaded = ckpt.resume(accelerator, resume, tc.output_dir, trust_checkpoint)
    if loaded is not None:
        path, saved = loaded
        for change in check_resume(saved.get("fingerprint"), fingerprint, allow_resume_changes):
            log.warning("resume with a change (--allow-resume-changes): %s", change)
        state = RunState.from_json(saved, accelerator.process_index)
        if stopper is not None and saved.get("early_stopping"):
            stopper.load_state_dict(saved["early_stopping"])
        log.info(
            "resumed from %s at step %d (%d batches consumed)",
            path,
            state.step,
            state.batches_consumed,
        )

    def snapshot() -> dict[str, Any]:
        """The state to save: every rank's loader streams gathered (a collective)."""
        return state.to_json(fingerprint, stopper, gather_object([state.streams]))

    def save() -> None:
        heart.beat(state.step, "checkpoint")
        ckpt.save_checkpoint(accelerator, model, tc.output_dir, snapshot(), tc.keep_last)

    loader = build_train_loader(
        cfg.data.train,
        cfg.data,
        tokenizer,
        cfg.model.text_max_length,
        accelerator.process_index,
        accelerator.num_processes,
        tc.seed,
        start_batch=state.batches_consumed,
        resume_counts=state.streams,
        text_cache=caches.get(cfg.data.train),
    )
    logger = MetricLogger(tc.output_dir, main)
    data = iter(loader)
    window: dict[str, float] = defaultdict(float)
    window_steps, window_start = 0, time.perf_counter()
    speed = StepSpeed()
    retries: dict[int, int] = {}  # per loader stream: remote shards opened again (this run)
    pbar = tqdm(
        total=tc.max_steps, initial=state.step, disable=not (main and tc.progress), desc="train"
    )
    model.train()
    try:
        while state.step < tc.max_steps:
            heart.beat(state.step, "train step")
            lr = lr_at(state.step, cfg.optim, tc.max_steps)
            set_lr(optimizer, lr)
            waited = time.perf_counter()
            raw = [next(data) for _ in range(tc.grad_accum)]
            speed.add_batches(raw, time.perf_counter() - waited)
            micro = [move(batch) for batch in raw]
            state.batches_consumed += tc.grad_accum
            for batch in micro:  # cumulative per loader stream
                state.streams[batch["worker"]] = (
                    batch["read"],
                    batch["skipped"],
                    batch["pool_pos"],
                )
                retries[batch["worker"]] = batch["retries"]
            result = train_step(task, model, micro, optimizer, accelerator, tc.grad_clip)
            state.step += 1
            pbar.update(1)
            if result.stepped:
                state.nonfinite_in_row = 0
                for key, value in result.losses.items():
                    window[key] += value
                window_steps += 1
            else:
                state.nonfinite_skipped += 1
                state.nonfinite_in_row += 1
                message = _nonfinite_message(state.step, result, accelerator.process_index)
                if tc.nonfinite == "stop" or state.nonfinite_in_row >= tc.max_nonfinite_in_row:
                    why = (
                        "train.nonfinite=stop"
                        if tc.nonfinite == "stop"
                        else f"{state.nonfinite_in_row} such steps in a row "
                        f"(train.max_nonfinite_in_row={tc.max_nonfinite_in_row})"
                    )
                    raise FloatingPointError(
                        f"{message}. Stopping: {why}; the last checkpoint holds the last finite "
                        "weights"
                    )
                log.warning("%s; skipped (%d in a row)", message, state.nonfinite_in_row)
            if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                metrics, postfix = {}, {}
                if window_steps:
                    means = reduce_mean(
                        accelerator, {k: v / window_steps for k, v in window.items()}
                    )
                    metrics = {f"train/{k}": v for k, v in means.items()}
                    postfix["loss"] = f"{means['loss']:.4f}"
                metrics["train/lr"] = lr
                rates = speed.metrics(accelerator, time.perf_counter() - window_start, flops, peak)
                metrics.update(rates)
                pbar.set_postfix({**postfix, **speed.postfix(rates)})
                speed = StepSpeed()
                metrics["train/nonfinite_skipped"] = state.nonfinite_skipped
                metrics["data/skipped"] = sum_over_ranks(accelerator, state.skipped)
                metrics["data/retries"] = sum_over_ranks(accelerator, sum(retries.values()))
                logger.log(state.step, metrics)
                window, window_steps = defaultdict(float), 0
                window_start = time.perf_counter()
            step = state.step
            if tc.eval_every and step % tc.eval_every == 0 and (step < tc.max_steps or stopper):
                heart.beat(step, "validation")
                val = task.evaluate(ctx, "val", cfg.data.val, plots=False)
                logger.log(step, _flat("val", val))
                if stopper is not None:
                    if stopper.update(step, val):
                        heart.beat(step, "checkpoint (best)")
                        ckpt.save_best(accelerator, model, tc.output_dir, snapshot())
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
                save()
        pbar.close()
        step = state.step
        if stopper is not None and stopper.best_step is not None and stopper.best_step != step:
            # The run ends on the best validation weights (optimizer and RNG state included).
            heart.beat(step, "restore best")
            ckpt.load_checkpoint(accelerator, ckpt.best_dir(tc.output_dir), trust_checkpoint)
            log.info(
                "restored the best val %s checkpoint (step %d)", stopper.metric, stopper.best_step
            )
        save()
        heart.beat(step, "export")
        ckpt.export_weights(accelerator, model, tc.output_dir)
        results: dict[str, Any] = {}
        for split in tc.eval_splits:
            heart.beat(step, f"evaluate {split}")
            results[split] = task.evaluate(ctx, split, cfg.data.split_dir(split), plots=True)
            logger.log(step, _flat(split, results[split]))
        heart.beat(step, "done")
    except Exception as err:
        if accelerator.num_processes > 1 and is_collective_timeout(err):
            raise RuntimeError(
                f"a collective timed out after train.collective_timeout_s="
                f"{tc.collective_timeout_s} s: {heart.stall_report()}"
            ) from err
        raise
    logger.close()
    if stopper is not None:
        results["early_stopping"] = stopper.summary(step)
    if main:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        plot_losses(out_dir / "metrics.jsonl", out_dir / "losses.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
