"""The Alifuse cohort protocol: held-out cohorts, binary cohorts scored from three-class models,
clinical field groups dropped at load time, and the synthetic cohort's demographic signal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from shards.ad_writer import write_ad_shards
from shards.clinical import FIELD_GROUPS, GROUP_NAMES, _sentence, field_group, render_text
from shards.formats.volume_class import ClinicalTextConfig, decode_sample
from shards.reader import (
    DataConfig,
    EvalStream,
    ShardSet,
    SkipCounter,
    _read_tars,
)
from shards.synthetic.ad import DEMOGRAPHICS, _make_subject, generate_ad_cohort
from trainer.evaluate import binary_metrics, collapse_to_binary, score

HOLDOUT = ("AIBL", "OASIS-2", "MIRIAD")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("holdout")
    sources = generate_ad_cohort(
        root / "raw", subjects_per_cohort=10, shape=(24, 28, 24), seed=3, corrupt=3,
        template="phantom",
    )  # fmt: skip
    report = write_ad_shards(
        sources, root / "shards", size=16, samples_per_shard=6, seed=0, holdout=HOLDOUT
    )
    return root / "shards", report


def _metas(folder: Path) -> list[dict]:
    if not json.loads((folder / "manifest.json").read_text())["shards"]:
        return []
    shards = ShardSet.load(str(folder))
    return [
        json.loads(raw["json"])
        for raw in _read_tars([p for p, _ in shards.shards], SkipCounter())
        if "json" in raw
    ]


def test_held_out_cohorts_share_no_subject_or_cohort_with_training(held_out) -> None:
    out, report = held_out
    pooled = {split: _metas(out / split) for split in ("train", "val", "test")}
    held = {name: _metas(out / name) for name in HOLDOUT}
    assert set(report["holdout"]) == set(HOLDOUT)
    for name, metas in held.items():
        assert metas and {m["cohort"] for m in metas} == {name}
        assert {m["split"] for m in metas} == {name}
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert manifest["holdout"] is True and manifest["split"] == name
        assert manifest["num_samples"] == len(metas) == report["written"][name]
    seen = {(m["cohort"], m["subject"]) for metas in pooled.values() for m in metas}
    assert {m["cohort"] for metas in pooled.values() for m in metas} == {"ADNI", "NACC"}
    for metas in held.values():
        assert not seen & {(m["cohort"], m["subject"]) for m in metas}
    assert report["records_in"] == report["written"]["total"] + report["rejected"]["total"]
    assert report["written"]["total"] == sum(len(m) for m in (*pooled.values(), *held.values()))


def test_holdout_names_are_checked(tmp_path, held_out) -> None:
    raw = held_out[0].parent / "raw"
    from shards.ad_writer import read_sources_file

    sources = read_sources_file(raw)
    with pytest.raises(ValueError, match="no such cohort.*'ADNI'"):
        write_ad_shards(sources, tmp_path / "a", size=16, holdout=["AIBLX"])
    with pytest.raises(ValueError, match="split names"):
        write_ad_shards(sources, tmp_path / "b", size=16, holdout=["test"])


# ---- binary cohorts -------------------------------------------------------------------------


def test_binary_collapse_on_a_fixed_example() -> None:
    # P(NC), P(MCI), P(AD) given as log-probabilities: softmax gives them back.
    probs = torch.tensor(
        [[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.1, 0.1, 0.8]]
    )
    logits = probs.log()
    impaired = collapse_to_binary(logits)
    torch.testing.assert_close(impaired, torch.tensor([0.3, 0.6, 0.8, 0.4, 0.9]))
    labels = torch.tensor([0, 0, 2, 2, 2])  # OASIS-2 codes NC and demented (AD)
    got = binary_metrics(impaired, labels > 0)
    # predicted impaired: P > 0.5 -> [no, yes, yes, no, yes]; truth [no, no, yes, yes, yes]
    assert got["acc"] == pytest.approx(3 / 5)
    assert got["auc"] == pytest.approx(roc_auc_score([0, 0, 1, 1, 1], [0.3, 0.6, 0.8, 0.4, 0.9]))
    assert got["confusion"] == [[1, 1], [1, 2]]
    assert got["precision"] == pytest.approx(2 / 3) and got["recall"] == pytest.approx(2 / 3)


def test_score_collapses_binary_cohorts_only() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 3, generator=gen)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 2, 0, 2, 0, 2])
    cohorts = ["ADNI"] * 6 + ["OASIS-2"] * 6
    binary = torch.tensor([False] * 6 + [True] * 6)
    pred = {"logits": logits, "label": labels, "cohort": cohorts, "binary": binary}
    result = score(pred, 3, collapse_binary=True)
    assert result["scoring"] == "three_class" and result["n"] == 12
    assert result["per_cohort"]["ADNI"]["scoring"] == "three_class"
    oasis = result["per_cohort"]["OASIS-2"]
    assert oasis["scoring"] == "binary_collapse"
    p = collapse_to_binary(logits[6:])
    assert oasis["acc"] == pytest.approx(float(((p > 0.5) == (labels[6:] > 0)).float().mean()))
    assert oasis["auc"] == pytest.approx(roc_auc_score((labels[6:] > 0).int(), p))
    only = score({k: v[6:] if k != "cohort" else v[6:] for k, v in pred.items()}, 3, True)
    assert only["scoring"] == "binary_collapse" and only["acc"] == pytest.approx(oasis["acc"])
    plain = score(pred, 3, collapse_binary=False)  # a binary-label run: nothing collapses
    assert plain["per_cohort"]["OASIS-2"]["scoring"] == "three_class"


# ---- clinical field groups ------------------------------------------------------------------

FIELDS = {
    "age": 74.2,
    "sex": "F",
    "handedness": "R",
    "education_years": 12,
    "mmse": 24,
    "cdr": 0.5,
    "cdr_sb": 2.5,
    "logical_memory": 6,
    "ses": 3,
    "apoe4_alleles": 1,
    "hippocampus": 6100.4,
    "etiv": 1530,
    "site": "North",
    "summary": "Informant reports occasional forgetfulness. Lives with spouse.",
}


def test_every_field_has_one_group() -> None:
    assert set(GROUP_NAMES) == {*FIELD_GROUPS, "other"}
    groups = {key: field_group(key) for key in FIELDS}
    assert groups["age"] == groups["sex"] == groups["education_years"] == "demographics"
    assert groups["mmse"] == groups["cdr"] == groups["ses"] == "lab_results"
    assert groups["hippocampus"] == groups["etiv"] == "imaging_measures"
    assert groups["summary"] == "summary" and groups["site"] == "other"
    assert field_group("MMSE") == "lab_results"  # column names in any case


@pytest.mark.parametrize("group", GROUP_NAMES)
def test_dropping_a_group_removes_exactly_its_sentences(group) -> None:
    full = render_text(FIELDS)
    kept = render_text(FIELDS, drop=[group])
    mine = [k for k in FIELDS if field_group(k) == group]
    assert mine, group
    removed = [
        _sentence(k, v) if k != "summary" else FIELDS["summary"]
        for k, v in FIELDS.items()
        if k in mine
    ]
    expected = full
    for sentence in removed:
        assert sentence in expected
        expected = expected.replace(sentence, "")
    assert kept == " ".join(expected.split())
    for key in FIELDS:
        if key not in mine:
            text = FIELDS[key] if key == "summary" else _sentence(key, FIELDS[key])
            assert text in kept


def test_dropping_everything_leaves_an_empty_text_only_when_allowed() -> None:
    with pytest.raises(Exception, match="empty_text"):
        render_text({"summary": "x y"}, drop=["summary"])
    assert render_text({"summary": "x y"}, drop=["summary"], allow_empty=True) == ""
    with pytest.raises(ValueError, match="unknown field group"):
        render_text(FIELDS, drop=["labs"])
    with pytest.raises(ValueError, match="drop: unknown field group"):
        ClinicalTextConfig(drop=["demographic"])


def test_reader_renders_the_text_again_from_the_stored_fields(ad_shards) -> None:
    split = ShardSet.load(str(ad_shards / "train"))
    raws = [r for r in _read_tars([p for p, _ in split.shards], SkipCounter()) if "json" in r]
    same = ClinicalTextConfig(summary_words=split.word_limit)  # active, changes nothing
    assert same.active
    for raw in raws:
        stored = decode_sample(raw, "three_class")["text"]
        assert decode_sample(raw, "three_class", same, split.word_limit)["text"] == stored
        fields = json.loads(raw["json"])["fields"]
        for group in ("lab_results", "demographics"):
            cfg = ClinicalTextConfig(drop=[group])
            got = decode_sample(raw, "three_class", cfg, split.word_limit)["text"]
            assert got == render_text(fields, split.word_limit, drop=[group], allow_empty=True)
    # Through the stream: every sample kept, lab results gone from every text.
    cfg = DataConfig(eval_batch_size=64, clinical=ClinicalTextConfig(drop=["lab_results"]))
    texts = []

    class Tok:
        def __call__(self, texts_, **_):
            texts.extend(texts_)
            n = len(texts_)
            return {
                "input_ids": torch.zeros(n, 4, dtype=torch.long),
                "attention_mask": torch.ones(n, 4),
            }

    batches = list(EvalStream(split, cfg, Tok(), 4))
    assert sum(int(b["valid"].sum()) for b in batches) == split.num_samples
    assert not any("MMSE" in t or "CDR" in t for t in texts)
    assert any("years old" in t for t in texts)


# ---- the synthetic cohort's demographics ----------------------------------------------------


def test_synthetic_demographics_differ_by_diagnosis_with_overlap() -> None:
    rng = np.random.default_rng(0)
    subjects = [_make_subject("ADNI", i, rng) for i in range(1500)]
    by_dx: dict[str, list] = {"NC": [], "MCI": [], "AD": []}
    for s in subjects:
        by_dx[s.visits[0].diagnosis].append(s)
    age = {dx: np.mean([s.visits[0].age for s in ss]) for dx, ss in by_dx.items()}
    educ = {dx: np.mean([s.education for s in ss]) for dx, ss in by_dx.items()}
    female = {dx: np.mean([s.sex == "F" for s in ss]) for dx, ss in by_dx.items()}
    assert age["NC"] < age["MCI"] < age["AD"]
    assert educ["AD"] < educ["MCI"] < educ["NC"]
    assert female["MCI"] < female["NC"] < female["AD"]
    for dx in by_dx:  # the generator's means, within sampling error
        assert age[dx] == pytest.approx(DEMOGRAPHICS[dx]["age"], abs=1.2)
        assert educ[dx] == pytest.approx(DEMOGRAPHICS[dx]["education"], abs=0.6)
    # Weak signal: the age ranges of NC and AD overlap widely.
    nc = [s.visits[0].age for s in by_dx["NC"]]
    ad = [s.visits[0].age for s in by_dx["AD"]]
    assert np.percentile(ad, 25) < np.percentile(nc, 75)


def test_binary_collapse_stays_a_probability_for_confident_models() -> None:
    # P(NC) ~ 1e-14: in float32 P(MCI) + P(AD) rounds above 1, which torchmetrics would read
    # as logits (and push every score above 0.5).
    logits = torch.tensor(
        [[-19.12, 3.12, 11.70], [5.0, 0.0, 0.0], [4.0, 1.0, 0.0], [-3.0, 2.0, 1.0]]
    )
    p = collapse_to_binary(logits)
    assert float(p.max()) <= 1.0
    got = binary_metrics(p, torch.tensor([True, False, False, True]))
    assert got["acc"] == 1.0 and got["confusion"] == [[2, 0], [0, 2]]
