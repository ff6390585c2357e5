"""Pack MIMIC-CXR-JPG (or MIMIC-CXR DICOM) images + reports into WebDataset shards per split.

    python scripts/make_cxr_shards.py --root physionet.org/files/mimic-cxr-jpg/2.1.0 \\
        --reports-root mimic-cxr-reports --out data/cxr_shards
    python scripts/make_cxr_shards.py --root mimic-cxr/2.0.0 --dicom \\
        --tables-root mimic-cxr-jpg/2.1.0 --out data/cxr_shards_dicom
    python scripts/make_cxr_shards.py --synthetic-root data/synthetic_cxr --out data/cxr_shards
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
from shards.mimic_cxr import (  # noqa: E402
    FRONTAL,
    LABELERS,
    read_sources_file,  # noqa: E402
    write_cxr_shards,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, help="folder holding files/ and the CSV tables")
    parser.add_argument(
        "--reports-root",
        type=Path,
        help="folder holding files/pXX/pSUBJECT/sSTUDY.txt (default: --root)",
    )
    parser.add_argument(
        "--tables-root",
        type=Path,
        help="folder of the mimic-cxr-2.0.0-*.csv(.gz) (default: --root)",
    )
    parser.add_argument(
        "--synthetic-root", type=Path, help="take the roots recorded in DIR/cxr_sources.json"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder for shards")
    parser.add_argument("--size", type=int, default=224, help="image side S (S x S pixels)")
    parser.add_argument("--samples-per-shard", type=int, default=512)
    parser.add_argument(
        "--views",
        nargs="+",
        default=list(FRONTAL),
        help="ViewPosition values kept (default: PA AP); 'all' keeps every view",
    )
    parser.add_argument("--labeler", choices=LABELERS, default="chexpert")
    parser.add_argument("--dicom", action="store_true", help="read .dcm images (MIMIC-CXR)")
    parser.add_argument("--workers", type=int, default=1, help="image decoding processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the in-split sample order")
    args = parser.parse_args(argv)
    if (args.root is None) == (args.synthetic_root is None):
        parser.error("give either --root DIR (with --reports-root) or --synthetic-root DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    """Write the shards; the writer prints a one-line summary and saves report.json."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    views = None if [v.lower() for v in args.views] == ["all"] else args.views

    def write() -> dict:
        if args.synthetic_root is not None:
            root, reports_root = read_sources_file(args.synthetic_root)
        else:
            root, reports_root = args.root, args.reports_root
        return write_cxr_shards(
            root,
            reports_root,
            args.out,
            size=args.size,
            samples_per_shard=args.samples_per_shard,
            views=views,
            labeler=args.labeler,
            dicom=args.dicom,
            workers=args.workers,
            seed=args.seed,
            tables_root=args.tables_root,
        )

    return run_writer("make_cxr_shards", write, args.out)


if __name__ == "__main__":
    sys.exit(main())
