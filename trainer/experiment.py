"""Experiments: a paper's table as a recipe of real training runs, scored with intervals.

An `Experiment` is a list of rows (each one training run of `train.py`, or two when a row is
pretrained first) and a list of columns (a split, or one cohort of it). `run_experiment`
trains every row once per training seed (the same seeds for every row), reads each run's
`predictions_<split>.jsonl`, and writes

    OUT/runs/<row>/seed<k>/  each run's folder (config, logs, predictions, weights)
    OUT/results.json         every number below, with the commands that produced them
    OUT/results.md           the table in the paper's layout (cells: mean ± seed spread [95 %])
    OUT/results.png          a bar chart with the intervals

Statistics (per column, over the samples the column holds):

- ACC and AUC: three-class columns take the arg-max class and the macro one-vs-rest AUC over
  the classes present; binary cohorts (NC vs impaired) take P(MCI) + P(AD) > 0.5 and its AUC
  (trainer/evaluate.py scores the runs the same way); a row's value is the mean over seeds;
- 95 % intervals: percentile bootstrap over subjects (a subject's visits are drawn together,
  so repeated scans of one person do not pass for independent evidence) of that mean; the
  seeds' standard deviation is printed beside (training noise, which the bootstrap over test
  subjects does not see);
- p-values: paired bootstrap against the reference row (the full model): the same subject
  draws score both rows; p = 2 min(P(d <= 0), P(d >= 0)) for the difference d = reference -
  row, capped at 1 (two-sided). With B resamples the smallest p it can show is 1 / B.

A run already done with the same command is read back, not trained again (`rerun` forces
it), so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer.cxr_metrics import weighted_auroc  # noqa: E402

log = logging.getLogger("medalign.experiment")

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Stage:
    """A training run before a row's own, whose weights start the next run (train.init_from).

    `shared`: every row that lists a stage of this name runs the same command, so it is
    trained once per seed under OUT/stages/<name>/ and reused by those rows."""

    name: str
    config: str  # its preset (repo-relative)
    overrides: list[str] = field(default_factory=list)
    shared: bool = False


@dataclass
class Row:
    """One line of a table: a training run of `config` with `overrides` (after the size's)."""

    key: str  # run folder name, unique in the experiment
    label: str  # as printed in the table
    group: str  # the table's row group ("Image-only", "(a) Loss components", ...)
    overrides: list[str] = field(default_factory=list)
    skip: str = ""  # why the row is not run (left in the table with the reason)
    # Multi-stage rows: runs before this row's own, in order, each starting the next.
    stages: list[Stage] = field(default_factory=list)
    config: str = ""  # this row's preset ("": the experiment's)


@dataclass
class Column:
    """A group of test samples: a split, or one cohort of it."""

    name: str  # as printed ("ADNI-test", "AIBL")
    split: str  # the split name the runs evaluate (test, AIBL, ...)
    cohort: str = ""  # keep only this cohort's samples ("": all of the split)
    zero_shot: bool = False  # a cohort never seen in training (marked in the table)


@dataclass
class Experiment:
    """A named recipe: rows x columns, scored against `reference`, laid out by `layout`."""

    name: str
    title: str
    config: str  # the preset every row starts from (repo-relative)
    rows: list[Row]
    columns: list[Column]
    reference: str  # the row the p-values compare against (the full model)
    layout: str  # "grid" (rows x columns, ACC and AUC each) or "ablation" (deltas too)
    notes: list[str] = field(default_factory=list)
    # multiclass: predictions with logits and one label (ACC, AUC, P, R, F1); multilabel:
    # logits, labels and a label mask per sample (mAUC, mean ACC, per-label AUROC).
    kind: str = "multiclass"
    metrics: tuple[str, ...] = ("acc", "auc")  # the table's cells, in order
    label_names: list[str] = field(default_factory=list)  # multilabel: per-label AUROC names
    split_groups: bool = False  # one table per row group (each with the reference row)


@dataclass
class Suite:
    """A family of experiments that share sizes and data (scripts/experiment.py looks an
    experiment's name up in the suites): `experiments[name](size, options)` builds it;
    `prepare(size, root, options)` writes or finds its data under `root` and returns the
    overrides every row gets; `sizes` maps a size name to what `prepare` and the factories
    read (each has `name` and `seeds`)."""

    experiments: dict[str, Callable[..., Experiment]]
    sizes: dict[str, Any]
    prepare: Callable[..., list[str]]
    needs_for_paper: str = ""  # what --size paper requires of the user, if anything
    data_name: str = "data"  # synthetic data is written to OUT/../data-<data_name>-<size>/
    paper_needs: tuple[str, ...] = ("shards", "text_checkpoint")  # options --size paper needs
    needs_run: bool = False  # the experiment evaluates a finished run (RUN_DIR)
    # After the table: finish(exp, out, options, results, n_boot) scores what is not a training
    # row (e.g. zero-shot), adds it to OUT/results.{json,md} and returns its markdown.
    finish: Callable[..., str] | None = None


def data_and_text(
    options: Any, text_kind: str, synthetic: Callable[[], tuple[Path, Path]]
) -> tuple[Path, Path]:
    """(shards, text tower folder): the user's (--shards and --text-checkpoint), or the
    synthetic ones `synthetic()` writes (--text-checkpoint alone replaces only the tower)."""
    if options.shards is not None:
        if options.text_checkpoint is None:
            raise ValueError(f"--shards needs --text-checkpoint too ({text_kind})")
        shards, text = options.shards, options.text_checkpoint
    else:
        shards, text = synthetic()
        text = options.text_checkpoint or text
    return Path(shards).resolve(), Path(text).resolve()


def split_overrides(shards: Path) -> list[str]:
    """data.train / val / test of a shard folder."""
    return [f"data.{split}={shards / split}" for split in ("train", "val", "test")]


# ---- running ----------------------------------------------------------------------------------


def train_command(
    python: str, launcher: Sequence[str], config: str, overrides: Sequence[str]
) -> list[str]:
    """The command that trains one run: `train.py` directly, or under `launcher` (e.g.
    `accelerate launch --num_processes 8`)."""
    entry = [str(REPO / "train.py"), "--config", str(REPO / config), *overrides]
    return [*launcher, *entry] if launcher else [python, *entry]


def _run(cmd: list[str], folder: Path) -> float:
    """Runs one training command with its output in folder/train.log; returns its seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(folder / "train.log", "w", encoding="utf-8") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = (folder / "train.log").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"run {folder} failed ({proc.returncode}); the end of its log:\n{tail}")
    return time.perf_counter() - started


def run_folder(out: Path, row: Row, seed: int) -> Path:
    """Where one training seed of a row runs: OUT/runs/<row>/seed<k>/."""
    return out / "runs" / row.key / f"seed{seed}"


def _recorded(cmd: list[str], folder: Path, fresh: bool, init: Path | None) -> dict[str, Any]:
    """Runs `cmd` in `folder` unless the same command already finished there after the run
    it starts from (`init`) did, and not `fresh`; returns {"seconds", "reused"}."""
    record = folder / "experiment_row.json"
    if not fresh and (folder / "results.json").is_file() and record.is_file():
        done = json.loads(record.read_text())
        init_record = None if init is None else init / "experiment_row.json"
        newer_init = init_record is not None and (
            not init_record.is_file() or init_record.stat().st_mtime > record.stat().st_mtime
        )
        if done.get("commands") == [cmd] and not newer_init:
            return {"seconds": done.get("seconds", 0.0), "reused": True}
    # A run trained again that then fails must not be read back as the old one next time.
    record.unlink(missing_ok=True)
    (folder / "results.json").unlink(missing_ok=True)
    seconds = _run(cmd, folder)
    record.write_text(json.dumps({"commands": [cmd], "seconds": round(seconds, 1)}, indent=2))
    return {"seconds": round(seconds, 1), "reused": False}


class _FolderLocks:
    """One lock per run folder: rows run in parallel train a shared stage once (the first
    to take its lock trains it, the others then find it finished and reuse it)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Path, threading.Lock] = {}

    def __call__(self, folder: Path) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(folder, threading.Lock())


