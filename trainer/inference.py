"""A trained model on new files: image files, texts and clinical records in, class or label
probabilities, logits and embeddings out.

    predictor = Predictor.from_run("runs/cxr_multilabel")      # or Predictor.from_export(...)
    pred = predictor.predict(images=["a.jpg", "b.dcm"])       # Prediction: names, logits, probs
    emb = predictor.embed_images(["a.jpg"])                   # (N, D)

Inputs go through the code that wrote and read the training shards, so the model sees at use
what it saw in training:

    .jpg .jpeg .png .dcm  shards.xray_images.load_square at model.vision.img_size, then / 255
                          (8-bit) or / 65535 (16-bit DICOM): the shard's PNG as decode_png reads it
    .nii .nii.gz .img     shards.volume.load_volume at model.vision.img_size, stored as float16
                          (as the AD writer stores it), read back as float32
    text                  stripped, put in data.prompt_template (DataConfig.prompted), tokenized
                          with the run's tokenizer, truncated to model.text_max_length and
                          padded as the reader pads a batch (data.pad_to)
    clinical record       rendered by shards.clinical.render_text as the AD writer renders it (the
                          summary cut to the run's word limit, data.clinical.drop left out)

Outputs by model: classify / joint: softmax over the classes (NC / MCI / AD, or NC / impaired);
multilabel: a sigmoid per CheXpert label; ITC models (pretrain, joint): L2-normalised image and
text embeddings, and for chest X-ray models zero-shot label probabilities from the positive /
negative prompt pairs, computed as the run's zero-shot evaluation computes them. Models without
ITC heads embed into their towers' pooled features (the multilabel head's input; a classifier's
unimodal image and text features).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from models.alifuse import build_model
from models.heads import MultiLabelModel
from shards.ad_tables import GENERIC_META
from shards.clinical import parse_cell, render_text
from shards.common import RecordError
from shards.cxr_labels import LABEL_NAMES as CXR_LABEL_NAMES
from shards.formats.volume_class import VolumeClass
from shards.reader import ShardSet, build_eval_loader, tokenize_texts
from shards.volume import NIFTI_SUFFIXES, is_volume_file, load_volume
from shards.xray_images import load_square
from trainer.config import Config, run_label_names
from trainer.distributed import resolve_mixed_precision
from trainer.evaluate import isolated_rng
from trainer.export import load_export
from trainer.retrieval import default_prompts, zero_shot_from_similarity
from trainer.run_folder import (
    load_run_config,
    load_run_weights,
    model_tokenizer,
    summary_word_limit,
)
from trainer.tasks import build_task

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")
# Clinical fields the table readers keep as text rather than parse as numbers.
_TEXT_FIELDS = frozenset({"sex", "handedness", "summary"})
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
OUTPUTS = ("logits", "image_emb", "text_emb", "zero_shot")


@dataclass
class Prediction:
    """Class or label scores of N inputs: `probs[i, j]` is the probability of `names[j]`."""

    names: list[str]
    logits: Tensor  # (N, C)
    probs: Tensor  # (N, C): softmax over the classes, or a sigmoid per label (multilabel)


class Predictor:
    """A model in eval mode with the run's preprocessing; every method runs batched under
    torch.no_grad on `device` and returns CPU float32 tensors."""

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        device: str | torch.device = "cpu",
        word_limit: int | None = None,
        batch_size: int | None = None,
        label_names: Sequence[str] | None = None,
    ) -> None:
        self.cfg = cfg
        self._label_names = list(label_names) if label_names else None
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = model_tokenizer(model)
        self.word_limit = word_limit if word_limit is not None else summary_word_limit(cfg)
        self.batch_size = batch_size or cfg.data.eval_batch_size
        # Autocast as the run's evaluation did: train.mixed_precision, "auto" resolved for the
        # device the predictor runs on.
        precision = cfg.train.mixed_precision
        if precision == "auto":
            precision = resolve_mixed_precision(precision) if self.device.type == "cuda" else "no"
        self.autocast = _AUTOCAST.get(precision)
        self._prompt_cache: dict[tuple[str, ...], dict[str, Tensor]] = {}

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        device: str | torch.device = "cpu",
        overrides: Sequence[str] = (),
        **kwargs: Any,
    ) -> Predictor:
        """A finished run folder (config.yaml + model.safetensors); `overrides` are
        `key.sub=value` config overrides (e.g. a moved model.text.checkpoint)."""
        cfg = load_run_config(run_dir, list(overrides))
        model = build_model(cfg.model, device)
        load_run_weights(model, run_dir)
        kwargs.setdefault("label_names", run_label_names(run_dir))
        return cls(model, cfg, device, **kwargs)

    @classmethod
    def from_export(
        cls,
        export_dir: str | Path,
        device: str | torch.device = "cpu",
        merged: bool = False,
        **kwargs: Any,
    ) -> Predictor:
        """A folder written by `trainer.export.export_run`; `merged` uses text_merged/ (the
        LoRA adapter merged into its base) instead of text_tower/ + text_adapter/."""
        cfg, model, manifest = load_export(export_dir, device, merged)
        kwargs.setdefault("word_limit", manifest["word_limit"])
        kwargs.setdefault("label_names", run_label_names(export_dir))
        return cls(model, cfg, device, **kwargs)

    # ---- what the model reads and returns ----------------------------------------------

    @property
    def task(self) -> str:
        return self.cfg.model.task

    @property
    def reads_images(self) -> bool:
        m = self.cfg.model
        if m.arch == "fusion":
            return bool({"cnn", "vit"} & set(m.fusion.branches))
        return m.arch != "bert" and not (m.arch == "alifuse" and m.image_tower == "none")

    @property
    def reads_texts(self) -> bool:
        return self.tokenizer is not None

    @property
    def label_names(self) -> list[str]:
        """The columns of `predict` and `zero_shot`: the labels or classes of the run's shards
        (its labels.json), else the default names of the format the task reads."""
        if self._label_names:
            return list(self._label_names)
        two_d = self.cfg.model.vision.spatial_dims == 2
        if self.task == "multilabel" or (self.task == "pretrain" and two_d):
            return list(CXR_LABEL_NAMES)[: self.cfg.model.multilabel.num_labels]
        names = list(VolumeClass.default_label_names)
        return VolumeClass().class_names(names, self.cfg.data.label_mode)

    def outputs(self) -> tuple[str, ...]:
        """What `run` can compute for this model."""
        m = self.cfg.model
        out = ["logits"] if self.task in ("classify", "joint", "multilabel") else []
        embeds = self.task == "multilabel" or (m.arch == "alifuse" and not m.attention_pool.enabled)
        if embeds and self.reads_images:
            out.append("image_emb")
        if embeds and self.reads_texts:
            out.append("text_emb")
        if self.zero_shot_ready:
            out.append("zero_shot")
        return tuple(out)

    @property
    def zero_shot_ready(self) -> bool:
        """Chest X-ray ITC models: zero-shot label scores from prompt pairs."""
        return self.cfg.model.has_itc and self.cfg.model.vision.spatial_dims == 2

    # ---- preprocessing -----------------------------------------------------------------

    def load_image(self, path: str | Path) -> np.ndarray:
        """An image or volume file -> (1, *spatial) float32, as the reader gives the model."""
        path = Path(path)
        vision = self.cfg.model.vision
        if vision.spatial_dims == 3:
            if not is_volume_file(path):
                raise ValueError(
                    f"{path}: the model is 3D (model.vision.spatial_dims=3) and reads volumes "
                    f"({', '.join(NIFTI_SUFFIXES)}); got {path.suffix or 'no suffix'}"
                )
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            what = (
                "a 3D volume" if is_volume_file(path) else f"a {path.suffix or 'suffixless'} file"
            )
            raise ValueError(
                f"{path}: the model is 2D (model.vision.spatial_dims=2) and reads "
                f"{', '.join(IMAGE_SUFFIXES)} images; got {what}"
            )
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such image file")
        try:
            if vision.spatial_dims == 3:  # float16 as stored in the shards, float32 as read
                return (
                    load_volume(path, vision.img_size).astype(np.float16).astype(np.float32)[None]
                )
            array, _ = load_square(path, vision.img_size)
        except RecordError as err:
            raise ValueError(str(err)) from err
        scale = 255.0 if array.dtype == np.uint8 else 65535.0  # as shards.xray_images.decode_png
        return (array.astype(np.float32) / scale)[None]

    def clinical_text(self, row: Mapping[str, Any]) -> str:
        """A clinical-table row (field -> value, the AD writer's field names: age, sex, mmse,
        ..., summary) -> the text the AD writer renders from it, with the run's summary word
        limit and data.clinical.drop. Table bookkeeping columns (subject_id, image_path,
        diagnosis, ...) are not rendered, as in the writer."""
        fields = {
            key: value.strip()
            if key in _TEXT_FIELDS and isinstance(value, str)
            else parse_cell(value)
            for key, value in row.items()
            if key not in GENERIC_META
        }
        clinical = self.cfg.data.clinical
        return render_text(fields, self.word_limit, drop=clinical.drop, allow_empty=True)

    def tokenize(self, texts: Sequence[str], pad_to: str | None = None) -> dict[str, Tensor]:
        """Texts -> input_ids and attention_mask (N, L), truncated to model.text_max_length and
        padded as the reader pads a batch (`pad_to`, default data.pad_to: to the longest text
        rounded up to a multiple of 8, or to the max length)."""
        if not self.reads_texts:
            raise ValueError(
                f"model.task={self.task} (model.arch={self.cfg.model.arch}) reads no text; "
                "pass images only"
            )
        stripped = [str(text).strip() for text in texts]
        if not self.cfg.data.clinical.active:  # the reader refuses an empty stored text
            empty = [i for i, text in enumerate(stripped) if not text]
            if empty:
                raise ValueError(f"texts {empty[:5]} are empty; expected a report or record")
        ids, mask = tokenize_texts(
            self.tokenizer,
            [self.cfg.data.prompted(text) for text in stripped],
            self.cfg.model.text_max_length,
            pad_to or self.cfg.data.pad_to,
        )
        return {"input_ids": ids, "attention_mask": mask}

    def batch(
        self, images: Sequence[str | Path] | None = None, texts: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Files and texts -> a model batch: image (N, 1, *spatial), input_ids, attention_mask."""
        out: dict[str, Tensor] = {}
        if images is not None:
            if not self.reads_images:
                raise ValueError(f"model.arch={self.cfg.model.arch} reads no image; pass texts")
            out["image"] = torch.from_numpy(np.stack([self.load_image(p) for p in images]))
        if texts is not None:
            out.update(self.tokenize(texts))
        if images is not None and texts is not None and len(images) != len(texts):
            raise ValueError(f"{len(images)} images and {len(texts)} texts: expected one each")
        return out

    # ---- the model ---------------------------------------------------------------------

    @torch.no_grad()
    def run(self, batch: Mapping[str, Any], outputs: Collection[str]) -> dict[str, Tensor]:
        """A model batch (from `batch`, or the reader's) -> the requested `outputs` (any of
        logits, probs, image_emb, text_emb, zero_shot), each (N, ...) on the CPU."""
        unknown = set(outputs) - {*OUTPUTS, "probs"}
        if unknown:
            raise ValueError(f"outputs {sorted(unknown)}: expected any of {OUTPUTS + ('probs',)}")
        inputs = {}
        for key in ("image", "input_ids", "attention_mask"):
            if key in batch:
                value = batch[key].to(self.device)
                inputs[key] = value.float() if value.is_floating_point() else value
        out: dict[str, Tensor] = {}
        with torch.autocast(self.device.type, self.autocast, enabled=self.autocast is not None):
            if {"logits", "probs"} & set(outputs):
                out["logits"] = self._logits(inputs)
                out["probs"] = self.probabilities(out["logits"])
            if "image_emb" in outputs:
                out["image_emb"] = self._image_emb(inputs)
            if "text_emb" in outputs:
                out["text_emb"] = self._text_emb(inputs)
            if "zero_shot" in outputs:
                out["zero_shot"] = self._zero_shot(inputs)
        return {key: value.float().cpu() for key, value in out.items()}

    def probabilities(self, logits: Tensor) -> Tensor:
        """Logits (N, C) -> a sigmoid per label (multilabel) or the softmax over the classes."""
        logits = logits.float()
        return logits.sigmoid() if self.task == "multilabel" else logits.softmax(dim=-1)

    def check_inputs(self, output: str, inputs: Collection[str]) -> None:
        """Raises ValueError when the model has no `output`, or when the batch keys `inputs`
        (image, input_ids) lack what computing it reads."""
        if output.endswith("_emb") and self.cfg.model.attention_pool.enabled:
            raise ValueError(
                f"{output}: model.attention_pool.enabled scores each image against each text "
                "jointly, so neither has an embedding of its own; zero_shot is available"
            )
        if output not in self.outputs():
            raise ValueError(
                f"{output}: a model.task={self.task} model (model.arch={self.cfg.model.arch}) "
                f"gives {', '.join(self.outputs()) or 'no output'}"
            )
        reads = {"image": "images", "input_ids": "texts"}
        if output == "logits":
            keys = [
                k for k, on in (("image", self.reads_images), ("input_ids", self.reads_texts)) if on
            ]
        else:
            keys = ["input_ids"] if output == "text_emb" else ["image"]
        missing = [reads[k] for k in keys if k not in inputs]
        if missing:
            raise ValueError(f"{output} of this model needs {' and '.join(missing)}")

    def _logits(self, inputs: dict[str, Tensor]) -> Tensor:
        self.check_inputs("logits", inputs)
        n = next(iter(inputs.values())).shape[0]
        # Placeholder targets: the forward computes its training losses from them beside the
        # logits; only the logits are read.
        if self.task == "multilabel":
            labels = self.cfg.model.multilabel.num_labels
            targets = {"labels": torch.zeros(n, labels), "label_mask": torch.ones(n, labels)}
        else:
            targets = {
                "label": torch.zeros(n, dtype=torch.long),
                "binary": torch.zeros(n, dtype=torch.bool),
            }
        batch = {**{k: v.to(self.device) for k, v in targets.items()}, **inputs}
        with isolated_rng(self.cfg.train.seed, self.device):  # joint: the MAE / MLM masks
            return self.model(batch)["logits"]

    def _image_emb(self, inputs: dict[str, Tensor]) -> Tensor:
        self.check_inputs("image_emb", inputs)
        model, image = self.model, inputs["image"]
        if isinstance(model, MultiLabelModel):
            return model.features(image)
        if self.cfg.model.has_itc:
            return model({"image": image}, embed=True)["image"]["emb"]
        return model.visual.pool(model.visual.forward_features(image))

    def _text_emb(self, inputs: dict[str, Tensor]) -> Tensor:
        self.check_inputs("text_emb", inputs)
        tokens = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        if self.cfg.model.has_itc:
            return self.model(tokens, embed=True)["text"]["emb"]
        text = self.model.text
        return text.pool(text.forward_features(**tokens), tokens["attention_mask"])

    def _prompt_states(self, texts: list[str]) -> dict[str, Tensor]:
        """The text tower's ITC states of prompts, padded to the max length as the zero-shot
        prompts of trainer.embed_eval.zero_shot_metrics are; computed once per list of texts."""
        key = tuple(texts)
        if key not in self._prompt_cache:
            prompts = self.tokenize(texts, pad_to="max_length")
            tokens = {k: v.to(self.device) for k, v in prompts.items()}
            self._prompt_cache[key] = self.model(tokens, embed=True)["text"]
        return self._prompt_cache[key]

    @torch.no_grad()
    def text_logits(self, batch: Mapping[str, Any], texts: Sequence[str]) -> Tensor:
        """The batch's images against `texts` -> (N, T) CPU logits: each image's similarity to
        each text (as the run's ITC scores it, attention pool included) times the learned
        logit scale. Zero-shot classification over classes, one prompt per class: the argmax
        of a row (CLIP's protocol). Texts are put in the run's prompt template and padded to
        the max length, as the zero-shot prompts of the run's evaluation are."""
        inputs = {"image": batch["image"].to(self.device).float()}
        self.check_inputs("zero_shot", inputs)
        with torch.autocast(self.device.type, self.autocast, enabled=self.autocast is not None):
            states = self._prompt_states(list(texts))
            out = self.model(inputs, embed=True)
            sims = self.model.similarity(out["image"], states)
        return (sims.float() * float(out["logit_scale"])).cpu()

    def _zero_shot(self, inputs: dict[str, Tensor]) -> Tensor:
        """As trainer.embed_eval.zero_shot_metrics: per label, the softmax over the image's
        similarity to the positive and the negative prompt at the learned temperature."""
        self.check_inputs("zero_shot", inputs)
        pos, neg = default_prompts(self.label_names)
        states, n = self._prompt_states(pos + neg), len(pos)
        out = self.model({"image": inputs["image"]}, embed=True)
        image, scale = out["image"], float(out["logit_scale"])
        pos_sim = self.model.similarity(image, {k: v[:n] for k, v in states.items()})
        neg_sim = self.model.similarity(image, {k: v[n:] for k, v in states.items()})
        pos_sim, neg_sim = pos_sim.float().cpu(), neg_sim.float().cpu()
        return zero_shot_from_similarity(pos_sim, neg_sim, 1.0 / scale)

    # ---- files and texts in, tensors out -----------------------------------------------

    def batches(
        self, images: Sequence[str | Path] | None, texts: Sequence[str] | None
    ) -> Iterator[dict[str, Tensor]]:
        """Model batches of `batch_size` rows over paired image files and texts."""
        n = len(images) if images is not None else len(texts or ())
        for start in range(0, n, self.batch_size):
            part = slice(start, start + self.batch_size)
            yield self.batch(
                None if images is None else images[part], None if texts is None else texts[part]
            )

    def _collect(self, images, texts, output: str) -> Tensor:
        parts = [self.run(batch, (output,))[output] for batch in self.batches(images, texts)]
        if not parts:
            raise ValueError("no input: expected at least one image or text")
        return torch.cat(parts)

    def embed_images(self, paths: Sequence[str | Path]) -> Tensor:
        """Image files -> (N, D): ITC embeddings (L2-normalised), or the tower's pooled features."""
        return self._collect(list(paths), None, "image_emb")

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """Texts -> (N, D): ITC embeddings (L2-normalised), or the tower's pooled features."""
        return self._collect(None, list(texts), "text_emb")

    def zero_shot(self, paths: Sequence[str | Path]) -> Tensor:
        """Chest X-ray files -> (N, K) zero-shot probabilities, in `label_names` order (the run's
        labels, the 14 CheXpert labels for MIMIC-CXR)."""
        return self._collect(list(paths), None, "zero_shot")

    def predict(
        self, images: Sequence[str | Path] | None = None, texts: Sequence[str] | None = None
    ) -> Prediction:
        """Image files and / or texts (one per image; fusion models need both) -> class or
        label probabilities and logits."""
        images = None if images is None else list(images)
        texts = None if texts is None else list(texts)
        logits = self._collect(images, texts, "logits")
        return Prediction(self.label_names, logits, self.probabilities(logits))


