"""Figures of a trained Alifuse run on a shard split (the paper's Figs. 3 and 4):

    python scripts/visualize.py runs/alifuse_joint --split data/ad_shards/test

writes, under RUN_DIR/figures (or --out):
    attention.png   last-layer [CLS] attention of the image encoder over axial, coronal and
                    sagittal slices, and of the text encoder over the words, for a few
                    subjects per class
    umap.png        UMAP of the split's image and text embeddings, before and after alignment,
                    coloured by class, pairs joined; the modality gap of each in the title
    figures.json    the modality gaps and what was drawn
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="a finished run's train.output_dir")
    parser.add_argument("--split", required=True, help="a shard split folder (e.g. the test split)")
    parser.add_argument("--out", help="output folder (default RUN_DIR/figures)")
    parser.add_argument("--per-class", type=int, default=2, help="attention maps per class")
    parser.add_argument("--max-points", type=int, default=400, help="samples in the UMAP")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    from trainer.config import ConfigError
    from trainer.figures import visualize_run

    try:
        record = visualize_run(
            args.run_dir, args.split, args.out, args.per_class, args.max_points, args.overrides
        )
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"visualize: error: {err}", file=sys.stderr)
        return 2
    print(f"attention maps: {record['attention']}")
    if record["umap"]:
        gaps = ", ".join(f"{k} {v:.3f}" for k, v in record["modality_gap"].items())
        print(f"UMAP: {record['umap']} (modality gap: {gaps})")
    else:
        print(f"UMAP not drawn: {record['umap_skipped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
