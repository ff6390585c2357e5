"""Score a finished run on shard splits without training: the same metrics, plots and
predictions files as the run's own evaluation, in RUN_DIR/eval (or --out).

    python scripts/evaluate.py runs/alifuse --split data/ad_shards/test \
        --split data/ad_shards/AIBL --split data/ad_shards/OASIS-2 --split data/ad_shards/MIRIAD
    # a moved text checkpoint, or any other config value: key.sub=value after the options
    python scripts/evaluate.py runs/alifuse --split data/ad_shards/test model.text.checkpoint=/m/bert

Binary cohorts (OASIS-2, MIRIAD) are scored from a three-class model as NC vs MCI+AD, with
P(impaired) = P(MCI) + P(AD). Runs in one process, or under `accelerate launch --multi_gpu`.
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
    parser.add_argument("run_dir", help="a finished run's train.output_dir")
    parser.add_argument(
        "--split",
        action="append",
        required=True,
        metavar="DIR",
        help="a shard split folder (manifest.json + tars); repeatable",
    )
    parser.add_argument(
        "--name",
        action="append",
        metavar="NAME",
        help="names for the splits, in --split order (default: each manifest's split name)",
    )
    parser.add_argument("--out", help="output folder (default RUN_DIR/eval)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import logging

    from trainer.config import ConfigError
    from trainer.run_folder import evaluate_run, load_run_config
    from trainer.tasks import build_task

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        results = evaluate_run(args.run_dir, args.split, args.out, args.name, args.overrides)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    from accelerate.state import PartialState

    if PartialState().is_main_process:
        task = build_task(load_run_config(args.run_dir, args.overrides))
        out = args.out or str(Path(args.run_dir) / "eval")
        for name, result in results.items():
            print("\n".join(task.summary(name, result)))
        print(f"results: {Path(out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
