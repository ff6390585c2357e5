"""Figures of a trained Alifuse run (the paper's Figs. 3 and 4), from its run folder.

- Attention maps (Fig. 3): the [CLS] row of the last self-attention layer of each unimodal
  encoder, averaged over heads (the paper's choice). Image: the CLS token's attention over the
  patches, upsampled to the volume and laid over axial, coronal and sagittal slices through
  the voxel it attends to most (jet colours). Text: each word shaded by the CLS token's
  attention to it (blues), word pieces summed into their word.
- Embeddings (Fig. 4): the ITC embeddings of every image and text of a split, before
  alignment (the run's initial weights: its seed, or the run it started from) and after, in
  one UMAP per state, coloured by class, each image joined to its text by a line; and the
  modality gap ||mean(image embeddings) - mean(text embeddings)|| (Liang et al. 2022) of the
  L2-normalised embeddings, which alignment should shrink.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib import colormaps  # noqa: E402

from models.alifuse import AlifuseModel, build_model  # noqa: E402
from shards.reader import DataConfig, ShardSet, build_eval_loader  # noqa: E402
from trainer.checkpoint import load_init_weights  # noqa: E402
from trainer.config import Config, run_label_names  # noqa: E402
from trainer.run_folder import load_run_config, load_run_weights  # noqa: E402

CLASS_COLOURS = ("#1b9e77", "#d95f02", "#7570b3")


# ---- attention ------------------------------------------------------------------------------


def _capture_input(module: torch.nn.Module, run) -> torch.Tensor:
    """The first positional input `module` receives while `run()` executes."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        run()
    finally:
        handle.remove()
    return seen[-1]


@torch.no_grad()
def image_cls_attention(model: AlifuseModel, image: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, *grid): the last ViT block's [CLS] attention over the patches,
    averaged over heads; each map sums to at most 1 (the rest is CLS attending to itself)."""
    block = model.visual.blocks[-1]
    x = _capture_input(block, lambda: model.visual.forward_features(image))
    q, k, _ = block.attn.project(block.norm1(x))  # (B, H, T, d)
    weights = (q[:, :, :1] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
    cls = weights[:, :, 0, 1:].mean(1)  # (B, N) over the patches
    return cls.reshape(image.shape[0], *model.cfg.vision.grid_size)


@torch.no_grad()
def text_cls_attention(
    model: AlifuseModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, L) -> (B, L): the last text layer's [CLS] attention over the tokens, averaged over
    heads (BERT-shaped towers); padding gets 0."""
    layer = model.text.layers[-1]
    if not hasattr(getattr(layer, "attention", None), "self"):
        raise ValueError("text attention maps need a BERT-shaped text tower (text_tower: bert)")
    h = _capture_input(layer, lambda: model.text.forward_features(input_ids, attention_mask))
    attn = layer.attention.self
    heads, size = attn.num_attention_heads, attn.attention_head_size
    q = attn.query(h[:, :1]).view(h.shape[0], 1, heads, size).transpose(1, 2)
    k = attn.key(h).view(h.shape[0], -1, heads, size).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) * size**-0.5  # (B, H, 1, L)
    scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
    return scores.softmax(-1)[:, :, 0].mean(1)


def upsample(grid_map: torch.Tensor, size: Iterable[int]) -> np.ndarray:
    """(*grid) patch map -> (*size) voxel map in [0, 1] (trilinear / bilinear)."""
    mode = "trilinear" if grid_map.ndim == 3 else "bilinear"
    up = F.interpolate(grid_map[None, None].float(), size=tuple(size), mode=mode)[0, 0]
    up = up - up.min()
    return (up / up.max().clamp(min=1e-12)).numpy()


def words(text: str, tokenizer, weights: np.ndarray, attention_mask: torch.Tensor):
    """The text's whitespace-separated words, each with the summed attention of the tokens
    that fall in it (special tokens and padding dropped): [(word, weight), ...]."""
    enc = tokenizer(
        text,
        truncation=True,
        max_length=int(attention_mask.shape[0]),
        return_offsets_mapping=True,
    )
    spans, start = [], 0
    for word in text.split():
        begin = text.index(word, start)
        spans.append([word, begin, begin + len(word), 0.0])
        start = begin + len(word)
    for (lo, hi), weight in zip(
        enc["offset_mapping"], weights[: len(enc["offset_mapping"])], strict=True
    ):
        if hi <= lo:  # [CLS], [SEP]
            continue
        for span in spans:
            if span[1] <= lo < span[2]:
                span[3] += float(weight)
                break
    last = max(
        (i for i, (_, lo, _, _) in enumerate(spans) if lo < enc["offset_mapping"][-2][1]),
        default=-1,
    )
    return [(w, weight) for w, _, _, weight in spans[: last + 1]]


