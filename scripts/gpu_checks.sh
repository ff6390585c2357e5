#!/usr/bin/env bash
# Every GPU check and benchmark of docs/PERFORMANCE.md ("GPU runs"), one after the other, on a
# machine with a CUDA device; each one's output is also written to OUT_DIR/<name>.txt.
#
#   bash scripts/gpu_checks.sh [OUT_DIR] [PART ...]     # default OUT_DIR gpu_results, all parts
#   bash scripts/gpu_checks.sh /tmp/gpu attention mae  # only some parts
#
# Parts: tests (pytest -m gpu: fused SDPA backends with math disabled, QLoRA tower training),
# attention (TFLOP/s per SDPA backend, bf16, seq 197 / 512 / 4096), mae (ViT-B 2D and 3D
# pretraining step: samples/s and MFU), checkpointing (activation checkpointing and
# torch.compile), llama (4-bit tower tokens/s, NF4 vs bf16-LoRA step ratio), text (text
# cache: uncached / cached step time with a frozen_4bit tower; padding and bucketing gains).
# PYTHON picks the interpreter (default: the checkout's .venv if there is one, else python).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
out=${1:-gpu_results}
shift || true
parts=("$@")
all=(tests attention mae checkpointing llama text)
[ ${#parts[@]} -gt 0 ] || parts=("${all[@]}")
for part in "${parts[@]}"; do
    [[ " ${all[*]} " == *" $part "* ]] || { echo "unknown part '$part': expected one of ${all[*]}" >&2; exit 2; }
done
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: these checks need a GPU')"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
for part in "${parts[@]}"; do
    case "$part" in
        tests) cmd=("$PYTHON" -m pytest -m gpu -q -p no:cacheprovider) ;;
        attention) cmd=("$PYTHON" scripts/bench_attention.py --device cuda) ;;
        mae) cmd=("$PYTHON" scripts/bench_mae.py --device cuda) ;;
        checkpointing) cmd=("$PYTHON" scripts/bench_checkpointing.py --device cuda --compile) ;;
        llama) cmd=("$PYTHON" scripts/bench_llama.py --device cuda) ;;
        text) cmd=("$PYTHON" scripts/bench_text_cache.py --device cuda) ;;
    esac
    echo "== $part: ${cmd[*]}"
    start=$(date +%s)
    "${cmd[@]}" 2>&1 | tee "$out/$part.txt"
    echo "== $part: $(( $(date +%s) - start )) s"
done
