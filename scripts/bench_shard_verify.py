"""What `data.verify_shards: start` costs: sha256 throughput of one core, and the time to
verify a shard split (each rank hashes 1 / world of it; a resume re-hashes nothing unchanged).

    python scripts/bench_shard_verify.py                      # a 256 MB file in /tmp
    python scripts/bench_shard_verify.py --split runs/demo/ad_shards/train
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.integrity import check_shards, file_sha256  # noqa: E402
from shards.reader import ShardSet  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="size of the temporary file")
    parser.add_argument("--split", help="a shard split folder to verify, cold and cached")
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile(delete=False) as fh:
        fh.write(os.urandom(args.mb << 20))
    try:
        file_sha256(fh.name)  # into the page cache
        times = []
        for _ in range(3):
            start = time.perf_counter()
            file_sha256(fh.name)
            times.append(time.perf_counter() - start)
    finally:
        os.unlink(fh.name)
    best = min(times)
    rate = (args.mb << 20) / best / 1e9
    print(f"sha256 of {args.mb} MB from the page cache: {best:.3f} s, {rate:.2f} GB/s per core")
    print(f"1 TB of shards: {1e12 / (rate * 1e9) / 60:.1f} min on one rank")
    if args.split:
        shards = ShardSet.load(args.split)
        total = sum(size for size, _ in shards.digests.values())
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "verified.json"
            start = time.perf_counter()
            problems, hashed = check_shards(shards.digests, cache)
            cold = time.perf_counter() - start
            start = time.perf_counter()
            check_shards(shards.digests, cache)
            cached = time.perf_counter() - start
        print(
            f"{args.split}: {len(shards.digests)} shards, {total / 1e6:.1f} MB; verify "
            f"{cold:.3f} s, again with the cache {cached * 1e3:.1f} ms; problems: {len(problems)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
