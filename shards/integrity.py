"""Shard files checked against their manifest's size and sha256 before a run trains on them.

A bit flipped or a volume overwritten inside a tar still reads as a valid tar: only the
manifest's digest (written by the shard writer as the shard was written) tells. Hashing reads
every byte once (about 1.5 GB/s per core for sha256 here, see docs/RELIABILITY.md), so a run
hashes at start, each rank its share, and remembers what it verified: `verified.json` in the
run folder maps a shard path to the (size, mtime_ns, sha256) it had, and a file whose size and
mtime are unchanged is not read again (a resume pays nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_BLOCK = 1 << 22


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def check_shards(
    digests: dict[str, tuple[int, str]], cache_path: Path | None = None
) -> tuple[list[str], int]:
    """Problems found in the shards `digests` lists (path -> (bytes, sha256)), and bytes hashed.

    Each problem names the file and what differs. `cache_path` (optional): a JSON file of
    results this process may reuse and extends."""
    cache: dict[str, list] = {}
    if cache_path is not None and cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
    problems, hashed = [], 0
    for path, (size, sha) in sorted(digests.items()):
        try:
            stat = os.stat(path)
        except OSError as err:
            problems.append(f"{path}: cannot be read ({err.strerror})")
            continue
        if stat.st_size != size:
            problems.append(f"{path}: {stat.st_size} bytes, the manifest says {size}")
            continue
        if cache.get(path) == [size, stat.st_mtime_ns, sha]:
            continue
        actual = file_sha256(path)
        hashed += size
        if actual != sha:
            problems.append(f"{path}: sha256 {actual[:12]}..., the manifest says {sha[:12]}...")
            continue
        cache[path] = [size, stat.st_mtime_ns, sha]
    if cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_path)
        except OSError:
            pass  # a cache only saves time
    return problems, hashed
