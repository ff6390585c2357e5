#!/usr/bin/env bash
# The main jobs on the built-in synthetic data, end to end, on CPU, 2 processes under
# DeepSpeed ZeRO-2 through `accelerate launch`:
#   ad:  synthetic AD cohort in the real raw layouts -> shards -> tiny BERT -> pretraining
#        (ITC + masked image + masked text) -> fusion classifier -> ACC / macro-AUC / F1 (test)
#   cxr: synthetic MIMIC-CXR tree -> shards -> tiny BERT -> 2D MAE pretraining, once without
#        and once with the report text (+ retrieval and zero-shot scores) -> 14-label heads
#        fine-tuned from each -> mAUC (test); and a 10 % label-fraction run from the text tower;
#        then the MAE + text run on a synthetic CheXpert tree (zero-shot 5x20, linear probe and
#        fine-tuning at 1 / 10 / 100 % of the labels)
# Usage: scripts/demo.sh [ad|cxr|all]   (default all). Everything lands under runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
VERTICAL=${1:-${DEMO_VERTICAL:-all}}
case "$VERTICAL" in ad|cxr|all) ;; *) echo "usage: $0 [ad|cxr|all]" >&2; exit 2 ;; esac
ROOT=${DEMO_ROOT:-runs/demo}
LAUNCH=(accelerate launch --config_file configs/accelerate/cpu_2proc_zero2.yaml)
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - start ))s] $*"; }

run_ad() {
  local t0; t0=$(date +%s)
  stamp "AD 1/6 synthetic cohort (ADNI, OASIS-2, NACC, AIBL, MIRIAD layouts) -> $ROOT/raw_ad"
  rm -rf "$ROOT/raw_ad" "$ROOT/ad_shards" "$ROOT/tiny_bert" "$ROOT/ad_pretrain" "$ROOT/ad_classify" \
    "$ROOT/ad_predict" "$ROOT/ad_export"
  python scripts/make_synthetic_ad.py --root "$ROOT/raw_ad" --subjects-per-cohort "${DEMO_SUBJECTS:-60}" --corrupt 5

  stamp "AD 2/6 shards (32^3 volumes for the CPU demo) -> $ROOT/ad_shards"
  python scripts/make_ad_shards.py --synthetic-root "$ROOT/raw_ad" --out "$ROOT/ad_shards" \
    --size 32 --samples-per-shard 24 --workers 2

  stamp "AD 3/6 tiny BERT text tower from the training texts -> $ROOT/tiny_bert"
  python scripts/make_tiny_bert.py --shards "$ROOT/ad_shards/train" --out "$ROOT/tiny_bert"

  local paths=(data.train="$ROOT/ad_shards/train" data.val="$ROOT/ad_shards/val"
               data.test="$ROOT/ad_shards/test" model.text.checkpoint="$ROOT/tiny_bert")
  stamp "AD 4/6 pretraining: 2 processes, DeepSpeed ZeRO-2 -> $ROOT/ad_pretrain"
  "${LAUNCH[@]}" train.py --config configs/ad_demo_pretrain.yaml "${paths[@]}" \
    train.output_dir="$ROOT/ad_pretrain"

  stamp "AD 5/6 fusion classifier fine-tuning and test evaluation -> $ROOT/ad_classify"
  "${LAUNCH[@]}" train.py --config configs/ad_demo_classify.yaml "${paths[@]}" \
    train.output_dir="$ROOT/ad_classify" train.init_from="$ROOT/ad_pretrain" \
    | tee "$ROOT/ad_summary.txt"
  stamp "AD 6/6 the trained classifier used and exported -> $ROOT/ad_predict, $ROOT/ad_export"
  python scripts/predict.py "$ROOT/ad_classify" --shards "$ROOT/ad_shards/test" \
    --out "$ROOT/ad_predict" --no-progress
  python scripts/export.py "$ROOT/ad_classify" --out "$ROOT/ad_export"
  stamp "AD done in $(( $(date +%s) - t0 ))s: $ROOT/ad_pretrain, $ROOT/ad_classify"
}

