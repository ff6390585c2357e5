"""Pack a CheXpert-v1.0 download (train.csv, valid.csv, train/, valid/) into WebDataset shards.

    python scripts/make_chexpert_shards.py --root CheXpert-v1.0 --out data/chexpert_shards
    python scripts/make_chexpert_shards.py --root CheXpert-v1.0-small --out data/chexpert_shards \\
        --zero-shot-5x200 200 --workers 8
    python scripts/make_chexpert_shards.py --synthetic-root data/synthetic_chexpert \\
        --out data/chexpert_shards
    python scripts/make_shards.py chexpert --root CheXpert-v1.0 --out data/chexpert_shards

valid.csv becomes the test split; train.csv is split by patient into train and val. With
--zero-shot-5x200 N a fourth folder, 5x200, holds GLoRIA's CheXpert 5xN zero-shot set (N=200 for the
protocol; shards/chexpert.py says how it is drawn) and its patients are kept out of train and val.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

if importlib.util.find_spec("shards") is None:  # running from a checkout without pip install -e
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.chexpert import VIEWS, read_sources_file, write_chexpert_shards  # noqa: E402
from shards.common import run_writer  # noqa: E402

PROG = "make_chexpert_shards"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", type=Path, help="the CheXpert-v1.0 folder (train.csv, valid.csv, train/, valid/)"
    )
    parser.add_argument(
        "--synthetic-root",
        type=Path,
        help="take the CheXpert folder recorded in DIR/chexpert_sources.json",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder for shards")
    parser.add_argument("--size", type=int, default=224, help="image side S (S x S pixels)")
    parser.add_argument("--samples-per-shard", type=int, default=512)
    parser.add_argument(
        "--views", choices=VIEWS, default="frontal", help="frontal views only, or all views"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="share of train.csv's patients that form the val split (default 0.05)",
    )
    parser.add_argument(
        "--zero-shot-5x200",
        type=int,
        default=0,
        metavar="N",
        help="write GLoRIA's 5-class zero-shot split with N images per class (200: the "
        "protocol; 0: none)",
    )
    parser.add_argument("--workers", type=int, default=1, help="image decoding processes")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the val split, the 5x200 draw and the order"
    )
    args = parser.parse_args(argv)
    if (args.root is None) == (args.synthetic_root is None):
        parser.error("give either --root DIR or --synthetic-root DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    """Write the shards; the writer prints a one-line summary and saves report.json."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def write() -> dict:
        root = args.root if args.synthetic_root is None else read_sources_file(args.synthetic_root)
        return write_chexpert_shards(
            root,
            args.out,
            size=args.size,
            samples_per_shard=args.samples_per_shard,
            views=args.views,
            val_fraction=args.val_fraction,
            zero_shot_5x200=args.zero_shot_5x200,
            workers=args.workers,
            seed=args.seed,
        )

    return run_writer(PROG, write, args.out)


if __name__ == "__main__":
    sys.exit(main())
