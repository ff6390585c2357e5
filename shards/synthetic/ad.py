"""A synthetic Alzheimer's cohort written in the real published layouts.

ADNI (image tree + ADNIMERGE.csv), OASIS-2 (NIfTI pairs + oasis_longitudinal.csv) and NACC,
AIBL, MIRIAD as the project's generic tables. The anatomy is the real MNI152 template that
nilearn ships (or a procedural phantom) with label-dependent, noisy changes: ventricles
enlarge and the medial temporal lobe darkens from NC to MCI to AD and with age. Volumes are
stored in varied orientations and voxel spacings so the reader's canonicalisation is used.

Each visit's anatomy (disease-load and atrophy noise, the subject's head size) is drawn once,
before anything is written; the volume is synthesised from it and the tables' image-derived
columns are measured from it with a few percent of error, as in the real data: ADNIMERGE's
FreeSurfer Ventricles / Hippocampus / WholeBrain / ICV, OASIS-2's eTIV / nWBV / ASF, and an
MRI impression in some NACC summaries.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

log = logging.getLogger(__name__)

COHORTS = ("ADNI", "OASIS-2", "NACC", "AIBL", "MIRIAD")
GZ_COHORTS = ("NACC", "AIBL", "MIRIAD")  # the cohorts whose volumes are .nii.gz
MNI_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
# The MNI152 2009a box (mm): both templates share it, so regions are placed in mm.
MNI_ORIGIN = np.array([-98.0, -134.0, -72.0])
MNI_SHAPE = np.array([197, 233, 189])
ORIENTATIONS = (
    ("R", "A", "S"),
    ("L", "A", "S"),
    ("L", "P", "S"),
    ("P", "S", "R"),
    ("A", "S", "L"),
)
# corruption kind -> the reject reason the writer must give it
CORRUPTIONS = {
    "truncated": "truncated_nifti",
    "garbage": "unreadable_nifti",
    "nan": "non_finite_voxels",
    "missing_image": "missing_image",
    "unknown_diagnosis": "unknown_diagnosis",
}
SUMMARY_PHRASES = {
    "NC": (
        "Independent in all daily activities.",
        "No memory complaints reported by the informant.",
        "Drives and manages finances without help.",
        "Reads the newspaper daily and follows current events.",
    ),
    "MCI": (
        "Informant reports occasional forgetfulness of recent conversations.",
        "Independent in daily activities with minor lapses.",
        "Mild word-finding difficulty noted during the interview.",
        "Misplaces keys more often than a year ago.",
    ),
    "AD": (
        "Needs help managing medications and finances.",
        "Informant reports getting lost in familiar places.",
        "Repeats questions within minutes.",
        "Stopped driving on family advice.",
    ),
    "any": (
        "Hypertension treated with medication.",
        "Lives with spouse.",
        "Retired schoolteacher.",
        "Reports good sleep.",
        "History of type 2 diabetes.",
        "Wears a hearing aid in the left ear.",
        "Walks thirty minutes most days.",
        "Mild low back pain, no other complaints.",
    ),
}

# Demographics by diagnosis at the first visit, as the cohorts report them (ADNI baseline:
# AD patients are older and less educated on average, MCI groups hold more men, AD groups
# more women): weak, overlapping signal, as demographics carry in real data.
DEMOGRAPHICS = {
    "NC": {"age": 72.0, "female": 0.55, "education": 16.3},
    "MCI": {"age": 74.0, "female": 0.42, "education": 15.8},
    "AD": {"age": 76.0, "female": 0.58, "education": 14.8},
}

# The ventricle field threshold (clip range) and the softness of the ventricle edge.
VENTRICLE_THRESHOLDS = (0.04, 0.65)
VENTRICLE_WIDTH = 0.03
VENTRICLE_ZERO_LOAD = 0.5  # the threshold at load 0; each unit of load lowers it by 0.16
VENTRICLE_SLOPE = 0.16
# Image-derived measures of a head of the template's size at load 0, in the tables' units.
REF_VENTRICLES_MM3 = 24000.0
REF_HIPPOCAMPUS_MM3 = 7400.0
REF_WHOLE_BRAIN_MM3 = 1.06e6
REF_ICV_MM3 = 1.5e6
REF_ETIV_CM3 = 1480.0
REF_NWBV = 0.765
# FreeSurfer's Ventricles for the ventricle volume the image shows (0.3x to 9x that of load 0
# over the threshold range): a mild compression keeps it within the range ADNIMERGE reports.
VENTRICLE_POWER = 0.75
# NACC narrative MRI impressions by disease load (upper bounds).
MRI_IMPRESSIONS = (
    (0.5, "MRI shows no significant ventricular enlargement or hippocampal atrophy."),
    (1.2, "MRI shows mild ventricular enlargement and hippocampal atrophy."),
    (2.0, "MRI shows moderate ventricular enlargement and hippocampal atrophy."),
    (math.inf, "MRI shows marked ventricular enlargement and hippocampal atrophy."),
)

Source = tuple[str, Path, Path]


# --------------------------------------------------------------------------- anatomy


@dataclass
class Anatomy:
    """A template on the base grid (RAS) with the regions the disease model changes."""

    base: torch.Tensor  # (X, Y, Z) intensities in [0, 1]
    ventricle_field: torch.Tensor  # (X, Y, Z) blurred ventricle fraction: thresholds grow them
    mtl: torch.Tensor  # (X, Y, Z) weight of hippocampi / medial temporal lobe in [0, 1]
    csf: float  # ventricle intensity


def mni_template_path() -> Path:
    """The MNI152 T1 template inside the installed nilearn, found without importing nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "template='mni' needs the MNI152 template shipped by nilearn: "
            "pip install --no-deps nilearn (or use template='phantom')"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / MNI_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: MNI152 template missing from nilearn; use template='phantom'"
        )
    return path


