"""What the text side costs a training step, measured side by side in one run.

    python scripts/bench_text_cache.py                  # CPU, both parts
    python scripts/bench_text_cache.py --device cuda    # GPU (frozen_4bit tower)
    python scripts/bench_text_cache.py --part cache     # or: padding

cache: the MAE + LLaMA alignment preset (configs/cxr_mae_llama_align.yaml: frozen LLaMA,
attention pooling, margin loss) at a small size, on synthetic MIMIC-CXR shards, with a random
LLaMA sized so that its forward FLOPs per report are about 100x the image tower's forward
FLOPs per image (LLaMA-2-7B against ViT-B/16 is of that order). The same training step
(trainer.loop.train_step, the real loader) runs uncached (the tower in every step) and cached
(data.text_cache: states read from the memory-mapped cache), interleaved in blocks, after
warm-up; printed: median step times and their ratio, the cache's build time and bytes per
report, and the same figures worked out for LLaMA-2-7B against ViT-B/16.

padding: reports whose token lengths follow a radiology-report-like distribution (median
about 43, 90th percentile about 80, as MIMIC-CXR reports tokenized for LLaMA), max_length
128. One epoch of the training stream is batched three ways: every batch to max_length, to
its longest text (multiple of 8), and to its longest with length bucketing
(data.bucket_batches); printed: padded / real text tokens of each, and the step time of a
LoRA LLaMA tower (forward + backward) on those batches, with the gain over max_length padding.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.llama_text import LlamaTextConfig, build_llama_tower, make_tiny_llama_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = (
    "no acute cardiopulmonary process mild cardiomegaly small left right pleural effusion "
    "lower lobe opacity concerning for pneumonia endotracheal tube terminates above the carina "
    "interval improvement bilateral pulmonary edema stable heart size normal lungs are clear "
    "there is atelectasis at the base without pneumothorax unchanged mediastinal contours"
).split()


def report_lengths(n: int, seed: int = 0) -> list[int]:
    """Word counts whose distribution has median 43 and 90th percentile 80 (log-normal)."""
    rng = np.random.default_rng(seed)
    sigma = math.log(80 / 43) / 1.2816
    return [int(np.clip(round(x), 3, 200)) for x in rng.lognormal(math.log(43), sigma, n)]


def texts_of(lengths: list[int], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCAB) for _ in range(n)) + "." for n in lengths]


def forward_flops(macs: int, layers: int, width: int, tokens: float) -> float:
    return 2 * macs * tokens + 4 * layers * tokens**2 * width


# ---- cache -----------------------------------------------------------------------------------


def analytic_7b() -> None:
    """LLaMA-2-7B against ViT-B/16 at 224 (a tower with 12 layers of 768, 197 tokens)."""
    llama_macs = 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    vit_macs = 12 * (4 * 768**2 + 2 * 4 * 768**2)
    image_fwd = forward_flops(vit_macs, 12, 768, 197)
    print("\nLLaMA-2-7B (frozen) against ViT-B/16 (trained), per sample:")
    for tokens in (43, 80, 128):
        text_fwd = forward_flops(llama_macs, 32, 4096, tokens)
        step_ratio = (text_fwd + 3 * image_fwd) / (3 * image_fwd)
        print(
            f"  {tokens:>3} tokens: text forward {text_fwd / 1e9:,.0f} GFLOP = "
            f"{text_fwd / image_fwd:.0f}x the image forward ({image_fwd / 1e9:.1f} GFLOP); "
            f"uncached / cached step FLOPs {step_ratio:.1f}x"
        )
    per_token = 4096 * 2
    print(
        f"  cache bytes per report (float16): pooled {per_token / 1e3:.1f} KB; token states "
        f"{per_token / 1e3:.1f} KB per token = {43 * per_token / 1e3:.0f} KB at 43 tokens, "
        f"{80 * per_token / 1e3:.0f} KB at 80"
    )
    text_43 = forward_flops(llama_macs, 32, 4096, 43)
    print(
        f"  a 43-token report: {text_43 / 400e12 * 1e3:.2f} ms of tower at 400 TFLOP/s against "
        f"{43 * per_token / 2e9 * 1e3:.2f} ms to read its states at 2 GB/s: caching pays from the "
        "second epoch on, as long as the cache's reads keep up (token states of 377k MIMIC-CXR "
        f"reports: {377_000 * 43 * per_token / 1e9:.0f} GB at the median length; pooled: "
        f"{377_000 * per_token / 1e9:.1f} GB)"
    )


def bench_cache(args, root: Path) -> None:
    from shards.mimic_cxr import write_cxr_shards
    from shards.reader import read_texts
    from shards.synthetic.cxr import generate_mimic_cxr

    paths = generate_mimic_cxr(root / "raw", subjects=args.subjects, size=128, seed=0)
    write_cxr_shards(paths["root"], paths["reports_root"], root / "shards", size=64)
    train = root / "shards" / "train"
    llama = make_tiny_llama_checkpoint(
        root / "llama",
        read_texts(str(train)),
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=4,
        intermediate_size=args.intermediate,
        vocab_size=1024,
    )
    for pool in (False, True):
        _cache_variant(args, root, train, llama, pool)
    analytic_7b()


def _cache_variant(args, root: Path, train: Path, llama: str, pool: bool) -> None:
    from accelerate import Accelerator

    from models.alifuse import build_model
    from shards.reader import build_train_loader
    from trainer.config import load_config
    from trainer.flops import linear_macs
    from trainer.loop import Mover, train_step
    from trainer.optim import build_optimizer
    from trainer.tasks import build_task
    from trainer.text_cache import prepare_text_cache

    cuda = args.device.startswith("cuda")
    cfg = load_config(
        str(REPO / "configs" / "cxr_mae_llama_align.yaml"),
        [
            f"data.train={train}",
            f"data.batch_size={args.batch}",
            "data.shuffle_buffer=64",
            f"data.text_cache_dir={root / 'cache'}",
            "data.verify_shards=off",
            "data.num_workers=0",
            "model.vision.img_size=64",
            "model.vision.patch_size=16",
            "model.vision.embed_dim=64",
            "model.vision.depth=2",
            "model.vision.num_heads=2",
            f"model.llama.checkpoint={llama}",
            f"model.llama.mode={'frozen_4bit' if cuda else 'frozen'}",
            "model.llama.max_length=128",
            "model.attention_pool.num_heads=4",
            "model.attention_pool.out_dim=64",
            "model.embed_dim=64",
            "train.init_from=",
            *([] if pool else ["model.attention_pool.enabled=false", "model.contrastive=infonce"]),
        ],
    )
    accelerator = Accelerator(cpu=not cuda)
    torch.manual_seed(0)
    model = build_model(cfg.model, accelerator.device)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    bare = accelerator.unwrap_model(model)
    task, move = build_task(cfg), Mover(accelerator)

    start = time.perf_counter()
    cache = prepare_text_cache(bare, cfg.data, str(train), 128, accelerator)
    build_s = time.perf_counter() - start
    n_reports = len(cache._arrays()["index"])
    stored = sum(f.stat().st_size for f in cache.folder.iterdir())
    tokens = cache.lengths(list(cache._arrays()["index"])).float()

    v = bare.visual
    image_fwd = forward_flops(
        linear_macs(v.blocks), len(v.blocks), v.cfg.embed_dim, v.cfg.num_patches + 1
    )
    t = bare.text
    text_fwd = forward_flops(
        linear_macs(t.layers), len(t.layers), t.hidden_size, float(tokens.mean())
    )
    what = (
        "the preset: attention pool + margin loss, token-state cache"
        if pool
        else ("pooled ITC (InfoNCE), pooled cache")
    )
    print(f"\n{what}")
    print(
        f"  {n_reports} reports of the training split (mean {tokens.mean():.0f} tokens); image tower "
        f"{v.cfg.embed_dim}x{len(v.blocks)} on {v.cfg.num_patches + 1} tokens, LLaMA "
        f"{t.hidden_size}x{len(t.layers)}: text forward / image forward FLOPs per sample "
        f"{text_fwd / image_fwd:.0f}x"
    )

    def loader(text_cache):
        return iter(
            build_train_loader(
                str(train), cfg.data, bare.tokenizer, 128, 0, 1, 0, text_cache=text_cache
            )
        )

    streams = {"uncached": loader(None), "cached": loader(cache)}
    times: dict[str, list[float]] = {k: [] for k in streams}

    def step(name: str) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        batch = move(next(streams[name]))
        train_step(task, model, [batch], optimizer, accelerator, 1.0)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for name in streams:
        for _ in range(3):
            step(name)
    for _ in range(args.rounds):
        for name in streams:
            times[name] += [step(name) for _ in range(5)]
    uncached, cached = (statistics.median(times[k]) for k in ("uncached", "cached"))
    print(
        f"  step time (batch {args.batch}, median of {len(times['cached'])}): uncached "
        f"{uncached * 1e3:.1f} ms, cached {cached * 1e3:.1f} ms, ratio {uncached / cached:.1f}x"
    )
    print(
        f"  cache build: {build_s:.1f} s for {n_reports} reports; {stored / n_reports / 1e3:.2f} KB "
        f"per report on disk ({cache.kind}, float16, hidden {t.hidden_size})"
    )


# ---- padding ---------------------------------------------------------------------------------


def _ad_sample(i: int, text: str) -> dict:
    vol = np.zeros((4, 4, 4), dtype=np.float16)
    buf = io.BytesIO()
    np.save(buf, vol)
    meta = {"subject": f"s{i}", "cohort": "ADNI", "label": i % 3, "split": "train"}
    return {
        "__key__": f"k{i:06d}",
        "vol.npy": buf.getvalue(),
        "txt": text,
        "json": json.dumps(meta),
    }


def bench_padding(args, root: Path) -> None:
    import webdataset as wds

    from shards.reader import DataConfig, ShardSet, TrainStream

    n = args.reports
    texts = texts_of(report_lengths(n))
    folder = root / "reports"
    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "train-000000.tar")) as sink:
        for i, text in enumerate(texts):
            sink.write(_ad_sample(i, text))
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "split": "train",
                "num_samples": n,
                "shards": [{"name": "train-000000.tar", "num_samples": n}],
            }
        )
    )
    llama = make_tiny_llama_checkpoint(
        root / "llama_pad",
        texts[:2000],
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=4,
        intermediate_size=args.intermediate,
        vocab_size=512,
    )
    tower = build_llama_tower(
        LlamaTextConfig(checkpoint=llama, mode="lora", max_length=128, lora_dropout=0.0),
        args.device,
    )
    real = [len(tower.tokenizer(t, truncation=True, max_length=128)["input_ids"]) for t in texts]
    print(
        f"\npadding: {n} reports, tokens per report median {statistics.median(real):.0f}, "
        f"90th percentile {np.percentile(real, 90):.0f}, max_length 128, batch {args.batch}"
    )
    shards = ShardSet.load(str(folder))
    modes = {
        "max_length": DataConfig(batch_size=args.batch, shuffle_buffer=256, pad_to="max_length"),
        "longest": DataConfig(batch_size=args.batch, shuffle_buffer=256),
        f"longest + bucket_batches={args.bucket}": DataConfig(
            batch_size=args.batch, shuffle_buffer=256, bucket_batches=args.bucket
        ),
    }
    params = [p for p in tower.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def text_step(batch) -> float:
        ids, mask = batch["input_ids"].to(args.device), batch["attention_mask"].to(args.device)
        t0 = time.perf_counter()
        tower(ids, mask).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    epochs, ratios = {}, {}
    for name, cfg in modes.items():
        it = iter(TrainStream(shards, cfg, tower.tokenizer, 128, seed=0))
        epochs[name] = [next(it) for _ in range(n // args.batch)]
        padded = sum(b["attention_mask"].numel() for b in epochs[name])
        ratios[name] = padded / sum(int(b["text_tokens"].sum()) for b in epochs[name])
    times: dict[str, list[float]] = {name: [] for name in modes}
    for i in range(args.timed_batches + 2):  # interleaved, batch i of every mode in turn
        for name in modes:
            elapsed = text_step(epochs[name][i])
            if i >= 2:  # warm-up
                times[name].append(elapsed)
    base = statistics.median(times["max_length"])
    for name in modes:
        step = statistics.median(times[name])
        print(
            f"  {name:<28} padded / real tokens {ratios[name]:.3f}   text step {step * 1e3:7.1f} ms"
            f"   gain over max_length {base / step:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["cache", "padding", "all"], default="all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--subjects", type=int, default=40, help="synthetic CXR subjects (cache)")
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=4, help="blocks of 5 steps per variant")
    parser.add_argument("--reports", type=int, default=4096)
    parser.add_argument("--bucket", type=int, default=64, help="data.bucket_batches")
    parser.add_argument("--timed-batches", type=int, default=24)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("cache", "all"):
            bench_cache(args, Path(tmp))
        if args.part in ("padding", "all"):
            bench_padding(args, Path(tmp))


if __name__ == "__main__":
    main()
