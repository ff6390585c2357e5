"""Benchmarks the LLaMA text tower's training step: 4-bit NF4 + LoRA (QLoRA) against the
same tower with LoRA on bf16 (or fp32) weights, side by side in one run.

    python scripts/bench_llama.py [--quick]             # CPU: a mid-size random LLaMA
    python scripts/bench_llama.py --device cuda          # GPU: bf16 compute

One step = tokenize-free forward of a (batch, length) id tensor through the tower, last-token
pooling, a mean-square loss, backward (LoRA matrices only train) and an AdamW step on the LoRA
parameters. The two variants share the checkpoint folder (`make_tiny_llama_checkpoint`, random
weights, widths multiples of 64), LoRA r=8 on q_proj and v_proj; they are timed interleaved
after warm-up, medians of repeats. Reported: step time, tokens/s (batch x length / step time)
and the NF4 / bf16-LoRA step-time ratio. On CPU the non-4-bit side runs in fp32 (bf16 matmuls
are slower than fp32 on most CPUs) and bitsandbytes dequantizes each 4-bit weight per call, so
the CPU ratio says little about a GPU; the GPU run is the one to quote.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attention import median_times, print_table  # noqa: E402 - sibling script

from models.llama_text import (  # noqa: E402
    LlamaTextConfig,
    build_llama_tower,
    make_tiny_llama_checkpoint,
)

CORPUS = [
    "No acute cardiopulmonary process.",
    "Mild cardiomegaly with a small left pleural effusion.",
    "Right lower lobe opacity concerning for pneumonia.",
    "Endotracheal tube terminates 4 cm above the carina.",
] * 8


def step_fn(tower, ids: torch.Tensor, mask: torch.Tensor):
    params = [p for p in tower.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        loss = tower(ids, mask).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    hidden = args.hidden or (512 if args.quick else (2048 if cuda else 1024))
    layers = args.layers or (2 if args.quick else (16 if cuda else 4))
    batch = args.batch or (16 if cuda else 2)
    plain_dtype = "bf16" if cuda else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_llama_checkpoint(
            Path(tmp) / "llama", CORPUS, hidden_size=hidden, num_layers=layers, num_heads=8
        )
        towers = {}
        for name, mode, dtype in (("nf4+lora", "qlora", "bf16" if cuda else "fp32"),
                                  (f"{plain_dtype}+lora", "lora", plain_dtype)):  # fmt: skip
            torch.manual_seed(0)
            cfg = LlamaTextConfig(
                checkpoint=folder, mode=mode, compute_dtype=dtype, max_length=args.length
            )
            towers[name] = build_llama_tower(cfg, device=device)
            towers[name].train()
        vocab = towers["nf4+lora"].base_model.config.vocab_size
        ids = torch.randint(3, vocab, (batch, args.length), device=device)
        mask = torch.ones_like(ids)
        fns = {name: step_fn(t, ids, mask) for name, t in towers.items()}
        times = median_times(fns, device, warmup=2, repeats=args.repeats, min_time=0.0)
    tokens = batch * args.length
    print(
        f"torch {torch.__version__}, device {device}, LLaMA hidden {hidden}, {layers} layers, "
        f"batch {batch} x {args.length} tokens, LoRA r=8 q_proj v_proj, median of {args.repeats}"
    )
    rows = [[name, f"{t * 1e3:.1f}", f"{tokens / t:.0f}"] for name, t in times.items()]
    print_table(["tower", "step ms", "tokens/s"], rows)
    nf4, plain = times["nf4+lora"], times[f"{plain_dtype}+lora"]
    print(f"NF4 / {plain_dtype}-LoRA step time: {nf4 / plain:.2f}x")


if __name__ == "__main__":
    main()
