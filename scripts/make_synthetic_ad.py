"""Write a synthetic ADNI / OASIS-2 / NACC / AIBL / MIRIAD cohort in the real raw layouts.

python scripts/make_synthetic_ad.py --root data/synthetic_ad --subjects-per-cohort 40
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

from shards.synthetic.ad import generate_ad_cohort  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True, help="output folder")
    parser.add_argument("--subjects-per-cohort", type=int, default=40)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 76, 64], metavar=("X", "Y", "Z"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corrupt", type=int, default=0, help="number of bad cases to inject")
    parser.add_argument("--template", choices=["mni", "phantom"], default="mni")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate the cohort and print where the sources are."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        sources = generate_ad_cohort(
            args.root,
            subjects_per_cohort=args.subjects_per_cohort,
            shape=tuple(args.shape),
            seed=args.seed,
            corrupt=args.corrupt,
            template=args.template,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"make_synthetic_ad: error: {exc}", file=sys.stderr)
        return 2
    for fmt, table, images in sources:
        print(f"{fmt:10s} {table}  {images}")
    print(f"wrote {args.root / 'sources.json'} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
