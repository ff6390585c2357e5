"""What a run trains and how it is scored: one object per `model.task` (open_clip's task wrapper).

The loop, the evaluate-only command and the report ask the task; none of them branches on the
task itself:

    task.check(shards)                 at start: the shards' format fits the task (a message if not);
                                       the label names come from the first split checked
    task.losses(model, batch)          one micro-batch: the weighted `*_loss` terms, and extras
                                       to log (the learned temperature)
    task.evaluate(ctx, name, folder)   a split's scores (and, with plots, the files a person reads)
    task.summary(name, result)         the lines the end-of-run report prints

    task        trains                    on shards          scored by
    pretrain    itc / mae / mlm           AD, chest X-ray    mean losses (+ retrieval, zero-shot)
    classify    cls                       AD                 ACC, macro-AUC, P / R / F1, per cohort
    joint       itc + mae + mlm + cls     AD                 classify's scores + the mean losses
    multilabel  14-label BCE              chest X-ray        per-label AUROC, mAUC with CIs
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator

from shards.formats.image_multilabel import ImageMultilabel
from shards.formats.volume_class import VolumeClass
from shards.reader import ShardSet, build_eval_loader
from trainer.config import Config
from trainer.cxr_metrics import format_table
from trainer.embed_eval import SplitEmbeddings, retrieval_metrics, zero_shot_metrics
from trainer.evaluate import isolated_rng, predict, reduce_mean, score, score_multilabel
from trainer.plots import plot_confusion, plot_label_auroc, plot_roc


@dataclass
class EvalContext:
    """What scoring a split needs: the prepared model, where batches go, where files go."""

    cfg: Config
    model: torch.nn.Module  # as the accelerator prepared it
    accelerator: Accelerator
    move: Any  # batch -> batch on the device (trainer.loop.Mover)
    tokenizer: Any
    out_dir: Path
    text_caches: dict[str, Any] = field(default_factory=dict)  # split folder -> its text cache

    def loader(self, folder: str):
        return build_eval_loader(
            folder,
            self.cfg.data,
            self.tokenizer,
            self.cfg.model.text_max_length,
            self.accelerator.process_index,
            self.accelerator.num_processes,
            self.text_caches.get(folder),
        )

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def _loss_terms(out: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in out.items() if k.endswith("_loss")}


def _loss_line(name: str, result: dict[str, Any]) -> str:
    return f"{name}: " + "  ".join(
        f"{k} {v:.4f}" for k, v in sorted(result.items()) if k.endswith("_loss")
    )


# Models whose input side is not fixed by model.vision.img_size: convolutional ones, and the
# text-only BERT baseline.
_ANY_SIZE = ("fusion", "resnet3d", "medicalnet", "bert")


class Task:
    """The interface (see the module docstring); subclasses fill in what differs."""

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]  # shard formats the task reads
    batch_keys: ClassVar[tuple[str, ...]]  # what each batch must hold for the model

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.label_names: list[str] | None = None  # the classes / labels, from the shards

    def class_names(self, shards: ShardSet) -> list[str]:
        """What the task predicts, named: the split's label names (ShardSet.label_names)."""
        return list(shards.label_names)

    def names_for(self, folder: str) -> list[str]:
        """The label names checked at start, or (no check ran) those of the split at `folder`."""
        return self.label_names or self.class_names(ShardSet.load(folder))

    def check(self, shards: ShardSet) -> None:
        """Raises ValueError when the split's shards cannot feed this task (format, image size,
        label names differing from the first split checked)."""
        if shards.format not in self.formats:
            raise ValueError(
                f"{shards.folder}: model.task={self.name} reads {' or '.join(self.formats)} "
                f"shards; this split is {shards.format}"
            )
        size = self.cfg.model.vision.img_size
        if shards.size is not None and shards.size != size and self._fixed_size:
            raise ValueError(
                f"model.vision.img_size={size}, but {shards.folder}/manifest.json has "
                f"{shards.spec.size_key}={shards.size}: set model.vision.img_size="
                f"{shards.size} or write shards of side {size}"
            )
        names = self.class_names(shards)
        if self.label_names is None:
            self.label_names = names
        elif names != self.label_names:
            raise ValueError(
                f"{shards.folder}/manifest.json: label names {names} differ from the first "
                f"split's {self.label_names}; every split of a run must have the same labels"
            )

    @property
    def _fixed_size(self) -> bool:
        m = self.cfg.model
        if m.arch == "fusion":
            return "vit" in m.fusion.branches  # the ViT branch reads model.vision.img_size
        return m.arch not in _ANY_SIZE and not (m.arch == "alifuse" and m.image_tower == "none")

    def check_settings(self) -> None:
        """Raises ValueError for settings this task cannot honour (before anything is built)."""
        metric = self.cfg.train.early_stop_metric
        if metric and metric not in self.metric_names():
            raise ValueError(
                f"train.early_stop_metric={metric!r}: a model.task={self.name} validation has "
                f"no such number; expected one of {sorted(self.metric_names())}"
            )

    def metric_names(self) -> set[str]:
        """The numbers a validation result of this task holds (early stopping watches one)."""
        return {f"{o}_loss" for o in self.cfg.model.objectives}

    def losses(
        self, model: torch.nn.Module, batch: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The weighted `*_loss` terms of one micro-batch (summed by the loop) and extras."""
        out = model(batch)
        extras = {"logit_scale": float(out["logit_scale"])} if "logit_scale" in out else {}
        return _loss_terms(out), extras

    def evaluate(self, ctx: EvalContext, name: str, folder: str, plots: bool) -> dict[str, Any]:
        raise NotImplementedError

    def summary(self, name: str, result: dict[str, Any]) -> list[str]:
        raise NotImplementedError


@torch.no_grad()
def eval_losses(
    ctx: EvalContext, loader, embeddings: SplitEmbeddings | None = None
) -> dict[str, float]:
    """Mean losses on a split; the eval's random masks do not touch the training RNG. With
    `embeddings`, each batch's unmasked image / text states are collected in the same pass."""
    model = ctx.model
    model.eval()
    sums: dict[str, float] = defaultdict(float)
    count = 0
    with isolated_rng(ctx.cfg.train.seed, ctx.accelerator.device):
        for batch in loader:
            batch = ctx.move(batch)
            for key, value in _loss_terms(model(batch)).items():
                sums[key] += float(value)
            if embeddings is not None:
                embeddings.add(model, batch)
            count += 1
    model.train()
    return reduce_mean(ctx.accelerator, {k: v / max(count, 1) for k, v in sums.items()})


class PretrainTask(Task):
    """Alignment and reconstruction (ITC, MAE, MLM): scored by its mean losses, and with
    train.retrieval / train.zero_shot by image <-> text retrieval and zero-shot labels."""

    name = "pretrain"
    formats = (VolumeClass.name, ImageMultilabel.name)
    batch_keys = ("image",)  # + input_ids, attention_mask with a text tower

    def check(self, shards: ShardSet) -> None:
        super().check(shards)
        if not shards.texts and self.cfg.model.text_tower != "none":
            raise ValueError(
                f'{shards.folder}/manifest.json says "texts": false (a dataset without '
                f"reports), but model.text_tower={self.cfg.model.text_tower} trains on texts; "
                "pretrain on shards with texts, or set model.text_tower=none (MAE only)"
            )

    def metric_names(self) -> set[str]:
        names = super().metric_names()
        if self.cfg.train.retrieval:
            names |= {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
        if self.cfg.train.zero_shot:
            names.add("zero_shot_mauc")
        return names

    def evaluate(self, ctx: EvalContext, name: str, folder: str, plots: bool) -> dict[str, Any]:
        cfg = ctx.cfg
        wanted = cfg.train.retrieval or cfg.train.zero_shot
        collect = SplitEmbeddings(cfg.model.text_max_length) if wanted else None
        result: dict[str, Any] = eval_losses(ctx, ctx.loader(folder), collect)
        if collect is None:
            return result
        emb = collect.gather(ctx.accelerator)
        bare = ctx.accelerator.unwrap_model(ctx.model)
        if cfg.train.retrieval:
            result.update(retrieval_metrics(bare, emb, ctx.accelerator.device, (1, 5, 10)))
        if cfg.train.zero_shot:
            zs, probs = zero_shot_metrics(
                bare,
                ctx.model,
                emb,
                ctx.tokenizer,
                cfg.model.text_max_length,
                ctx.move,
                self.names_for(folder),
                cfg.train.bootstrap if plots else 0,
                cfg.data.prompted,
            )
            result["zero_shot_mauc"] = zs["mauc"]
            result["zero_shot"] = zs
            if plots and ctx.main:
                with open(ctx.out_dir / f"zero_shot_{name}.jsonl", "w", encoding="utf-8") as fh:
                    for key, row in zip(emb["key"], probs.tolist(), strict=True):
                        fh.write(json.dumps({"key": key, "probs": row}) + "\n")
        return result

    def summary(self, name: str, result: dict[str, Any]) -> list[str]:
        lines = [_loss_line(name, result)]
        recall = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
        if all(k in result for k in recall):
            lines.append(
                f"{name} retrieval: "
                + "  ".join(f"{k} {result[k]:.4f}" for k in recall)
                + f"  (n={result['retrieval_n']})"
            )
        if "zero_shot" in result:
            zs = result["zero_shot"]
            ci = zs.get("mauc_ci")
            interval = "" if ci is None else f" [{ci[0]:.4f}, {ci[1]:.4f}]"
            mauc = "n/a" if zs["mauc"] is None else f"{zs['mauc']:.4f}"
            lines.append(f"{name} zero-shot: mAUC {mauc}{interval}")
        return lines


class ClassifyTask(Task):
    """NC / MCI / AD (or binary) classification of AD shards: ACC, macro-AUC, macro P / R / F1,
    overall and per cohort. A three-class model scores the samples of binary cohorts (OASIS-2,
    MIRIAD: NC vs impaired) as binary, from P(MCI) + P(AD)."""

    name = "classify"
    formats = (VolumeClass.name,)
    batch_keys = ("image", "label")

    def class_names(self, shards: ShardSet) -> list[str]:
        return shards.spec.class_names(shards.label_names, self.cfg.data.label_mode, shards.folder)

    def check(self, shards: ShardSet) -> None:
        super().check(shards)
        mode, classes, names = (
            self.cfg.data.label_mode,
            self.cfg.model.num_classes,
            self.label_names,
        )
        if classes != len(names):
            raise ValueError(
                f"model.num_classes={classes}: data.label_mode={mode} on {shards.folder} has "
                f"{len(names)} classes ({', '.join(names)})"
            )

    def metric_names(self) -> set[str]:
        return super().metric_names() | {"n", "acc", "precision", "recall", "f1", "auc"}

    @property
    def collapse_binary(self) -> bool:
        return self.cfg.data.label_mode == "three_class"

    def evaluate(self, ctx: EvalContext, name: str, folder: str, plots: bool) -> dict[str, Any]:
        pred = predict(
            ctx.model,
            ctx.loader(folder),
            ctx.accelerator,
            ctx.move,
            VolumeClass.eval_tensors,
            VolumeClass.eval_lists,
            seed=ctx.cfg.train.seed,
        )
        result = score(pred, self.cfg.model.num_classes, self.collapse_binary)
        result.update(pred["losses"])
        if plots and ctx.main:
            self._write(ctx.out_dir, name, pred, result, self.names_for(folder))
        return result

    def _write(
        self,
        out: Path,
        name: str,
        pred: dict[str, Any],
        result: dict[str, Any],
        names: list[str],
    ) -> None:
        plot_roc(pred["logits"], pred["label"], names, out / f"roc_{name}.png", f"ROC ({name})")
        if result.get("scoring") != "binary_collapse":  # its 2 x 2 matrix is in results.json
            plot_confusion(
                result["confusion"], names, out / f"confusion_{name}.png", f"Confusion ({name})"
            )
        with open(out / f"predictions_{name}.jsonl", "w", encoding="utf-8") as fh:
            for i, key in enumerate(pred["key"]):
                row = {
                    "key": key,
                    "subject": pred["subject"][i],
                    "cohort": pred["cohort"][i],
                    "label": int(pred["label"][i]),
                    "binary": bool(pred["binary"][i]),
                    "logits": pred["logits"][i].tolist(),
                }
                fh.write(json.dumps(row) + "\n")

    def summary(self, name: str, result: dict[str, Any]) -> list[str]:
        def auc(r: dict[str, Any]) -> str:
            return "n/a" if r["auc"] is None else f"{r['auc']:.4f}"

        binary = " (binary: NC vs MCI+AD)" if result.get("scoring") == "binary_collapse" else ""
        lines = [
            f"{name}: ACC {result['acc']:.4f}  macro-AUC {auc(result)}  "
            f"P {result['precision']:.4f}  R {result['recall']:.4f}  F1 {result['f1']:.4f}  "
            f"(n={result['n']}){binary}"
        ]
        for cohort, r in result.get("per_cohort", {}).items():
            tag = "  binary" if r.get("scoring") == "binary_collapse" else ""
            lines.append(
                f"  {cohort:<8} ACC {r['acc']:.4f}  AUC {auc(r)}  F1 {r['f1']:.4f}  "
                f"(n={r['n']}){tag}"
            )
        if any(k.endswith("_loss") for k in result):
            lines.append("  " + _loss_line(f"{name} losses", result))
        return lines


class JointTask(ClassifyTask):
    """The Alifuse paper's joint objective (eq. 5): ITC, MAE, MLM and the classifier trained
    together; scored like classify, with the split's mean loss terms beside."""

    name = "joint"


class MultilabelTask(Task):
    """The labels of chest X-ray shards (the 14 CheXpert labels, or a manifest's label_names):
    per-label AUROC and mAUC with bootstrap intervals (images of one study resampled together)."""

    name = "multilabel"
    formats = (ImageMultilabel.name,)
    batch_keys = ("image", "labels", "label_mask")

    def check(self, shards: ShardSet) -> None:
        super().check(shards)
        heads = self.cfg.model.multilabel.num_labels
        if heads != len(shards.label_names):
            raise ValueError(
                f"model.multilabel.num_labels={heads}, but {shards.folder}/manifest.json has "
                f"{len(shards.label_names)} label names ({', '.join(shards.label_names)})"
            )

    def metric_names(self) -> set[str]:
        return {"mauc", "mean_acc"}

    def evaluate(self, ctx: EvalContext, name: str, folder: str, plots: bool) -> dict[str, Any]:
        pred = predict(
            ctx.model,
            ctx.loader(folder),
            ctx.accelerator,
            ctx.move,
            ImageMultilabel.eval_tensors,
            ImageMultilabel.eval_lists,
        )
        names = self.names_for(folder)
        result = score_multilabel(pred, names, ctx.cfg.train.bootstrap if plots else 0)
        if plots and ctx.main:
            plot_label_auroc(result, ctx.out_dir / f"auroc_{name}.png", f"Per-label AUROC ({name})")
            with open(ctx.out_dir / f"predictions_{name}.jsonl", "w", encoding="utf-8") as fh:
                for i, key in enumerate(pred["key"]):
                    row = {
                        "key": key,
                        "group": pred["group"][i],  # the study: its images share one report
                        "labels": pred["labels"][i].tolist(),
                        "label_mask": pred["label_mask"][i].tolist(),
                        "logits": pred["logits"][i].tolist(),
                    }
                    fh.write(json.dumps(row) + "\n")
        return result

    def summary(self, name: str, result: dict[str, Any]) -> list[str]:
        ci = result.get("mauc_ci")
        interval = "" if ci is None else f" [{ci[0]:.4f}, {ci[1]:.4f}]"
        mauc = "n/a" if result["mauc"] is None else f"{result['mauc']:.4f}"
        return [
            f"{name}: mAUC {mauc}{interval}  mean ACC {result['mean_acc']:.4f}",
            format_table(result),
        ]


TASKS: dict[str, type[Task]] = {
    t.name: t for t in (PretrainTask, ClassifyTask, JointTask, MultilabelTask)
}


def build_task(cfg: Config) -> Task:
    """The task object for `cfg.model.task`."""
    return TASKS[cfg.model.task](cfg)
