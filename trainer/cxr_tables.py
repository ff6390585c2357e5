"""Table 1 of the MAE + LLaMA chest X-ray report (seed 001) as a recipe.

    mae-llama-table1   the frozen-MAE baseline against the MAE aligned with a frozen LLaMA
                       (the report's model), each fine-tuned on the 14 labels with the same
                       fully connected head: mAUC, mean accuracy, per-label AUROC, 95 %
                       bootstrap intervals by study and paired bootstrap p-values; plus rows
                       for the MAE fine-tuned without alignment (what alignment adds beyond
                       unfreezing the tower), InfoNCE instead of the margin loss and a LoRA
                       text tower instead of the frozen one

Every row starts from the same MAE pretraining run (stage 1, configs/cxr_mae_pretrain.yaml,
trained once per seed and shared); the aligned rows add stage 2 (configs/cxr_mae_llama_align
.yaml and one change each) and fine-tune with configs/cxr_mae_llama_finetune.yaml; the baseline
fine-tunes stage 1 directly with configs/cxr_mae_baseline_finetune.yaml (the tower frozen, the
same head). Sizes:

    quick     a synthetic MIMIC-CXR tree (24 subjects, 32 x 32), a 2-layer LLaMA: minutes
    default   120 subjects at 64 x 64, a LLaMA of width 128, a few hundred steps per stage
    paper     the presets as they are (ViT-B/16 at 224, LLaMA-2-7B): --shards and
              --text-checkpoint /path/to/Llama-2-7b-hf, on GPUs

The synthetic reports describe the synthetic findings (shards/synthetic/cxr.py), so alignment
has something to learn; a randomly initialised tiny LLaMA is not a language model, which is
the main reason the default size's numbers say little about LLaMA-2-7B's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from shards.cxr_labels import LABEL_NAMES
from trainer.experiment import (
    Column,
    Experiment,
    Row,
    Stage,
    Suite,
    data_and_text,
    split_overrides,
)

MAE = "configs/cxr_mae_pretrain.yaml"
ALIGN = "configs/cxr_mae_llama_align.yaml"
FINETUNE = "configs/cxr_mae_llama_finetune.yaml"
BASELINE = "configs/cxr_mae_baseline_finetune.yaml"


@dataclass
class Size:
    name: str
    seeds: tuple[int, ...] = (0,)
    subjects: int = 0  # 0: the user's shards
    image: int = 32  # synthetic images are written at twice this, shards at this side
    llama: dict[str, int] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # every run
    steps: dict[str, int] = field(default_factory=dict)  # per stage: mae, align, finetune


# Every run of every size: no evaluation or checkpoint on the way (the table scores the test
# predictions of each row's last run), fp32.
_RUNS = [
    "train.eval_every=0",
    "train.save_every=0",
    "train.early_stop_metric=",
    "train.retrieval=false",
    "train.zero_shot=false",
    "train.bootstrap=0",
    "train.progress=false",
    "train.mixed_precision=no",
]

_TINY_VIT = [
    "model.vision.patch_size=8",
    "model.vision.embed_dim=32",
    "model.vision.depth=2",
    "model.vision.num_heads=2",
    "model.vision.decoder_embed_dim=32",
    "model.vision.decoder_depth=1",
    "model.vision.decoder_num_heads=2",
]

SIZES = {
    "quick": Size(
        "quick",
        subjects=24,
        image=32,
        llama={"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 512},
        overrides=[
            "model.vision.img_size=32",
            *_TINY_VIT,
            "model.llama.max_length=48",
            "model.llama.gradient_checkpointing=false",
            "model.attention_pool.num_heads=2",
            "model.attention_pool.out_dim=32",
            "model.embed_dim=32",
            "model.multilabel.head_hidden=32",
            "data.batch_size=8",
            "data.eval_batch_size=32",
            "data.num_workers=0",
            "data.shuffle_buffer=32",
            "optim.warmup_steps=2",
            "train.log_every=10",
            *_RUNS,
        ],
        steps={"mae": 20, "align": 15, "finetune": 20},
    ),
    "default": Size(
        "default",
        seeds=(0, 1, 2),
        subjects=120,
        image=64,
        llama={"hidden_size": 128, "num_layers": 2, "num_heads": 4, "vocab_size": 1000},
        overrides=[
            "model.vision.img_size=64",
            "model.vision.patch_size=8",
            "model.vision.embed_dim=96",
            "model.vision.depth=4",
            "model.vision.num_heads=4",
            "model.vision.decoder_embed_dim=64",
            "model.vision.decoder_depth=2",
            "model.vision.decoder_num_heads=4",
            "model.llama.max_length=96",
            "model.llama.gradient_checkpointing=false",
            "model.attention_pool.num_heads=4",
            "model.attention_pool.out_dim=64",
            "model.embed_dim=64",
            "model.multilabel.head_hidden=128",
            "data.batch_size=16",
            "data.eval_batch_size=64",
            "data.num_workers=0",
            "data.shuffle_buffer=256",
            "optim.warmup_steps=20",
            "train.log_every=50",
            *_RUNS,
        ],
        steps={"mae": 600, "align": 300, "finetune": 400},
    ),
    "paper": Size("paper"),
}


def _steps(size: Size, stage: str) -> list[str]:
    return [f"train.max_steps={size.steps[stage]}"] if stage in size.steps else []


def table1(size_name: str, options=None) -> Experiment:
    size = SIZES[size_name]
    mae = Stage("mae", MAE, _steps(size, "mae"), shared=True)

    def aligned(name: str, *changes: str) -> list[Stage]:
        return [mae, Stage(name, ALIGN, [*_steps(size, "align"), *changes], shared=True)]

    finetune = _steps(size, "finetune")
    rows = [
        Row("mae", "MAE (frozen) + FC head", "Table 1", finetune, stages=[mae], config=BASELINE),
        Row(
            "ours",
            "MAE aligned with frozen LLaMA (margin loss) + FC head",
            "Table 1",
            finetune,
            stages=aligned("align_margin_frozen"),
            config=FINETUNE,
        ),
        Row(
            "mae_finetuned",
            "  MAE fine-tuned without alignment + FC head",
            "Variants",
            finetune,
            stages=[mae],
            config=FINETUNE,
        ),
        Row(
            "infonce",
            "  alignment with InfoNCE instead of the margin loss",
            "Variants",
            finetune,
            stages=aligned("align_infonce_frozen", "model.contrastive=infonce"),
            config=FINETUNE,
        ),
        Row(
            "lora",
            "  LoRA text tower (LLaMA trains) instead of frozen",
            "Variants",
            finetune,
            stages=aligned("align_margin_lora", "model.llama.mode=qlora"),
            config=FINETUNE,
        ),
    ]
    return Experiment(
        name="mae-llama-table1",
        title="MAE + LLaMA Table 1: 14-label fine-tuning, frozen MAE vs MAE aligned with LLaMA",
        config=FINETUNE,
        rows=rows,
        columns=[Column("test", "test")],
        reference="ours",
        layout="grid",
        kind="multilabel",
        metrics=("mauc", "mean_acc"),
        label_names=list(LABEL_NAMES),
        notes=[
            "Stages: 1 MAE pretraining (shared by every row), 2 contrastive alignment with the "
            "text tower (the aligned rows), 3 fine-tuning with the same fully connected head "
            "(2 layers) on the 14 labels; the baseline keeps the stage-1 tower frozen.",
            "mAUC: the mean of the labels' AUROC where both classes occur; mean ACC: per-label "
            "accuracy at 0.5 over the labels the policy keeps (U-Ones, blank = negative), "
            "averaged. Intervals and p-values resample studies (a study's images share one "
            "report).",
        ],
    )


def prepare_data(size: Size, root: Path, seed: int, progress=print) -> tuple[Path, Path]:
    """A synthetic MIMIC-CXR tree -> shards -> a tiny LLaMA whose tokenizer is trained on the
    training reports; written once under `root`. Returns (shards, llama folder)."""
    from models.llama_text import make_tiny_llama_checkpoint
    from shards.mimic_cxr import write_cxr_shards
    from shards.reader import read_texts
    from shards.synthetic.cxr import generate_mimic_cxr

    recipe = {"subjects": size.subjects, "image": size.image, "llama": size.llama, "seed": seed}
    stamp = root / "data_recipe.json"
    shards, llama = root / "shards", root / "tiny_llama"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        progress(f"data: reusing {root}")
        return shards, llama
    progress(f"data: synthetic MIMIC-CXR tree ({size.subjects} subjects) -> {root}")
    paths = generate_mimic_cxr(root / "raw", subjects=size.subjects, size=2 * size.image, seed=seed)
    write_cxr_shards(
        paths["root"], paths["reports_root"], shards, size=size.image, samples_per_shard=32
    )
    make_tiny_llama_checkpoint(
        str(llama), read_texts(str(shards / "train")), seed=seed, **size.llama
    )
    stamp.write_text(json.dumps(recipe, indent=2))
    return shards, llama


def _prepare(size: Size, root: Path, options, progress=print) -> list[str]:
    shards, llama = data_and_text(
        options,
        "the LLaMA folder",
        lambda: prepare_data(size, root, options.data_seed, progress),
    )
    return [
        *size.overrides,
        *split_overrides(shards),
        "train.eval_splits=[test]",
        f"model.llama.checkpoint={llama}",
    ]


SUITE = Suite(
    experiments={"mae-llama-table1": table1},
    sizes=SIZES,
    prepare=_prepare,
    needs_for_paper="--shards and --text-checkpoint (your MIMIC-CXR shards and Llama-2-7b-hf)",
    data_name="cxr",
)
