"""Format medalign-cxr-v1: a 2-D grayscale image, a text and several binary labels per sample.

Written by shards/mimic_cxr.py (MIMIC-CXR: the 14 CheXpert labels and the study's report),
shards/chexpert.py (CheXpert-v1.0: the same 14 labels, no reports) and shards/hf_source.py (any
dataset of 2-D images with label columns). A sample's members:

  __key__   unique within the dataset; characters outside [A-Za-z0-9_-] replaced by "_"
  img.png   grayscale S x S PNG, 8-bit (mode L) or 16-bit (mode I;16)
  txt       the report (utf-8); empty or absent when the manifest says "texts": false
  json      labels (raw values in label_names order: 1.0, 0.0, -1.0 uncertain, or null for
            blank), study (images of one study share one report), split, subject,
            source_path; writers add what their source has (view, dicom_id, labeler, ...)

Manifest: image_size (S), bit_depth, label_names (default the 14 CheXpert labels), texts.
Batch keys: image (B, 1, S, S) float32 in [0, 1], labels (B, K) float32 targets and label_mask
(B, K) float32 (after data.labels: the uncertain / blank policy; a loss multiplies its per-label
terms by the mask), split / group (lists of str; group is the study).
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import numpy as np
import torch

from shards.cxr_labels import LABEL_NAMES, NUM_LABELS, LabelPolicyConfig, labels_to_array
from shards.formats import ShardFormat, register
from shards.xray_images import decode_png

MEMBERS = ("img.png", "txt", "json")  # a sample's tar members (txt optional without texts)

_RAW_LABELS = (1.0, 0.0, -1.0)


def decode_cxr_sample(
    raw: dict[str, Any],
    policy: LabelPolicyConfig,
    size: int | None = None,
    num_labels: int = NUM_LABELS,
    texts: bool = True,
) -> dict[str, Any]:
    """Decodes one tar sample of format medalign-cxr-v1; raises ValueError naming what is wrong.

    ``policy`` turns the raw labels (``num_labels`` of them: the manifest's label names) into
    (targets, mask); ``size``, when known from the manifest, is the side length every image must
    have (so one odd image cannot break a batch); ``texts=False`` (a manifest's "texts": false,
    datasets without reports such as CheXpert) reads a missing or empty text as "".
    """
    key = raw.get("__key__", "?")
    url = raw.get("__url__", "?")
    for name in MEMBERS:
        if name not in raw and (texts or name != "txt"):
            raise ValueError(f"{url}: sample {key} has no '{name}' member")
    try:
        image = decode_png(raw["img.png"])
    except Exception as exc:
        raise ValueError(f"{url}: sample {key} img.png cannot be decoded ({exc})") from exc
    if image.ndim != 2:
        raise ValueError(f"{url}: sample {key} image has shape {image.shape}, expected 2-D gray")
    if size is not None and image.shape != (size, size):
        raise ValueError(
            f"{url}: sample {key} image has shape {image.shape}, the manifest says {size}x{size}"
        )
    text = raw["txt"].decode("utf-8").strip() if "txt" in raw else ""
    if not text and texts:
        raise ValueError(f"{url}: sample {key} has empty text")
    meta = json.loads(raw["json"])
    values = meta.get("labels")
    if not isinstance(values, list) or len(values) != num_labels:
        count = len(values) if isinstance(values, list) else type(values).__name__
        raise ValueError(f"{url}: sample {key} has {count} labels, expected {num_labels}")
    bad = [
        v
        for v in values
        if v is not None
        and (isinstance(v, bool) or not isinstance(v, (int, float)) or v not in _RAW_LABELS)
    ]
    if bad:
        raise ValueError(f"{url}: sample {key} labels {bad}: expected 1.0, 0.0, -1.0 or null")
    study = str(meta.get("study", "")).strip()
    if not study:
        raise ValueError(f"{url}: sample {key} has no study id")
    targets, mask = policy.apply(labels_to_array(values))
    return {
        "image": np.ascontiguousarray(image, dtype=np.float32)[None],  # (1, S, S)
        "text": text,
        "labels": torch.from_numpy(targets),
        "label_mask": torch.from_numpy(mask),
        "key": key,
        "split": meta.get("split", ""),
        "group": study,
    }


@register
class ImageMultilabel(ShardFormat):
    name = "medalign-cxr-v1"
    size_key = "image_size"
    members = MEMBERS
    image_dims = 2
    default_label_names = LABEL_NAMES
    eval_tensors = ("labels", "label_mask")
    eval_lists = ("group", "key")

    def decoder(self, shards: Any, cfg: Any):
        return partial(
            decode_cxr_sample,
            policy=cfg.labels,
            size=shards.size,
            num_labels=len(shards.label_names),
            texts=shards.texts,
        )

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "labels": torch.stack([s["labels"] for s in samples]),
            "label_mask": torch.stack([s["label_mask"] for s in samples]),
            "split": [s["split"] for s in samples],
            "group": [s["group"] for s in samples],
        }

    @staticmethod
    def encode(key: str, png: bytes, text: str, meta: dict[str, Any]) -> dict[str, Any]:
        """A tar sample from a writer: `png` the encoded image, `meta` holding at least labels,
        study and split."""
        for name in ("labels", "study", "split"):
            if name not in meta:
                raise ValueError(f"sample {key}: meta has no {name!r}")
        return {
            "__key__": key,
            "img.png": png,
            "txt": text.encode("utf-8"),
            "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
        }
