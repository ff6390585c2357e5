"""Write a synthetic MIMIC-CXR-JPG download (images, four tables) and its reports tree.

python scripts/make_synthetic_cxr.py --root data/synthetic_cxr --subjects 60
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

from shards.synthetic.cxr import generate_mimic_cxr  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True, help="output folder")
    parser.add_argument("--subjects", type=int, default=60)
    parser.add_argument("--size", type=int, default=256, help="image height in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corrupt", type=int, default=0, help="number of bad inputs to inject")
    parser.add_argument(
        "--plain-csv", action="store_true", help="write .csv tables instead of .csv.gz"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate the download and print where its parts are."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        paths = generate_mimic_cxr(
            args.root,
            subjects=args.subjects,
            size=args.size,
            seed=args.seed,
            corrupt=args.corrupt,
            gz=not args.plain_csv,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"make_synthetic_cxr: error: {exc}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name:13s} {path}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