def run_row(
    row: Row,
    exp: Experiment,
    out: Path,
    shared: Sequence[str],
    launcher: Sequence[str],
    rerun: bool,
    seed: int = 0,
    python: str = sys.executable,
    trained: set[Path] | None = None,
    locks: _FolderLocks | None = None,
) -> dict[str, Any]:
    """Trains one seed of a row (its stages first, if any) unless the same commands already
    finished in its folders; returns {"commands", "seconds", "reused"}. A run whose stage
    trained after it is trained again; `trained` collects the folders trained in this
    invocation, so `rerun` trains a shared stage once, not once per row (`locks` keeps that
    true when rows run in parallel)."""
    trained = set() if trained is None else trained
    locks = _FolderLocks() if locks is None else locks
    folder = run_folder(out, row, seed)
    shared = [*shared, f"train.seed={seed}"]
    commands, seconds, reused, init = [], 0.0, True, None
    shared_seconds: dict[str, float] = {}  # shared stages: counted once per experiment
    for stage in row.stages:
        where = out / "stages" / stage.name / f"seed{seed}" if stage.shared else folder / stage.name
        overrides = [*shared, *stage.overrides]
        if init is not None:
            overrides.append(f"train.init_from={init}")
        overrides += [f"train.output_dir={where}", "train.eval_splits=[val]"]
        cmd = train_command(python, launcher, stage.config, overrides)
        log.info("row %s seed %d, stage %s: %s", row.key, seed, stage.name, shlex.join(cmd))
        with locks(where):
            done = _recorded(cmd, where, rerun and where not in trained, init)
            if not done["reused"]:
                trained.add(where)
        commands.append(cmd)
        if stage.shared:
            shared_seconds[str(where)] = done["seconds"]
        else:
            seconds += done["seconds"]
        reused &= done["reused"]
        init = where
    overrides = [*shared, *row.overrides]
    if init is not None:
        overrides.append(f"train.init_from={init}")
    cmd = train_command(
        python, launcher, row.config or exp.config, [*overrides, f"train.output_dir={folder}"]
    )
    log.info("row %s seed %d: %s", row.key, seed, shlex.join(cmd))
    done = _recorded(cmd, folder, rerun, init)
    commands.append(cmd)
    seconds += done["seconds"]
    return {
        "commands": commands,
        "seconds": round(seconds, 1),  # this row's own runs
        "shared_seconds": shared_seconds,
        "reused": reused and done["reused"],
    }