run_cxr() {
  local t0; t0=$(date +%s)
  stamp "CXR 1/6 synthetic MIMIC-CXR-JPG tree + reports -> $ROOT/raw_cxr"
  rm -rf "$ROOT/raw_cxr" "$ROOT/cxr_shards" "$ROOT/cxr_tiny_bert" "$ROOT"/cxr_pretrain_* "$ROOT"/cxr_finetune_* \
    "$ROOT/chexpert_transfer" "$ROOT/data-chexpert-quick"
  python scripts/make_synthetic_cxr.py --root "$ROOT/raw_cxr" --subjects "${DEMO_CXR_SUBJECTS:-300}" --corrupt 6

  stamp "CXR 2/6 shards (frontal views, 64 x 64 for the CPU demo) -> $ROOT/cxr_shards"
  python scripts/make_cxr_shards.py --synthetic-root "$ROOT/raw_cxr" --out "$ROOT/cxr_shards" \
    --size 64 --samples-per-shard 32

  stamp "CXR 3/6 tiny BERT text tower from the training reports -> $ROOT/cxr_tiny_bert"
  python scripts/make_tiny_bert.py --shards "$ROOT/cxr_shards/train" --out "$ROOT/cxr_tiny_bert"

  local paths=(data.train="$ROOT/cxr_shards/train" data.val="$ROOT/cxr_shards/val"
               data.test="$ROOT/cxr_shards/test")
  for variant in mae mae_text; do
    stamp "CXR 4/6 pretraining ($variant): 2 processes, DeepSpeed ZeRO-2 -> $ROOT/cxr_pretrain_$variant"
    "${LAUNCH[@]}" train.py --config "configs/cxr_demo_pretrain_$variant.yaml" "${paths[@]}" \
      model.text.checkpoint="$ROOT/cxr_tiny_bert" train.output_dir="$ROOT/cxr_pretrain_$variant" \
      | tee "$ROOT/cxr_pretrain_$variant.log"
    stamp "CXR 5/6 14-label heads from the $variant tower -> $ROOT/cxr_finetune_$variant"
    "${LAUNCH[@]}" train.py --config configs/cxr_demo_finetune.yaml "${paths[@]}" \
      train.output_dir="$ROOT/cxr_finetune_$variant" train.init_from="$ROOT/cxr_pretrain_$variant" \
      | tee "$ROOT/cxr_summary_$variant.txt"
  done
  stamp "CXR 5/6 14-label heads from the mae_text tower, 10 % of the training labels"
  "${LAUNCH[@]}" train.py --config configs/cxr_demo_finetune.yaml "${paths[@]}" \
    train.output_dir="$ROOT/cxr_finetune_mae_text_10pct" train.init_from="$ROOT/cxr_pretrain_mae_text" \
    data.label_fraction=0.1 | tee "$ROOT/cxr_summary_mae_text_10pct.txt"
  stamp "CXR 6/6 the MAE + text run on CheXpert (synthetic CheXpert-v1.0 tree) -> $ROOT/chexpert_transfer"
  python scripts/experiment.py chexpert-transfer "$ROOT/cxr_pretrain_mae_text" --quick --jobs 2 \
    --out "$ROOT/chexpert_transfer" > "$ROOT/chexpert_transfer.txt"
  stamp "CXR done in $(( $(date +%s) - t0 ))s; test mAUC, MAE only vs MAE + text (+ 10 % labels):"
  for variant in mae mae_text mae_text_10pct; do
    echo "  $variant: $(grep '^test: mAUC' "$ROOT/cxr_summary_$variant.txt")"
  done
  echo "  MAE + text tower, test split without fine-tuning:"
  grep '^test retrieval\|^test zero-shot' "$ROOT/cxr_pretrain_mae_text.log" | sed 's/^/    /' || true
  echo "  CheXpert transfer ($ROOT/chexpert_transfer/results.md):"
  grep '^| Linear probe | \|^| Fine-tune | \|^| CheXpert ' "$ROOT/chexpert_transfer/results.md" \
    | sed 's/^/    /' || true
}

case "$VERTICAL" in
  ad) run_ad ;;
  cxr) run_cxr ;;
  all) run_ad; run_cxr ;;
esac
stamp "done (run folders hold config.yaml, launch.json, metrics.jsonl, tensorboard/, *.png, results.json)"