# ---- batch prediction into a folder (scripts/predict.py) --------------------------------


@dataclass
class Inputs:
    """Rows to predict: a key per row, and image files and / or texts (None: not given)."""

    keys: list[str]
    images: list[str] | None = None
    texts: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("images", "texts"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.keys):
                raise ValueError(
                    f"{len(values)} {name} for {len(self.keys)} keys: expected one each"
                )
        seen: set[str] = set()
        repeated = sorted({k for k in self.keys if k in seen or seen.add(k)})
        if repeated:
            raise ValueError(f"keys {repeated[:5]} repeat: expected one row per key")


def _image_files(predictor: Predictor, folder: Path) -> list[Path]:
    if predictor.cfg.model.vision.spatial_dims == 3:
        return sorted(p for p in folder.rglob("*") if p.is_file() and is_volume_file(p))
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def inputs_from_paths(
    predictor: Predictor, images: Sequence[str] = (), texts_file: str | None = None
) -> Inputs:
    """Image files and folders (every image the model reads inside, sorted; keyed by the path
    below the folder, a file by its path as given), and / or a text file, one text a line,
    paired with the images in order."""
    keys, paths = [], []
    for item in images:
        path = Path(item)
        if path.is_dir():
            found = _image_files(predictor, path)
            if not found:
                raise FileNotFoundError(f"{path}: no image file the model reads in the folder")
            keys += [p.relative_to(path).as_posix() for p in found]
            paths += [str(p) for p in found]
        else:
            keys.append(item)
            paths.append(item)
    texts = None
    if texts_file is not None:
        texts = Path(texts_file).read_text(encoding="utf-8").splitlines()
        if not paths:
            keys = [f"text-{i}" for i in range(len(texts))]
    return Inputs(keys, paths or None, texts)


