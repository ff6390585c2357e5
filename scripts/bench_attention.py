"""Benchmarks the project's attention (`models.attention.Attention`, on SDPA) against eager
softmax(Q K^T / sqrt(d)) V with the same weights.

    python scripts/bench_attention.py [--quick]           # CPU, float32: the issue's target
    python scripts/bench_attention.py --device cuda       # + SDPA backends in bf16 on the GPU

What is measured, side by side in one run (issue target: >= 1.3x on CPU):
- module: `Attention` (qkv projection -> SDPA -> output projection) against the same module
  with `eager_attention` (the project's test reference) in place of SDPA, on (B, N, 768)
  inputs: 12 heads of dim 64 by default. The issue's "attention module".
- core: the kernel alone, `F.scaled_dot_product_attention(q, k, v)` against
  `eager_attention(q, k, v)` on (B, H, N, d) tensors. The projections, which SDPA cannot
  speed up, hold most of the module's FLOPs (attention / projections = N / 2D: 13% at
  N = 197, 33% at N = 512), so the module's speedup is bounded well below the core's.
The target is judged per row, for both levels.
Each at sequence lengths 197 and 512, for the forward pass (inference, under no_grad) and for
forward + backward. Times are medians over repeats; the two sides are timed interleaved
(ours, eager, ours, eager, ...) so that load from other processes hits both alike, after
warm-up calls; each repeat runs the call enough times to last --min-time seconds.

Peak memory is the peak of bytes allocated during one call above the level at its start. On
CUDA it is `torch.cuda.max_memory_allocated`. On CPU, which has no allocator statistics, it is
read from `torch.profiler` with profile_memory=True: every allocation (+bytes) and free
(-bytes) of the CPU allocator is an event, and the peak is the running maximum of their sum in
time order. Eager attention materialises the (B, H, N, N) score and probability matrices (and
keeps them for backward); SDPA's fused kernels do not, which this column shows.

With --device cuda, also (bf16, head dim 64, seq 197 / 512 / 4096, --cuda-tokens tokens per
batch): each SDPA backend alone (FLASH_ATTENTION, EFFICIENT_ATTENTION, CUDNN_ATTENTION, MATH,
chosen with `torch.nn.attention.sdpa_kernel`), fwd and fwd+bwd, in TFLOP/s and as a fraction
of the H100's 989 dense bf16 TFLOP/s, with peak memory. FLOPs count the two matmuls,
fwd = 4 * B * H * N^2 * d, and fwd+bwd = 3.5x that (backward = 5 matmuls of the same size, as
FlashAttention counts it; recomputation not counted). A backend that rejects the inputs is
shown as n/a with the reason.

Default-path check (every device): the module's forward + backward must run with the math
backend disabled (`sdpa_kernel([FLASH, EFFICIENT, CUDNN])`), and the aten op its unrestricted
call dispatches to (seen by the profiler) must not be `_scaled_dot_product_attention_math`.

The profiler prints a few "USDT ... profiler_start/stop" lines on stderr; they are harmless.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from models.attention import Attention, eager_attention

TARGET_SPEEDUP = 1.3  # the target, on CPU
H100_BF16_DENSE_FLOPS = 989e12
MiB = 2**20


# ViT sizes and input layouts shared by the ViT benchmarks (bench_mae.py, bench_checkpointing.py).
VIT_SIZES = {
    "vit-b": dict(
        embed_dim=768,
        depth=12,
        num_heads=12,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
    ),
    "vit-s": dict(
        embed_dim=384,
        depth=12,
        num_heads=6,
        decoder_embed_dim=256,
        decoder_depth=4,
        decoder_num_heads=8,
    ),
}
VIT_LAYOUTS = {
    "2D": dict(spatial_dims=2, img_size=224, in_chans=3),
    "3D": dict(spatial_dims=3),
}


def add_vit_args(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """The flags every ViT benchmark takes: device, size, depth, batch, layouts, precision,
    timing and --quick."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", choices=sorted(VIT_SIZES), help="default: vit-s CPU, vit-b CUDA")
    parser.add_argument("--depth", type=int, help="encoder depth, overriding the size's")
    parser.add_argument("--batch", type=int, help="default: 2 on CPU, 64 on CUDA")
    parser.add_argument(
        "--layouts", nargs="+", default=list(VIT_LAYOUTS), choices=list(VIT_LAYOUTS)
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="bf16 autocast (default: on for CUDA, off for CPU)",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.0, help="seconds per repeat, least")
    parser.add_argument("--quick", action="store_true", help=quick_help)


