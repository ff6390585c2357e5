"""Pack a local Hugging Face dataset (save_to_disk folder, or .csv / .json / .jsonl / .parquet
files) into WebDataset shards per split: 2-D images with binary label columns (format
medalign-cxr-v1) or 3-D volumes with one class column (medalign-ad-v1). shards/hf_source.py
says how images, labels, splits and keys are read.

    python scripts/make_shards.py hf data/chest_ds --image-column image \\
        --text-column report --label-columns effusion nodule --split-column split \\
        --out data/hf_shards
    python scripts/make_shards.py hf scans.csv --image-column path --label-columns finding \\
        --subject-column patient --split-ratios 0.8 0.1 0.1 --size 224 --out data/hf_shards
    python scripts/make_shards.py hf data/mri_ds --image-column volume --dims 3 \\
        --text-column note --label-columns diagnosis --out data/hf_volumes
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

if importlib.util.find_spec("shards") is None:  # running from a checkout without pip install -e
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.common import run_writer  # noqa: E402
from shards.hf_source import DATA_FILE_BUILDERS, write_hf_shards  # noqa: E402

PROG = "make_hf_shards"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "path",
        type=Path,
        help="a save_to_disk folder, a .csv/.json/.jsonl/.parquet file or a folder of them",
    )
    parser.add_argument("--image-column", required=True, help="the image / volume column")
    parser.add_argument(
        "--label-columns",
        nargs="+",
        required=True,
        help="2-D: binary label columns (or one class column, one-hot); 3-D: one class column",
    )
    parser.add_argument(
        "--label-names", nargs="+", help="names of the labels / classes (default: from the data)"
    )
    parser.add_argument("--text-column", help="the report / text column (required for 3-D)")
    parser.add_argument(
        "--subject-column", help="rows of one subject stay in one split (default: each row)"
    )
    splits = parser.add_mutually_exclusive_group()
    splits.add_argument(
        "--split-column", help="each row's split: train, val, validation, valid or test"
    )
    splits.add_argument(
        "--split-ratios",
        nargs=3,
        type=float,
        default=[0.8, 0.1, 0.1],
        metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of subjects drawn into train / val / test (default: 0.8 0.1 0.1)",
    )
    parser.add_argument(
        "--dims",
        choices=("auto", "2", "3"),
        default="auto",
        help="2-D images or 3-D volumes (default: from the image column)",
    )
    parser.add_argument("--size", type=int, help="side S (default: 224 for 2-D, 128 for 3-D)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for shards")
    parser.add_argument("--samples-per-shard", type=int, default=512)
    parser.add_argument("--workers", type=int, default=1, help="image converting processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and the order")
    parser.add_argument(
        "--data-files-format",
        choices=sorted(set(DATA_FILE_BUILDERS.values())),
        help="read PATH's data files with this builder (default: by their suffix)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write the shards; the writer prints a one-line summary and saves report.json."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def write() -> dict:
        return write_hf_shards(
            args.path,
            args.out,
            image_column=args.image_column,
            label_columns=args.label_columns,
            text_column=args.text_column,
            subject_column=args.subject_column,
            split_column=args.split_column,
            split_ratios=tuple(args.split_ratios),
            label_names=args.label_names,
            dims=args.dims,
            size=args.size,
            samples_per_shard=args.samples_per_shard,
            workers=args.workers,
            seed=args.seed,
            data_files_format=args.data_files_format,
        )

    return run_writer(PROG, write, args.out)


if __name__ == "__main__":
    sys.exit(main())
