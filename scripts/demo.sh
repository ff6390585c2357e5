#!/usr/bin/env bash
# The main job on the built-in synthetic default, end to end, on CPU:
#   synthetic AD cohort in the real raw layouts -> shards -> tiny BERT from the training texts
#   -> pretraining with 2 processes under DeepSpeed ZeRO-2 (accelerate launch)
#   -> fusion classifier fine-tuned (same launch) -> ACC / macro-AUC / F1 on the test subjects.
# Everything lands under runs/demo/ (DEMO_ROOT to change it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${DEMO_ROOT:-runs/demo}
SUBJECTS=${DEMO_SUBJECTS:-60}
LAUNCH=(accelerate launch --config_file configs/accelerate/cpu_2proc_zero2.yaml)
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - start ))s] $*"; }

stamp "1/5 synthetic AD cohort (ADNI, OASIS-2, NACC, AIBL, MIRIAD layouts) -> $ROOT/raw_ad"
rm -rf "$ROOT/raw_ad" "$ROOT/ad_shards" "$ROOT/tiny_bert" "$ROOT/ad_pretrain" "$ROOT/ad_classify"
python scripts/make_synthetic_ad.py --root "$ROOT/raw_ad" --subjects-per-cohort "$SUBJECTS" --corrupt 5

stamp "2/5 shards (32^3 volumes for the CPU demo) -> $ROOT/ad_shards"
python scripts/make_ad_shards.py --synthetic-root "$ROOT/raw_ad" --out "$ROOT/ad_shards" \
  --size 32 --samples-per-shard 24 --workers 2

stamp "3/5 tiny BERT text tower from the training texts -> $ROOT/tiny_bert"
python scripts/make_tiny_bert.py --shards "$ROOT/ad_shards/train" --out "$ROOT/tiny_bert"

paths=(data.train="$ROOT/ad_shards/train" data.val="$ROOT/ad_shards/val" data.test="$ROOT/ad_shards/test"
       model.text.checkpoint="$ROOT/tiny_bert")
stamp "4/5 pretraining: 2 processes, DeepSpeed ZeRO-2 -> $ROOT/ad_pretrain"
"${LAUNCH[@]}" train.py --config configs/ad_demo_pretrain.yaml "${paths[@]}" \
  train.output_dir="$ROOT/ad_pretrain"

stamp "5/5 fusion classifier fine-tuning and test evaluation -> $ROOT/ad_classify"
"${LAUNCH[@]}" train.py --config configs/ad_demo_classify.yaml "${paths[@]}" \
  train.output_dir="$ROOT/ad_classify" train.init_from="$ROOT/ad_pretrain" \
  | tee "$ROOT/ad_classify_summary.txt"

stamp "done. Run folders: $ROOT/ad_pretrain, $ROOT/ad_classify (config.yaml, metrics.jsonl, tensorboard/, *.png, results.json)"
