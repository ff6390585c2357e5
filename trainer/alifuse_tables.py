"""The Alifuse paper's experiments as recipes (scripts/experiment.py runs them).

    alifuse-table2   Table II: image-only, text-only and multimodal baselines against Alifuse,
                     ACC and AUC on ADNI-test, NACC-test and the zero-shot cohorts AIBL,
                     OASIS-2 (binary) and MIRIAD (binary)
    alifuse-table3   Table III: ablations on ADNI-test (and NACC-test): (a) loss terms,
                     (b) modalities, (c) clinical field groups, and (d) the shortcuts this
                     implementation offers, each against the paper's model

Every row starts from configs/ad_alifuse_joint.yaml (the paper's settings) and changes only
what the row is about; a size then scales every row alike:

    quick     tiny widths, 16^3 volumes, a few dozen steps: a smoke run of every row (minutes)
    default   the synthetic cohort at 32^3 and demo-sized towers, on a CPU
    paper     the preset as it is (ViT 768 x 24 at 128^3, BERT-base): for a GPU cluster and the
              user's own shards (--shards) and BERT (--text-checkpoint)

Data: the user's shards (--shards DIR, written with --holdout AIBL OASIS-2 MIRIAD), or a
synthetic cohort in the five cohorts' published layouts, written once per size under
OUT/../data-ad-<size>/ (shards/synthetic/ad.py; its signal model is in docs/ALIFUSE.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from trainer.experiment import Column, Experiment, Row, Stage, Suite, data_and_text

log = logging.getLogger("medalign.experiment")

PRESET = "configs/ad_alifuse_joint.yaml"
HOLDOUT = ("AIBL", "OASIS-2", "MIRIAD")
# The paper's text: demographics, lab results and the narrative summary (Table I).
KEEP_OUT = ["imaging_measures", "other"]


@dataclass
class Size:
    """How big every row is: the synthetic cohort, the tiny BERT, the shared overrides and
    the training seeds every row runs with (their mean is reported, their spread beside)."""

    name: str
    seeds: tuple[int, ...] = (0,)
    subjects_per_cohort: int = 0  # 0: no synthetic data (the user's shards)
    shape: tuple[int, int, int] = (64, 76, 64)
    volume: int = 32
    bert: dict[str, int] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)


SIZES = {
    "quick": Size(
        "quick",
        subjects_per_cohort=30,
        shape=(24, 28, 24),
        volume=16,
        bert={"hidden_size": 32, "num_layers": 2, "num_heads": 2, "vocab_size": 600},
        overrides=[
            "model.vision.img_size=16",
            "model.vision.patch_size=4",
            "model.vision.embed_dim=32",
            "model.vision.depth=2",
            "model.vision.num_heads=2",
            "model.vision.decoder_embed_dim=32",
            "model.vision.decoder_depth=1",
            "model.vision.decoder_num_heads=2",
            "model.text_decoder.depth=1",
            "model.text_decoder.width=32",
            "model.text_decoder.num_heads=2",
            "model.text.max_length=64",
            "model.embed_dim=16",
            "model.fusion_hidden=32",
            "model.init_temperature=0.2",
            "model.baseline.resnet.widen_factor=0.125",
            "model.baseline.perceiver.d_model=32",
            "model.baseline.perceiver.num_latents=8",
            "model.baseline.perceiver.d_latents=32",
            "model.baseline.perceiver.num_self_attends_per_block=1",
            "model.baseline.perceiver.num_self_attention_heads=2",
            "model.baseline.irene.dim=32",
            "model.baseline.irene.depth=2",
            "model.baseline.irene.num_heads=2",
            "data.batch_size=8",
            "data.eval_batch_size=32",
            "data.shuffle_buffer=64",
            "optim.lr=1e-3",
            "optim.warmup_steps=3",
            "train.max_steps=20",
            "train.log_every=10",
            "train.eval_every=0",
            "train.save_every=0",
            "train.progress=false",
            "train.mixed_precision=no",
        ],
    ),
    "default": Size(
        "default",
        # One seed's ADNI-test ACC moved by up to 19 points between seeds of the same model
        # (small validation split for early stopping): three seeds per row.
        seeds=(0, 1, 2),
        subjects_per_cohort=150,
        shape=(64, 76, 64),
        volume=32,
        bert={"hidden_size": 64, "num_layers": 2, "num_heads": 2, "vocab_size": 2000},
        overrides=[
            "model.vision.img_size=32",
            "model.vision.patch_size=8",
            "model.vision.embed_dim=96",
            "model.vision.depth=4",
            "model.vision.num_heads=4",
            "model.vision.decoder_embed_dim=96",
            "model.vision.decoder_depth=2",
            "model.vision.decoder_num_heads=4",
            "model.text_decoder.depth=2",
            "model.text_decoder.width=96",
            "model.text_decoder.num_heads=4",
            "model.text.max_length=96",
            "model.text.pooling=mean",
            "model.embed_dim=64",
            "model.fusion_hidden=96",
            "model.init_temperature=0.2",
            "model.baseline.resnet.widen_factor=0.25",
            "model.baseline.perceiver.d_model=96",
            "model.baseline.perceiver.num_latents=32",
            "model.baseline.perceiver.d_latents=96",
            "model.baseline.perceiver.num_self_attends_per_block=2",
            "model.baseline.perceiver.num_self_attention_heads=4",
            "model.baseline.irene.dim=96",
            "model.baseline.irene.depth=4",
            "model.baseline.irene.num_heads=4",
            "data.batch_size=8",
            "data.eval_batch_size=32",
            "data.shuffle_buffer=128",
            "optim.lr=3e-4",
            "optim.warmup_steps=50",
            # Up to 1500 steps, ending on the best validation macro-AUC (checked every 100
            # steps, stopping after 5 checks without improvement): the same rule for every row.
            "train.max_steps=1500",
            "train.log_every=50",
            "train.eval_every=100",
            "train.early_stop_metric=auc",
            "train.early_stop_patience=5",
            "train.save_every=0",
            "train.progress=false",
            "train.mixed_precision=no",
        ],
    ),
    "paper": Size("paper"),
}

# Departures every size shares, and why (printed under each table).
NOTES = [
    "Every row trains with the same seeds, optimiser, step budget and batch (a two-stage "
    "row: that budget per stage); the Alifuse rows are configs/ad_alifuse_joint.yaml, the "
    "baselines share its image and text settings.",
    "Binary cohorts (OASIS-2, MIRIAD) are scored from the three-class models as NC vs MCI+AD "
    "with P(MCI) + P(AD).",
]


def _splits(shards: Path) -> list[str]:
    """data.* overrides for a shard folder: train / val / test and every held-out split."""
    out = [f"data.train={shards / 'train'}", f"data.val={shards / 'val'}"]
    out.append(f"data.test={shards / 'test'}")
    held = []
    for name in HOLDOUT:
        if (shards / name / "manifest.json").is_file():
            out.append(f"data.extra_splits.{name}={shards / name}")
            held.append(name)
    # Only the splits the shards hold are scored (the preset names the paper's three).
    out.append("train.eval_splits=[" + ", ".join(["test", *held]) + "]")
    return out


def prepare_data(
    size: Size,
    root: Path,
    seed: int,
    progress=print,
    holdout: tuple[str, ...] = HOLDOUT,
    split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
) -> tuple[Path, Path]:
    """The synthetic cohort -> shards (`holdout` cohorts written apart) -> a tiny BERT, each
    written once under `root` and reused while its recipe is unchanged. Returns (shards, bert)."""
    from models.text import make_tiny_bert_checkpoint
    from shards.ad_writer import write_ad_shards
    from shards.reader import read_texts
    from shards.synthetic.ad import generate_ad_cohort

    recipe = {
        "subjects_per_cohort": size.subjects_per_cohort,
        "shape": list(size.shape),
        "volume": size.volume,
        "bert": size.bert,
        "seed": seed,
        "holdout": list(holdout),
        "split_ratios": list(split_ratios),
    }
    stamp = root / "data_recipe.json"
    shards, bert = root / "shards", root / "tiny_bert"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        progress(f"data: reusing {root}")
        return shards, bert
    progress(f"data: synthetic cohort ({size.subjects_per_cohort} subjects per cohort) -> {root}")
    sources = generate_ad_cohort(
        root / "raw",
        subjects_per_cohort=size.subjects_per_cohort,
        shape=size.shape,
        seed=seed,
        corrupt=5,
    )
    write_ad_shards(
        sources,
        shards,
        size=size.volume,
        samples_per_shard=32,
        seed=seed,
        workers=2,
        holdout=holdout,
        split_ratios=split_ratios,
    )
    make_tiny_bert_checkpoint(str(bert), read_texts(str(shards / "train")), seed=seed, **size.bert)
    stamp.write_text(json.dumps(recipe, indent=2))
    return shards, bert


def shared_overrides(size: Size, shards: Path, bert: Path) -> list[str]:
    """What every row of an experiment gets: the size, the data, the text tower."""
    return [*size.overrides, *_splits(shards), f"model.text.checkpoint={bert}"]


# ---- Table II -----------------------------------------------------------------------------

TABLE2_COLUMNS = [
    Column("ADNI-test", "test", cohort="ADNI"),
    Column("NACC-test", "test", cohort="NACC"),
    Column("AIBL", "AIBL", zero_shot=True),
    Column("OASIS-2", "OASIS-2", zero_shot=True),
    Column("MIRIAD", "MIRIAD", zero_shot=True),
]

CLASSIFY = ["model.task=classify"]


def table2(medicalnet: str = "") -> Experiment:
    """Table II: the baselines and Alifuse, every row trained by the same loop."""
    medical = (
        Row(
            "medicalnet",
            "MedicalNet",
            "Image-only",
            [*CLASSIFY, "model.arch=medicalnet", f"model.baseline.resnet.pretrained={medicalnet}"],
        )
        if medicalnet
        else Row(
            "medicalnet",
            "MedicalNet",
            "Image-only",
            skip="needs MedicalNet (Med3D) weights, which are not downloaded at run time: "
            "--medicalnet PATH to a local resnet_50.pth runs it",
        )
    )
    rows = [
        Row("resnet3d", "3D ResNet50", "Image-only", [*CLASSIFY, "model.arch=resnet3d"]),
        medical,
        Row("vit3d", "3D ViT", "Image-only", [*CLASSIFY, "model.arch=vit"]),
        Row(
            "m3t",
            "M3T",
            "Image-only",
            skip="not built: multi-plane 2D CNNs on ImageNet weights (torchvision does not "
            "load beside the CPU build of torch here) and no library implementation",
        ),
        Row("bert", "BERT", "Text-only", [*CLASSIFY, "model.arch=bert"]),
        Row("perceiver", "Perceiver", "Multimodal", [*CLASSIFY, "model.arch=perceiver"]),
        Row(
            "git",
            "GIT",
            "Multimodal",
            skip="not built: a generative image-to-text model over 2D CLIP features; no 3D "
            "variant exists to compare fairly",
        ),
        Row("irene", "IRENE", "Multimodal", [*CLASSIFY, "model.arch=irene"]),
        Row("alifuse", "Alifuse", "Multimodal", []),
    ]
    return Experiment(
        name="alifuse-table2",
        title="Alifuse Table II: baselines vs Alifuse (NC / MCI / AD)",
        config=PRESET,
        rows=rows,
        columns=TABLE2_COLUMNS,
        reference="alifuse",
        layout="grid",
        notes=NOTES,
    )


# ---- Table III ----------------------------------------------------------------------------

TABLE3_COLUMNS = [
    Column("ADNI-test", "test", cohort="ADNI"),
    Column("NACC-test", "test", cohort="NACC"),
]


def _drop(*groups: str) -> str:
    return "data.clinical.drop=[" + ", ".join([*KEEP_OUT, *groups]) + "]"


def table3() -> Experiment:
    """Table III: one change from the full model per row, all trained jointly."""
    a, b, c, d = (
        "(a) Loss components",
        "(b) Modalities",
        "(c) Non-image data",
        "(d) Implementation shortcuts",
    )
    rows = [
        Row("cls", "L_cls", a, ["model.itc_weight=0", "model.mae_weight=0", "model.mlm_weight=0"]),
        Row("cls_cl", "L_cls + L_cl", a, ["model.mae_weight=0", "model.mlm_weight=0"]),
        Row("alifuse", "L_cls + L_cl + L_res (Alifuse)", a, []),
        Row(
            "image_only",
            "Alifuse-I",
            b,
            [
                "model.text_tower=none",
                "model.itc_weight=0",
                "model.mlm_weight=0",
                "model.cross_layers_image=0",
            ],
        ),
        Row(
            "text_only",
            "Alifuse-T",
            b,
            [
                "model.image_tower=none",
                "model.itc_weight=0",
                "model.mae_weight=0",
                "model.cross_layers_text=0",
            ],
        ),
        Row("no_summary", "w/o Dr.Sum.", c, [_drop("summary")]),
        Row("no_labs", "w/o LabRes.", c, [_drop("lab_results")]),
        Row("no_demographics", "w/o Demogr.", c, [_drop("demographics")]),
        Row(
            "two_stage",
            "two-stage: pretrain, then classify",
            d,
            ["model.task=classify"],
            stages=[Stage("pretrain", PRESET, ["model.task=pretrain", "train.early_stop_metric="])],
        ),
        Row(
            "cross_after",
            "gated cross-attention after the last blocks (2 ViT, 1 BERT)",
            d,
            [
                "model.cross_attention=after",
                "model.cross_layers_image=2",
                "model.cross_layers_text=1",
            ],
        ),
        Row("masked_itc", "unimodal ITC on the masked image", d, ["model.unimodal_image=masked"]),
        Row("mlm_head", "BERT's MLM head as text decoder", d, ["model.text_decoder.kind=mlm_head"]),
    ]
    return Experiment(
        name="alifuse-table3",
        title="Alifuse Table III: ablations (NC / MCI / AD)",
        config=PRESET,
        rows=rows,
        columns=TABLE3_COLUMNS,
        reference="alifuse",
        layout="ablation",
        notes=[
            *NOTES,
            "(d) lists what the CPU demo and the default config do differently from the "
            "paper, each changed alone.",
        ],
    )


EXPERIMENTS = {"alifuse-table2": table2, "alifuse-table3": table3}


def _experiment(name: str, size: str, options) -> Experiment:
    return table2(options.medicalnet) if name == "alifuse-table2" else table3()


def _prepare(size: Size, root: Path, options, progress=print) -> list[str]:
    """The shared overrides: the user's shards and BERT (--shards, --text-checkpoint), or the
    synthetic cohort and a tiny BERT written under `root`."""
    shards, bert = data_and_text(
        options, "the BERT folder", lambda: prepare_data(size, root, options.data_seed, progress)
    )
    return shared_overrides(size, shards, bert)


SUITE = Suite(
    experiments={name: partial(_experiment, name) for name in EXPERIMENTS},
    sizes=SIZES,
    prepare=_prepare,
    needs_for_paper="--shards and --text-checkpoint (no synthetic data at 128^3)",
    data_name="ad",
)
