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
    parser.add_argument(
        "--allow-resume-changes",
        action="store_true",
        help="resume even where the data stream settings differ from the checkpoint's (batch "
        "size, workers, world size, seed, shards, ...); the changes are logged",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a DeepSpeed checkpoint with full unpickling (it can run code: only for a "
        "checkpoint from a source you trust)",
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

    results = run(
        cfg,
        resume=args.resume,
        trust_checkpoint=args.trust_checkpoint,
        allow_resume_changes=args.allow_resume_changes,
    )
    from trainer.report import print_results

    print_results(results, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