# ---- statistics -------------------------------------------------------------------------------


@dataclass
class Predictions:
    """One column's samples as one run predicted them, in key order."""

    keys: list[str]
    subjects: list[str]  # the bootstrap's resampling unit (a subject, or a study's images)
    logits: torch.Tensor  # (N, C)
    labels: torch.Tensor  # (N,) class ids, or (N, L) 0 / 1 targets (multilabel)
    binary: bool  # every sample is of a binary cohort: scored NC vs impaired
    mask: torch.Tensor | None = None  # (N, L) 1 = the label counts (multilabel)


def read_predictions(run_dir: Path, column: Column, kind: str = "multiclass") -> Predictions | None:
    """The column's samples from run_dir/predictions_<split>.jsonl (None if the run has none)."""
    path = run_dir / f"predictions_{column.split}.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if not column.cohort or r.get("cohort") == column.cohort]
    if not rows:
        return None
    rows.sort(key=lambda r: r["key"])
    logits = torch.tensor([r["logits"] for r in rows], dtype=torch.float64)
    if kind == "multilabel":
        return Predictions(
            keys=[r["key"] for r in rows],
            subjects=[str(r["group"]) for r in rows],  # a study's images share one report
            logits=logits,
            labels=torch.tensor([r["labels"] for r in rows], dtype=torch.float64),
            binary=False,
            mask=torch.tensor([r["label_mask"] for r in rows], dtype=torch.float64),
        )
    return Predictions(
        keys=[r["key"] for r in rows],
        subjects=[f"{r.get('cohort', '')}/{r.get('subject', r['key'])}" for r in rows],
        logits=logits,
        labels=torch.tensor([r["label"] for r in rows]),
        binary=all(r.get("binary", False) for r in rows) and len(rows[0]["logits"]) == 3,
    )


