"""AD ingest: volume reading (orientation, spacing, bad files), clinical text, table adapters,
subject-wise splits."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shards.ad_tables import AdRecord, read_source
from shards.clinical import render_text
from shards.common import RecordError, Reject
from shards.splits import assign_splits, check_ratios, subject_strata
from shards.synthetic.ad import generate_ad_cohort, reorient
from shards.volume import load_volume, read_canonical, to_cube

ADNI_HEADER = (
    "RID,PTID,VISCODE,EXAMDATE,DX_bl,AGE,PTGENDER,PTEDUCAT,APOE4,CDRSB,ADAS13,MMSE,LDELTOTAL,"
    "Ventricles,DX,Years_bl\n"
)
OASIS_HEADER = (
    "Subject ID,MRI ID,Group,Visit,MR Delay,M/F,Hand,Age,EDUC,SES,MMSE,CDR,eTIV,nWBV,ASF\n"
)


def asymmetric_volume(shape: tuple[int, int, int] = (20, 24, 28)) -> np.ndarray:
    """A volume with no symmetry, so any wrong flip or transpose changes it."""
    x, y, z = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    vol = 100 + 50 * x + 30 * y**2 + 20 * z**3
    vol[2:6, 3:9, 4:7] += 200  # a marker blob off-centre
    return vol.astype(np.float32)


def save(path: Path, data: np.ndarray, affine: np.ndarray, pair: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cls = nib.Nifti1Pair if pair else nib.Nifti1Image
    nib.save(cls(data, affine), str(path))
    return path


def tiny_nifti(path: Path, seed: int = 0) -> Path:
    data = np.random.default_rng(seed).random((8, 8, 8)).astype(np.float32)
    return save(path, data, np.eye(4))


# --------------------------------------------------------------------------- volumes


@pytest.mark.parametrize(
    "codes", [("L", "A", "S"), ("L", "P", "S"), ("P", "S", "R"), ("A", "S", "L")]
)
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nifti.img"])
def test_any_orientation_reads_back_as_the_ras_volume(tmp_path: Path, codes, suffix) -> None:
    data = asymmetric_volume()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    ras = load_volume(
        save(tmp_path / f"ras{suffix}", data, affine, pair=suffix.endswith(".img")), size=16
    )
    moved, moved_affine = reorient(data, affine, codes)
    assert nib.aff2axcodes(moved_affine) == codes
    assert moved.shape != data.shape or not np.array_equal(moved, data)
    path = save(tmp_path / f"moved{suffix}", moved, moved_affine, pair=suffix.endswith(".img"))
    np.testing.assert_array_equal(load_volume(path, size=16), ras)


def test_canonical_array_matches_the_ras_array(tmp_path: Path) -> None:
    data = asymmetric_volume()
    moved, affine = reorient(data, np.eye(4), ("P", "S", "R"))
    got, zooms = read_canonical(save(tmp_path / "psr.nii.gz", moved, affine))
    np.testing.assert_array_equal(got, data)
    assert zooms == (1.0, 1.0, 1.0)


def test_anisotropic_spacing_keeps_physical_shape(tmp_path: Path) -> None:
    # A 16 mm-radius ball, once on a 1 mm grid and once on a 1 x 1 x 2 mm grid.
    def ball(spacing: tuple[float, float, float], n: tuple[int, int, int]) -> np.ndarray:
        axes = [(np.arange(k) + 0.5) * s - k * s / 2 for k, s in zip(n, spacing, strict=True)]
        x, y, z = np.meshgrid(*axes, indexing="ij")
        return (np.sqrt(x**2 + y**2 + z**2) < 16).astype(np.float32) * 100 + 10

    iso = load_volume(save(tmp_path / "iso.nii", ball((1, 1, 1), (40, 40, 40)), np.eye(4)), 32)
    aniso_affine = np.diag([1.0, 1.0, 2.0, 1.0])
    aniso_path = save(tmp_path / "aniso.nii", ball((1, 1, 2), (40, 40, 20)), aniso_affine)
    aniso = load_volume(aniso_path, 32)
    assert np.abs(aniso - iso).mean() < 0.03
    # Ignoring the spacing would squash the ball to half its height: far from the truth.
    naive = load_volume(save(tmp_path / "naive.nii", ball((1, 1, 2), (40, 40, 20)), np.eye(4)), 32)
    assert np.abs(naive - iso).mean() > 0.05


def test_non_cubic_volume_is_padded_centred_with_the_minimum(tmp_path: Path) -> None:
    data = np.full((32, 32, 16), 50.0, dtype=np.float32)
    data[8:24, 8:24, 4:12] = 150.0
    cube = load_volume(save(tmp_path / "flat.nii", data, np.eye(4)), size=32)
    assert cube.shape == (32, 32, 32)
    # 16 slices of data centred in 32: 8 padded slices below and above, at the minimum (0).
    assert np.all(cube[:, :, :8] == 0) and np.all(cube[:, :, 24:] == 0)
    assert cube[:, :, 8:24].max() == 1.0


@pytest.mark.parametrize("size", [16, 24])
def test_output_shape_dtype_and_range(tmp_path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(500, 100, (30, 26, 22)).astype(np.float32)
    data[0, 0, 0] = 1e6  # an outlier the percentile clip must absorb
    cube = load_volume(save(tmp_path / "v.nii.gz", data, np.diag([1.2, 1.0, 1.4, 1.0])), size)
    assert cube.shape == (size, size, size)
    assert cube.dtype == np.float32
    assert cube.min() == 0.0 and cube.max() == 1.0
    assert (
        0.3
        < cube[size // 4 : -size // 4, size // 4 : -size // 4, size // 4 : -size // 4].mean()
        < 0.7
    )


def test_trailing_singleton_axis_is_dropped_and_4d_rejected(tmp_path: Path) -> None:
    data = asymmetric_volume((12, 14, 16))
    flat = load_volume(save(tmp_path / "a.nii", data, np.eye(4)), 16)
    oasis_like = save(tmp_path / "mpr-1.nifti.img", data[..., None], np.eye(4), pair=True)
    np.testing.assert_array_equal(load_volume(oasis_like, 16), flat)
    series = save(tmp_path / "bold.nii", np.stack([data, data], axis=-1), np.eye(4))
    with pytest.raises(RecordError, match="expected a 3D volume") as info:
        load_volume(series, 16)
    assert info.value.reason == "not_3d" and "bold.nii" in str(info.value)


def test_truncated_gz_is_a_record_error_naming_the_file(tmp_path: Path) -> None:
    path = save(tmp_path / "cut.nii.gz", asymmetric_volume(), np.eye(4))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(RecordError) as info:
        load_volume(path, 16)
    assert info.value.reason == "truncated_nifti"
    assert str(path) in str(info.value)


def test_truncated_plain_nii_is_a_record_error(tmp_path: Path) -> None:
    path = save(tmp_path / "cut.nii", asymmetric_volume(), np.eye(4))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(RecordError) as info:
        load_volume(path, 16)
    assert info.value.reason == "truncated_nifti" and "cut.nii" in str(info.value)


@pytest.mark.parametrize("name", ["junk.nii.gz", "junk.nii", "junk.nifti.img"])
def test_garbage_file_is_unreadable(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(os.urandom(3000))
    with pytest.raises(RecordError, match="expected a NIfTI") as info:
        load_volume(path, 16)
    assert info.value.reason == "unreadable_nifti" and name in str(info.value)


def test_nan_voxels_are_counted(tmp_path: Path) -> None:
    data = asymmetric_volume()
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    with pytest.raises(RecordError, match="4 of 13440 voxels") as info:
        load_volume(save(tmp_path / "nan.nii", data, np.eye(4)), 16)
    assert info.value.reason == "non_finite_voxels"


def test_constant_and_missing_volumes(tmp_path: Path) -> None:
    with pytest.raises(RecordError) as info:
        load_volume(save(tmp_path / "flat.nii", np.full((8, 8, 8), 3.0, np.float32), np.eye(4)), 8)
    assert info.value.reason == "constant_volume" and "flat.nii" in str(info.value)
    with pytest.raises(RecordError) as info:
        load_volume(tmp_path / "absent.nii.gz", 8)
    assert info.value.reason == "missing_image"


def test_record_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(RecordError("truncated_nifti", "/x/a.nii.gz", "ends early")))
    assert (err.reason, err.path, err.detail) == ("truncated_nifti", "/x/a.nii.gz", "ends early")


def test_sparse_volume_falls_back_to_min_max() -> None:
    data = np.zeros((20, 20, 20), np.float32)
    data[10, 10, 10] = 5.0  # 1 voxel of 8000: both percentiles are 0
    cube = to_cube(data, (1.0, 1.0, 1.0), size=20)
    assert cube.max() == 1.0 and cube.min() == 0.0


# --------------------------------------------------------------------------- clinical text


def test_render_all_fields_exactly() -> None:
    fields = {
        "age": 74,
        "sex": "F",
        "education_years": 16,
        "mmse": 29.0,
        "cdr": 0.5,
        "cdr_sb": 1.5,
        "logical_memory": 12,
        "ventricles": 41234.0,
        "hippocampus": "6812",
        "whole_brain": 1012345,
        "icv": 1523456.4,
        "ses": 2,
        "etiv": 1987,
        "nwbv": 0.6963,
        "asf": 0.883,
        "handedness": "R",
        "apoe4_alleles": 1,
        "summary": "Lives with spouse.",
    }
    assert render_text(fields) == (
        "The patient is 74 years old. The patient is female. The patient is right-handed. "
        "The patient has 16 years of education. The socioeconomic status is 2. "
        "The MMSE score is 29. The CDR global score is 0.5. The CDR sum of boxes is 1.5. "
        "The logical memory delayed recall score is 12. "
        "The ventricular volume is 41,234 mm3. The hippocampal volume is 6,812 mm3. "
        "The whole brain volume is 1,012,345 mm3. The intracranial volume is 1,523,456 mm3. "
        "The estimated total intracranial volume is 1987 cm3. "
        "The normalized whole brain volume is 0.696. The atlas scaling factor is 0.883. "
        "The apoe4 alleles is 1. Lives with spouse."
    )


@pytest.mark.parametrize("missing", [None, "", "  ", float("nan"), "NA", "nan"])
def test_missing_fields_are_left_out(missing) -> None:
    text = render_text({"age": 70, "mmse": missing, "cdr": missing, "ses": missing})
    assert text == "The patient is 70 years old."
    for bad in ("-1", "nan", "NaN", "None", "MMSE"):
        assert bad not in text


def test_integers_print_without_decimal_point() -> None:
    text = render_text({"age": 81.0, "mmse": 30.0, "cdr_sb": 2.0})
    assert "81 years" in text and "is 30." in text and "is 2." in text and ".0" not in text


def test_summary_is_cut_to_the_word_limit() -> None:
    summary = " ".join(f"w{i}" for i in range(100))
    text = render_text({"summary": summary}, word_limit=10)
    assert text.split() == [f"w{i}" for i in range(10)]
    assert len(render_text({"summary": summary}).split()) == 40  # the Alifuse paper's limit


def test_diagnosis_is_never_rendered() -> None:
    text = render_text({"age": 70, "diagnosis": "AD", "DX": "Dementia", "Group": "Demented"})
    assert text == "The patient is 70 years old."


def test_empty_text_is_a_record_error() -> None:
    with pytest.raises(RecordError, match="expected at least one clinical field") as info:
        render_text({"mmse": None, "diagnosis": "AD"}, source="t.csv:3")
    assert info.value.reason == "empty_text" and "t.csv:3" in str(info.value)


# --------------------------------------------------------------------------- generic table


def write_generic(folder: Path, opener=open, name: str = "clinical.csv") -> Path:
    tiny_nifti(folder / "img" / "s1_v1.nii.gz", 1)
    tiny_nifti(folder / "img" / "s2_v1.nii.gz", 2)
    absolute = tiny_nifti(folder.parent / "elsewhere" / "s3.nii", 3)
    table = folder / name
    with opener(table, "wt") as fh:
        fh.write(
            "subject_id,image_path,cohort,diagnosis,visit,age,sex,education_years,mmse,cdr,"
            "cdr_sb,logical_memory,summary,apoe4_alleles,site\n"
            "s1,img/s1_v1.nii.gz,NACC,cn,1,71.5,F,16,29,0,0.0,13,Lives alone.,0,North\n"
            f"s3,{absolute},MIRIAD,Dementia,2,80,M,,22.0,1,4.5,,,,\n"
            "s2,img/s2_v1.nii.gz,NACC,FTD,1,70,F,,,,,,,,\n"
            "s4,img/missing.nii.gz,NACC,MCI,1,66,M,,,,,,,,\n"
        )
    return table


@pytest.mark.parametrize("gz", [False, True])
def test_generic_table_fields_parse_exactly(tmp_path: Path, gz: bool) -> None:
    name = "clinical.csv.gz" if gz else "clinical.csv"
    table = write_generic(tmp_path / "t", gzip.open if gz else open, name)
    items = list(read_source("generic", table, table.parent))
    records = [i for i in items if isinstance(i, AdRecord)]
    assert [r.subject for r in records] == ["s1", "s3"]
    s1, s3 = records
    assert s1.cohort == "NACC" and s1.diagnosis == "NC" and not s1.binary and s1.visit == "1"
    assert s1.image_id == "s1_v1" and s1.image_path == table.parent / "img" / "s1_v1.nii.gz"
    assert s1.fields == {
        "age": 71.5,
        "sex": "F",
        "education_years": 16,
        "mmse": 29,
        "cdr": 0,
        "cdr_sb": 0,
        "logical_memory": 13,
        "summary": "Lives alone.",
        "apoe4_alleles": 0,
        "site": "North",
    }
    assert s3.cohort == "MIRIAD" and s3.diagnosis == "AD" and s3.binary
    assert s3.fields == {"age": 80, "sex": "M", "mmse": 22, "cdr": 1, "cdr_sb": 4.5}
    assert isinstance(s3.fields["mmse"], int)
    assert render_text(s1.fields).endswith("The site is North. Lives alone.")


def test_generic_rejects_name_the_value_and_the_file(tmp_path: Path) -> None:
    table = write_generic(tmp_path / "t")
    rejects = [i for i in read_source("generic", table, None) if isinstance(i, Reject)]
    assert [r.reason for r in rejects] == ["unknown_diagnosis", "missing_image"]
    unknown, missing = rejects
    assert unknown.source == f"{table}:4"
    assert "'FTD'" in unknown.detail and "NC, CN, MCI, AD, Dementia" in unknown.detail
    assert missing.source == f"{table}:5" and "img/missing.nii.gz" in missing.detail


def test_cohort_argument_overrides_and_makes_the_column_optional(tmp_path: Path) -> None:
    tiny_nifti(tmp_path / "a.nii")
    table = tmp_path / "t.csv"
    table.write_text("subject_id,image_path,diagnosis,mmse\nx,a.nii,AD,20\n")
    (rec,) = read_source("generic", table, tmp_path, cohort="MIRIAD")
    assert rec.cohort == "MIRIAD" and rec.binary and rec.fields == {"mmse": 20}
    with pytest.raises(ValueError, match=r"missing required columns \['cohort'\]"):
        read_source("generic", table, tmp_path)


def test_unknown_format_and_missing_columns_raise(tmp_path: Path) -> None:
    table = tmp_path / "oasis_longitudinal.csv"
    table.write_text("Subject ID,MRI ID,Group,Visit,M/F,Age\n")
    with pytest.raises(ValueError, match="unknown source format 'nifti'") as info:
        read_source("nifti", table, tmp_path)
    assert "generic" in str(info.value) and "oasis2" in str(info.value)
    with pytest.raises(ValueError) as info:
        read_source("oasis2", table, tmp_path)
    message = str(info.value)
    assert str(table) in message and "'MR Delay'" in message and "'eTIV'" in message
    assert "expected at least" in message and "'Hand'" in message


# --------------------------------------------------------------------------- ADNIMERGE


def adni_image(root: Path, ptid: str, stamp: str, image_id: str, series: str = "MPRAGE") -> Path:
    name = f"ADNI_{ptid}_MR_{series}_br_raw_20060418193713747_1_S13408_{image_id}.nii"
    return tiny_nifti(root / ptid / series / stamp / image_id / name)


def test_adnimerge_matches_nearest_visit_within_180_days(tmp_path: Path) -> None:
    images = tmp_path / "ADNI"
    first = adni_image(images, "002_S_0295", "2006-04-18_08_20_30.0", "I13722")
    adni_image(images, "002_S_0295", "2006-11-02_09_01_10.0", "I20001")
    adni_image(images, "002_S_0295", "2009-01-05_10_00_00.0", "I30001")  # no visit near
    adni_image(images, "011_S_0002", "2005-09-08_10_00_00.0", "I40001")  # empty DX
    adni_image(images, "099_S_9999", "2007-01-01_10_00_00.0", "I50001")  # PTID not in table
    adni_image(images, "033_S_0001", "2010-05-01_10_00_00.0", "I60001")  # older DX code
    (images / "033_S_0001" / "MPRAGE" / "2011-05-01_10_00_00.0" / "I60002").mkdir(parents=True)
    table = tmp_path / "ADNIMERGE.csv"
    table.write_text(
        ADNI_HEADER
        + "295,002_S_0295,bl,2006-04-20,CN,84.8,Male,18,1,0,5.0,28,14,118233,CN,0\n"
        + "295,002_S_0295,m06,2006-11-10,CN,84.8,Male,18,1,0.5,6.0,,10,,MCI,0.558\n"
        + "295,002_S_0295,m03,2006-07-20,CN,84.8,Male,18,1,,,,,,,0.25\n"
        + "2,011_S_0002,bl,2005-09-08,CN,74.3,Female,16,0,0,10.67,29,16,,,0\n"
        + "1,033_S_0001,m48,5/3/2010,LMCI,70,Female,12,0,2,20,26,6,,LMCI,4.0\n"
    )
    stats: dict[str, int] = {}
    items = list(read_source("adnimerge", table, images, stats=stats))
    records = {i.image_id: i for i in items if isinstance(i, AdRecord)}
    rejects = {Path(i.source).name: i for i in items if isinstance(i, Reject)}

    bl = records["I13722"]
    assert (bl.subject, bl.cohort, bl.visit, bl.diagnosis, bl.binary) == (
        "002_S_0295",
        "ADNI",
        "bl",
        "NC",
        False,
    )
    assert bl.image_path == first
    assert bl.fields == {
        "age": 84.8,
        "sex": "Male",
        "education_years": 18,
        "mmse": 28,
        "cdr_sb": 0,
        "logical_memory": 14,
        "ventricles": 118233,
    }
    assert "The ventricular volume is 118,233 mm3." in render_text(bl.fields)
    m06 = records["I20001"]
    assert m06.visit == "m06" and m06.diagnosis == "MCI"
    assert m06.fields["age"] == pytest.approx(85.4) and "mmse" not in m06.fields
    # An empty Ventricles cell (FreeSurfer failed or no MRI): no field, no sentence.
    assert "ventricles" not in m06.fields and "ventricular" not in render_text(m06.fields)
    assert records["I60001"].diagnosis == "MCI" and records["I60001"].visit == "m48"

    far = next(r for n, r in rejects.items() if "I30001" in n)
    assert far.reason == "no_visit_match" and "within 180 days" in far.detail
    assert next(r for n, r in rejects.items() if "I40001" in n).reason == "missing_diagnosis"
    stranger = next(r for n, r in rejects.items() if "I50001" in n)
    assert stranger.reason == "no_visit_match" and "099_S_9999" in stranger.detail
    assert rejects["I60002"].reason == "missing_image"
    assert len(items) == 7
    assert stats["adnimerge_rows"] == 5 and stats["adnimerge_rows_without_image"] == 1


def test_adnimerge_freesurfer_volumes_become_sentences(tmp_path: Path) -> None:
    images = tmp_path / "ADNI"
    adni_image(images, "002_S_0295", "2006-04-18_08_20_30.0", "I1")
    adni_image(images, "002_S_0295", "2007-04-20_08_20_30.0", "I2")
    adni_image(images, "002_S_0295", "2008-04-21_08_20_30.0", "I3")
    table = tmp_path / "ADNIMERGE.csv"
    table.write_text(
        "PTID,VISCODE,EXAMDATE,DX,AGE,MMSE,Ventricles,Hippocampus,WholeBrain,ICV,Years_bl\n"
        "002_S_0295,bl,2006-04-18,CN,84.8,28,41234,6812,1012345,1523456,0\n"
        "002_S_0295,m12,2007-04-20,CN,84.8,29,43210.0,,1009876.0,1.52e6,1.0\n"
        "002_S_0295,m24,2008-04-21,MCI,84.8,27,,,,,2.0\n"
    )
    records = {r.image_id: r for r in read_source("adnimerge", table, images)}
    assert {k: records["I1"].fields[k] for k in ("ventricles", "hippocampus", "icv")} == {
        "ventricles": 41234,
        "hippocampus": 6812,
        "icv": 1523456,
    }
    text = render_text(records["I1"].fields)
    assert text == (
        "The patient is 84.8 years old. The MMSE score is 28. "
        "The ventricular volume is 41,234 mm3. The hippocampal volume is 6,812 mm3. "
        "The whole brain volume is 1,012,345 mm3. The intracranial volume is 1,523,456 mm3."
    )
    text = render_text(records["I2"].fields)
    assert "The ventricular volume is 43,210 mm3." in text and "hippocampal" not in text
    assert "The intracranial volume is 1,520,000 mm3." in text and ".0" not in text
    text = render_text(records["I3"].fields)
    assert text == "The patient is 86.8 years old. The MMSE score is 27."
    for word in ("ventricular", "hippocampal", "brain", "intracranial", "nan", "None"):
        assert word not in text


def test_adnimerge_older_dx_codes() -> None:
    from shards.ad_tables import adni_diagnosis

    expected = {
        "CN": "NC",
        "SMC": "NC",
        "EMCI": "MCI",
        "LMCI": "MCI",
        "MCI": "MCI",
        "Dementia": "AD",
        "AD": "AD",
        "MCI to Dementia": "AD",
        "NL": "NC",
    }
    assert {k: adni_diagnosis(k) for k in expected} == expected
    assert adni_diagnosis("FTD") is None


# --------------------------------------------------------------------------- OASIS-2


def test_oasis2_groups_fields_and_first_volume(tmp_path: Path) -> None:
    part1, part2 = tmp_path / "OAS2_RAW_PART1", tmp_path / "OAS2_RAW_PART2"
    data = asymmetric_volume((8, 8, 8))[..., None]
    for mri in ("OAS2_0001_MR1", "OAS2_0002_MR1", "OAS2_0002_MR2"):
        for scan in ("mpr-2", "mpr-1"):
            save(part1 / mri / "RAW" / f"{scan}.nifti.img", data, np.eye(4), pair=True)
    save(part2 / "OAS2_0180_MR1" / "RAW" / "mpr-1.nifti.img", data, np.eye(4), pair=True)
    table = tmp_path / "oasis_longitudinal.csv"
    table.write_text(
        OASIS_HEADER
        + "OAS2_0001,OAS2_0001_MR1,Nondemented,1,0,M,R,87,14,2,27,0,1987,0.696,0.883\n"
        + "OAS2_0002,OAS2_0002_MR1,Converted,1,0,F,R,75,12,,,0,1678,0.736,1.046\n"
        + "OAS2_0002,OAS2_0002_MR2,Converted,2,560,F,R,76,12,,29,0.5,1738,0.713,1.01\n"
        + "OAS2_0180,OAS2_0180_MR1,Demented,1,0,M,R,69,16,1,24,1,1400,0.7,1.254\n"
        + "OAS2_0003,OAS2_0003_MR1,Demented,1,0,F,R,75,12,,23,0.5,1678,0.736,1.046\n"
        + "OAS2_0004,OAS2_0004_MR1,Uncertain,1,0,F,R,75,12,,23,0.5,1678,0.736,1.046\n"
    )
    # The root holds both download parts: volumes are found one level down.
    items = list(read_source("oasis2", table, tmp_path))
    records = [i for i in items if isinstance(i, AdRecord)]
    rejects = [i for i in items if isinstance(i, Reject)]
    assert [r.diagnosis for r in records] == ["NC", "NC", "AD", "AD"]
    first = records[0]
    assert (first.subject, first.image_id, first.visit, first.cohort, first.binary) == (
        "OAS2_0001",
        "OAS2_0001_MR1",
        "1",
        "OASIS-2",
        True,
    )
    assert first.image_path == part1 / "OAS2_0001_MR1" / "RAW" / "mpr-1.nifti.img"
    assert first.fields == {
        "age": 87,
        "sex": "M",
        "handedness": "R",
        "education_years": 14,
        "ses": 2,
        "mmse": 27,
        "cdr": 0,
        "etiv": 1987,
        "nwbv": 0.696,
        "asf": 0.883,
    }
    assert "ses" not in records[1].fields and "mmse" not in records[1].fields
    assert records[3].image_path.parent.parent.parent == part2
    assert [(r.reason, r.source) for r in rejects] == [
        ("missing_image", f"{table}:6"),
        ("unknown_diagnosis", f"{table}:7"),
    ]
    assert "'Uncertain'" in rejects[1].detail and "Converted" in rejects[1].detail
    assert "mpr-1.nifti.img" in rejects[0].detail


def test_oasis2_converted_without_cdr_is_rejected(tmp_path: Path) -> None:
    table = tmp_path / "oasis_longitudinal.csv"
    table.write_text(OASIS_HEADER + "OAS2_9,OAS2_9_MR1,Converted,1,0,F,R,75,12,,,,1678,0.7,1.0\n")
    (item,) = read_source("oasis2", table, tmp_path)
    assert isinstance(item, Reject) and item.reason == "missing_diagnosis"


# --------------------------------------------------------------------------- generated tree


@pytest.fixture(scope="module")
def clean_cohort(tmp_path_factory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("clean_ad")
    sources = generate_ad_cohort(
        root, subjects_per_cohort=5, shape=(24, 28, 24), seed=3, template="phantom"
    )
    return root, sources


def test_adapters_read_every_generated_volume(clean_cohort) -> None:
    root, sources = clean_cohort
    volumes = [
        p for p in root.rglob("*") if p.name.endswith((".nii", ".nii.gz", ".img")) and p.is_file()
    ]
    seen: list[Path] = []
    for fmt, table, images in sources:
        items = list(read_source(fmt, table, images))
        assert not [i for i in items if isinstance(i, Reject)], fmt
        seen += [i.image_path for i in items]
        for rec in items:
            assert rec.diagnosis in ("NC", "MCI", "AD")
            assert rec.binary == (rec.cohort in ("OASIS-2", "MIRIAD"))
            text = render_text(rec.fields)
            for word in ("MCI", "Dementia", "dementia", "Alzheimer", " AD", " NC", " CN"):
                assert word not in text, (word, text)
    assert sorted(seen) == sorted(volumes)


def test_gzipped_table_reads_the_same(clean_cohort, tmp_path: Path) -> None:
    root, sources = clean_cohort
    fmt, table, images = next(s for s in sources if s[0] == "adnimerge")
    gz = tmp_path / "ADNIMERGE.csv.gz"
    with open(table, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert list(read_source(fmt, gz, images)) == list(read_source(fmt, table, images))


# --------------------------------------------------------------------------- splits


def fake_records(n_subjects: int) -> list[AdRecord]:
    rng = random.Random(0)
    records = []
    for i in range(n_subjects):
        cohort = ["ADNI", "NACC", "OASIS-2"][i % 3]
        dx = ["NC", "MCI", "AD"][rng.randrange(3)]
        for visit in range(rng.randint(1, 3)):
            records.append(
                AdRecord(
                    f"S{i}",
                    cohort,
                    Path(f"/x/{i}_{visit}.nii"),
                    dx,
                    False,
                    f"m{visit * 12:02d}",
                    f"I{i}{visit}",
                    {},
                )
            )
    return records


def test_splits_are_deterministic_order_free_and_disjoint() -> None:
    records = fake_records(300)
    split = assign_splits(subject_strata(records), seed=5)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    assert assign_splits(subject_strata(shuffled), seed=5) == split
    assert assign_splits(subject_strata(records), seed=6) != split
    assert set(split) == {(r.cohort, r.subject) for r in records}
    counts = {s: sum(1 for v in split.values() if v == s) for s in ("train", "val", "test")}
    assert counts == pytest.approx({"train": 210, "val": 30, "test": 60}, abs=9)


def test_splits_are_stratified_by_cohort_and_first_diagnosis() -> None:
    records = fake_records(600)
    strata = subject_strata(records)
    split = assign_splits(strata, ratios=(0.5, 0.25, 0.25), seed=0)
    for stratum in set(strata.values()):
        members = [k for k, s in strata.items() if s == stratum]
        n_train = sum(1 for k in members if split[k] == "train")
        assert abs(n_train - 0.5 * len(members)) <= 1, stratum


def test_first_diagnosis_is_the_earliest_visit() -> None:
    later = AdRecord("S", "ADNI", Path("/b.nii"), "AD", False, "m24", "I2", {})
    first = AdRecord("S", "ADNI", Path("/a.nii"), "MCI", False, "bl", "I9", {})
    assert subject_strata([later, first]) == {("ADNI", "S"): ("ADNI", "MCI")}


@pytest.mark.parametrize("ratios", [(0.7, 0.1), (0.7, 0.2, 0.2), (1.2, -0.1, -0.1)])
def test_bad_split_ratios_raise(ratios) -> None:
    with pytest.raises(ValueError, match="summing to 1"):
        check_ratios(ratios)
    assert math.isclose(sum(check_ratios((0.7, 0.1, 0.2))), 1.0)
