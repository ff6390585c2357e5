"""Benchmarks activation checkpointing of the ViT blocks (`VisionConfig.grad_checkpointing`).

    python scripts/bench_checkpointing.py [--quick] [--compile]
    python scripts/bench_checkpointing.py --device cuda       # ViT-B, bf16 autocast

One training step of the image tower, without and with checkpointing, the same weights and
inputs, side by side in one run: `VisionTransformer` on all tokens (no masking, as in
fine-tuning) -> CLS -> linear head -> cross-entropy -> backward -> AdamW step, on 2D images
(224^2, patch 16: 197 tokens) and 3D volumes (128^3, patch 16: 513 tokens).

- step time: median of repeats after warm-up, the two variants timed interleaved.
- saved activations: bytes of the distinct tensor storages autograd saves for backward during
  the forward (`torch.autograd.graph.saved_tensors_hooks`), parameters and the input image
  left out (they are in memory anyway). Checkpointed blocks keep only their input, which
  non-reentrant checkpointing saves through autograd outside its own hooks, so it is counted.
- peak memory: the peak bytes allocated during one whole step above the level at its start
  (after warm-up, so AdamW's state already exists): `torch.cuda.max_memory_allocated` on
  CUDA; on CPU the running maximum of the profiler's allocation / free events (see
  bench_attention.py). It includes the parameter gradients and the optimizer's temporaries,
  which checkpointing cannot shrink, so at small batches it falls much less than the saved
  activations do.
Expectations (ours, the issue sets none): saved activations at least 3x smaller, and a step
at most 1.5x slower (recomputation costs about one more forward: ideally about 1.33x).

--compile adds the same two variants under `torch.compile` (slow to compile on CPU; off by
default). Sizes as in bench_mae.py: ViT-S (384 / 12 / 6) by default on CPU, ViT-B
(768 / 12 / 12) on CUDA; --quick uses 2 blocks and fewer repeats (< 60 s on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_attention import (  # sibling script: scripts/ is on sys.path
    VIT_LAYOUTS,
    VIT_SIZES,
    add_vit_args,
    median_times,
    peak_memory,
    print_table,
    resolve_vit_args,
    run_header,
)
from torch import Tensor, nn

from models.vit import VisionConfig, VisionTransformer

MAX_TIME_RATIO = 1.5
MIN_SAVED_RATIO = 3.0
MiB = 2**20
NUM_CLASSES = 10


def saved_activation_bytes(exclude: list[Tensor], fn: Callable[[], Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while fn runs, leaving out the storages
    of `exclude` (parameters and inputs: they are in memory anyway)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()  # alive until the end, so no saved storage is freed and its address reused
    del out
    return sum(saved.values())


def bench_layout(
    layout: str, args: argparse.Namespace, device: torch.device
) -> list[tuple[str, dict[str, float], dict[str, int], dict[str, int]]]:
    """(variant label, step seconds, saved bytes, peak bytes) for eager and, if asked, compiled."""
    model = {**VIT_SIZES[args.size], **({"depth": args.depth} if args.depth else {})}
    cfg = VisionConfig(**model, **VIT_LAYOUTS[layout])
    torch.manual_seed(0)
    towers = {"plain": VisionTransformer(cfg).to(device)}
    towers["ckpt"] = VisionTransformer(dataclasses.replace(cfg, grad_checkpointing=True))
    towers["ckpt"].to(device).load_state_dict(towers["plain"].state_dict())
    heads = {name: nn.Linear(cfg.embed_dim, NUM_CLASSES).to(device) for name in towers}
    heads["ckpt"].load_state_dict(heads["plain"].state_dict())
    shape = (args.batch, cfg.in_chans) + (cfg.img_size,) * cfg.spatial_dims
    imgs = torch.randn(shape, device=device)
    labels = torch.randint(NUM_CLASSES, (args.batch,), device=device)
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    )
    results = []
    for compiled in [False, True] if args.compile else [False]:
        steps, forwards, params = {}, {}, {}
        for name, vit in towers.items():
            tower = torch.compile(vit) if compiled else vit
            head = heads[name]
            params[name] = [*vit.parameters(), *head.parameters()]
            opt = torch.optim.AdamW(params[name], lr=1e-4, fused=device.type == "cuda")

            def forward(tower: nn.Module = tower, head: nn.Module = head) -> Tensor:
                with amp:
                    return F.cross_entropy(head(tower(imgs)).float(), labels)

            def step(forward: Callable[[], Tensor] = forward, opt=opt) -> None:
                forward().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            steps[name], forwards[name] = step, forward
        times = median_times(steps, device, args.warmup, args.repeats, args.min_time)
        saved = {n: saved_activation_bytes([*params[n], imgs], forwards[n]) for n in steps}
        peak = {n: peak_memory(steps[n], device) for n in steps}
        label = f"{layout} compiled" if compiled else layout
        results.append((label, times, saved, peak))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_vit_args(parser, "2 blocks, few repeats (< 60 s)")
    parser.add_argument("--compile", action="store_true", help="also time under torch.compile")
    args = parser.parse_args()
    device = resolve_vit_args(args)
    size = VIT_SIZES[args.size]
    print(run_header(args, device))
    print(
        f"model: {args.size} width {size['embed_dim']}, depth {args.depth or size['depth']}, "
        f"heads {size['num_heads']}; all tokens, CLS -> linear head -> cross-entropy, AdamW"
    )
    headers = ["layout", "plain ms", "ckpt ms", "time ckpt/plain", "result", "plain saved MiB"]
    headers += ["ckpt saved MiB", "saved plain/ckpt", "result", "plain peak MiB", "ckpt peak MiB"]
    headers += ["peak plain/ckpt"]
    rows, met = [], True
    for layout in args.layouts:
        for label, t, saved, peak in bench_layout(layout, args, device):
            time_ratio = t["ckpt"] / t["plain"]
            saved_ratio = saved["plain"] / max(saved["ckpt"], 1)
            time_ok, saved_ok = time_ratio <= MAX_TIME_RATIO, saved_ratio >= MIN_SAVED_RATIO
            met &= time_ok and saved_ok
            rows.append(
                [
                    label,
                    f"{t['plain'] * 1e3:.1f}",
                    f"{t['ckpt'] * 1e3:.1f}",
                    f"{time_ratio:.2f}x",
                    "PASS" if time_ok else "MISS",
                    f"{saved['plain'] / MiB:.1f}",
                    f"{saved['ckpt'] / MiB:.1f}",
                    f"{saved_ratio:.2f}x",
                    "PASS" if saved_ok else "MISS",
                    f"{peak['plain'] / MiB:.1f}",
                    f"{peak['ckpt'] / MiB:.1f}",
                    f"{peak['plain'] / max(peak['ckpt'], 1):.2f}x",
                ]
            )
    print()
    print_table(headers, rows)
    print(
        f"\nexpectations: step time ckpt/plain <= {MAX_TIME_RATIO}x, saved activations "
        f"plain/ckpt >= {MIN_SAVED_RATIO}x: {'PASS' if met else 'MISS'}"
    )


if __name__ == "__main__":
    main()
