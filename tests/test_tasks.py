"""Task owners: each task names the shard formats it reads and fails at start otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from shards.reader import AD_FORMAT, CXR_FORMAT, ShardSet
from trainer.config import load_config
from trainer.tasks import TASKS, ClassifyTask, JointTask, MultilabelTask, PretrainTask, build_task


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
        if fmt in reads:
            owner.check(_shards(fmt))
        else:
            with pytest.raises(ValueError, match=f"model.task={task} reads .*this split is {fmt}"):
                owner.check(_shards(fmt))


def test_classifier_classes_must_match_the_label_mode() -> None:
    cfg = load_config(None, ["model.task=classify", "model.num_classes=2"])
    with pytest.raises(ValueError, match="model.num_classes=2: data.label_mode=three_class has 3"):
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