def _mm_coords(shape: Sequence[int]) -> torch.Tensor:
    """(3, X, Y, Z) MNI mm coordinates of base-grid voxel centres spanning the MNI box."""
    axes = [
        torch.tensor(
            MNI_ORIGIN[i] - 0.5 + (np.arange(n) + 0.5) * MNI_SHAPE[i] / n, dtype=torch.float32
        )
        for i, n in enumerate(shape)
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _ellipsoid(mm: torch.Tensor, centre: Sequence[float], radii: Sequence[float]) -> torch.Tensor:
    """Normalised ellipsoid distance (1 on the surface)."""
    d2 = sum(((mm[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    return torch.sqrt(d2)


def _soft(distance: torch.Tensor, width: float = 0.15) -> torch.Tensor:
    return torch.sigmoid((1.0 - distance) / width)


def _gaussian_blur(vol: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of an (X, Y, Z) tensor; sigma in voxels per axis."""
    out = vol[None, None]
    for axis, s in enumerate(sigma):
        radius = max(1, int(math.ceil(3 * s)))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x / max(s, 1e-3)) ** 2)
        kernel = kernel / kernel.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out[0, 0]


def _mtl_weight(mm: torch.Tensor) -> torch.Tensor:
    # Hippocampus + entorhinal cortex, both hemispheres (MNI mm).
    w = torch.zeros(mm.shape[1:])
    for x in (-26.0, 26.0):
        d = _ellipsoid(mm, (x, -22.0, -14.0), (8.0, 18.0, 9.0))
        w = torch.maximum(w, ((1.3 - d) / 0.6).clamp(0.0, 1.0))
    return w


def _finish(base: torch.Tensor, ventricles: torch.Tensor, mm: torch.Tensor, csf: float) -> Anatomy:
    voxel_mm = MNI_SHAPE / np.asarray(base.shape)
    field_ = _gaussian_blur(ventricles, [6.0 / v for v in voxel_mm])
    field_ = field_ / field_.max().clamp(min=1e-6)
    return Anatomy(base=base, ventricle_field=field_, mtl=_mtl_weight(mm), csf=csf)


def mni_anatomy(shape: Sequence[int]) -> Anatomy:
    """The real MNI152 T1 brain resampled to ``shape``, ventricles found by intensity."""
    img = nib.as_closest_canonical(nib.load(str(mni_template_path())))
    full = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32)) / 255.0
    x, y, z = (
        torch.from_numpy(img.affine[i, i] * np.arange(n) + img.affine[i, 3]).float()
        for i, n in enumerate(full.shape)
    )
    # Lateral + third ventricles: dark voxels in a deep central box, away from the cortex.
    box = (
        (x.abs() < 28)[:, None, None]
        & ((y > -45) & (y < 30))[None, :, None]
        & ((z > -5) & (z < 32))[None, None, :]
    )
    vent = ((full < 0.42) & (full > 0.02) & box).float()
    size = tuple(int(n) for n in shape)
    base = F.interpolate(full[None, None], size=size, mode="area")[0, 0]
    ventricles = F.interpolate(vent[None, None], size=size, mode="area")[0, 0]
    return _finish(base, ventricles, _mm_coords(size), csf=0.14)


def phantom_anatomy(shape: Sequence[int]) -> Anatomy:
    """A procedural head: scalp, skull, grey and white matter, ventricles, hippocampi."""
    mm = _mm_coords(shape)
    centre = (0.0, -18.0, 14.0)
    head = _ellipsoid(mm, centre, (88.0, 112.0, 92.0))
    brain = _ellipsoid(mm, centre, (72.0, 96.0, 76.0))
    white = _ellipsoid(mm, centre, (60.0, 82.0, 62.0))
    img = 0.55 * _soft(head, 0.02)  # scalp
    img = img * (1 - _soft(head / 0.94, 0.02)) + 0.08 * _soft(head / 0.94, 0.02)  # skull
    img = img * (1 - _soft(brain, 0.03)) + 0.62 * _soft(brain, 0.03)  # grey matter
    img = img * (1 - _soft(white, 0.04)) + 0.86 * _soft(white, 0.04)  # white matter
    ventricles = torch.zeros(mm.shape[1:])
    for x in (-11.0, 11.0):
        ventricles = torch.maximum(
            ventricles, _soft(_ellipsoid(mm, (x, -10.0, 14.0), (7.0, 28.0, 9.0)))
        )
    ventricles = torch.maximum(
        ventricles, _soft(_ellipsoid(mm, (0.0, -14.0, 0.0), (2.5, 12.0, 8.0)))
    )
    for x in (-26.0, 26.0):
        hippo = _soft(_ellipsoid(mm, (x, -22.0, -14.0), (6.0, 16.0, 7.0)))
        img = img * (1 - hippo) + 0.66 * hippo
    img = img * (1 - ventricles) + 0.08 * ventricles
    return _finish(img, ventricles, mm, csf=0.08)


def build_anatomy(template: str, shape: Sequence[int]) -> Anatomy:
    """The template anatomy on a base grid of ``shape`` ("mni" or "phantom")."""
    if template == "mni":
        return mni_anatomy(shape)
    if template == "phantom":
        return phantom_anatomy(shape)
    raise ValueError(f"unknown template {template!r}; expected 'mni' or 'phantom'")


@dataclass(frozen=True)
class Latents:
    """What a visit's anatomy is made of, drawn once: the image shows it, the table measures it.

    ``load_noise`` and ``atrophy_noise`` are this visit's deviations of the disease load and of
    the medial temporal lobe atrophy from what severity and age predict; ``head_scale`` is the
    subject's linear head size relative to the template (shared by all of its visits).
    """

    load_noise: float
    atrophy_noise: float
    head_scale: float


def draw_head_scale(rng: np.random.Generator, sex: str = "") -> float:
    """A subject's linear head size relative to the template: men's heads are larger."""
    mean = {"M": 1.025, "F": 0.975}.get(sex, 1.0)
    return float(np.clip(rng.normal(mean, 0.025), 0.92, 1.08))


def draw_latents(rng: np.random.Generator, head_scale: float | None = None) -> Latents:
    """One visit's latents; ``head_scale`` is the subject's, drawn here when not given."""
    load_noise = float(rng.normal(0.0, 0.35))
    atrophy_noise = float(rng.normal(0.0, 0.04))
    if head_scale is None:
        head_scale = draw_head_scale(rng)
    return Latents(load_noise, atrophy_noise, float(head_scale))


def disease_effects(severity: float, age: float, latents: Latents) -> tuple[float, float, float]:
    """(load, ventricle threshold, MTL atrophy) that ``synth_volume`` applies to the template.

    The load rises with severity and age; ventricles are the part of the ventricle field above
    the threshold (lower = larger), and the MTL loses ``atrophy`` of its intensity.
    """
    load = severity + 0.04 * (age - 72.0) + latents.load_noise
    threshold = float(np.clip(VENTRICLE_ZERO_LOAD - VENTRICLE_SLOPE * load, *VENTRICLE_THRESHOLDS))
    atrophy = float(np.clip(0.12 * load + latents.atrophy_noise, 0.0, 0.55))
    return load, threshold, atrophy


def synth_volume(
    anatomy: Anatomy,
    severity: float,
    age: float,
    rng: np.random.Generator,
    latents: Latents | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One subject's scan: (float32 RAS array, 4x4 RAS affine with 1.0-1.5 mm voxels).

    ``severity`` ~0 NC, ~1 MCI, ~2 AD. Ventricles enlarge and the MTL darkens with severity
    and age, with per-subject noise, head pose, intensity scale, bias field and noise.
    ``latents`` fixes the anatomy (load and atrophy noise, head size) so that a table can
    measure the same anatomy; without it they are drawn from ``rng`` here.
    """
    base_shape = np.asarray(anatomy.base.shape)
    # Drawn in the order this function always drew them, so that a seed keeps its volume.
    load_noise = rng.normal(0.0, 0.35) if latents is None else latents.load_noise
    atrophy_noise = rng.normal(0.0, 0.04) if latents is None else latents.atrophy_noise
    _, t, atrophy = disease_effects(
        severity, age, Latents(float(load_noise), float(atrophy_noise), 1.0)
    )
    w_vent = torch.sigmoid((anatomy.ventricle_field - t) / VENTRICLE_WIDTH)
    img = anatomy.base * (1 - w_vent) + anatomy.csf * w_vent
    img = img * (1 - atrophy * anatomy.mtl)
    img = img.clamp(min=0) ** float(rng.uniform(0.85, 1.15))

    # Voxel spacing (base-voxel units = mm in the written affine), sometimes anisotropic.
    spacing = np.full(3, rng.uniform(1.0, 1.5))
    if rng.random() < 0.4:
        spacing[rng.integers(3)] = rng.uniform(1.0, 1.5)
    n_out = np.maximum(8, np.round(base_shape / spacing)).astype(int)
    axes = [
        torch.tensor((np.arange(n) + 0.5) * s - n * s / 2, dtype=torch.float32)
        for n, s in zip(n_out, spacing, strict=True)
    ]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (X, Y, Z, 3)
    # Head pose: small rotation, size and shift, as between real subjects and sessions.
    angles = np.deg2rad(rng.uniform(-6, 6, 3))
    head_scale = rng.uniform(0.93, 1.07) if latents is None else latents.head_scale
    rot = _rotation(angles) / head_scale  # sampling at p / s shows the head s times larger
    shift = rng.uniform(-0.04, 0.04, 3) * base_shape
    p = coords @ torch.tensor(rot.T, dtype=torch.float32) + torch.tensor(shift, dtype=torch.float32)
    grid = (p / torch.tensor(base_shape / 2, dtype=torch.float32)).flip(-1)  # grid is (z, y, x)
    out = F.grid_sample(img[None, None], grid[None], mode="bilinear", align_corners=False)[0, 0]

    # Scanner: intensity scale, smooth bias field, Rician-like noise.
    direction = rng.normal(size=3)
    unit = coords / torch.tensor(base_shape / 2, dtype=torch.float32)
    bias = torch.exp(
        0.15 * (unit @ torch.tensor(direction / np.linalg.norm(direction), dtype=torch.float32))
    )
    scale = rng.uniform(300.0, 1200.0)
    noise = torch.from_numpy(
        rng.normal(0.0, rng.uniform(0.01, 0.035), out.shape).astype(np.float32)
    )
    data = ((out * bias + noise).abs() * scale).numpy().astype(np.float32)

    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = -n_out * spacing / 2 + spacing / 2 + rng.uniform(-5, 5, 3)
    return data, affine


class VentricleCurve:
    """An anatomy's ventricle volume as a function of the threshold, relative to load 0.

    The soft ventricle mask ``synth_volume`` paints, summed over the base grid once per
    threshold on a fine grid and interpolated, so that every visit is cheap to measure. The
    mask's floor far from the ventricles (sigmoid(-t / width), a faint overall darkening, not
    ventricle) is taken off, so the volume is that of the visibly enlarged ventricles.
    """

    def __init__(self, anatomy: Anatomy, steps: int = 123) -> None:
        self.thresholds = np.linspace(*VENTRICLE_THRESHOLDS, steps)
        volumes = np.array([self._volume(anatomy, t) for t in self.thresholds])
        self.relative = volumes / max(self._volume(anatomy, VENTRICLE_ZERO_LOAD), 1e-6)

    @staticmethod
    def _volume(anatomy: Anatomy, threshold: float) -> float:
        mask = torch.sigmoid((anatomy.ventricle_field - threshold) / VENTRICLE_WIDTH)
        floor = 1.0 / (1.0 + math.exp(threshold / VENTRICLE_WIDTH))
        return float(((mask - floor) / (1.0 - floor)).sum())

    def __call__(self, threshold: float) -> float:
        return float(np.interp(threshold, self.thresholds, self.relative))


@dataclass(frozen=True)
class Morphometry:
    """A visit's true image-derived measures: what FreeSurfer (ADNIMERGE) or the OASIS atlas
    registration would report without measurement error, in the tables' units."""

    load: float  # disease load (severity + age + noise) before the image's clipping
    shown_load: float  # the load the ventricles show (the threshold's load, within its clip)
    ventricle_ratio: float  # ventricle volume painted in the image relative to load 0
    atrophy: float  # fraction of MTL intensity removed
    ventricles: float  # mm3
    hippocampus: float  # mm3
    whole_brain: float  # mm3
    icv: float  # mm3
    etiv: float  # cm3
    nwbv: float  # whole brain / estimated intracranial volume


def morphometry(
    curve: VentricleCurve, severity: float, age: float, latents: Latents
) -> Morphometry:
    """The image-derived measures of the anatomy ``synth_volume`` draws with ``latents``.

    Volumes scale with the head size cubed; ventricles grow with the ventricle volume actually
    painted, the hippocampus shrinks with the MTL atrophy applied, whole brain volume and
    nWBV fall with the load the image shows (which includes age).
    """
    load, threshold, atrophy = disease_effects(severity, age, latents)
    shown = (VENTRICLE_ZERO_LOAD - threshold) / VENTRICLE_SLOPE
    ratio = curve(threshold)
    cube = latents.head_scale**3
    return Morphometry(
        load=load,
        shown_load=shown,
        ventricle_ratio=ratio,
        atrophy=atrophy,
        ventricles=REF_VENTRICLES_MM3 * cube * ratio**VENTRICLE_POWER,
        hippocampus=REF_HIPPOCAMPUS_MM3 * cube * (1.0 - 0.7 * atrophy),
        whole_brain=REF_WHOLE_BRAIN_MM3 * cube * (1.0 - 0.035 * shown),
        icv=REF_ICV_MM3 * cube,
        etiv=REF_ETIV_CM3 * cube,
        nwbv=REF_NWBV * (1.0 - 0.04 * shown),
    )


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def reorient(
    data: np.ndarray, affine: np.ndarray, axcodes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Store a RAS array in another voxel order (e.g. LPS, PSR); the world stays the same."""
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(tuple(axcodes)))
    new_data = apply_orientation(data, transform)
    new_affine = affine @ inv_ornt_aff(transform, data.shape)
    return np.ascontiguousarray(new_data), new_affine


# --------------------------------------------------------------------------- clinical model


@dataclass
class Visit:
    """One imaged (or, for ADNI, table-only) visit of a synthetic subject."""

    index: int
    years: float  # since baseline
    severity: float
    diagnosis: str  # NC / MCI / AD (latent, before cohort-specific coding)
    age: float
    mmse: int
    cdr: float
    cdr_sb: float
    logical_memory: int
    imaged: bool = True
    image_path: Path | None = None
    image_id: str = ""
    corrupt: str = ""
    latents: Latents | None = None  # the anatomy, drawn once (see _set_anatomy)
    truth: Morphometry | None = None  # its image-derived measures, before measurement noise


@dataclass
class Subject:
    """A synthetic subject: identity, demographics and visits."""

    cohort: str
    sid: str
    sex: str  # "F" / "M"
    education: int
    visits: list[Visit] = field(default_factory=list)


def _dx(severity: float, first: str) -> str:
    # Diagnosis only moves forward: a converter never goes back.
    order = ("NC", "MCI", "AD")
    by_severity = "NC" if severity < 0.7 else "MCI" if severity < 1.6 else "AD"
    return order[max(order.index(first), order.index(by_severity))]


def _scores(dx: str, rng: np.random.Generator) -> tuple[int, float, float, int]:
    """(MMSE, CDR global, CDR sum of boxes, logical memory) for a diagnosis, overlapping."""
    if dx == "NC":
        mmse = rng.normal(29, 1)
        cdr = rng.choice([0.0, 0.5], p=[0.92, 0.08])
        cdr_sb = rng.choice([0.0, 0.0, 0.0, 0.5])
        lm = rng.normal(13, 3.5)
    elif dx == "MCI":
        mmse = rng.normal(27, 2)
        cdr = rng.choice([0.0, 0.5, 1.0], p=[0.08, 0.87, 0.05])
        cdr_sb = 0.5 * rng.integers(1, 9)
        lm = rng.normal(6, 3)
    else:
        mmse = rng.normal(22, 4)
        cdr = rng.choice([0.5, 1.0, 2.0, 3.0], p=[0.2, 0.55, 0.2, 0.05])
        cdr_sb = 0.5 * rng.integers(6, 25)
        lm = rng.normal(2.5, 2)
    return (
        int(np.clip(round(mmse), 0, 30)),
        float(cdr),
        float(cdr_sb),
        int(np.clip(round(lm), 0, 25)),
    )


def _make_subject(cohort: str, index: int, rng: np.random.Generator) -> Subject:
    if cohort == "MIRIAD":  # controls and AD only
        first = rng.choice(["NC", "AD"], p=[0.35, 0.65])
    else:
        first = rng.choice(["NC", "MCI", "AD"], p=[0.4, 0.3, 0.3])
    s0 = {"NC": rng.uniform(-0.4, 0.5), "MCI": rng.uniform(0.7, 1.4), "AD": rng.uniform(1.6, 2.6)}[
        first
    ]
    rate = {"NC": 0.06, "MCI": 0.25, "AD": 0.3}[first]
    demo = DEMOGRAPHICS[first]
    age0 = float(np.clip(rng.normal(demo["age"], 7), 55, 92))
    sid = {
        "ADNI": f"{rng.integers(2, 150):03d}_S_{1000 + index:04d}",
        "OASIS-2": f"OAS2_{index + 1:04d}",
        "NACC": f"NACC{100000 + 37 * index:06d}",
        "AIBL": f"{10 + index}",
        "MIRIAD": f"miriad_{188 + index:03d}",
    }[cohort]
    sex = str(rng.choice(["F", "M"], p=[demo["female"], 1.0 - demo["female"]]))
    subject = Subject(
        cohort, sid, sex, int(np.clip(round(rng.normal(demo["education"], 3)), 6, 20))
    )
    n_visits = int(rng.integers(1, 4))
    years = 0.0
    for v in range(n_visits):
        severity = s0 + rate * years + rng.normal(0, 0.05)
        dx = _dx(severity, first) if cohort != "MIRIAD" else first
        mmse, cdr, cdr_sb, lm = _scores(dx, rng)
        subject.visits.append(
            Visit(v, years, severity, dx, round(age0 + years, 1), mmse, cdr, cdr_sb, lm)
        )
        years += float(rng.choice([0.5, 1.0, 1.5, 2.0]))
    return subject


def _set_anatomy(
    subject: Subject, seed: int, cohort: str, index: int, curve: VentricleCurve
) -> None:
    """Draw each visit's latents from its own stream (the head size from the subject's) and
    measure them, before any table or volume is written."""
    stream = [seed, COHORTS.index(cohort), index]
    head = draw_head_scale(np.random.default_rng([*stream, 3]), subject.sex)
    for visit in subject.visits:
        visit.latents = draw_latents(np.random.default_rng([*stream, visit.index, 5]), head)
        visit.truth = morphometry(curve, visit.severity, visit.age, visit.latents)


def _measured(value: float, rng: np.random.Generator, relative_sd: float) -> int:
    """An integer measurement of ``value`` with a few percent of error."""
    return int(round(value * (1.0 + rng.normal(0.0, relative_sd))))


def _freesurfer(visit: Visit, rng: np.random.Generator) -> dict[str, int | None]:
    """ADNIMERGE's FreeSurfer columns for a visit: empty without an MRI or when the run
    failed QC (~10%); Hippocampus alone is sometimes missing too."""
    columns = ("Ventricles", "Hippocampus", "WholeBrain", "ICV")
    if not visit.imaged or _missing(rng, 0.1):
        return dict.fromkeys(columns)
    truth = _truth(visit)
    return {
        "Ventricles": _measured(truth.ventricles, rng, 0.03),
        "Hippocampus": None if _missing(rng, 0.04) else _measured(truth.hippocampus, rng, 0.03),
        "WholeBrain": _measured(truth.whole_brain, rng, 0.01),
        "ICV": _measured(truth.icv, rng, 0.015),
    }


def _truth(visit: Visit) -> Morphometry:
    if visit.truth is None:
        raise RuntimeError(f"visit {visit.index} has no anatomy: _set_anatomy was not run")
    return visit.truth


def _mri_impression(load: float) -> str:
    return next(text for bound, text in MRI_IMPRESSIONS if load < bound)


def _missing(rng: np.random.Generator, rate: float) -> bool:
    return bool(rng.random() < rate)


def _summary(dx: str, rng: np.random.Generator, impression: str = "") -> str:
    phrases: list[str] = []
    for _ in range(int(rng.integers(2, 13))):
        # Mostly phrases of the subject's state, sometimes another state's: noisy, like notes.
        pool = dx if rng.random() < 0.6 else str(rng.choice(["NC", "MCI", "AD", "any", "any"]))
        phrases.append(str(rng.choice(SUMMARY_PHRASES[pool])))
    if impression:  # early in the note, so that the word limit keeps it
        phrases.insert(int(rng.integers(0, min(3, len(phrases)) + 1)), impression)
    return " ".join(phrases)


# --------------------------------------------------------------------------- writing volumes


def _save(
    data: np.ndarray,
    affine: np.ndarray,
    path: Path,
    corrupt: str,
    rng: np.random.Generator,
    pair: bool = False,
    int16: bool = True,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if corrupt == "missing_image":
        return
    if corrupt == "garbage":
        path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        return
    if corrupt == "nan":
        data = data.copy()
        flat = data.reshape(-1)
        flat[rng.choice(flat.size, size=max(1, flat.size // 100), replace=False)] = np.nan
        int16 = False
    array = np.round(data).astype(np.int16) if int16 else data.astype(np.float32)
    if pair:
        # OASIS-2 RAW volumes are stored (X, Y, Z, 1).
        nib.save(nib.Nifti1Pair(array[..., None], affine), str(path))
    else:
        nib.save(nib.Nifti1Image(array, affine), str(path))
    if corrupt == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[: max(400, int(len(raw) * 0.4))])


def _volume(
    anatomy: Anatomy, visit: Visit, seed: int, cohort: str, subject: int
) -> tuple[np.ndarray, np.ndarray]:
    # A stream per volume: changing one volume (or the corruption plan) leaves the others alone.
    rng = np.random.default_rng([seed, COHORTS.index(cohort), subject, visit.index, 7])
    data, affine = synth_volume(anatomy, visit.severity, visit.age, rng, latents=visit.latents)
    axcodes = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    return reorient(data, affine, axcodes)


# --------------------------------------------------------------------------- cohorts


def _write_csv(path: Path, header: Sequence[str], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(header))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in header})


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _write_adni(root: Path, subjects: list[Subject], rng: np.random.Generator) -> Source:
    folder = root / "ADNI"
    images = folder / "ADNI"
    header = [
        "RID", "COLPROT", "ORIGPROT", "PTID", "SITE", "VISCODE", "EXAMDATE", "DX_bl", "AGE",
        "PTGENDER", "PTEDUCAT", "PTETHCAT", "PTRACCAT", "PTMARRY", "APOE4", "FDG", "AV45",
        "CDRSB", "ADAS11", "ADAS13", "MMSE", "RAVLT_immediate", "LDELTOTAL", "FAQ", "Ventricles",
        "Hippocampus", "WholeBrain", "ICV", "DX", "EXAMDATE_bl", "Years_bl", "Month_bl", "Month",
        "M", "update_stamp",
    ]  # fmt: skip
    rows: list[dict[str, Any]] = []
    image_number = 10000
    for subj in subjects:
        rid = int(subj.sid.split("_")[-1])
        protocol = str(rng.choice(["ADNI1", "ADNIGO", "ADNI2", "ADNI3"]))
        start = date(2005, 9, 1) + timedelta(days=int(rng.integers(0, 9 * 365)))
        first = subj.visits[0].diagnosis
        dx_bl = {
            "NC": str(rng.choice(["CN", "CN", "SMC"])),
            "MCI": str(rng.choice(["EMCI", "LMCI"])),
            "AD": "AD",
        }[first]
        apoe4 = int(
            rng.choice([0, 1, 2], p=[0.6, 0.3, 0.1] if first == "NC" else [0.35, 0.45, 0.2])
        )
        race = str(rng.choice(["White", "White", "Black", "Asian"]))
        married = str(rng.choice(["Married", "Widowed", "Divorced", "Never married"]))
        visits = list(subj.visits)
        # ADNIMERGE has visits without MRI (e.g. m03, m18): rows the adapter must count, not reject.
        for _ in range(int(rng.integers(0, 3))):
            last, step = visits[-1], 0.25  # a quarterly clinic visit after the last scan
            visits.append(
                replace(
                    last,
                    index=len(visits),
                    years=last.years + step,
                    age=round(last.age + step, 1),
                    imaged=False,
                    image_path=None,
                    image_id="",
                    corrupt="",
                )
            )
        for visit in visits:
            months = int(round(visit.years * 12))
            viscode = "bl" if months == 0 else f"m{months:02d}"
            jitter = 0 if months == 0 else int(rng.integers(-10, 11))
            exam = start + timedelta(days=int(round(visit.years * 365.25)) + jitter)
            adas11 = max(0.0, rng.normal(6 + 5 * visit.severity, 3))
            dx = {"NC": "CN", "MCI": "MCI", "AD": "Dementia"}[visit.diagnosis]
            if not visit.imaged:
                dx = dx if rng.random() < 0.6 else ""  # DX is often empty at non-exam visits
            if visit.corrupt == "unknown_diagnosis":
                dx = "Other"
            lm_missing, mmse_missing = _missing(rng, 0.2), _missing(rng, 0.15)
            rows.append(
                {
                    "RID": rid, "COLPROT": protocol, "ORIGPROT": protocol, "PTID": subj.sid,
                    "SITE": int(subj.sid[:3]), "VISCODE": viscode, "EXAMDATE": exam.isoformat(),
                    "DX_bl": dx_bl, "AGE": subj.visits[0].age,
                    "PTGENDER": "Female" if subj.sex == "F" else "Male",
                    "PTEDUCAT": None if _missing(rng, 0.15) else subj.education,
                    "PTETHCAT": "Not Hisp/Latino", "PTRACCAT": race, "PTMARRY": married,
                    "APOE4": apoe4, "FDG": None, "AV45": None if rng.random() < 0.7 else round(rng.normal(1.2, 0.2), 4),
                    "CDRSB": None if _missing(rng, 0.15) else _fmt(visit.cdr_sb),
                    "ADAS11": round(adas11, 2), "ADAS13": round(adas11 + abs(rng.normal(5, 2)), 2),
                    "MMSE": None if mmse_missing else visit.mmse,
                    "RAVLT_immediate": int(np.clip(rng.normal(45 - 10 * visit.severity, 8), 0, 75)),
                    "LDELTOTAL": None if lm_missing else visit.logical_memory,
                    "FAQ": int(np.clip(rng.normal(6 * visit.severity, 3), 0, 30)),
                    **_freesurfer(visit, rng),
                    "DX": dx, "EXAMDATE_bl": start.isoformat(), "Years_bl": round(visit.years, 4),
                    "Month_bl": round(visit.years * 12, 4), "Month": months, "M": months,
                    "update_stamp": "2024-04-10 05:55:39.0",
                }
            )  # fmt: skip
            if not visit.imaged:
                continue
            image_number += int(rng.integers(1, 40))
            series = str(
                rng.choice(["MPRAGE", "MP-RAGE", "MPRAGE_Repeat", "Accelerated_Sagittal_MPRAGE"])
            )
            acquired = exam + timedelta(days=int(rng.integers(-25, 26)))
            stamp = f"{acquired.isoformat()}_{int(rng.integers(7, 18)):02d}_{int(rng.integers(0, 60)):02d}_{int(rng.integers(0, 60)):02d}.0"
            image_id = f"I{image_number}"
            raw_stamp = acquired.strftime("%Y%m%d") + f"{int(rng.integers(0, 10**9)):09d}"
            name = f"ADNI_{subj.sid}_MR_{series}_br_raw_{raw_stamp}_1_S{image_number - 300}_{image_id}.nii"
            visit.image_path = images / subj.sid / series / stamp / image_id / name
            visit.image_id = image_id
    # Images are written after the visit table exists so corruptions can refer to paths.
    _write_csv(folder / "ADNIMERGE.csv", header, rows)
    return ("adnimerge", folder / "ADNIMERGE.csv", images)


def _write_oasis(root: Path, subjects: list[Subject], rng: np.random.Generator) -> Source:
    folder = root / "OASIS-2"
    images = folder / "OAS2_RAW_PART1"
    header = ["Subject ID", "MRI ID", "Group", "Visit", "MR Delay", "M/F", "Hand", "Age",
              "EDUC", "SES", "MMSE", "CDR", "eTIV", "nWBV", "ASF"]  # fmt: skip
    rows: list[dict[str, Any]] = []
    for subj in subjects:
        # OASIS-2 codes only demented or not: MCI-level visits are "demented" with CDR 0.5.
        coded = ["NC" if v.diagnosis == "NC" else "AD" for v in subj.visits]
        group = (
            "Nondemented"
            if set(coded) == {"NC"}
            else "Demented"
            if coded[0] == "AD"
            else "Converted"
        )
        if any(v.corrupt == "unknown_diagnosis" for v in subj.visits):
            group = "Uncertain"
        ses = None if _missing(rng, 0.2) else int(rng.integers(1, 6))
        for v, dx in zip(subj.visits, coded, strict=True):
            mri_id = f"{subj.sid}_MR{v.index + 1}"
            cdr = 0.0 if dx == "NC" else max(0.5, v.cdr)
            # Measured from this visit's scan: eTIV by the atlas fit, nWBV by segmentation.
            truth = _truth(v)
            etiv = _measured(truth.etiv, rng, 0.01)
            nwbv = truth.nwbv + rng.normal(0.0, 0.004)
            rows.append(
                {
                    "Subject ID": subj.sid, "MRI ID": mri_id, "Group": group, "Visit": v.index + 1,
                    "MR Delay": int(round(v.years * 365.25)), "M/F": subj.sex, "Hand": "R",
                    "Age": int(v.age), "EDUC": subj.education, "SES": ses,
                    "MMSE": None if _missing(rng, 0.15) else v.mmse, "CDR": _fmt(cdr),
                    "eTIV": etiv, "nWBV": round(nwbv, 3), "ASF": round(1755.0 / etiv, 3),
                }
            )  # fmt: skip
            v.image_path = images / mri_id / "RAW" / "mpr-1.nifti.img"
            v.image_id = mri_id
    _write_csv(folder / "oasis_longitudinal.csv", header, rows)
    return ("oasis2", folder / "oasis_longitudinal.csv", images)


def _write_generic(
    root: Path, cohort: str, subjects: list[Subject], rng: np.random.Generator
) -> Source:
    folder = root / cohort
    header = ["subject_id", "image_path", "cohort", "diagnosis", "visit", "age", "sex"]
    if cohort == "NACC":
        header += [
            "education_years",
            "mmse",
            "cdr",
            "cdr_sb",
            "logical_memory",
            "summary",
            "apoe4_alleles",
        ]
    elif cohort == "AIBL":
        header += ["mmse", "cdr", "logical_memory", "apoe_genotype"]
    else:
        header += ["mmse"]
    # Tables in the wild spell the same diagnosis several ways.
    spellings = {"NC": ["NC", "CN", "cn"], "MCI": ["MCI", "mci"], "AD": ["AD", "Dementia", "ad"]}
    rows: list[dict[str, Any]] = []
    for subj in subjects:
        apoe = int(
            rng.choice(
                [0, 1, 2],
                p=[0.6, 0.3, 0.1] if subj.visits[0].diagnosis == "NC" else [0.35, 0.45, 0.2],
            )
        )
        for v in subj.visits:
            visit = (
                str(v.index + 1)
                if cohort != "AIBL"
                else ("bl" if v.index == 0 else f"m{18 * v.index}")
            )
            rel = f"images/{subj.sid}/{subj.sid}_v{visit}.nii.gz"
            dx = (
                "FTD"
                if v.corrupt == "unknown_diagnosis"
                else str(rng.choice(spellings[v.diagnosis]))
            )
            impression = ""
            if cohort == "NACC" and rng.random() < 0.7:
                impression = _mri_impression(_truth(v).load)
            row: dict[str, Any] = {
                "subject_id": subj.sid, "image_path": rel, "cohort": cohort, "diagnosis": dx,
                "visit": visit, "age": v.age, "sex": subj.sex, "education_years": subj.education,
                "mmse": v.mmse, "cdr": _fmt(v.cdr), "cdr_sb": _fmt(v.cdr_sb),
                "logical_memory": v.logical_memory, "summary": _summary(v.diagnosis, rng, impression),
                "apoe4_alleles": apoe, "apoe_genotype": ["E3/E3", "E3/E4", "E4/E4"][apoe],
            }  # fmt: skip
            optional = [
                k
                for k in header
                if k not in ("subject_id", "image_path", "cohort", "diagnosis", "visit")
            ]
            rate = rng.uniform(0.15, 0.25)
            dropped = [k for k in optional if _missing(rng, rate)]
            if len(dropped) == len(optional):  # keep some text: an empty record is a different test
                dropped.remove("age")
            for k in dropped:
                row[k] = None
            rows.append(row)
            v.image_path = folder / rel
            v.image_id = f"{subj.sid}_v{visit}"
    _write_csv(folder / "clinical.csv", header, rows)
    return ("generic", folder / "clinical.csv", folder)


def _plan_corruptions(
    cohorts: dict[str, list[Subject]], count: int, rng: np.random.Generator
) -> list[tuple[str, Subject, Visit]]:
    """Spread ``count`` corruptions over kinds and cohorts, one per distinct visit."""
    kinds = list(CORRUPTIONS)
    imaged = {c: [(s, v) for s in subs for v in s.visits] for c, subs in cohorts.items()}
    capacity = sum(len(x) for x in imaged.values())
    if count > capacity // 2:
        raise ValueError(
            f"corrupt={count} is too many for {capacity} volumes; use at most {capacity // 2}"
        )
    used = dict.fromkeys(cohorts, 0)
    plan: list[tuple[str, Subject, Visit]] = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        # A truncated .nii.gz needs a gzip cohort; an OASIS Group is per subject, so its
        # unknown diagnosis would reject all of that subject's visits: keep it elsewhere.
        allowed = GZ_COHORTS if kind == "truncated" else COHORTS
        if kind == "unknown_diagnosis":
            allowed = tuple(c for c in COHORTS if c != "OASIS-2")
        allowed = tuple(c for c in allowed if any(not v.corrupt for _, v in imaged[c]))
        if not allowed:  # preferred cohorts are full: any cohort with a clean visit will do
            allowed = tuple(c for c in COHORTS if any(not v.corrupt for _, v in imaged[c]))
        cohort = min(allowed, key=lambda c: (used[c], (COHORTS.index(c) - i) % len(COHORTS)))
        free = [(s, v) for s, v in imaged[cohort] if not v.corrupt]
        subject, visit = free[int(rng.integers(len(free)))]
        visit.corrupt = kind
        used[cohort] += 1
        plan.append((kind, subject, visit))
    return plan


def generate_ad_cohort(
    root: str | Path,
    subjects_per_cohort: int = 40,
    shape: Sequence[int] = (64, 76, 64),
    seed: int = 0,
    corrupt: int = 0,
    template: str = "mni",
) -> list[Source]:
    """Write a synthetic ADNI / OASIS-2 / NACC / AIBL / MIRIAD cohort under ``root``.

    Each cohort gets ``subjects_per_cohort`` subjects with 1-3 visits. ``corrupt`` bad cases
    (truncated .nii.gz, garbage file, NaN voxels, missing image, unknown diagnosis) are spread
    over the cohorts and listed in <root>/corruptions.json with the reject reason expected.
    Returns the (fmt, table, images_root) sources, also saved to <root>/sources.json.
    """
    if subjects_per_cohort < 1:
        raise ValueError(f"subjects_per_cohort must be >= 1, got {subjects_per_cohort}")
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes >= 8, got {tuple(shape)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    # The per-volume ops are small: extra threads gain little, and their spin-waits slow
    # generation several-fold when the cores are shared (measured 16 s vs 55 s under load).
    torch.set_num_threads(1)
    try:
        return _generate(root, subjects_per_cohort, shape, seed, corrupt, template)
    finally:
        torch.set_num_threads(threads)


def _generate(
    root: Path,
    subjects_per_cohort: int,
    shape: Sequence[int],
    seed: int,
    corrupt: int,
    template: str,
) -> list[Source]:
    anatomy = build_anatomy(template, shape)
    rng = np.random.default_rng(seed)
    cohorts = {c: [_make_subject(c, i, rng) for i in range(subjects_per_cohort)] for c in COHORTS}
    curve = VentricleCurve(anatomy)
    for cohort, subjects in cohorts.items():
        for si, subj in enumerate(subjects):
            _set_anatomy(subj, seed, cohort, si, curve)
    plan = _plan_corruptions(cohorts, corrupt, rng)

    sources = [
        _write_adni(root, cohorts["ADNI"], rng),
        _write_oasis(root, cohorts["OASIS-2"], rng),
        *(_write_generic(root, c, cohorts[c], rng) for c in GZ_COHORTS),
    ]
    for cohort, subjects in cohorts.items():
        for si, subj in enumerate(subjects):
            for visit in subj.visits:
                if visit.image_path is None:
                    continue
                data, affine = _volume(anatomy, visit, seed, cohort, si)
                vol_rng = np.random.default_rng([seed, COHORTS.index(cohort), si, visit.index, 11])
                _save(
                    data,
                    affine,
                    visit.image_path,
                    visit.corrupt if visit.corrupt != "unknown_diagnosis" else "",
                    vol_rng,
                    pair=cohort == "OASIS-2",
                    int16=cohort != "NACC",
                )

    corruptions = [
        {
            "kind": kind,
            "reason": CORRUPTIONS[kind],
            "cohort": subj.cohort,
            "subject": subj.sid,
            "image_id": visit.image_id,
            "image_path": str(visit.image_path),
        }
        for kind, subj, visit in plan
    ]
    (root / "corruptions.json").write_text(json.dumps(corruptions, indent=2) + "\n")
    record = {
        "sources": [
            [fmt, os.path.relpath(t, root), os.path.relpath(i, root)] for fmt, t, i in sources
        ],
        "generator": {
            "subjects_per_cohort": subjects_per_cohort,
            "shape": list(shape),
            "seed": seed,
            "corrupt": corrupt,
            "template": template,
        },
    }
    (root / "sources.json").write_text(json.dumps(record, indent=2) + "\n")
    n_volumes = sum(1 for subs in cohorts.values() for s in subs for v in s.visits if v.image_path)
    n_subjects = sum(map(len, cohorts.values()))
    log.info(
        "synthetic AD: %d subjects, %d volumes, %d corrupt -> %s",
        n_subjects,
        n_volumes,
        corrupt,
        root,
    )
    return sources