def _slices(volume: np.ndarray, heat: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Axial, coronal and sagittal slices (RAS volume) through the hottest voxel."""
    x, y, z = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return [
        ("axial", volume[:, :, z].T, heat[:, :, z].T),
        ("coronal", volume[:, y, :].T, heat[:, y, :].T),
        ("sagittal", volume[x, :, :].T, heat[x, :, :].T),
    ]


def _draw_words(ax, pieces: list[tuple[str, float]], fontsize: float = 7.0) -> None:
    """Words in lines, each shaded by its weight (darker blue = more attention)."""
    ax.axis("off")
    fig = ax.figure
    width_px = ax.get_window_extent(fig.canvas.get_renderer()).width
    char_px = 0.6 * fontsize * fig.dpi / 72  # monospace advance
    per_line = max(20, int(width_px / char_px))
    top = max((w for _, w in pieces), default=1.0) or 1.0
    cmap = colormaps["Blues"]
    col, y = 0, 0.97
    for word, weight in pieces:
        if col + len(word) > per_line:
            col, y = 0, y - 0.09
        shade = weight / top
        ax.text(
            col / per_line,
            y,
            word,
            fontsize=fontsize,
            family="monospace",
            va="top",
            color="white" if shade > 0.6 else "black",
            bbox={"facecolor": cmap(0.05 + 0.9 * shade), "edgecolor": "none", "pad": 0.8},
            transform=ax.transAxes,
        )
        col += len(word) + 1


def attention_figure(
    model: AlifuseModel, batch: dict[str, Any], tokenizer, names: list[str], path: Path
) -> Path:
    """One row per sample: three image slices with the heat map (if the model has an image
    tower), then the text shaded by attention (if it has a BERT text tower)."""
    n = batch["label"].shape[0]
    has_image = model.visual is not None and model.cfg.vision.spatial_dims == 3
    has_text = model.text is not None and hasattr(model.text, "layers")
    image_maps = image_cls_attention(model, batch["image"].float()) if has_image else None
    text_maps = (
        text_cls_attention(model, batch["input_ids"], batch["attention_mask"]) if has_text else None
    )
    cols = (3 if has_image else 0) + (1 if has_text else 0)
    fig = plt.figure(figsize=(2.4 * cols + (3.5 if has_text else 0), 2.5 * n))
    grid = fig.add_gridspec(n, cols, width_ratios=[1] * (cols - has_text) + [3] * has_text)
    for i in range(n):
        title = f"{batch['key'][i]} ({names[int(batch['label'][i])]})"
        c = 0
        if has_image:
            volume = batch["image"][i, 0].float().numpy()
            heat = upsample(image_maps[i], volume.shape)
            for view, plane, hot in _slices(volume, heat):
                ax = fig.add_subplot(grid[i, c])
                ax.imshow(plane, cmap="gray", origin="lower")
                # Opacity follows the heat: unattended anatomy stays visible.
                ax.imshow(hot, cmap="jet", alpha=0.6 * hot, origin="lower", vmin=0, vmax=1)
                ax.set_title(f"{view}" + (f"\n{title}" if c == 0 else ""), fontsize=7)
                ax.axis("off")
                c += 1
        if has_text:
            ax = fig.add_subplot(grid[i, c])
            mask = batch["attention_mask"][i]
            _draw_words(ax, words(batch["text"][i], tokenizer, text_maps[i].numpy(), mask))
            if not has_image:
                ax.set_title(title, fontsize=7)
    fig.suptitle("Last-layer [CLS] attention of the unimodal encoders", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pick_per_class(loader, per_class: int, num_classes: int) -> dict[str, Any]:
    """The first `per_class` valid samples of each class, in split order, as one batch."""
    chosen: dict[int, list[tuple[dict[str, Any], int]]] = {c: [] for c in range(num_classes)}
    for batch in loader:
        for i in range(batch["label"].shape[0]):
            label = int(batch["label"][i])
            if bool(batch["valid"][i]) and len(chosen[label]) < per_class:
                chosen[label].append((batch, i))
        if all(len(v) == per_class for v in chosen.values()):
            break
    picks = [pair for c in range(num_classes) for pair in chosen[c]]
    if not picks:
        raise ValueError("the split has no sample to show")
    out: dict[str, Any] = {}
    for key, value in picks[0][0].items():
        if torch.is_tensor(value) and value.ndim >= 1:
            out[key] = torch.stack([b[key][i] for b, i in picks])
        elif isinstance(value, list):
            out[key] = [b[key][i] for b, i in picks]
    return out


# ---- embeddings -----------------------------------------------------------------------------


@torch.no_grad()
def split_embeddings(model: AlifuseModel, loader) -> dict[str, np.ndarray]:
    """L2-normalised ITC embeddings of every valid sample: image (N, D), text (N, D), label."""
    image, text, labels = [], [], []
    model.eval()
    for batch in loader:
        keep = batch["valid"].bool()
        inputs = {k: batch[k] for k in ("image", "input_ids", "attention_mask")}
        inputs["image"] = inputs["image"].float()
        out = model(inputs, embed=True)
        image.append(out["image"]["emb"][keep])
        text.append(out["text"]["emb"][keep])
        labels.append(batch["label"][keep])
    return {
        "image": torch.cat(image).numpy(),
        "text": torch.cat(text).numpy(),
        "label": torch.cat(labels).numpy(),
    }


def modality_gap(emb: dict[str, np.ndarray]) -> float:
    """||mean image embedding - mean text embedding|| (L2-normalised embeddings)."""
    return float(np.linalg.norm(emb["image"].mean(0) - emb["text"].mean(0)))


def umap_figure(
    states: dict[str, dict[str, np.ndarray]], names: list[str], path: Path, seed: int = 0
) -> Path:
    """One UMAP panel per state (before / after alignment): images as circles, texts as
    triangles, coloured by class, each pair joined by a line; the modality gap in the title."""
    try:
        import umap
    except ImportError as err:  # an extra, not a core dependency
        raise ImportError("UMAP figures need umap-learn: pip install 'medalign[figures]'") from err
    fig, axes = plt.subplots(1, len(states), figsize=(5.2 * len(states), 4.8), squeeze=False)
    for ax, (state, emb) in zip(axes[0], states.items(), strict=True):
        n = len(emb["label"])
        both = np.concatenate([emb["image"], emb["text"]])
        reducer = umap.UMAP(n_neighbors=min(15, max(2, 2 * n - 1)), random_state=seed)
        xy = reducer.fit_transform(both)
        img, txt = xy[:n], xy[n:]
        for i in range(n):
            ax.plot([img[i, 0], txt[i, 0]], [img[i, 1], txt[i, 1]], color="k", lw=0.3, alpha=0.3)
        for c, name in enumerate(names):
            sel = emb["label"] == c
            colour = CLASS_COLOURS[c % len(CLASS_COLOURS)]
            ax.scatter(*img[sel].T, s=14, color=colour, marker="o", label=f"{name} image")
            ax.scatter(*txt[sel].T, s=18, color=colour, marker="^", label=f"{name} text")
        ax.set_title(f"{state}: modality gap {modality_gap(emb):.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, -1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the command ------------------------------------------------------------------------------


def initial_model(cfg: Config, recorded_init: str) -> AlifuseModel:
    """The run's weights before training: its seed's initialisation, and the run it started
    from (`train.init_from` as the run recorded it) when that folder still exists."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    if recorded_init and (Path(recorded_init) / "model.safetensors").is_file():
        load_init_weights(model, recorded_init)
    return model


def visualize_run(
    run_dir: str | Path,
    split: str,
    out_dir: str | Path | None = None,
    per_class: int = 2,
    max_points: int = 400,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Writes attention.png and umap.png for `split` under OUT (default RUN_DIR/figures) and
    figures.json with the modality gaps; returns that record."""
    import yaml

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    if cfg.model.arch != "alifuse":
        raise ValueError(f"model.arch={cfg.model.arch}: figures are drawn for Alifuse models")
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["train"].get("init_from", "")
    out = Path(out_dir) if out_dir else run_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    load_run_weights(model, run_dir)
    model.eval()
    shards = ShardSet.load(split)
    names = run_label_names(run_dir) or shards.spec.class_names(
        shards.label_names, cfg.data.label_mode, split
    )
    data: DataConfig = cfg.data
    loader = build_eval_loader(split, data, model.tokenizer, cfg.model.text_max_length, 0, 1)
    record: dict[str, Any] = {"run": str(run_dir), "split": split}
    batch = pick_per_class(loader, per_class, len(names))
    record["attention"] = str(
        attention_figure(model, batch, model.tokenizer, names, out / "attention.png")
    )
    record["attention_samples"] = batch["key"]
    if model.use_itc and model.attention_pool is not None:
        record["umap"] = None
        record["umap_skipped"] = (
            "with attention pooling an image has no embedding of its own (each pair is scored "
            "jointly), so there is no image point to place"
        )
    elif model.use_itc:
        before = initial_model(cfg, recorded).eval()
        states = {"before alignment": split_embeddings(before, loader)}
        states["after alignment"] = split_embeddings(model, loader)
        if len(states["after alignment"]["label"]) > max_points:
            keep = np.random.default_rng(0).permutation(len(states["after alignment"]["label"]))
            keep = np.sort(keep[:max_points])
            states = {s: {k: v[keep] for k, v in e.items()} for s, e in states.items()}
        record["modality_gap"] = {s: modality_gap(e) for s, e in states.items()}
        record["umap"] = str(umap_figure(states, names, out / "umap.png", cfg.train.seed))
        record["umap_points"] = int(len(states["after alignment"]["label"]))
    else:
        record["umap"] = None
        record["umap_skipped"] = "the model has no ITC heads (itc_weight 0 or task classify)"
    (out / "figures.json").write_text(json.dumps(record, indent=2))
    return record
