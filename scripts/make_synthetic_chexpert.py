"""Write a synthetic CheXpert-v1.0 download (train.csv, valid.csv, train/ and valid/ images).

python scripts/make_synthetic_chexpert.py --root data/synthetic_chexpert --patients 300
python scripts/make_chexpert_shards.py --synthetic-root data/synthetic_chexpert \\
    --out data/chexpert_shards --zero-shot-5x200 20
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from pathlib import Path

if importlib.util.find_spec("shards") is None:  # running from a checkout without pip install -e
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.synthetic.chexpert import FOLDER, generate_chexpert  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True, help="output folder")
    parser.add_argument("--patients", type=int, default=60, help="patients in train.csv")
    parser.add_argument(
        "--valid-patients", type=int, default=10, help="patients in valid.csv (one study each)"
    )
    parser.add_argument(
        "--studies-per-patient",
        type=int,
        nargs=2,
        default=(1, 3),
        metavar=("MIN", "MAX"),
        help="studies of a train patient, inclusive (default 1 3)",
    )
    parser.add_argument("--size", type=int, default=256, help="image height in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corrupt", type=int, default=0, help="number of bad inputs to inject")
    parser.add_argument(
        "--single-finding-share",
        type=float,
        default=0.35,
        help="share of train studies with exactly one competition finding (5x200 candidates)",
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help="name the folder (and the Path prefix) CheXpert-v1.0-small",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate the download and print where its parts are."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        paths = generate_chexpert(
            args.root,
            patients=args.patients,
            studies_per_patient=tuple(args.studies_per_patient),
            seed=args.seed,
            valid_patients=args.valid_patients,
            corrupt=args.corrupt,
            size=args.size,
            single_finding_share=args.single_finding_share,
            folder=f"{FOLDER}-small" if args.small else FOLDER,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"make_synthetic_chexpert: error: {exc}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name:12s} {path}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
