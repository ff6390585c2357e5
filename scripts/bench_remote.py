"""Remote shard streams against the local (memory-mapped) reader, on the same shards, in one run.

    python scripts/bench_remote.py [--split DIR] [--repeats 3]

The split (default: synthetic AD shards written here, 64^3 float16 volumes) is read three
ways, each a full pass that decodes every sample (no tokenizer): from the local folder, over
HTTP from a loopback server (fsspec + aiohttp; the server is a Python thread on the same
cores), and through `pipe:cat`. Passes are interleaved, medians of `--repeats`; printed:
samples/s, MB/s of shard bytes, and the ratio to the local reader.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.reader import DataConfig, EvalStream, ShardSet  # noqa: E402


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        """No request log on stderr."""


def one_pass(location: str) -> float:
    stream = EvalStream(ShardSet.load(location), DataConfig(eval_batch_size=16), None, 0)
    start = time.perf_counter()
    n = sum(int(batch["valid"].sum()) for batch in stream)
    assert n == stream.shards.num_samples - stream.counter.total
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", help="a local shard split (default: synthetic AD shards)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        split = Path(args.split) if args.split else None
        if split is None:
            from shards.ad_writer import write_ad_shards
            from shards.synthetic.ad import generate_ad_cohort

            sources = generate_ad_cohort(Path(tmp) / "raw", subjects_per_cohort=20, seed=0)
            write_ad_shards(sources, Path(tmp) / "shards", size=64, samples_per_shard=32, seed=0)
            split = Path(tmp) / "shards" / "train"
        shards = ShardSet.load(str(split))
        total = sum(size for size, _ in shards.digests.values())
        handler = functools.partial(_Quiet, directory=str(split.parent))
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        ways = {
            "local (mmap)": str(split),
            "http (fsspec)": f"http://127.0.0.1:{httpd.server_address[1]}/{split.name}",
            "pipe:cat": f"pipe:cat {split}/{{}}",
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        for location in ways.values():  # warm-up: page cache, imports
            one_pass(location)
        for _ in range(args.repeats):
            for name, location in ways.items():
                times[name].append(one_pass(location))
        httpd.shutdown()
        print(
            f"{split}: {shards.num_samples} samples in {len(shards.shards)} shards, "
            f"{total / 1e6:.1f} MB; median of {args.repeats} passes"
        )
        local = statistics.median(times["local (mmap)"])
        for name in ways:
            t = statistics.median(times[name])
            print(
                f"  {name:<14} {shards.num_samples / t:8.1f} samples/s  {total / t / 1e6:7.1f} MB/s"
                f"  {local / t:5.2f}x the local reader"
            )


if __name__ == "__main__":
    main()