def subject_weights(subjects: Sequence[str], n_boot: int, seed: int) -> torch.Tensor:
    """(1 + n_boot, N) sample weights: the first row all ones (the point estimate), then one
    row per bootstrap resample of the subjects (a subject drawn k times weighs k)."""
    index: dict[str, int] = {}
    unit = torch.tensor([index.setdefault(s, len(index)) for s in subjects])
    n_units = len(index)
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_units, (n_boot, n_units), generator=gen)
    counts = torch.zeros(n_boot, n_units, dtype=torch.float64)
    counts.scatter_add_(1, draws, torch.ones(n_boot, n_units, dtype=torch.float64))
    return torch.cat([torch.ones(1, len(subjects), dtype=torch.float64), counts[:, unit]])


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den is 0 (torchmetrics' zero_division=0)."""
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def _prf(predicted: torch.Tensor, actual: torch.Tensor, weights: torch.Tensor) -> tuple:
    """Weighted precision, recall and F1 of one class: predicted, actual (N,) bool."""
    tp = (weights * (predicted & actual)).sum(1)
    pp = (weights * predicted).sum(1)
    ap = (weights * actual).sum(1)
    return _ratio(tp, pp), _ratio(tp, ap), _ratio(2 * tp, pp + ap)


def weighted_scores(pred: Predictions, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every metric of the predictions under each weighting, (W,) each; NaN where a resample
    leaves a class (a label) with no positive or no negative sample.

    multiclass: acc, auc (macro one-vs-rest over the classes present), precision, recall, f1
    (macro over the classes present); binary cohorts: those of the impaired class at
    P(MCI) + P(AD) > 0.5; multilabel: mauc (mean of the labels' AUROC where defined),
    mean_acc (per-label accuracy at 0.5 over the kept entries, averaged) and auroc:<j> per
    label."""
    if pred.mask is not None:
        return _multilabel_scores(pred, weights)
    probs = pred.logits.softmax(dim=-1)
    if pred.binary:
        score = probs[:, 1:].sum(dim=-1)  # P(MCI) + P(AD)
        target = pred.labels > 0
        correct = (score > 0.5) == target
        auc = weighted_auroc(score, target, weights)
        precision, recall, f1 = _prf(score > 0.5, target, weights)
    else:
        predicted = probs.argmax(dim=-1)
        correct = predicted == pred.labels
        present = [c for c in range(probs.shape[1]) if bool((pred.labels == c).any())]
        per_class = [weighted_auroc(probs[:, c], pred.labels == c, weights) for c in present]
        auc = (
            torch.stack(per_class).mean(0)
            if len(present) > 1
            else torch.full_like(weights[:, 0], math.nan)
        )
        prf = [_prf(predicted == c, pred.labels == c, weights) for c in present]
        precision, recall, f1 = (torch.stack([p[i] for p in prf]).mean(0) for i in range(3))
    acc = (weights * correct).sum(1) / weights.sum(1)
    return {"acc": acc, "auc": auc, "precision": precision, "recall": recall, "f1": f1}


def _multilabel_scores(pred: Predictions, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per label over its kept entries; mAUC over the labels whose AUROC the point estimate
    defines (a resample that leaves one of them undefined is NaN, so every resample averages
    the same labels, as trainer.cxr_metrics.bootstrap_ci does); accuracy at >= 0.5
    (trainer.cxr_metrics.multilabel_accuracy), NaN where a resample keeps no entry."""
    probs = pred.logits.sigmoid()
    nan = torch.full_like(weights[:, 0], math.nan)
    out: dict[str, torch.Tensor] = {}
    aurocs, accs = [], []
    for j in range(probs.shape[1]):
        keep = pred.mask[:, j] > 0
        if not bool(keep.any()):
            out[f"auroc:{j}"] = nan
            continue
        w = weights[:, keep]
        target = pred.labels[keep, j] > 0.5
        auroc = weighted_auroc(probs[keep, j], target, w)
        out[f"auroc:{j}"] = auroc
        if not math.isnan(float(auroc[0])):  # defined on the full data
            aurocs.append(auroc)
        correct = (probs[keep, j] >= 0.5) == target
        total = w.sum(1)
        accs.append(torch.where(total > 0, (w * correct).sum(1) / total.clamp(min=1e-300), nan))
    out["mauc"] = torch.stack(aurocs).mean(0) if aurocs else nan  # NaN if any label is
    out["mean_acc"] = torch.stack(accs).nanmean(0) if accs else nan
    return out


def _interval(values: torch.Tensor) -> list[float] | None:
    values = values[~values.isnan()]
    if values.numel() < 2:
        return None
    q = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype))
    return [float(q[0]), float(q[1])]


def paired_p(reference: torch.Tensor, other: torch.Tensor) -> float | None:
    """Two-sided paired bootstrap p-value of reference - other (same resamples)."""
    d = reference - other
    d = d[~d.isnan()]
    if d.numel() == 0:
        return None
    p = 2 * min(float((d <= 0).double().mean()), float((d >= 0).double().mean()))
    return min(1.0, p)


def score_column(
    preds: dict[str, list[Predictions]], reference: str, n_boot: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Point estimates, intervals and p-values of every row on one column.

    `preds[row]` holds one `Predictions` per training seed. A row's metric is the mean over
    its seeds; each bootstrap resample of the subjects scores every seed of every row, so the
    interval and the paired p-value are those of the seed-averaged metric. The seeds' own
    values and their standard deviation are kept beside (training noise, which the bootstrap
    over test subjects does not hold)."""
    first = next(iter(preds.values()))[0]
    keys = first.keys
    for row, runs in preds.items():
        for pred in runs:
            if pred.keys != keys:
                raise ValueError(
                    f"row {row} predicted other samples than the others ({len(pred.keys)} vs "
                    f"{len(keys)}); every row must score the same split"
                )
    weights = subject_weights(first.subjects, n_boot, seed)
    scores = {}
    for row, runs in preds.items():
        per_seed = [weighted_scores(pred, weights) for pred in runs]
        scores[row] = {m: torch.stack([s[m] for s in per_seed]) for m in per_seed[0]}
    out: dict[str, dict[str, Any]] = {}
    for row, metrics in scores.items():
        entry: dict[str, Any] = {"n": len(keys), "subjects": len(set(first.subjects))}
        first_pred = preds[row][0]
        entry["scoring"] = (
            "multilabel"
            if first_pred.mask is not None
            else "binary"
            if first_pred.binary
            else "three_class"
        )
        entry["seeds"] = len(preds[row])
        for metric, values in metrics.items():  # (seeds, 1 + n_boot)
            mean = values.mean(0)
            point = float(mean[0])
            entry[metric] = None if math.isnan(point) else point
            entry[f"{metric}_ci"] = _interval(mean[1:]) if n_boot else None
            entry[f"{metric}_by_seed"] = [float(v) for v in values[:, 0]]
            entry[f"{metric}_seed_sd"] = float(values[:, 0].std()) if len(values) > 1 else None
            if row != reference and reference in scores and n_boot:
                entry[f"{metric}_p"] = paired_p(scores[reference][metric].mean(0)[1:], mean[1:])
        out[row] = entry
    return out


# ---- output -----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _cell(entry: dict[str, Any] | None, metric: str) -> str:
    if entry is None:
        return "n/a"
    ci = entry.get(f"{metric}_ci")
    interval = "" if ci is None else f" [{_pct(ci[0])}, {_pct(ci[1])}]"
    sd = entry.get(f"{metric}_seed_sd")
    spread = "" if sd is None else f" ±{100 * sd:.1f}"
    return f"{_pct(entry.get(metric))}{spread}{interval}"


def _p(value: float | None, n_boot: int) -> str:
    if value is None:
        return "-"
    return f"<{1 / n_boot:.3g}" if value == 0 else f"{value:.3f}"


METRIC_NAMES = {
    "acc": "ACC",
    "auc": "AUC",
    "precision": "P",
    "recall": "R",
    "f1": "F1",
    "mauc": "mAUC",
    "mean_acc": "mean ACC",
}


def _per_label(exp: Experiment, scores: dict[str, Any]) -> list[str]:
    """Per-label AUROC of every row on the first column (multilabel experiments)."""
    col = exp.columns[0]
    rows = [row for row in exp.rows if not row.skip and scores.get(row.key, {}).get(col.name)]
    lines = ["", f"## Per-label AUROC ({col.name})", ""]
    lines += ["| Label | " + " | ".join(row.label for row in rows) + " |"]
    lines += ["|" + "---|" * (len(rows) + 1)]
    for j, name in enumerate(exp.label_names):
        cells = [_cell(scores[row.key][col.name], f"auroc:{j}") for row in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def format_markdown(exp: Experiment, results: dict[str, Any]) -> str:
    """The table in the paper's layout, then the p-values, the rows not run and the notes."""
    scores, n_boot = results["scores"], results["n_boot"]
    cols = exp.columns
    lines = [f"# {exp.title}", ""]
    header = ["", "Method"]
    for col in cols:
        mark = " †" if col.zero_shot else ""
        header += [f"{col.name}{mark} {METRIC_NAMES.get(m, m)}" for m in exp.metrics]
    ref = scores.get(exp.reference, {})
    groups = [exp.rows]
    if exp.split_groups:  # one table per row group, the reference row in each
        names = list(dict.fromkeys(row.group for row in exp.rows))
        reference = [row for row in exp.rows if row.key == exp.reference]
        groups = [
            [*(r for r in reference if r.group != name), *(r for r in exp.rows if r.group == name)]
            for name in names
        ]
    for rows in groups:
        if exp.split_groups:
            lines += [f"## {rows[-1].group}", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            cells = [row.group, row.label]
            for col in cols:
                entry = scores.get(row.key, {}).get(col.name)
                for metric in exp.metrics:
                    cell = _cell(entry, metric) if not row.skip else "not run"
                    if exp.layout == "ablation" and entry and row.key != exp.reference:
                        base = ref.get(col.name, {}).get(metric)
                        if base is not None and entry.get(metric) is not None:
                            delta = 100 * (entry[metric] - base)
                            cell += f" ({delta:+.1f})"
                    cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.pop()
    seeds = results["seeds"]
    unit = "study" if exp.kind == "multilabel" else "subject"
    lines += [
        "",
        "Values in %"
        + (
            f", the mean of {len(seeds)} training seeds ({', '.join(map(str, seeds))}) ± their "
            f"standard deviation, then the 95 % bootstrap interval by {unit} of that mean"
            if len(seeds) > 1
            else f", 95 % bootstrap interval by {unit} in brackets"
        )
        + (" (change against the full model in parentheses)." if exp.layout == "ablation" else ".")
        + (
            " †: zero-shot, a cohort never seen in training."
            if any(c.zero_shot for c in cols)
            else ""
        ),
        "",
        f"## Paired bootstrap p-values against {_label(exp, exp.reference)} ({n_boot} resamples)",
        "",
    ]
    header = ["Method"] + [f"{c.name} {METRIC_NAMES.get(m, m)}" for c in cols for m in exp.metrics]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in exp.rows:
        if row.key == exp.reference or row.skip:
            continue
        cells = [row.label]
        for col in cols:
            entry = scores.get(row.key, {}).get(col.name) or {}
            cells += [_p(entry.get(f"{m}_p"), n_boot) for m in exp.metrics]
        lines.append("| " + " | ".join(cells) + " |")
    if exp.label_names:
        lines += _per_label(exp, scores)
    skipped = [row for row in exp.rows if row.skip]
    if skipped:
        lines += ["", "Not run:"] + [f"- {row.label}: {row.skip}" for row in skipped]
    lines += ["", "Samples per column:"]
    ref_scores = scores.get(exp.reference, {})
    for col in cols:
        entry = ref_scores.get(col.name)
        if entry:
            kind = {
                "binary": "NC vs MCI+AD, P(MCI)+P(AD)",
                "multilabel": f"{len(exp.label_names)} labels, resampled by study",
            }.get(entry["scoring"], "NC / MCI / AD")
            units = "studies" if entry["scoring"] == "multilabel" else "subjects"
            lines.append(
                f"- {col.name}: {entry['n']} scans of {entry['subjects']} {units} ({kind})"
            )
    if exp.notes:
        lines += ["", *exp.notes]
    shared = {
        k: v for run in results["runs"].values() for k, v in run.get("shared_seconds", {}).items()
    }
    trained = sum(run["seconds"] for run in results["runs"].values()) + sum(shared.values())
    reused = sum(1 for run in results["runs"].values() if run["reused"])
    lines += [
        "",
        f"Size: {results['size']}; training seeds {results['seeds']}; training "
        f"{trained / 60:.1f} min "
        f"(the rows' runs added up) on {results['machine']}"
        + (f"; {reused} rows read back from earlier runs." if reused else "."),
    ]
    return "\n".join(lines) + "\n"


def _label(exp: Experiment, key: str) -> str:
    return next(row.label for row in exp.rows if row.key == key)


def plot_results(exp: Experiment, results: dict[str, Any], path: Path) -> Path:
    """ACC and AUC per column, one bar per row, with the 95 % intervals."""
    scores = results["scores"]
    rows = [row for row in exp.rows if not row.skip and row.key in scores]
    cols = exp.columns
    fig, axes = plt.subplots(
        len(exp.metrics),
        1,
        figsize=(max(6.0, 1.1 * len(cols) * max(1, len(rows)) / 3 + 2) + 3, 3.5 * len(exp.metrics)),
        squeeze=False,
    )
    width = 0.8 / max(1, len(rows))
    palette = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    for ax, metric in zip(axes[:, 0], exp.metrics, strict=True):
        for i, row in enumerate(rows):
            xs, ys, lo, hi = [], [], [], []
            for j, col in enumerate(cols):
                entry = scores[row.key].get(col.name)
                if not entry or entry.get(metric) is None:
                    continue
                value, ci = entry[metric], entry.get(f"{metric}_ci") or [entry[metric]] * 2
                xs.append(j - 0.4 + (i + 0.5) * width)
                ys.append(value)
                lo.append(value - ci[0])
                hi.append(ci[1] - value)
            colour = palette(i % palette.N)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=row.label, color=colour)
        ax.set_xticks(range(len(cols)), [c.name + (" †" if c.zero_shot else "") for c in cols])
        ax.set_ylabel(METRIC_NAMES.get(metric, metric))
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_title(exp.title, fontsize=10)
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_experiment(
    exp: Experiment,
    out: Path,
    shared: Sequence[str],
    launcher: Sequence[str] = (),
    n_boot: int = 1000,
    seeds: Sequence[int] = (0,),
    rerun: bool = False,
    size: str = "",
    progress: Callable[[str], None] = print,
    jobs: int = 1,
) -> dict[str, Any]:
    """Trains every row once per seed, scores every column, writes results.{json,md,png}
    under `out` (the bootstrap draws use the first seed). `jobs` runs that many rows at once
    (each run is seeded on its own, so the results do not depend on it).

    The runs start in the repository (for its configs): `out` and any paths in `shared`
    must be absolute or relative to it; scripts/experiment.py resolves them."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = list(seeds)
    runs: dict[str, Any] = {}
    trained: set[Path] = set()
    todo = [row for row in exp.rows if not row.skip]
    for row in exp.rows:
        if row.skip:
            progress(f"{row.label}: not run ({row.skip})")
    locks = _FolderLocks()
    work = [(seed, row) for seed in seeds for row in todo]

    def one(i: int, seed: int, row: Row) -> dict[str, Any]:
        tag = f"[{i}/{len(work)}] {row.label}, seed {seed}"
        progress(f"{tag} ...")
        run = run_row(row, exp, out, shared, launcher, rerun, seed, trained=trained, locks=locks)
        how = "reused" if run["reused"] else f"{run['seconds']:.0f} s"
        progress(f"{tag}: done ({how})")
        return run

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    futures = {
        pool.submit(one, i, seed, row): f"{row.key}/seed{seed}"
        for i, (seed, row) in enumerate(work, 1)
    }
    try:
        for future in as_completed(futures):
            runs[futures[future]] = future.result()
    except BaseException:
        # The first failure (or Ctrl-C) ends the experiment: no queued row starts; rows
        # already training finish their current run.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    runs = {f"{row.key}/seed{seed}": runs[f"{row.key}/seed{seed}"] for seed, row in work}
    scores: dict[str, dict[str, Any]] = {row.key: {} for row in todo}
    for col in exp.columns:
        preds = {}
        for row in todo:
            found = [read_predictions(run_folder(out, row, seed), col, exp.kind) for seed in seeds]
            if all(pred is not None for pred in found):
                preds[row.key] = found
        if not preds:
            log.warning("column %s: no run has predictions for split %s", col.name, col.split)
            continue
        for key, entry in score_column(preds, exp.reference, n_boot, seeds[0]).items():
            scores[key][col.name] = entry
    results = {
        "experiment": exp.name,
        "title": exp.title,
        "size": size,
        "seeds": seeds,
        "n_boot": n_boot,
        "reference": exp.reference,
        "rows": [asdict(row) for row in exp.rows],
        "columns": [asdict(col) for col in exp.columns],
        "runs": runs,
        "scores": scores,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{os.cpu_count()} CPU cores"
        + (", CUDA" if torch.cuda.is_available() else ", no GPU"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(format_markdown(exp, results))
    plot_results(exp, results, out / "results.png")
    return results


def finite_table(results: dict[str, Any], exp: Experiment) -> bool:
    """Every run row has a finite ACC and AUC in every column (what --quick must deliver)."""
    for row in exp.rows:
        if row.skip:
            continue
        for col in exp.columns:
            entry = results["scores"].get(row.key, {}).get(col.name)
            if not entry or any(
                entry.get(m) is None or not np.isfinite(entry[m]) for m in exp.metrics
            ):
                return False
    return True
