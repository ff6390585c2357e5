"""Write WebDataset shards from a dataset as its publisher lays it out: one command, one source
per subcommand (the rest of the command line goes to that source's own options, --help lists
them).

    python scripts/make_shards.py ad --out data/ad_shards --source adnimerge ADNIMERGE.csv ADNI/
    python scripts/make_shards.py mimic-cxr --root mimic-cxr-jpg/2.1.0 \\
        --reports-root mimic-cxr-reports --out data/cxr_shards
    python scripts/make_shards.py chexpert --root CheXpert-v1.0 --out data/chexpert_shards
    python scripts/make_shards.py hf PATH --image-column image --text-column report \\
        --label-columns effusion nodule --out data/hf_shards

Every source writes train / val / test folders with a manifest.json, rejects.jsonl (every
record that produced no sample, with its reason) and report.json (records in = written +
rejected). docs/DATASETS.md says what each source reads and how to add one.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# subcommand -> the script that writes that source (each has main(argv) -> exit code)
SOURCES = {
    "ad": "make_ad_shards.py",
    "mimic-cxr": "make_cxr_shards.py",
    "chexpert": "make_chexpert_shards.py",
    "hf": "make_hf_shards.py",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in SOURCES:
        print(__doc__.strip(), file=sys.stderr)
        what = f"unknown source {argv[0]!r}" if argv else "no source"
        print(f"make_shards: error: {what}; expected one of {', '.join(SOURCES)}", file=sys.stderr)
        return 2
    path = HERE / SOURCES[argv[0]]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return int(module.main(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
