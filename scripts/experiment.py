"""Run a paper's table: every row as a real training run, scored with 95 % intervals.

    python scripts/experiment.py alifuse-table2 --quick          # every row, tiny, minutes
    python scripts/experiment.py alifuse-table3                  # synthetic cohort, CPU size
    python scripts/experiment.py mae-llama-table1 --quick        # seed 001's Table 1
    python scripts/experiment.py fusion-table1 --quick           # seed 002's Table I + Fig. 4
    python scripts/experiment.py chexpert-transfer RUN_DIR --quick  # a MIMIC run on CheXpert
        (RUN_DIR right after the name: --set and --run-set take every value that follows)
    python scripts/experiment.py alifuse-table2 --size paper \\
        --shards data/ad_shards --text-checkpoint /models/bert-base-uncased \\
        --launcher "accelerate launch --num_processes 8 --use_deepspeed --zero_stage 2"

Writes OUT/results.md (the paper's layout), OUT/results.json, OUT/results.png and every run's
folder under OUT/runs/. OUT defaults to runs/experiments/<name>-<size>. Rows already run with
the same command are read back (--rerun trains them again). With --shards, the folder must
hold train/, val/, test/ and the held-out cohorts (make_ad_shards.py --holdout AIBL OASIS-2
MIRIAD); without it synthetic data is written once per suite and size under runs/experiments/.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shlex
import sys
import time
from pathlib import Path

if importlib.util.find_spec("trainer") is None:  # running from a checkout without pip install -e
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.alifuse_tables import SUITE as ALIFUSE  # noqa: E402
from trainer.chexpert_transfer import SUITE as CHEXPERT  # noqa: E402
from trainer.cxr_tables import SUITE as MAE_LLAMA  # noqa: E402
from trainer.experiment import finite_table, run_experiment  # noqa: E402
from trainer.fusion_tables import SUITE as FUSION  # noqa: E402

SUITES = {
    name: suite for suite in (ALIFUSE, MAE_LLAMA, FUSION, CHEXPERT) for name in suite.experiments
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", choices=sorted(SUITES))
    parser.add_argument(
        "run_dir",
        nargs="?",
        type=Path,
        help="chexpert-transfer: the finished MIMIC-CXR run (its train.output_dir) to evaluate",
    )
    parser.add_argument("--quick", action="store_true", help="the same as --size quick")
    parser.add_argument("--size", default="default", help="quick, default or paper")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--shards", type=Path, help="your shard folder (train/ val/ test/ ...)")
    parser.add_argument(
        "--text-checkpoint", type=Path, help="your local text tower folder (BERT / LLaMA)"
    )
    parser.add_argument("--medicalnet", default="", help="a local MedicalNet resnet_50.pth")
    parser.add_argument(
        "--launcher", default="", help='run each row under this, e.g. "accelerate launch ..."'
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="training seeds of every row (default: the size's); the first also seeds the "
        "bootstrap",
    )
    parser.add_argument("--data-seed", type=int, default=0, help="synthetic data and split seed")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--rerun", action="store_true", help="train rows already run again")
    parser.add_argument(
        "--jobs", type=int, default=1, help="rows trained at once (each run is seeded on its own)"
    )
    parser.add_argument(
        "--run-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="RUN_DIR's config overrides when it is loaded (e.g. a moved model.text.checkpoint)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every row (after the size's)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size = "quick"
    suite = SUITES[args.experiment]
    if args.size not in suite.sizes:
        parser.error(f"--size {args.size}: {args.experiment} has {sorted(suite.sizes)}")
    if suite.needs_run and args.run_dir is None:
        parser.error(f"{args.experiment} needs RUN_DIR: the finished run it evaluates")
    if not suite.needs_run and args.run_dir is not None:
        parser.error(f"{args.experiment} trains its own runs; it takes no RUN_DIR")
    if args.run_dir is not None and not (args.run_dir / "config.yaml").is_file():
        parser.error(f"{args.run_dir}: not a run folder (no config.yaml)")
    if (
        args.size == "paper"
        and suite.needs_for_paper
        and not all(getattr(args, name) for name in suite.paper_needs)
    ):
        parser.error(f"--size paper needs {suite.needs_for_paper}")
    if args.bootstrap < 1:
        parser.error("--bootstrap: expected >= 1")
    if args.jobs < 1:
        parser.error("--jobs: expected >= 1")
    if args.jobs > 1 and args.launcher:
        parser.error(
            "--jobs > 1 with --launcher: launched rows would share the launcher's port and "
            "devices; run them one at a time"
        )
    for name in ("shards", "text_checkpoint", "run_dir"):  # the runs start in the repository
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    suite = SUITES[args.experiment]
    size = suite.sizes[args.size]
    exp = suite.experiments[args.experiment](args.size, args)
    # Absolute paths: the runs start in the repository, wherever this command was started.
    name = f"{args.experiment}-{args.size}"
    if args.run_dir is not None:  # one folder per evaluated run (.../align/seed0: align_seed0)
        name += f"-{args.run_dir.parent.name}_{args.run_dir.name}"
    out = (args.out or Path("runs/experiments") / name).resolve()
    started = time.perf_counter()
    try:
        shared = suite.prepare(size, out.parent / f"data-{suite.data_name}-{args.size}", args)
    except ValueError as err:
        print(f"experiment: error: {err}", file=sys.stderr)
        return 2
    try:
        results = run_experiment(
            exp,
            out,
            [*shared, *args.set],
            launcher=shlex.split(args.launcher),
            n_boot=args.bootstrap,
            seeds=args.seeds or list(size.seeds),
            rerun=args.rerun,
            size=args.size,
            jobs=args.jobs,
        )
        if suite.finish is not None:
            suite.finish(exp, out, args, results, args.bootstrap)
    except RuntimeError as err:
        print(f"experiment: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        print(f"experiment: error: {err}", file=sys.stderr)
        return 2
    print((out / "results.md").read_text())
    print(
        f"wrote {out / 'results.md'}, results.json, results.png "
        f"in {(time.perf_counter() - started) / 60:.1f} min"
    )
    if not finite_table(results, exp):
        print("experiment: some rows have no finite number (see results.md)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
