"""Task owners: each task names the shard formats it reads and fails at start otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from shards.formats.image_multilabel import ImageMultilabel
from shards.formats.volume_class import VolumeClass
from shards.reader import ShardSet
from trainer.config import load_config
from trainer.tasks import TASKS, ClassifyTask, JointTask, MultilabelTask, PretrainTask, build_task

AD_FORMAT, CXR_FORMAT = VolumeClass.name, ImageMultilabel.name


def _shards(fmt: str) -> ShardSet:
    return ShardSet(Path("/data/split"), [("/data/split/x-000000.tar", 4)], 4, 128, fmt)


@pytest.mark.parametrize(
    ("task", "cls", "reads"),
    [
        ("pretrain", PretrainTask, {AD_FORMAT, CXR_FORMAT}),
        ("classify", ClassifyTask, {AD_FORMAT}),
        ("joint", JointTask, {AD_FORMAT}),
        ("multilabel", MultilabelTask, {CXR_FORMAT}),
    ],
)
def test_each_task_reads_its_formats_and_refuses_the_others(task, cls, reads) -> None:
    cfg = load_config(None, [f"model.task={task}"])
    owner = build_task(cfg)
    assert isinstance(owner, cls) and TASKS[task] is cls
    for fmt in (AD_FORMAT, CXR_FORMAT):
        owner = build_task(cfg)  # a run's splits share one format; one task per format here
        if fmt in reads:
            owner.check(_shards(fmt))
        else:
            with pytest.raises(ValueError, match=f"model.task={task} reads .*this split is {fmt}"):
                owner.check(_shards(fmt))


def test_label_names_come_from_the_shards_and_must_agree_across_splits() -> None:
    names = ["Effusion", "Nodule", "Mass"]
    labelled = ShardSet(Path("/d/a"), [("/d/a/x.tar", 4)], 4, 128, CXR_FORMAT, label_names=names)
    cfg = load_config(None, ["model.task=multilabel", "model.multilabel.num_labels=3"])
    task = build_task(cfg)
    task.check(labelled)
    assert task.label_names == names and task.names_for("/nowhere") == names
    other = ShardSet(Path("/d/b"), [("/d/b/x.tar", 4)], 4, 128, CXR_FORMAT, label_names=names[::-1])
    with pytest.raises(
        ValueError, match="/d/b/manifest.json: label names .* differ from the first"
    ):
        task.check(other)
    with pytest.raises(ValueError, match="num_labels=14, but /data/split/manifest.json has 3"):
        build_task(load_config(None, ["model.task=multilabel"])).check(
            ShardSet(Path("/data/split"), [("x.tar", 1)], 1, 128, CXR_FORMAT, label_names=names)
        )
    # classes of volume shards: the manifest's names, or binary: the first against the rest
    grades = ["CDR0", "CDR0.5", "CDR1", "CDR2"]
    vol = ShardSet(Path("/d/v"), [("/d/v/x.tar", 4)], 4, 128, AD_FORMAT, label_names=grades)
    classify = build_task(load_config(None, ["model.task=classify", "model.num_classes=4"]))
    classify.check(vol)
    assert classify.label_names == grades
    binary = ["model.task=classify", "model.num_classes=2", "data.label_mode=binary"]
    task = build_task(load_config(None, binary))
    task.check(vol)
    assert task.label_names == ["CDR0", "other"]
    task = build_task(load_config(None, binary))
    task.check(_shards(AD_FORMAT))
    assert task.label_names == ["NC", "impaired"]

    # a run's recorded names (evaluate_run, predict) must be the shards' names
    task = build_task(load_config(None, ["model.task=classify"]))
    task.label_names = ["NC", "AD", "MCI"]
    with pytest.raises(ValueError, match="differ from the first split's \\['NC', 'AD', 'MCI'\\]"):
        task.check(_shards(AD_FORMAT))


def test_pretraining_a_text_tower_needs_shards_with_texts() -> None:
    bare = ShardSet(Path("/d/c"), [("/d/c/x.tar", 4)], 4, 128, CXR_FORMAT, texts=False)
    with pytest.raises(ValueError, match='"texts": false .* model.text_tower=bert'):
        build_task(load_config(None, ["model.task=pretrain"])).check(bare)
    mae_only = ["model.task=pretrain", "model.text_tower=none", "model.itc_weight=0"]
    mae_only += ["model.mlm_weight=0", "model.cross_layers_image=0"]
    build_task(load_config(None, mae_only)).check(bare)
    build_task(load_config(None, ["model.task=multilabel"])).check(bare)  # image-only heads


def test_classifier_classes_must_match_the_label_mode() -> None:
    cfg = load_config(None, ["model.task=classify", "model.num_classes=2"])
    with pytest.raises(
        ValueError, match="model.num_classes=2: data.label_mode=three_class on /data/split has 3"
    ):
        build_task(cfg).check(_shards(AD_FORMAT))
    cfg = load_config(
        None, ["model.task=classify", "model.num_classes=2", "data.label_mode=binary"]
    )
    build_task(cfg).check(_shards(AD_FORMAT))


def test_summaries_come_from_the_task() -> None:
    cfg = load_config(None, ["model.task=joint"])
    result = {
        "acc": 0.5, "auc": 0.75, "precision": 0.5, "recall": 0.5, "f1": 0.5, "n": 4,
        "scoring": "three_class", "itc_loss": 1.5, "cls_loss": 0.7,
        "per_cohort": {"OASIS-2": {"acc": 1.0, "auc": None, "f1": 1.0, "n": 2, "scoring": "binary_collapse"}},
    }  # fmt: skip
    lines = build_task(cfg).summary("test", result)
    assert lines[0].startswith("test: ACC 0.5000  macro-AUC 0.7500")
    assert "OASIS-2  ACC 1.0000  AUC n/a" in lines[1] and lines[1].endswith("binary")
    assert "itc_loss 1.5000" in lines[2] and "cls_loss 0.7000" in lines[2]
