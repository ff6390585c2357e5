"""The synthetic AD cohort: real raw layouts, label-dependent anatomy and scores, varied
orientation and spacing, injected corruptions, determinism."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shards.ad_tables import ADNI_REQUIRED, OASIS_REQUIRED, AdRecord, read_source
from shards.ad_writer import read_sources_file
from shards.clinical import render_text
from shards.synthetic.ad import (
    Latents,
    build_anatomy,
    generate_ad_cohort,
    mni_template_path,
    synth_volume,
)
from shards.volume import load_volume, read_canonical

SHAPE = (24, 28, 24)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("synthetic_ad")
    sources = generate_ad_cohort(root, subjects_per_cohort=12, shape=SHAPE, seed=7, corrupt=5)
    return root, sources


def table_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_sources_are_recorded_and_point_at_real_layouts(cohort) -> None:
    root, sources = cohort
    assert [s[0] for s in sources] == ["adnimerge", "oasis2", "generic", "generic", "generic"]
    assert read_sources_file(root) == sources
    for _, table, images in sources:
        assert table.is_file() and images.is_dir()
    assert sources[0][1] == root / "ADNI" / "ADNIMERGE.csv"
    assert sources[1][1] == root / "OASIS-2" / "oasis_longitudinal.csv"
    assert [s[1] for s in sources[2:]] == [
        root / c / "clinical.csv" for c in ("NACC", "AIBL", "MIRIAD")
    ]


def test_adni_tree_and_table(cohort) -> None:
    root, _ = cohort
    pattern = re.compile(
        r"(\d{3}_S_\d{4})/[A-Za-z_-]+/\d{4}-\d{2}-\d{2}_\d{2}_\d{2}_\d{2}\.0/(I\d+)/"
        r"ADNI_\1_MR_[A-Za-z_-]+_br_raw_\d+_1_S\d+_\2\.nii"
    )
    files = sorted((root / "ADNI" / "ADNI").rglob("*.nii"))
    assert files
    for f in files:
        assert pattern.fullmatch(f.relative_to(root / "ADNI" / "ADNI").as_posix()), f
    rows = table_rows(root / "ADNI" / "ADNIMERGE.csv")
    assert set(ADNI_REQUIRED) | {
        "AGE",
        "PTGENDER",
        "PTEDUCAT",
        "MMSE",
        "CDRSB",
        "LDELTOTAL",
    } <= set(rows[0])
    assert len(rows[0]) > 25  # the many columns the adapter must ignore
    assert {r["DX"] for r in rows} <= {"CN", "MCI", "Dementia", "", "Other"}
    assert len(rows) > len(files)  # visits without an MRI exist


def test_oasis_pairs_and_table(cohort) -> None:
    root, _ = cohort
    table = root / "OASIS-2" / "oasis_longitudinal.csv"
    with open(table) as fh:
        assert fh.readline().strip().split(",") == list(OASIS_REQUIRED)
    rows = table_rows(table)
    assert {r["Group"] for r in rows} <= {"Nondemented", "Demented", "Converted"}
    assert any(r["MMSE"] == "" for r in rows) or any(r["SES"] == "" for r in rows)
    row = next(r for r in rows if r["MRI ID"].endswith("_MR1"))
    img_path = root / "OASIS-2" / "OAS2_RAW_PART1" / row["MRI ID"] / "RAW" / "mpr-1.nifti.img"
    assert img_path.with_suffix(".hdr").is_file()
    img = nib.load(str(img_path))
    assert isinstance(img, nib.Nifti1Pair) and img.shape[3:] == (1,)


def test_generic_tables_have_label_dependent_scores_and_missingness(cohort) -> None:
    root, sources = cohort
    records = [
        r
        for fmt, table, images in sources
        for r in read_source(fmt, table, images)
        if isinstance(r, AdRecord)
    ]
    mmse = {
        dx: [r.fields["mmse"] for r in records if r.diagnosis == dx and "mmse" in r.fields]
        for dx in ("NC", "MCI", "AD")
    }
    means = {dx: float(np.mean(v)) for dx, v in mmse.items()}
    assert means["NC"] > means["MCI"] > means["AD"], means
    assert all(0 <= m <= 30 for v in mmse.values() for m in v)
    nacc = table_rows(root / "NACC" / "clinical.csv")
    for column in ("age", "mmse", "cdr", "logical_memory", "summary"):
        missing = sum(1 for r in nacc if r[column] == "") / len(nacc)
        assert 0.0 < missing < 0.45, (column, missing)
    assert {r["diagnosis"] for r in table_rows(root / "MIRIAD" / "clinical.csv")} <= {
        "NC",
        "CN",
        "cn",
        "AD",
        "Dementia",
        "ad",
        "FTD",
    }


def spearman(a, b) -> float:
    ranks = [np.argsort(np.argsort(np.asarray(x, dtype=float))) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def measure(path: Path) -> tuple[float, float]:
    """(ventricle volume, head volume) in world mm3, crudely, from a volume as the reader gives
    it: dark voxels deep inside the head, and the head with its holes filled. Independent of
    pose, orientation, spacing and intensity scale."""
    data, zooms = read_canonical(path)
    lo, hi = np.percentile(data, [0.5, 99.5])
    scaled = torch.from_numpy((data - lo) / (hi - lo))
    head = scaled > 0.15
    filled = torch.ones_like(head)
    for axis in range(3):  # inside = head on both sides along every axis (fills the ventricles)
        for flip in (False, True):
            h = head.flip(axis) if flip else head
            seen = torch.cummax(h.int(), dim=axis).values.bool()
            filled &= seen.flip(axis) if flip else seen
    interior = -F.max_pool3d(-filled[None, None].float(), 5, 1, 2)[0, 0] > 0  # eroded by 2
    voxel = float(np.prod(zooms))
    return float((interior & (scaled < 0.3)).sum()) * voxel, float(filled.sum()) * voxel


def records_of(cohort: tuple[Path, list], fmt: str) -> list[AdRecord]:
    """The records of one format whose volume was written intact (the corrupt ones dropped)."""
    root, sources = cohort
    bad = {c["image_path"] for c in json.loads((root / "corruptions.json").read_text())}
    return [
        r
        for f, table, images in sources
        if f == fmt
        for r in read_source(f, table, images)
        if isinstance(r, AdRecord) and str(r.image_path) not in bad
    ]


def test_adni_freesurfer_volumes_are_measured_from_the_written_volume(cohort) -> None:
    root, sources = cohort
    records = [r for r in records_of(cohort, "adnimerge") if "ventricles" in r.fields]
    assert len(records) >= 12
    dark, head = zip(*(measure(r.image_path) for r in records), strict=True)
    ventricles = [r.fields["ventricles"] for r in records]
    icv = [r.fields["icv"] for r in records]
    assert spearman(ventricles, dark) > 0.8, (ventricles, dark)
    assert np.corrcoef(ventricles, dark)[0, 1] > 0.8
    assert spearman(icv, head) > 0.8, (icv, head)
    # Relative to head size, the hippocampus shrinks and the brain loses tissue with the load.
    relative = [
        (r.fields["hippocampus"] / r.fields["icv"], d / h)
        for r, d, h in zip(records, dark, head, strict=True)
        if "hippocampus" in r.fields
    ]
    assert spearman(*zip(*relative, strict=True)) < -0.5
    whole_brain = [r.fields["whole_brain"] / r.fields["icv"] for r in records]
    assert spearman(whole_brain, np.divide(dark, head)) < -0.6

    rows = table_rows(root / "ADNI" / "ADNIMERGE.csv")
    columns = ("Ventricles", "Hippocampus", "WholeBrain", "ICV")
    values = {c: np.array([float(r[c]) for r in rows if r[c]]) for c in columns}
    assert 8e3 < values["Ventricles"].min() and values["Ventricles"].max() < 2.2e5
    assert 3.5e3 < values["Hippocampus"].min() and values["Hippocampus"].max() < 1.0e4
    assert 6.5e5 < values["WholeBrain"].min() and values["WholeBrain"].max() < 1.45e6
    assert 1.05e6 < values["ICV"].min() and values["ICV"].max() < 2.05e6
    assert all(float(v).is_integer() for v in values["ICV"])
    # Measured from an MRI: empty at clinic-only visits (and where FreeSurfer failed).
    assert all(r["Ventricles"] == "" for r in rows if r["DX"] == "")  # no MRI at these
    imaged = records_of(cohort, "adnimerge")
    assert len(records) >= 0.65 * len(imaged)  # FreeSurfer fails QC now and then (~10%)
    # Every ADNI record with a ventricle volume says it, one without does not.
    for r in imaged:
        text = render_text(r.fields)
        assert ("The ventricular volume is " in text) == ("ventricles" in r.fields), text


def test_oasis_etiv_and_nwbv_come_from_the_scan(cohort) -> None:
    root, sources = cohort
    records = records_of(cohort, "oasis2")
    head = [measure(r.image_path)[1] for r in records]
    etiv = [r.fields["etiv"] for r in records]
    assert spearman(etiv, head) > 0.8, (etiv, head)
    rows = table_rows(root / "OASIS-2" / "oasis_longitudinal.csv")
    etivs, nwbv = (np.array([float(r[c]) for r in rows]) for c in ("eTIV", "nWBV"))
    assert 1050 < etivs.min() and etivs.max() < 2050 and 0.62 < nwbv.min() and nwbv.max() < 0.86
    for r in rows:  # ASF is the atlas scaling factor 1755 / eTIV, as published
        assert float(r["ASF"]) == round(1755.0 / float(r["eTIV"]), 3)
    by_subject: dict[str, list[float]] = {}
    for r in rows:  # head size is the subject's: eTIV moves only by measurement error
        by_subject.setdefault(r["Subject ID"], []).append(float(r["eTIV"]))
    assert all(max(v) / min(v) < 1.08 for v in by_subject.values())
    # nWBV falls with disease (CDR) and the image's atrophy: more dark interior, less brain.
    cdr = [float(r["CDR"]) for r in rows]
    assert spearman(nwbv, cdr) < -0.4
    dark = [measure(r.image_path)[0] for r in records]
    assert spearman([r.fields["nwbv"] for r in records], dark) < -0.6


def test_nacc_summaries_describe_the_scan(cohort) -> None:
    root, sources = cohort
    grades = ("no significant", "mild", "moderate", "marked")
    pairs = []
    for r in records_of(cohort, "generic"):
        summary = r.fields.get("summary", "")
        if r.cohort != "NACC" or not summary:
            continue
        found = [i for i, g in enumerate(grades) if f"MRI shows {g} ventricular" in summary]
        if found:
            pairs.append((found[0], measure(r.image_path)[0]))
    n_summaries = sum(1 for r in table_rows(root / "NACC" / "clinical.csv") if r["summary"])
    assert 0.4 * n_summaries <= len(pairs) <= 0.95 * n_summaries
    assert spearman(*zip(*pairs, strict=True)) > 0.6, pairs
    for cohort_name in ("AIBL", "MIRIAD"):
        with open(root / cohort_name / "clinical.csv") as fh:
            assert "MRI" not in fh.read()


def test_latents_fix_the_anatomy_whatever_the_pose(tmp_path: Path) -> None:
    anatomy = build_anatomy("mni", (32, 38, 32))
    cases = {
        "nc": Latents(load_noise=-0.5, atrophy_noise=0.0, head_scale=0.95),
        "ad": Latents(load_noise=1.5, atrophy_noise=0.1, head_scale=0.95),
        "big": Latents(load_noise=-0.5, atrophy_noise=0.0, head_scale=1.05),
    }
    dark: dict[str, list[float]] = {}
    head: dict[str, list[float]] = {}
    for name, latents in cases.items():
        for seed in range(3):  # another pose, spacing, intensity and noise each time
            rng = np.random.default_rng(seed)
            data, affine = synth_volume(anatomy, 0.5, 72.0, rng, latents=latents)
            path = tmp_path / f"{name}{seed}.nii"
            nib.save(nib.Nifti1Image(data, affine), str(path))
            d, h = measure(path)
            dark.setdefault(name, []).append(d)
            head.setdefault(name, []).append(h)
    assert min(dark["ad"]) > 1.5 * max(dark["nc"]), dark
    assert min(head["big"]) > 1.15 * max(head["nc"]), head


def test_orientations_and_spacings_vary(cohort) -> None:
    root, _ = cohort
    codes, zooms = set(), []
    for path in sorted(root.rglob("*.nii*")) + sorted(root.rglob("*.img")):
        try:
            img = nib.load(str(path))
        except Exception:  # the injected garbage / truncated files
            continue
        codes.add(nib.aff2axcodes(img.affine))
        zooms += list(img.header.get_zooms()[:3])
    assert len(codes) >= 3 and ("R", "A", "S") in codes
    assert 1.0 - 1e-3 <= min(zooms) and max(zooms) <= 1.5 + 1e-3 and max(zooms) - min(zooms) > 0.2


def test_corruptions_are_spread_and_listed(cohort) -> None:
    root, _ = cohort
    corruptions = json.loads((root / "corruptions.json").read_text())
    assert {c["kind"] for c in corruptions} == {
        "truncated",
        "garbage",
        "nan",
        "missing_image",
        "unknown_diagnosis",
    }
    assert len({c["cohort"] for c in corruptions}) >= 4
    truncated = next(c for c in corruptions if c["kind"] == "truncated")
    assert truncated["image_path"].endswith(".nii.gz")
    assert not Path(
        next(c for c in corruptions if c["kind"] == "missing_image")["image_path"]
    ).exists()


def test_same_seed_same_tables(tmp_path: Path) -> None:
    kwargs = dict(subjects_per_cohort=2, shape=(16, 16, 16), seed=11, template="phantom")
    generate_ad_cohort(tmp_path / "a", **kwargs)
    generate_ad_cohort(tmp_path / "b", **kwargs)
    for name in ("ADNI/ADNIMERGE.csv", "OASIS-2/oasis_longitudinal.csv", "NACC/clinical.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    generate_ad_cohort(tmp_path / "c", **{**kwargs, "seed": 12})
    assert (tmp_path / "a" / "NACC/clinical.csv").read_bytes() != (
        tmp_path / "c" / "NACC/clinical.csv"
    ).read_bytes()


@pytest.mark.parametrize("template", ["mni", "phantom"])
def test_disease_enlarges_ventricles_and_darkens_the_mtl(template: str) -> None:
    # Same seed = same pose, spacing, noise and subject effect: only the severity differs.
    anatomy = build_anatomy(template, (32, 38, 32))
    dark, brightness = [], []
    for severity in (0.0, 1.0, 2.0):
        d, b = [], []
        for seed in range(4):
            data, affine = synth_volume(anatomy, severity, 72.0, np.random.default_rng(seed))
            spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
            assert np.all((spacing >= 1.0) & (spacing <= 1.5))
            scaled = data / np.percentile(data, 99)
            d.append(float((scaled < 0.3).mean()))
            b.append(float(scaled.mean()))
        dark.append(np.mean(d))
        brightness.append(np.mean(b))
    assert dark[0] < dark[1] < dark[2], dark  # CSF replaces tissue
    assert brightness[0] > brightness[1] > brightness[2], brightness


def test_signal_survives_ingest_across_subjects(tmp_path: Path) -> None:
    """Different subjects (seeds) through the real reader: AD cubes have more dark voxels in
    the central brain than NC cubes on average, despite pose, spacing and intensity noise."""
    anatomy = build_anatomy("mni", (48, 56, 48))
    dark = {}
    for severity, offset in ((0.0, 100), (2.2, 300)):
        values = []
        for i in range(12):
            data, affine = synth_volume(anatomy, severity, 72.0, np.random.default_rng(offset + i))
            path = tmp_path / f"s{offset + i}.nii.gz"
            nib.save(nib.Nifti1Image(data, affine), str(path))
            cube = load_volume(path, 32)
            values.append(float((cube[8:24, 8:24, 8:24] < 0.25).mean()))
        dark[severity] = values
    assert np.mean(dark[2.2]) > np.mean(dark[0.0]) + 0.01, dark


def test_bad_template_and_arguments_raise(tmp_path: Path) -> None:
    assert mni_template_path().name == "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    with pytest.raises(ValueError, match="expected 'mni' or 'phantom'"):
        generate_ad_cohort(tmp_path, subjects_per_cohort=1, template="colin27")
    with pytest.raises(ValueError, match="too many"):
        generate_ad_cohort(
            tmp_path, subjects_per_cohort=1, shape=(8, 8, 8), corrupt=50, template="phantom"
        )
    with pytest.raises(FileNotFoundError, match="sources.json"):
        read_sources_file(tmp_path / "nowhere")
