"""Pack AD volumes + clinical tables into WebDataset shards (train / val / test by subject).

    python scripts/make_ad_shards.py --out data/ad_shards \\
        --source adnimerge ADNIMERGE.csv ADNI/ --source oasis2 oasis_longitudinal.csv OAS2_RAW_PART1/
    python scripts/make_ad_shards.py --out data/ad_shards --synthetic-root data/synthetic_ad \\
        --holdout AIBL OASIS-2 MIRIAD   # the Alifuse protocol: zero-shot cohorts kept out whole
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

if importlib.util.find_spec("shards") is None:  # running from a checkout without pip install -e
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.ad_tables import FORMATS  # noqa: E402
from shards.ad_writer import (  # noqa: E402
    read_sources_file,  # noqa: E402
    write_ad_shards,
)
from shards.common import run_writer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source",
        nargs=3,
        action="append",
        default=[],
        metavar=("FORMAT", "TABLE", "IMAGES_ROOT"),
        help=f"a table and its images; FORMAT is one of {', '.join(FORMATS)} (repeatable)",
    )
    parser.add_argument(
        "--synthetic-root", type=Path, help="take the sources recorded in DIR/sources.json"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder for shards")
    parser.add_argument("--size", type=int, default=128, help="volume side S (S^3 voxels)")
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="preprocessing processes")
    parser.add_argument(
        "--word-limit", type=int, default=40, help="words kept of a narrative summary (paper: 40)"
    )
    parser.add_argument(
        "--holdout",
        nargs="+",
        default=[],
        metavar="COHORT",
        help="cohorts kept out of train/val/test, each written whole as its own split "
        "(OUT/COHORT/), e.g. --holdout AIBL OASIS-2 MIRIAD",
    )
    parser.add_argument(
        "--split-by",
        choices=["subject", "scan"],
        default="subject",
        help="subject (default): all of a subject's visits in one split; scan: a random split "
        "of scans (a subject's visits can then land in train and test)",
    )
    parser.add_argument(
        "--split-ratios",
        type=float,
        nargs=3,
        default=[0.7, 0.1, 0.2],
        metavar=("TRAIN", "VAL", "TEST"),
    )
    args = parser.parse_args(argv)
    if not args.source and args.synthetic_root is None:
        parser.error("give at least one --source FORMAT TABLE IMAGES_ROOT or --synthetic-root DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    """Write the shards; the writer prints a one-line summary and saves report.json."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def write() -> dict:
        sources = [tuple(s) for s in args.source]
        if args.synthetic_root is not None:
            sources += read_sources_file(args.synthetic_root)
        return write_ad_shards(
            sources,
            args.out,
            size=args.size,
            samples_per_shard=args.samples_per_shard,
            seed=args.seed,
            split_ratios=tuple(args.split_ratios),
            workers=args.workers,
            word_limit=args.word_limit,
            holdout=args.holdout,
            split_by=args.split_by,
        )

    return run_writer("make_ad_shards", write, args.out)


if __name__ == "__main__":
    sys.exit(main())