def inputs_from_csv(predictor: Predictor, path: str | Path) -> Inputs:
    """A CSV with columns key (optional), image (a file path, relative to the CSV's folder),
    and text, or, for AD models, clinical field columns instead of text (rendered with
    `Predictor.clinical_text`)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows, columns = list(reader), list(reader.fieldnames or [])
    if not columns:
        raise ValueError(f"{path}: empty CSV; expected a header row (key, image, text, ...)")
    known = ["key", "image"] + (["text"] if predictor.reads_texts else [])
    clinical = (
        predictor.reads_texts
        and predictor.cfg.model.vision.spatial_dims == 3
        and "text" not in columns
    )
    extra = [c for c in columns if c not in known]
    if extra and not clinical:
        hint = " or clinical field columns instead of text" if predictor.reads_texts else ""
        raise ValueError(
            f"{path}: unknown column(s) {extra}; this model reads {', '.join(known)}{hint}"
        )
    if "image" not in columns and not ("text" in columns or extra):
        raise ValueError(f"{path}: no image column and no text; expected {', '.join(known)}")

    def cell(i: int, row: dict[str, str], column: str) -> str:
        value = (row.get(column) or "").strip()
        if not value:
            raise ValueError(f"{path}: row {i + 2} has an empty {column!r} cell")
        return value

    images = None
    if "image" in columns:
        images = [str(path.parent / cell(i, row, "image")) for i, row in enumerate(rows)]
    texts = None
    if "text" in columns:
        texts = [row["text"] or "" for row in rows]
    elif extra:
        texts = [predictor.clinical_text({c: row[c] for c in extra}) for row in rows]
    keys = [
        cell(i, row, "key") if "key" in columns else (row.get("image") or f"row-{i}").strip()
        for i, row in enumerate(rows)
    ]
    return Inputs(keys, images, texts)


def plan_outputs(predictor: Predictor, inputs: Collection[str]) -> tuple[str, ...]:
    """The outputs the model gives from batch keys `inputs`; predictions are required (their
    missing input is an error), embeddings are computed where their input is given."""
    plan = []
    for output in predictor.outputs():
        try:
            predictor.check_inputs(output, inputs)
        except ValueError:
            if output == "logits":
                raise
            continue
        plan.append(output)
    if not plan:
        raise ValueError(f"model.task={predictor.task}: nothing to compute from {sorted(inputs)}")
    return tuple(plan)


def file_batches(predictor: Predictor, inputs: Inputs) -> Iterator[tuple[list[str], dict]]:
    """(keys, model batch) of `batch_size` rows at a time."""
    step = predictor.batch_size
    keys = (inputs.keys[i : i + step] for i in range(0, len(inputs.keys), step))
    return zip(keys, predictor.batches(inputs.images, inputs.texts), strict=True)


def shard_batches(predictor: Predictor, split_dir: str) -> Iterator[tuple[list[str], dict]]:
    """(keys, model batch) of a shard split, decoded and tokenized by the reader as in the
    run's evaluation (data.prompt_template and data.clinical applied there)."""
    task = build_task(predictor.cfg)
    task.label_names = predictor._label_names  # the shards must name the run's labels
    task.check(ShardSet.load(split_dir))
    data = dataclasses.replace(predictor.cfg.data, eval_batch_size=predictor.batch_size)
    max_length = predictor.cfg.model.text_max_length
    for batch in build_eval_loader(split_dir, data, predictor.tokenizer, max_length, 0, 1):
        keep = batch["valid"]
        keys = [k for k, ok in zip(batch["key"], keep.tolist(), strict=True) if ok]
        tensors = ("image", "input_ids", "attention_mask")
        yield keys, {k: batch[k][keep] for k in tensors if k in batch}


