"""medalign entry point: parse config -> build -> train -> close.

python train.py --config configs/ad_demo.yaml train.max_steps=100
accelerate launch --num_processes 2 --use_deepspeed --zero_stage 2 train.py --config ...
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # loader workers fork after tokenizing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a medalign model.")
    parser.add_argument("--config", help="preset YAML (values that differ from the defaults)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the latest checkpoint in train.output_dir, or from the given folder",
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied last")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from trainer.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from trainer.loop import run

    results = run(cfg, resume=args.resume)
    from trainer.report import print_results

    print_results(results, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
