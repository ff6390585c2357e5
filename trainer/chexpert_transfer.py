"""A MIMIC-CXR-pretrained run evaluated on CheXpert, as papers evaluate such models.

    python scripts/experiment.py chexpert-transfer RUN_DIR --quick
    python scripts/experiment.py chexpert-transfer RUN_DIR --size paper --shards data/chexpert

RUN_DIR is a finished chest X-ray run (its config.yaml and model.safetensors): a pretraining run
with an image and a text tower (ITC), or any run whose image tower is named `visual` (an MAE
run). Two parts:

- zero-shot CheXpert 5x200 (GLoRIA, Huang et al. 2021): 5 classes (Atelectasis, Cardiomegaly,
  Consolidation, Edema, Pleural Effusion) x N images of the CheXpert training set, each positive
  for its class and negative (or blank) for every other label except No Finding; N = 200 in the
  protocol. shards/chexpert.py selects them (`make_shards.py chexpert --zero-shot-5x200 200`)
  into a split of its own, whose patients are left out of train and val. Each image is
  classified by the arg-max of its similarity to one prompt per class (the prompts of the run's
  own zero-shot evaluation, trainer/retrieval.default_prompts, in the run's prompt template):
  accuracy with a 95 % percentile bootstrap interval over studies, per-class accuracy and the
  confusion matrix. GLoRIA averages several prompts per class drawn from severity / subtype /
  location templates; one prompt per class keeps the number comparable with the run's
  MIMIC zero-shot. Also the run's 14-label zero-shot (positive against negative prompt per
  label) on the CheXpert test split: mAUC with its interval. A run without a text tower gets
  neither (the section says so).
- label efficiency: a linear probe (the tower frozen, one linear layer on its normalised
  feature) and full fine-tuning, each on 1 %, 10 % and 100 % of the CheXpert training images
  (data.label_fraction: nested seeded subsets), every row started from RUN_DIR's image tower
  (train.init_from) and scored on the CheXpert test split (the official valid.csv): mAUC over
  the 14 labels and mean accuracy, with bootstrap intervals over studies and paired p-values
  against full fine-tuning on 100 %.

Sizes:

    quick     a synthetic CheXpert tree (240 + 60 valid patients, 5 x 20 zero-shot images),
              40 steps a row
    default   800 + 150 valid patients, 5 x 50 zero-shot images, 300 steps a row, 3 seeds
    paper     your CheXpert shards (--shards, with a 5x200 split); the preset's schedule

Images are written at RUN_DIR's model.vision.img_size, and every row takes RUN_DIR's vision
settings, so the pretrained weights fit. The synthetic tree draws its findings as the synthetic
MIMIC-CXR tree does (shards/synthetic/cxr.py), so a tower pretrained on that tree transfers;
its numbers say how the pipeline behaves, not how a real model transfers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shards.chexpert import COMPETITION_TASKS as COMPETITION
from shards.chexpert import ZERO_SHOT_SPLIT
from shards.cxr_labels import LABEL_NAMES
from trainer.experiment import (
    Column,
    Experiment,
    Predictions,
    Row,
    Suite,
    _interval,
    subject_weights,
    weighted_scores,
)

CONFIG = "configs/chexpert_transfer.yaml"
FRACTIONS = (0.01, 0.1, 1.0)


@dataclass
class Size:
    name: str
    seeds: tuple[int, ...] = (0,)
    patients: int = 0  # 0: the user's shards
    valid_patients: int = 0  # the synthetic valid.csv's patients (the test split)
    per_class: int = 200  # zero-shot images per class
    steps: int = 0  # 0: the preset's
    overrides: list[str] = field(default_factory=list)


_RUNS = [  # every row: no checkpoints or evaluation on the way, the test split scored at the end
    "train.eval_every=0",
    "train.save_every=0",
    "train.early_stop_metric=",
    "train.bootstrap=0",
    "train.progress=false",
    "train.eval_splits=[test]",
]

SIZES = {
    "quick": Size(
        "quick",
        patients=240,
        valid_patients=60,
        per_class=20,
        steps=40,
        overrides=[
            "data.batch_size=16",
            "data.eval_batch_size=64",
            "data.shuffle_buffer=64",
            "data.num_workers=0",
            "optim.warmup_steps=4",
            "train.log_every=20",
            "train.mixed_precision=no",
            *_RUNS,
        ],
    ),
    "default": Size(
        "default",
        seeds=(0, 1, 2),
        patients=800,
        valid_patients=150,
        per_class=50,
        steps=300,
        overrides=[
            "data.batch_size=32",
            "data.eval_batch_size=64",
            "data.num_workers=0",
            "optim.warmup_steps=20",
            "train.log_every=50",
            "train.mixed_precision=no",
            *_RUNS,
        ],
    ),
    "paper": Size("paper", seeds=(0, 1, 2), overrides=list(_RUNS)),
}


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g} %"


def transfer(size_name: str, options: Any) -> Experiment:
    """The label-efficiency table: linear probe and fine-tuning at 1 / 10 / 100 % of labels."""
    size = SIZES[size_name]
    steps = [f"train.max_steps={size.steps}"] if size.steps else []
    rows = []
    for mode, group, key in (
        ("linear_probe", "Linear probe", "probe"),
        ("full", "Fine-tune", "ft"),
    ):
        for fraction in FRACTIONS:
            rows.append(
                Row(
                    f"{key}_{fraction * 100:g}pct",
                    f"{group}, {_pct(fraction)} of the labels",
                    group,
                    [
                        *steps,
                        f"model.multilabel.finetune={mode}",
                        f"data.label_fraction={fraction}",
                    ],
                )
            )
    return Experiment(
        name="chexpert-transfer",
        title="CheXpert transfer of a MIMIC-CXR-pretrained image tower: label efficiency",
        config=CONFIG,
        rows=rows,
        columns=[Column("CheXpert test", "test")],
        reference="ft_100pct",
        layout="grid",
        kind="multilabel",
        metrics=("mauc", "mean_acc"),
        label_names=list(LABEL_NAMES),
        notes=[
            f"Every row starts from the image tower of {options.run_dir} (train.init_from) with "
            "its vision settings; the linear probe trains one linear layer on the frozen "
            "tower's normalised CLS feature, fine-tuning trains the tower too.",
            "Label fractions are nested seeded subsets of the CheXpert training images "
            "(data.label_fraction); validation and test are whole. The test split is the "
            "official valid.csv. Uncertain labels count as positive (U-Ones), blank as negative.",
            "mAUC averages the AUROC of the labels whose both classes occur in the test split "
            "(up to 14); CheXpert papers often report the mean over the 5 competition tasks "
            "(Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion), which the "
            "per-label table gives.",
        ],
    )


def run_overrides(run_dir: Path, cfg: Any) -> list[str]:
    """What every row takes from the pretrained run (its config `cfg`): its vision settings and
    its weights."""
    if cfg.model.vision.spatial_dims != 2:
        raise ValueError(
            f"{run_dir}: model.vision.spatial_dims={cfg.model.vision.spatial_dims}; a chest "
            "X-ray run (2-D) is needed"
        )
    if not (Path(run_dir) / "model.safetensors").is_file():
        raise ValueError(f"{run_dir}: no model.safetensors; the run has not finished")
    vision = dataclasses.asdict(cfg.model.vision)
    return [
        *(f"model.vision.{k}={json.dumps(v)}" for k, v in vision.items()),
        f"train.init_from={Path(run_dir).resolve()}",
    ]


def prepare_data(size: Size, image: int, root: Path, seed: int, progress=print) -> Path:
    """A synthetic CheXpert-v1.0 tree -> shards at side `image` with a 5x200-style split;
    written once under `root`. Returns the shard folder."""
    from shards.chexpert import write_chexpert_shards
    from shards.synthetic.chexpert import generate_chexpert

    recipe = {
        "patients": size.patients,
        "valid_patients": size.valid_patients,
        "per_class": size.per_class,
        "image": image,
        "seed": seed,
    }
    stamp = root / "data_recipe.json"
    shards = root / "shards"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        progress(f"data: reusing {root}")
        return shards
    progress(f"data: synthetic CheXpert-v1.0 tree ({size.patients} patients) -> {root}")
    tree = generate_chexpert(
        root / "raw",
        patients=size.patients,
        valid_patients=size.valid_patients,
        size=2 * image,
        seed=seed,
    )["root"]
    write_chexpert_shards(
        tree, shards, size=image, samples_per_shard=64, zero_shot_5x200=size.per_class, seed=seed
    )
    stamp.write_text(json.dumps(recipe, indent=2))
    return shards


def _prepare(size: Size, root: Path, options: Any, progress=print) -> list[str]:
    from trainer.run_folder import load_run_config

    run_dir = Path(options.run_dir).resolve()
    cfg = load_run_config(run_dir, options.run_set)
    shared = run_overrides(run_dir, cfg)
    if options.shards is not None:
        shards = Path(options.shards).resolve()
        needed = ["train", "val", "test"]
        if cfg.model.has_itc:  # the zero-shot part
            needed.append(ZERO_SHOT_SPLIT)
        missing = [s for s in needed if not (shards / s / "manifest.json").is_file()]
        if missing:
            raise ValueError(
                f"{shards}: no {', '.join(missing)} split (manifest.json); write CheXpert shards "
                "with make_shards.py chexpert --zero-shot-5x200 200"
            )
    else:
        image = cfg.model.vision.img_size
        shards = prepare_data(size, image, root / f"img{image}", options.data_seed, progress)
    options.chexpert_shards = shards
    return [
        *size.overrides,
        *(f"data.{split}={shards / split}" for split in ("train", "val", "test")),
        *shared,
    ]


# ---- zero-shot ------------------------------------------------------------------------------


def _batches(predictor: Any, split_dir: Path):
    from shards.reader import build_eval_loader

    data = dataclasses.replace(predictor.cfg.data, eval_batch_size=predictor.batch_size)
    max_length = predictor.cfg.model.text_max_length
    for batch in build_eval_loader(str(split_dir), data, None, max_length, 0, 1):
        keep = batch["valid"]
        rows = [i for i, ok in enumerate(keep.tolist()) if ok]
        yield {
            "image": batch["image"][keep],
            "labels": batch["labels"][keep],
            "label_mask": batch["label_mask"][keep],
            "key": [batch["key"][i] for i in rows],
            "group": [batch["group"][i] for i in rows],
        }


def zero_shot_5x200(predictor: Any, split_dir: Path, n_boot: int, seed: int) -> dict[str, Any]:
    """Accuracy of the arg-max over the 5 class prompts on the 5x200 split, with a bootstrap
    interval over studies, per-class accuracy and the confusion matrix (rows: true class)."""
    from trainer.retrieval import default_prompts

    index = [LABEL_NAMES.index(name) for name in COMPETITION]
    prompts = default_prompts(list(COMPETITION))[0]
    truth, guess, groups = [], [], []
    for batch in _batches(predictor, split_dir):
        positive = batch["labels"][:, index] > 0.5
        bad = [k for k, n in zip(batch["key"], positive.sum(1).tolist(), strict=True) if n != 1]
        if bad:
            raise ValueError(
                f"{split_dir}: samples {bad[:3]} are not positive for exactly one of "
                f"{', '.join(COMPETITION)}; expected a 5x200 split (make_shards.py chexpert "
                "--zero-shot-5x200 N)"
            )
        truth.append(positive.float().argmax(1))
        guess.append(predictor.text_logits(batch, prompts).argmax(1))
        groups += batch["group"]
    truth_t, guess_t = torch.cat(truth), torch.cat(guess)
    correct = (truth_t == guess_t).double()
    weights = subject_weights(groups, n_boot, seed)
    acc = (weights * correct).sum(1) / weights.sum(1)
    confusion = torch.zeros(len(COMPETITION), len(COMPETITION), dtype=torch.long)
    confusion.index_put_((truth_t, guess_t), torch.ones_like(truth_t), accumulate=True)
    return {
        "n": int(truth_t.numel()),
        "acc": float(acc[0]),
        "acc_ci": _interval(acc[1:]),
        "per_class": {
            name: float(correct[truth_t == c].mean()) if bool((truth_t == c).any()) else None
            for c, name in enumerate(COMPETITION)
        },
        "confusion": confusion.tolist(),
        "classes": list(COMPETITION),
        "prompts": prompts,
        "chance": 1.0 / len(COMPETITION),
    }


def zero_shot_labels(predictor: Any, split_dir: Path, n_boot: int, seed: int) -> dict[str, Any]:
    """The run's 14-label zero-shot (positive against negative prompt per label) on a split:
    mAUC over the labels where both classes occur, with its bootstrap interval over studies."""
    from shards.reader import ShardSet

    names = ShardSet.load(str(split_dir)).label_names
    if predictor.label_names != names:
        raise ValueError(
            f"{split_dir}: label names {names} are not the run's {predictor.label_names}; the "
            "zero-shot columns would be scored against the wrong labels"
        )
    probs, labels, masks, keys, groups = [], [], [], [], []
    for batch in _batches(predictor, split_dir):
        probs.append(predictor.run(batch, ("zero_shot",))["zero_shot"])
        labels.append(batch["labels"])
        masks.append(batch["label_mask"])
        keys += batch["key"]
        groups += batch["group"]
    p = torch.cat(probs).double().clamp(1e-7, 1 - 1e-7)
    pred = Predictions(
        keys, groups, torch.logit(p), torch.cat(labels).double(), False, torch.cat(masks).double()
    )
    scores = weighted_scores(pred, subject_weights(groups, n_boot, seed))
    per_label = {name: float(scores[f"auroc:{j}"][0]) for j, name in enumerate(LABEL_NAMES)}
    return {
        "n": len(keys),
        "mauc": float(scores["mauc"][0]),
        "mauc_ci": _interval(scores["mauc"][1:]),
        "per_label": {k: (None if v != v else v) for k, v in per_label.items()},
    }


def _fmt(value: float | None, ci: list[float] | None = None) -> str:
    if value is None:
        return "n/a"
    text = f"{100 * value:.1f}"
    return text + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def finish(exp: Experiment, out: Path, options: Any, results: dict[str, Any], n_boot: int) -> str:
    """The zero-shot part: scores RUN_DIR on the 5x200 and test splits, adds them to
    OUT/results.json and OUT/results.md; returns the markdown section."""
    from trainer.inference import Predictor

    run_dir = Path(options.run_dir).resolve()
    shards = Path(options.chexpert_shards)
    seed = results["seeds"][0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        predictor = Predictor.from_run(run_dir, device, overrides=options.run_set)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{run_dir} cannot be loaded for zero-shot ({err}); a path in its config.yaml may be "
            "relative to where it was trained: pass --run-set model.text.checkpoint=/abs/path"
        ) from err
    lines = ["", "## Zero-shot (no CheXpert label used)", ""]
    if "zero_shot" not in predictor.outputs():
        reason = f"{run_dir} has no text tower aligned by ITC (model.task={predictor.task})"
        results["zero_shot"] = {"skipped": reason}
        lines.append(f"Not run: {reason}.")
    else:
        five = shards / ZERO_SHOT_SPLIT
        if not (five / "manifest.json").is_file():
            raise ValueError(
                f"{five}: no 5x200 split; write the shards with make_shards.py chexpert "
                "--zero-shot-5x200 200"
            )
        zs = zero_shot_5x200(predictor, five, n_boot, seed)
        labels = zero_shot_labels(predictor, shards / "test", n_boot, seed)
        results["zero_shot"] = {"5x200": zs, "test_14_labels": labels}
        per_class = ", ".join(f"{k} {_fmt(v)}" for k, v in zs["per_class"].items())
        lines += [
            "| protocol | n | metric | value [95 % CI] |",
            "|---|---|---|---|",
            f"| CheXpert 5x{zs['n'] // 5} (GLoRIA), 5-way | {zs['n']} | accuracy | "
            f"{_fmt(zs['acc'], zs['acc_ci'])} (chance 20.0) |",
            f"| CheXpert test, 14 labels | {labels['n']} | mAUC | "
            f"{_fmt(labels['mauc'], labels['mauc_ci'])} |",
            "",
            f"Accuracy per class (%, 5x{zs['n'] // 5}): {per_class}. Confusion (rows: true class, columns: predicted, "
            f"order {', '.join(zs['classes'])}): {zs['confusion']}. Prompts: "
            + "; ".join(f'"{p}"' for p in zs["prompts"])
            + ".",
        ]
    section = "\n".join(lines) + "\n"
    (out / "results.json").write_text(json.dumps(results, indent=2))
    with open(out / "results.md", "a", encoding="utf-8") as fh:
        fh.write(section)
    return section


SUITE = Suite(
    experiments={"chexpert-transfer": transfer},
    sizes=SIZES,
    prepare=_prepare,
    needs_for_paper="--shards (your CheXpert shards with a 5x200 split)",
    data_name="chexpert",
    paper_needs=("shards",),
    needs_run=True,
    finish=finish,
)
