"""Memory benchmark: per-rank model-state bytes of DDP vs DeepSpeed ZeRO-1/2/3 at 2 processes,
and the NF4 (4-bit) LLaMA text tower vs the same tower in bf16. Ratios are measured side by
side in one run and checked against the targets of the issue.

    python scripts/bench_memory.py            # ViT-B, ~4 minutes on 2 CPU cores
    python scripts/bench_memory.py --quick    # ViT-S and a smaller LLaMA, ~2 minutes

ZeRO part. For each of DDP (`accelerate launch --multi_gpu`, the trainer's `Accelerator(cpu=True)`)
and DeepSpeed ZeRO stages 1, 2, 3 (`--use_deepspeed` with configs/deepspeed/zero{1,2,3}.json,
gloo), two processes run `scripts/_bench_memory_worker.py`: the project's ViT image tower
(models/vit.py, 3D, patch 16; ViT-B: 768 wide, 12 blocks, 88.2M parameters, the default
`model.vision` of the AD preset) with a linear head, the trainer's `build_accelerator`, bf16
mixed precision and `torch.optim.AdamW`. After the last backward and before the last optimizer
step (all states alive, Adam moments created by the step before) each rank counts the tensor
storages it holds, each storage once:

    params  the module's parameters (ZeRO-1/2: the replicated bf16 flat buffer; ZeRO-3: this
            rank's `ds_tensor` partitions plus the whole persistent small parameters)
    grads   DDP: `param.grad`; ZeRO-1/2: `averaged_gradients` (this rank's partition);
            ZeRO-3: `grad_partitions_flat_buffer`
    optim   DDP: AdamW's exp_avg / exp_avg_sq; ZeRO-1/2: `single_partition_of_fp32_groups`
            (fp32 master partition) and its AdamW state; ZeRO-3: `fp32_partitioned_groups_flat`
            and its state

Model states = params + grads + optim, compared with DDP's and with the analytic ZeRO numbers
for mixed-precision Adam (Psi parameters, N = 2 ranks): DDP 16 Psi (here fp32 weights, fp32
grads and two fp32 moments under autocast: 4 + 4 + 8); ZeRO-1 2 + 2 + 12/N; ZeRO-2 2 + (2 + 12)/N;
ZeRO-3 16/N, i.e. 0.625 / 0.5625 / 0.50 of DDP. With `--precision fp32` (no master copy
needed): ZeRO-1 4 + 4 + 8/N, ZeRO-2 4 + 12/N, ZeRO-3 16/N, i.e. 0.75 / 0.625 / 0.50.
Reported apart, not in the ratio: communication buffers (DDP's reducer buckets, a second full
copy of the gradients; DeepSpeed's reduce buckets, sized by `reduce_bucket_size`, not by the
model) and, for ZeRO-3, the layer gathered while backward runs; every tensor reachable from
Python (gc); and process RSS, where imports and the allocator dominate at this size.

NF4 part. `make_tiny_llama_checkpoint` writes a random LLaMA (default hidden 1024, 8 layers,
MLP 2816, a ~500-token SentencePiece vocabulary, so the linear layers hold 99% of the weights);
`build_llama_tower` loads it as qlora (NF4, double quant, bf16 compute) vs lora (bf16), and
frozen_4bit vs frozen (bf16), and `model_state_bytes` measures each. Two ratios per pair: the
whole tower, and the quantized linear layers only (qlora's `prepare_model_for_kbit_training`
upcasts the embedding and the norms to fp32, which weighs heavily in a small model: the default
tiny tower, hidden 64, is shown as well), next to the analytic numbers for LLaMA-2-7B.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "scripts" / "_bench_memory_worker.py"
WORLD = 2
VITS = {  # embed_dim, depth, heads: the project's ViT in the two usual sizes
    "base": (768, 12, 12),  # 88.2M parameters (3D patch 16)
    "small": (384, 12, 6),  # 22.0M
}
TARGET_NF4 = 0.30
MB = 1e6


# ----------------------------------------------------------------------------- ZeRO part


def expected_ratios(precision: str, n: int = WORLD) -> dict[str, float]:
    """Model-state bytes per rank relative to DDP, Adam, from the ZeRO paper's accounting."""
    if precision == "bf16":  # 2 B weights, 2 B grads, 12 B fp32 master + moments; DDP 16
        per_rank = {"zero1": 2 + 2 + 12 / n, "zero2": 2 + (2 + 12) / n, "zero3": 16 / n}
    else:  # fp32: 4 B weights, 4 B grads, 8 B moments, no master copy needed; DDP 16
        per_rank = {"zero1": 4 + 4 + 8 / n, "zero2": 4 + (4 + 8) / n, "zero3": 16 / n}
    return {"ddp": 1.0, **{k: v / 16 for k, v in per_rank.items()}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(mode: str, args: argparse.Namespace, out: Path) -> list[dict]:
    """Runs the worker on 2 processes in `mode`; returns the ranks' records."""
    precision = "bf16" if args.precision == "bf16" else "no"
    if mode == "ddp":
        topology = ["--multi_gpu"]
    else:
        config = REPO / "configs" / "deepspeed" / f"{mode}.json"
        topology = ["--use_deepspeed", "--deepspeed_config_file", str(config)]
    embed, depth, heads = VITS[args.vit]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--num_processes",
        str(WORLD),
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        precision,
        *topology,
        str(WORKER),
        f"--out={out / mode}",
        f"--embed-dim={embed}",
        f"--depth={depth}",
        f"--heads={heads}",
        f"--steps={args.steps}",
        f"--precision={precision}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = out / f"{mode}.log"
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{mode}: launch failed ({proc.returncode}):\n{' '.join(cmd)}\n{tail}")
    records = [json.loads((out / mode / f"rank{r}.json").read_text()) for r in range(WORLD)]
    want = "DistributedType.DEEPSPEED" if mode != "ddp" else "DistributedType.MULTI_CPU"
    for rec in records:  # the silent failure modes of ENVIRONMENT.md: check what really ran
        got = rec["launch"]
        if got["distributed_type"] != want or got["num_processes"] != WORLD:
            raise SystemExit(f"{mode}: ran as {got}, expected {want} with {WORLD} processes")
        if mode != "ddp" and got.get("zero_stage") != int(mode[-1]):
            raise SystemExit(f"{mode}: ran ZeRO stage {got.get('zero_stage')}")
    return records


def summarize(rec: dict) -> dict:
    """Model-state classes at the after-backward point; transient buffers at their peak."""
    after = rec["points"]["after_backward"]
    during = rec["points"].get("in_backward", {})
    params = after.get("params", 0) + after.get("params_gathered", 0)  # + persistent (ZeRO-3)
    gathered = max(0, during.get("params_gathered", 0) - after.get("params_gathered", 0))
    comm = max(after.get("comm_buffers", 0), during.get("comm_buffers", 0))
    grads, optim = after.get("grads", 0), after.get("optim", 0)
    return {
        "params": params,
        "grads": grads,
        "optim": optim,
        "states": params + grads + optim,
        "transient": comm + gathered,
        "live": max(after["live_tensors"], during.get("live_tensors", 0)),
        "rss": after["rss"],
        "peak_rss": after["peak_rss"],
    }


def zero_part(args: argparse.Namespace, out: Path) -> list[tuple[str, float, str]]:
    modes = ["ddp", "zero1", "zero2", "zero3"]
    expected = expected_ratios(args.precision)
    results: dict[str, list[dict]] = {}
    for mode in modes:
        start = time.time()
        results[mode] = launch(mode, args, out)
        print(f"  {mode:<6} ran in {time.time() - start:5.1f} s", flush=True)
    n_params = results["ddp"][0]["param_count"]
    embed, depth, _ = VITS[args.vit]
    print(
        f"\nZeRO part: ViT-{args.vit} (3D, {embed} wide, {depth} blocks) + linear head, "
        f"Psi = {n_params / 1e6:.1f}M params, {WORLD} ranks, {args.precision}, AdamW, "
        f"{args.steps} steps; MB = 1e6 B; ratio = model states / DDP's, same rank"
    )
    head = (
        f"{'mode':<6}{'rank':>5}{'params':>9}{'grads':>9}{'optim':>9}{'states':>9}"
        f"{'B/Psi':>7}{'ratio':>7}{'expect':>8}  {'check':<13}"
        f"{'buffers':>9}{'live':>8}{'RSS':>8}{'peakRSS':>8}"
    )
    print(head + "\n" + "-" * len(head))
    checks = []
    ddp = [summarize(r) for r in results["ddp"]]
    for mode in modes:
        for rank, rec in enumerate(results[mode]):
            s = summarize(rec)
            ratio = s["states"] / ddp[rank]["states"]
            exp = expected[mode]
            ok = abs(ratio - exp) <= args.tolerance
            check = "PASS" if ok else ("MISS (lower)" if ratio < exp else "MISS (higher)")
            print(
                f"{mode:<6}{rank:>5}{s['params'] / MB:>9.1f}{s['grads'] / MB:>9.1f}"
                f"{s['optim'] / MB:>9.1f}{s['states'] / MB:>9.1f}{s['states'] / n_params:>7.2f}"
                f"{ratio:>7.3f}{exp:>8.3f}  {check:<13}{s['transient'] / MB:>9.1f}"
                f"{s['live'] / MB:>8.0f}{s['rss'] / MB:>8.0f}{s['peak_rss'] / MB:>8.0f}"
            )
            if rank == 0 and mode != "ddp":
                checks.append((f"{mode} model states vs DDP (expected {exp:.3f})", ratio, check))
    z = results["zero1"][0]
    print(
        f"\n  DeepSpeed: {z.get('optimizer_class')} over torch {z.get('inner_optimizer')}, "
        f"bf16={z.get('bf16')}, gradient dtype {z.get('grad_accum_dtype')}; zero3 buckets "
        f"{results['zero3'][0].get('ds_config_zero')}"
    )
    print(
        "  buffers: DDP reducer buckets (a 2nd copy of the fp32 grads, C++ side); DeepSpeed\n"
        "  reduce buckets (2 x reduce_bucket_size, alive during backward) and, ZeRO-3, the\n"
        "  layer gathered in backward. live: all tensors reachable from Python (gc), peak.\n"
        "  RSS / peakRSS: the process (imports alone are ~0.3 GB, plus allocator caching).\n"
        "  ZeRO-1 vs 2: DeepSpeed runs both with one optimizer (DeepSpeedZeroOptimizer); with\n"
        "  contiguous_gradients (configs/deepspeed/zero1.json) stage 1 also keeps only this\n"
        "  rank's gradient partition once a bucket is reduced, so it holds 1/N of the\n"
        "  gradients like stage 2, not all of them: full gradients exist only inside the\n"
        "  fixed-size reduce buckets during backward (the buffers column)."
    )
    if args.precision == "fp32":
        print(
            "  fp32: DeepSpeed still clones an fp32 master partition next to the fp32 weights\n"
            "  (single_partition_of_fp32_groups / fp32_partitioned_groups_flat): +4 Psi / N of\n"
            "  optimizer state over the ideal, +0.125 of DDP at N = 2 (ZeRO-1's PASS is that\n"
            "  and its partitioned gradients cancelling out)."
        )
    return checks


# ----------------------------------------------------------------------------- NF4 part

CORPUS = [
    f"{finding} {where}; {impression}"
    for finding in (
        "No acute cardiopulmonary process.",
        "Mild cardiomegaly with small bilateral pleural effusions.",
        "Moderate hippocampal atrophy, MMSE 22.",
        "Periventricular white matter hyperintensities (Fazekas 2).",
        "Right lower lobe consolidation, suspicious for pneumonia.",
    )
    for where in ("left side", "right side", "bilateral", "midline", "diffuse")
    for impression in ("follow-up in 6 months", "compare with prior", "no change since 2019")
]


def linear_bytes(module) -> int:
    """State bytes of the base linear layers (4-bit or not), LoRA matrices excluded."""
    from torch import nn

    from models.llama_text import model_state_bytes

    return sum(
        model_state_bytes(m)
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and "lora_" not in name  # bnb Linear4bit is an nn.Linear
    )


def breakdown(tower) -> str:
    """Parameter bytes of the tower by role and dtype, for the explanation."""
    parts: dict[str, int] = {}
    for name, p in tower.named_parameters():
        role = (
            "lora"
            if "lora_" in name
            else "embed"
            if "embed_tokens" in name
            else "norm"
            if "norm" in name
            else "linear"
        )
        key = f"{role} {str(p.dtype).replace('torch.', '')}"
        parts[key] = parts.get(key, 0) + p.numel() * p.element_size()
    return ", ".join(f"{k} {v / MB:.1f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))


def measure_llama(folder: str) -> dict[str, tuple[int, int, str]]:
    """mode -> (whole tower bytes, linear-layer bytes, breakdown) for the 4 modes."""
    from models.llama_text import LlamaTextConfig, build_llama_tower, model_state_bytes

    out = {}
    for mode in ("qlora", "lora", "frozen_4bit", "frozen"):
        cfg = LlamaTextConfig(checkpoint=folder, mode=mode, compute_dtype="bf16")
        tower = build_llama_tower(cfg, device="cpu")
        out[mode] = (model_state_bytes(tower), linear_bytes(tower), breakdown(tower))
        del tower
    return out


def llama2_7b_analytic() -> dict[str, float]:
    """The module docstring's memory plan for LLaMA-2-7B, computed."""
    hidden, layers, mlp, vocab = 4096, 32, 11008, 32000
    linear = layers * (4 * hidden**2 + 3 * hidden * mlp)
    nf4 = linear // 2 + linear // 64 + linear // 64 // 256 * 4  # 4 bit, 8-bit absmax, fp32 / 256
    embed, norms = vocab * hidden, (2 * layers + 1) * hidden
    qlora = nf4 + (embed + norms) * 4  # prepare_model_for_kbit_training upcasts them to fp32
    bf16 = (linear + embed + norms) * 2
    return {"qlora": qlora, "bf16": bf16, "nf4_linear": nf4, "bf16_linear": linear * 2}


def nf4_part(args: argparse.Namespace, out: Path) -> list[tuple[str, float, str]]:
    import warnings

    import transformers

    from models.llama_text import make_tiny_llama_checkpoint

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    hidden, layers, mlp = args.llama_hidden, args.llama_layers, args.llama_intermediate
    heads = max(1, hidden // 64)
    start = time.time()
    folder = make_tiny_llama_checkpoint(
        out / "llama", CORPUS, hidden_size=hidden, num_layers=layers, num_heads=heads,
        intermediate_size=mlp, vocab_size=512,
    )  # fmt: skip
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    sized = measure_llama(folder)
    tiny = measure_llama(make_tiny_llama_checkpoint(out / "llama_tiny", CORPUS))
    print(f"  NF4 towers built and measured in {time.time() - start:5.1f} s")
    a7 = llama2_7b_analytic()

    def check(ratio: float) -> str:
        return "PASS" if ratio <= TARGET_NF4 else "MISS"

    rows = [  # label, 4-bit bytes, bf16 bytes, counted in the checks
        (f"qlora / lora, whole tower (h{hidden} L{layers})", sized["qlora"][0],
         sized["lora"][0], True),
        ("qlora / lora, quantized linears only", sized["qlora"][1], sized["lora"][1], True),
        ("frozen_4bit / frozen, whole tower", sized["frozen_4bit"][0], sized["frozen"][0], True),
        ("frozen_4bit / frozen, linears only", sized["frozen_4bit"][1], sized["frozen"][1], True),
        ("qlora / lora, whole, default tiny (h64 L2)", tiny["qlora"][0], tiny["lora"][0],
         False),
        ("qlora / lora, linears, default tiny (h64 L2)", tiny["qlora"][1], tiny["lora"][1],
         False),
        ("LLaMA-2-7B analytic: qlora / bf16, whole", a7["qlora"], a7["bf16"], True),
        ("LLaMA-2-7B analytic: NF4 / bf16, linears", a7["nf4_linear"], a7["bf16_linear"], True),
    ]  # fmt: skip
    print(
        f"\nNF4 part: LLaMA tower, {layers} layers, hidden {hidden}, MLP {mlp}, vocab {vocab} "
        f"(make_tiny_llama_checkpoint); NF4 + double quant, bf16 compute; target 4-bit / bf16 "
        f"<= {TARGET_NF4}"
    )
    head = f"{'pair':<47}{'4-bit MB':>11}{'bf16 MB':>11}{'ratio':>8}  check"
    print(head + "\n" + "-" * len(head))
    checks = []
    for label, low, high, counted in rows:
        ratio = low / high
        mark = check(ratio) if counted else "(info)"
        print(f"{label:<47}{low / MB:>11.1f}{high / MB:>11.1f}{ratio:>8.3f}  {mark}")
        if counted:
            checks.append((label, ratio, mark))
    for name, key in (("qlora", "qlora"), ("lora", "lora"), ("tiny qlora", "qlora")):
        source = tiny if name.startswith("tiny") else sized
        print(f"  {name:<11} parameter MB by role: {source[key][2]}")
    print(
        "  qlora: prepare_model_for_kbit_training upcasts the embedding and the norms to fp32\n"
        "  (4 B/param vs 2 B in bf16); LoRA matrices are fp32 in both modes. The smaller the\n"
        "  layers next to the embedding, the further the whole-tower ratio is from the\n"
        "  linear-only one (the h64 tower). A quantized linear costs 0.5 B (4 bit) + 1/64 B\n"
        "  (8-bit absmax per 64 weights) + 4/16384 B (fp32 per 256 blocks) per weight = 0.258\n"
        "  of bf16, plus small per-layer constants (code tables; visible in tiny layers)."
    )
    return checks


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ViT-S, a smaller LLaMA: ~2 min")
    parser.add_argument("--vit", choices=sorted(VITS), default=None, help="default: base")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--steps", type=int, default=2, help="AdamW steps (>= 2: moments exist)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="|ratio - expected| PASS")
    parser.add_argument("--llama-hidden", type=int, default=None, help="default 1024 (quick 512)")
    parser.add_argument("--llama-layers", type=int, default=None, help="default 8 (quick 4)")
    parser.add_argument(
        "--llama-intermediate", type=int, default=None, help="default 2816 (quick 1408)"
    )
    parser.add_argument("--skip-zero", action="store_true")
    parser.add_argument("--skip-nf4", action="store_true")
    parser.add_argument("--keep", default="", help="folder to keep logs and records in")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2: the measured step needs the Adam moments")
    quick = args.quick
    args.vit = args.vit or ("small" if quick else "base")
    args.llama_hidden = args.llama_hidden or (512 if quick else 1024)
    args.llama_layers = args.llama_layers or (4 if quick else 8)
    args.llama_intermediate = args.llama_intermediate or (1408 if quick else 2816)

    start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        out = Path(args.keep) if args.keep else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        checks = []
        if not args.skip_zero:
            checks += zero_part(args, out)
        if not args.skip_nf4:
            checks += nf4_part(args, out)
    print(f"\nSummary ({time.time() - start:.0f} s):")
    for label, ratio, mark in checks:
        print(f"  {mark:<13} {ratio:6.3f}  {label}")


if __name__ == "__main__":
    main()