def predict_to_folder(
    predictor: Predictor,
    batches: Iterable[tuple[list[str], dict]],
    out_dir: str | Path,
    total: int | None = None,
    npy: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs every batch and writes OUT/predictions.jsonl (key; probs and logits of a
    classifier; zero_shot label probabilities of a chest X-ray ITC model) and
    OUT/embeddings.safetensors (image_emb, text_emb; the keys in its metadata), with `npy`
    also OUT/<name>.npy and OUT/keys.json. Returns counts and paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names, plan = predictor.label_names, None
    keys: list[str] = []
    embeddings: dict[str, list[Tensor]] = {"image_emb": [], "text_emb": []}
    bar = tqdm(total=total, unit="sample", desc="predict", disable=not progress)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for batch_keys, batch in batches:
            plan = plan or plan_outputs(predictor, batch)
            result = predictor.run(batch, plan)
            for i, key in enumerate(batch_keys):
                row: dict[str, Any] = {"key": key}
                if "logits" in result:
                    row["probs"] = dict(zip(names, result["probs"][i].tolist(), strict=True))
                    row["logits"] = result["logits"][i].tolist()
                if "zero_shot" in result:
                    zs = result["zero_shot"][i].tolist()
                    row["zero_shot"] = dict(zip(names, zs, strict=True))
                fh.write(json.dumps(row) + "\n")
            for name, parts in embeddings.items():
                if name in result:
                    parts.append(result[name])
            keys += batch_keys
            bar.update(len(batch_keys))
    bar.close()
    if not keys:
        raise ValueError("no input rows: nothing was predicted")
    tensors = {name: torch.cat(parts) for name, parts in embeddings.items() if parts}
    written = {
        "rows": len(keys),
        "outputs": list(plan or ()),
        "predictions": str(out / "predictions.jsonl"),
    }
    if tensors:
        kind = "itc" if predictor.cfg.model.has_itc else "features"
        meta = {"keys": json.dumps(keys), "kind": kind}
        save_file(tensors, str(out / "embeddings.safetensors"), metadata=meta)
        written["embeddings"] = str(out / "embeddings.safetensors")
    if npy:
        for name, tensor in tensors.items():
            np.save(out / f"{name}.npy", tensor.numpy())
        (out / "keys.json").write_text(json.dumps(keys))
    return written
