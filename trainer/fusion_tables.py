"""Table I and Fig. 4 of "Application of multimodal fusion deep learning model in disease
recognition" (seed 002) as a recipe.

    fusion-table1   Table I: CNN, RNN and Transformer single-branch baselines against the
                    fusion model (precision, accuracy, F1, recall, each with its interval);
                    second table: the Fig. 4 ablations N_CNN, N_RNN, N_Transformer (the model
                    without that branch); a bar chart of both

Every row is configs/ad_fusion_paper.yaml (three branches, attention fusion, Adam 1e-3 with
decay, early stopping) with `model.fusion.branches` changed; precision, recall and F1 are
macro averages over the three classes (NC / MCI / AD). Data: the synthetic AD cohort
(shards/synthetic/ad.py) split 70 / 15 / 15 by subject (the paper splits at random; see
configs/ad_fusion_paper.yaml), or the user's shards (--shards) and tokenizer folder
(--text-checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.alifuse_tables import SIZES as AD_SIZES
from trainer.alifuse_tables import prepare_data
from trainer.experiment import (
    Column,
    Experiment,
    Row,
    Suite,
    data_and_text,
    split_overrides,
)

PRESET = "configs/ad_fusion_paper.yaml"
ALL = ["cnn", "vit", "rnn"]


@dataclass
class Size:
    name: str
    seeds: tuple[int, ...] = (0,)
    data: str = ""  # the AD size whose synthetic cohort this size uses ("": the user's shards)
    overrides: list[str] = field(default_factory=list)


_SMALL_FUSION = [
    "model.fusion.text.embed_dim=32",
    "model.fusion.text.hidden_size=32",
    "model.fusion.text.num_layers=1",
    "model.fusion.dim=32",
    "model.fusion.num_heads=2",
    "model.fusion.hidden=64",
    "data.num_workers=0",
    "train.log_every=10",
    "train.save_every=0",
    "train.progress=false",
    "train.mixed_precision=no",
]

SIZES = {
    "quick": Size(
        "quick",
        data="quick",
        overrides=[
            "model.vision.img_size=16",
            "model.vision.patch_size=4",
            "model.vision.embed_dim=32",
            "model.vision.depth=2",
            "model.vision.num_heads=2",
            "model.fusion.image.widths=[8,16]",
            "model.fusion.image.blocks_per_stage=[1,1]",
            "model.text.max_length=64",
            *_SMALL_FUSION,
            "data.batch_size=16",
            "data.eval_batch_size=32",
            "data.shuffle_buffer=64",
            "train.max_steps=20",
            "train.eval_every=10",
            "train.early_stop_patience=2",
        ],
    ),
    "default": Size(
        "default",
        seeds=(0, 1, 2),
        data="default",
        overrides=[
            "model.vision.img_size=32",
            "model.vision.patch_size=8",
            "model.vision.embed_dim=64",
            "model.vision.depth=4",
            "model.vision.num_heads=4",
            "model.fusion.image.widths=[16,32,64]",
            "model.fusion.image.blocks_per_stage=[1,1,1]",
            "model.text.max_length=96",
            *_SMALL_FUSION,
            "model.fusion.dim=64",
            "model.fusion.num_heads=4",
            "model.fusion.hidden=128",
            "data.batch_size=32",
            "data.eval_batch_size=64",
            "data.shuffle_buffer=256",
            "train.max_steps=1200",
            "train.eval_every=100",
            "train.early_stop_patience=4",
        ],
    ),
    "paper": Size("paper"),
}


def _branches(*names: str) -> list[str]:
    return ["model.fusion.branches=[" + ",".join(names) + "]"]


def table1(size_name: str, options=None) -> Experiment:
    single, ablation = "Table I", "Fig. 4 ablations"
    rows = [
        Row("cnn", "CNN", single, _branches("cnn")),
        Row("rnn", "RNN", single, _branches("rnn")),
        Row("transformer", "Transformer", single, _branches("vit")),
        Row("fusion", "Our (CNN + Transformer + RNN, attention fusion)", single, _branches(*ALL)),
        Row("n_cnn", "N_CNN (without the CNN)", ablation, _branches("vit", "rnn")),
        Row("n_rnn", "N_RNN (without the RNN)", ablation, _branches("cnn", "vit")),
        Row("n_transformer", "N_Transformer (without the ViT)", ablation, _branches("cnn", "rnn")),
    ]
    return Experiment(
        name="fusion-table1",
        title="Multimodal fusion Table I and Fig. 4: single branches, fusion, ablations",
        config=PRESET,
        rows=rows,
        columns=[Column("test", "test")],
        reference="fusion",
        layout="grid",
        metrics=("precision", "acc", "f1", "recall"),
        split_groups=True,
        notes=[
            "Precision, recall and F1: macro averages over NC / MCI / AD; intervals resample "
            "subjects; p-values compare each row with the fusion model on the same resamples.",
            "Split 70 / 15 / 15 by subject (medalign's default; the paper splits at random, "
            "which puts one subject's visits on both sides).",
            "Optimiser as in the paper: Adam (AdamW without weight decay) at 1e-3 with cosine "
            "decay, batch 32 at the default and paper sizes, early stopping on validation "
            "accuracy.",
        ],
    )


def _prepare(size: Size, root: Path, options, progress=print) -> list[str]:
    shards, tokenizer = data_and_text(
        options,
        "a tokenizer folder",
        lambda: prepare_data(
            AD_SIZES[size.data],
            root,
            options.data_seed,
            progress,
            holdout=(),
            split_ratios=(0.7, 0.15, 0.15),
        ),
    )
    return [
        *size.overrides,
        *split_overrides(shards),
        "train.eval_splits=[test]",
        f"model.text.checkpoint={tokenizer}",
    ]


SUITE = Suite(
    experiments={"fusion-table1": table1},
    sizes=SIZES,
    prepare=_prepare,
    needs_for_paper="--shards and --text-checkpoint (your AD shards and a tokenizer folder)",
    data_name="ad-70-15-15",
)
