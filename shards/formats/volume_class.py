"""Format medalign-ad-v1: a 3-D volume, a text and one class label per sample.

Written by shards/ad_writer.py (the Alzheimer's cohorts: NC / MCI / AD) and by
shards/hf_source.py (any dataset of volumes with one class column). A sample's members:

  __key__   unique within the dataset; characters outside [A-Za-z0-9_-] replaced by "_"
  vol.npy   float16 (S, S, S) volume in [0, 1] (RAS for NIfTI sources)
  txt       the text (utf-8; clinical records rendered by shards/clinical.py)
  json      label (an index into the manifest's label_names), split, subject, cohort, binary
            (the cohort publishes NC vs impaired only), source_path; AD writers add image_id,
            visit, diagnosis and fields (the clinical fields the text was rendered from)

Manifest: volume_size (S), label_names (default NC, MCI, AD), word_limit (AD writers).
Batch keys: image (B, 1, S, S, S) float16 as stored (float32 for other dtypes), label (B,) long
(data.label_mode: three_class, or binary: 0 vs the rest), binary (B,) bool, subject / cohort /
split (lists of str).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from shards.clinical import check_groups, render_text
from shards.formats import ShardFormat, register

AD_LABEL_NAMES = ("NC", "MCI", "AD")
MEMBERS = ("vol.npy", "txt", "json")  # a sample's tar members
BINARY_NAMES = ("NC", "impaired")


@dataclass
class ClinicalTextConfig:
    """medalign-ad-v1 only: the clinical text rendered again at load time from the fields the
    shards store (shards/clinical.py), so an ablation needs no new shards."""

    # Field groups left out of the text: any of demographics, lab_results, summary,
    # imaging_measures, other (shards.clinical.FIELD_GROUPS). A sample left with no field keeps
    # an empty text, so every ablation scores the same samples.
    drop: list[str] = field(default_factory=list)
    summary_words: int = (
        0  # narrative summary cut to this many words; 0: as the shards were written
    )

    def __post_init__(self) -> None:
        check_groups(self.drop, "drop")
        if self.summary_words < 0:
            raise ValueError(f"summary_words={self.summary_words}: expected >= 0 (0: as written)")

    @property
    def active(self) -> bool:
        return bool(self.drop) or self.summary_words > 0


# The largest header of a version 1.0 .npy file (magic, version, 2-byte length, 65535 bytes).
_NPY_HEADER_MAX = 10 + 65535
_CHUNK = 1 << 18  # elements per finiteness test: temporaries stay small and cache-resident


def npy_array(data: bytes | memoryview, where: str) -> np.ndarray:
    """An .npy member as an array over ``data`` itself (no copy: read-only when ``data`` is).

    np.load would copy the bytes twice through 256 KB blocks; here the batch's stack is the
    only copy of a volume. Raises ValueError naming ``where`` for anything but a complete,
    numeric .npy.
    """
    head = io.BytesIO(bytes(data[:_NPY_HEADER_MAX]))
    try:
        version = np.lib.format.read_magic(head)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(head)
    except ValueError as exn:
        raise ValueError(f"{where} is not a readable .npy file ({exn})") from exn
    if dtype.hasobject:
        raise ValueError(f"{where} holds Python objects (dtype {dtype}); expected numbers")
    count = math.prod(shape)
    if head.tell() + count * dtype.itemsize != len(data):
        raise ValueError(
            f"{where} has {len(data) - head.tell()} data bytes; shape {shape} of {dtype} "
            f"needs {count * dtype.itemsize}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=head.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C")


def _all_finite(volume: np.ndarray) -> bool:
    flat = volume.reshape(-1, order="A")  # a view for C- or Fortran-ordered arrays
    if flat.dtype != np.float16:
        return bool(np.isfinite(flat).all())
    bits = flat.view(np.uint16)  # inf / nan: all exponent bits set; 10x np.isfinite's speed
    return not any(
        ((bits[i : i + _CHUNK] & 0x7C00) == 0x7C00).any() for i in range(0, bits.size, _CHUNK)
    )


def clinical_text(meta: dict[str, Any], clinical: ClinicalTextConfig, word_limit: int) -> str:
    """The sample's text rendered again from its stored fields (``meta["fields"]``), without
    the field groups in ``clinical.drop`` and with the summary cut to ``clinical.summary_words``
    (or the writer's ``word_limit``); the same renderer as the writer's, so with nothing
    dropped it reproduces the stored text."""
    fields = meta.get("fields")
    if not isinstance(fields, dict):
        raise ValueError("has no 'fields' object in its json; data.clinical needs them")
    words = clinical.summary_words or word_limit
    return render_text(fields, word_limit=words, drop=clinical.drop, allow_empty=True)


def decode_sample(
    raw: dict[str, Any],
    label_mode: str,
    clinical: ClinicalTextConfig | None = None,
    word_limit: int = 64,
    num_classes: int = 3,
) -> dict[str, Any]:
    """Decodes one tar sample of format medalign-ad-v1; raises ValueError naming what is wrong.

    ``num_classes``: how many label names the manifest has (the label is an index into them).
    With an active ``clinical`` config the text is rendered again from the stored fields
    (``word_limit``: the writer's summary limit, from the manifest)."""
    key = raw.get("__key__", "?")
    url = raw.get("__url__", "?")
    for member in MEMBERS:
        if member not in raw:
            raise ValueError(f"{url}: sample {key} has no '{member}' member")
    volume = npy_array(raw["vol.npy"], f"{url}: sample {key} vol.npy")
    if volume.ndim != 3:
        raise ValueError(f"{url}: sample {key} volume has shape {volume.shape}, expected 3-D")
    if not _all_finite(volume):
        raise ValueError(f"{url}: sample {key} volume has non-finite voxels")
    # float16 volumes stay float16 up to the device (half the bytes to stack, to pass between
    # loader processes and to copy); trainer.loop.Mover casts them there.
    if volume.dtype != np.float16:
        volume = volume.astype(np.float32)
    text = raw["txt"].decode("utf-8").strip()
    if not text:
        raise ValueError(f"{url}: sample {key} has empty text")
    meta = json.loads(raw["json"])
    if clinical is not None and clinical.active:
        try:
            text = clinical_text(meta, clinical, word_limit)
        except ValueError as exn:
            raise ValueError(f"{url}: sample {key} {exn}") from exn
    label = meta.get("label")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes:
        raise ValueError(
            f"{url}: sample {key} label={label!r}, expected an integer in 0..{num_classes - 1}"
        )
    if label_mode == "binary":
        label = int(label > 0)
    return {
        "image": volume[None],  # (1, S, S, S) float16 as stored (float32 for other dtypes)
        "text": text,
        "label": label,
        "key": key,
        "subject": str(meta.get("subject", "")),
        "cohort": meta.get("cohort", ""),
        "split": meta.get("split", ""),
        "binary": bool(meta.get("binary", False)),
    }


@register
class VolumeClass(ShardFormat):
    name = "medalign-ad-v1"
    size_key = "volume_size"
    members = MEMBERS
    image_dims = 3
    default_label_names = AD_LABEL_NAMES
    eval_tensors = ("label", "binary")
    eval_lists = ("subject", "cohort", "key")

    def class_names(self, names: list[str], label_mode: str, where: str = "") -> list[str]:
        """The classes a classifier predicts: the split's label names, or (data.label_mode
        binary) the first against the rest, named NC / impaired."""
        if label_mode != "binary":
            return list(names)
        if len(names) < 2:
            raise ValueError(f"{where}: data.label_mode=binary needs at least 2 label names")
        return list(BINARY_NAMES) if tuple(names) == AD_LABEL_NAMES else [names[0], "other"]

    def decoder(self, shards: Any, cfg: Any):
        return partial(
            decode_sample,
            label_mode=cfg.label_mode,
            clinical=cfg.clinical,
            word_limit=shards.word_limit,
            num_classes=len(shards.label_names),
        )

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "binary": torch.tensor([s["binary"] for s in samples], dtype=torch.bool),
            "subject": [s["subject"] for s in samples],
            "cohort": [s["cohort"] for s in samples],
            "split": [s["split"] for s in samples],
        }

    @staticmethod
    def encode(key: str, volume_npy: bytes, text: str, meta: dict[str, Any]) -> dict[str, Any]:
        """A tar sample from a writer: `volume_npy` the float16 cube as .npy bytes, `meta`
        holding at least label and split."""
        for name in ("label", "split"):
            if name not in meta:
                raise ValueError(f"sample {key}: meta has no {name!r}")
        return {
            "__key__": key,
            "vol.npy": volume_npy,
            "txt": text.encode("utf-8"),
            "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
        }