def resolve_vit_args(args: argparse.Namespace) -> torch.device:
    """Fills the device-dependent defaults of `add_vit_args` in place; returns the device."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    cuda = device.type == "cuda"
    args.size = args.size or ("vit-b" if cuda else "vit-s")
    args.batch = args.batch or (64 if cuda else 2)
    args.bf16 = cuda if args.bf16 is None else args.bf16
    if cuda:
        args.warmup, args.repeats = max(args.warmup, 5), max(args.repeats, 10)
    if args.quick:
        args.depth = args.depth or 2
        args.warmup, args.repeats = 2, 3
    return device


def run_header(args: argparse.Namespace, device: torch.device) -> str:
    """The first line a ViT benchmark prints: versions, device, precision, timing."""
    return (
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"{'bf16 autocast' if args.bf16 else 'float32'}, batch {args.batch}, "
        f"warmup {args.warmup}, median of {args.repeats}" + (" (quick)" if args.quick else "")
    )


def sync(device: torch.device) -> None:
    """Waits for the device's queued work, so that wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int,
    repeats: int,
    min_time: float,
) -> dict[str, float]:
    """Median seconds per call of each fn, the fns timed interleaved repeat by repeat (in
    alternating order), after `warmup` calls each."""
    inner = dict.fromkeys(fns, 1)
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        if min_time > 0:  # calls per repeat: enough to last min_time
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            inner[name] = max(1, math.ceil(min_time / max(time.perf_counter() - start, 1e-9)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for repeat in range(repeats):
        for name, fn in list(fns.items())[:: 1 if repeat % 2 == 0 else -1]:
            sync(device)
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / inner[name])
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while fn runs, above the level at its start (how: this module's
    docstring)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # + on allocation, - on free
        peak = max(peak, live)
    return peak


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """Right-aligned columns, one line per row."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def eager_module(attn: Attention, x: Tensor) -> Tensor:
    """`attn` with eager attention in place of SDPA: the same weights and projections."""
    q, k, v = attn.project(x)
    return attn.proj(eager_attention(q, k, v).transpose(1, 2).flatten(2))


def make_pass(fn: Callable[[], Tensor], backward: bool) -> Callable[[], None]:
    """One call of the benchmark: fn under no_grad, or fn then backward of a fixed gradient."""
    if not backward:

        def fwd() -> None:
            with torch.no_grad():
                fn()

        return fwd

    grad_out: list[Tensor] = []

    def fwd_bwd() -> None:
        out = fn()
        if not grad_out:
            grad_out.append(torch.randn_like(out))
        out.backward(grad_out[0])

    return fwd_bwd


def sdpa_with(backend: SDPBackend, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA with only `backend` allowed: raises RuntimeError where it cannot take the inputs."""
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


def clear_grads(leaves: list[Tensor]) -> None:
    for t in leaves:
        t.grad = None


def compare_to_eager(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict[str, bool]:
    """The module-vs-eager table; returns, per level, whether every row meets the target."""
    dim = args.heads * args.head_dim
    torch.manual_seed(0)
    attn = Attention(dim, args.heads).to(device, dtype)
    params = list(attn.parameters())
    headers = ["level", "seq", "pass", "ours ms", "eager ms", "speedup", "target", "result"]
    headers += ["ours MiB", "eager MiB", "eager/ours mem"]
    rows, met_by_level = [], {}
    for seq in args.seqs:
        x = torch.randn(args.batch, seq, dim, device=device, dtype=dtype, requires_grad=True)
        q, k, v = (
            torch.randn(
                args.batch, args.heads, seq, args.head_dim, device=device, dtype=dtype
            ).requires_grad_(True)
            for _ in range(3)
        )
        levels = {
            "module": ([x, *params], partial(attn, x), partial(eager_module, attn, x)),
            "core": (
                [q, k, v],
                partial(F.scaled_dot_product_attention, q, k, v),
                partial(eager_attention, q, k, v),
            ),
        }
        for level, (leaves, ours, eager) in levels.items():
            for backward in (False, True):
                fns = {
                    "ours": make_pass(ours, backward),
                    "eager": make_pass(eager, backward),
                }
                t = median_times(fns, device, args.warmup, args.repeats, args.min_time)
                mem = {}
                for name, fn in fns.items():
                    clear_grads(leaves)  # so both sides allocate their gradients afresh
                    mem[name] = peak_memory(fn, device)
                clear_grads(leaves)
                speedup = t["eager"] / t["ours"]
                judged = device.type == "cpu"  # the target is a CPU one
                met = speedup >= TARGET_SPEEDUP
                met_by_level[level] = met_by_level.get(level, True) and met
                rows.append(
                    [
                        level,
                        seq,
                        "fwd+bwd" if backward else "fwd",
                        f"{t['ours'] * 1e3:.2f}",
                        f"{t['eager'] * 1e3:.2f}",
                        f"{speedup:.2f}x",
                        f">={TARGET_SPEEDUP}x" if judged else "-",
                        ("PASS" if met else "MISS") if judged else "-",
                        f"{mem['ours'] / MiB:.1f}",
                        f"{mem['eager'] / MiB:.1f}",
                        f"{mem['eager'] / max(mem['ours'], 1):.2f}x",
                    ]
                )
    print(
        f"\n== Attention vs eager: batch {args.batch}, {args.heads} heads x {args.head_dim} "
        f"(dim {dim}), {str(dtype).removeprefix('torch.')}, {device}"
    )
    print_table(headers, rows)
    return met_by_level


def default_path_check(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> bool:
    """The module's fwd+bwd runs with the math backend off, and its default op is not math."""
    dim = args.heads * args.head_dim
    attn = Attention(dim, args.heads).to(device, dtype)
    x = torch.randn(args.batch, args.seqs[0], dim, device=device, dtype=dtype)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        attn(x).float().sum().backward()
    ops = sorted({e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot")})
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    try:
        with sdpa_kernel(fused):
            attn(x).float().sum().backward()
        restricted = "runs"
    except RuntimeError as err:
        restricted = f"fails: {str(err).splitlines()[0]}"
    ok = restricted == "runs" and bool(ops) and not any("math" in op for op in ops)
    print(f"\n== Default path ({device}, {str(dtype).removeprefix('torch.')}, seq {args.seqs[0]})")
    print(f"aten ops of an unrestricted call: {', '.join(ops) or 'none seen'}")
    print(f"with the math backend disabled (FLASH, EFFICIENT, CUDNN only): {restricted}")
    print(f"default path avoids the math backend: {'PASS' if ok else 'MISS'}")
    return ok


def cuda_backends(args: argparse.Namespace, device: torch.device) -> None:
    """Each SDPA backend alone, bf16: TFLOP/s, fraction of the H100's dense bf16 peak, memory."""
    backends = [
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.MATH,
    ]
    headers = ["backend", "seq", "batch", "pass", "ms", "TFLOP/s", "of 989", "peak MiB", "note"]
    rows = []
    for seq in args.cuda_seqs:
        batch = max(1, args.cuda_tokens // seq)
        q, k, v = (
            torch.randn(
                batch, args.heads, seq, args.head_dim, device=device, dtype=torch.bfloat16
            ).requires_grad_(True)
            for _ in range(3)
        )
        fwd_flops = 4 * batch * args.heads * seq * seq * args.head_dim
        for backend in backends:
            for backward in (False, True):
                name = "fwd+bwd" if backward else "fwd"
                fn = make_pass(partial(sdpa_with, backend, q, k, v), backward)
                try:
                    t = median_times({"x": fn}, device, args.warmup, args.repeats, args.min_time)
                    clear_grads([q, k, v])
                    mem = peak_memory(fn, device)
                except RuntimeError as err:  # this backend does not take these inputs
                    reason = str(err).splitlines()[0][:60]
                    rows.append([backend.name, seq, batch, name, "n/a", "", "", "", reason])
                    continue
                finally:
                    clear_grads([q, k, v])
                    torch.cuda.empty_cache()
                flops = fwd_flops * (3.5 if backward else 1.0)
                achieved = flops / t["x"]
                rows.append(
                    [
                        backend.name,
                        seq,
                        batch,
                        name,
                        f"{t['x'] * 1e3:.3f}",
                        f"{achieved / 1e12:.1f}",
                        f"{achieved / H100_BF16_DENSE_FLOPS:.1%}",
                        f"{mem / MiB:.0f}",
                        "",
                    ]
                )
        del q, k, v
        torch.cuda.empty_cache()
    print(
        f"\n== SDPA backends, bf16, {args.heads} heads x {args.head_dim}, "
        f"{args.cuda_tokens} tokens per batch ({torch.cuda.get_device_name(device)})"
    )
    print("FLOPs: fwd 4*B*H*N^2*d, fwd+bwd 3.5x fwd; 'of 989' = fraction of H100 dense bf16")
    print_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="default: float32 on CPU, bf16 on CUDA"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seqs", type=int, nargs="+", default=[197, 512])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per repeat, least")
    parser.add_argument("--cuda-seqs", type=int, nargs="+", default=[197, 512, 4096])
    parser.add_argument("--cuda-tokens", type=int, default=32768, help="batch = this // seq")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (< 60 s on CPU)")
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.repeats, args.min_time = 2, 5, 0.02
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    default_dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, args.dtype or default_dtype)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"warmup {args.warmup}, median of {args.repeats} repeats"
        + (" (quick)" if args.quick else "")
    )
    met_by_level = compare_to_eager(args, device, dtype)
    default_ok = default_path_check(args, device, dtype)
    if device.type == "cuda":
        cuda_backends(args, device)
    if device.type == "cpu":
        print(f"\ntarget: speedup >= {TARGET_SPEEDUP}x on CPU, every row of the level:")
        for level, met in met_by_level.items():
            print(f"  {level}: {'PASS' if met else 'MISS'}")
    print(f"default path without math backend: {'PASS' if default_ok else 'MISS'}")


if __name__ == "__main__":
    main()
