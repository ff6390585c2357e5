"""Predict with a finished run (or an export folder of one) on new files, a CSV or a shard split:
OUT/predictions.jsonl (key; class or label probabilities and logits; zero-shot label
probabilities of a chest X-ray ITC model) and OUT/embeddings.safetensors (image_emb, text_emb;
the keys in its metadata).

    python scripts/predict.py runs/cxr_multilabel --images scans/ --out preds/
    python scripts/predict.py runs/ad_classify --images a.nii.gz b.nii.gz --texts texts.txt --out p/
    python scripts/predict.py runs/ad_classify --csv visits.csv --out p/   # key, image, text or
                                                                            # clinical fields
    python scripts/predict.py runs/ad_classify --shards data/ad_shards/AIBL --out p/
    # a moved text checkpoint, or any other config value: key.sub=value right after RUN_DIR
    python scripts/predict.py runs/ad_classify model.text.checkpoint=/m/bert --csv v.csv --out p/

Images go through the shard writers' preprocessing and texts through the run's prompt template
and tokenizer, so the model sees what it saw in training (docs/INFERENCE.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

if importlib.util.find_spec("trainer") is None:  # running from a checkout without pip install -e
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="a finished run's train.output_dir, or an export folder")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides (runs only)")
    source = parser.add_argument_group("inputs (one of --images / --texts, --csv, --shards)")
    source.add_argument("--images", nargs="+", metavar="PATH", help="image files or folders")
    source.add_argument("--texts", metavar="FILE", help="one text a line, paired with --images")
    source.add_argument("--csv", metavar="FILE", help="columns key, image, text or clinical fields")
    source.add_argument("--shards", metavar="SPLIT_DIR", help="a shard split folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, help="default: the run's data.eval_batch_size")
    parser.add_argument("--npy", action="store_true", help="also write <name>.npy and keys.json")
    parser.add_argument("--merged", action="store_true", help="export folders: use text_merged/")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    given = [bool(args.images or args.texts), bool(args.csv), bool(args.shards)]
    if sum(given) != 1:
        parser.error("give one input: --images (and / or --texts), --csv or --shards")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: expected >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from shards.reader import ShardSet
    from trainer.config import ConfigError
    from trainer.export import MANIFEST
    from trainer.inference import (
        Predictor,
        file_batches,
        inputs_from_csv,
        inputs_from_paths,
        predict_to_folder,
        shard_batches,
    )

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if (Path(args.run_dir) / MANIFEST).is_file():
            if args.overrides:
                raise ValueError("config overrides apply to run folders, not to export folders")
            predictor = Predictor.from_export(
                args.run_dir, device, merged=args.merged, batch_size=args.batch_size
            )
        else:
            predictor = Predictor.from_run(
                args.run_dir, device, args.overrides, batch_size=args.batch_size
            )
        if args.shards:
            batches = shard_batches(predictor, args.shards)
            total = ShardSet.load(args.shards).num_samples
        else:
            if args.csv:
                inputs = inputs_from_csv(predictor, args.csv)
            else:
                inputs = inputs_from_paths(predictor, args.images or (), args.texts)
            batches, total = file_batches(predictor, inputs), len(inputs.keys)
        written = predict_to_folder(
            predictor, batches, args.out, total, npy=args.npy, progress=not args.no_progress
        )
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"predict: error: {err}", file=sys.stderr)
        return 2
    print(f"predicted {written['rows']} rows ({', '.join(written['outputs'])})")
    for name in ("predictions", "embeddings"):
        if name in written:
            print(f"{name}: {written[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
