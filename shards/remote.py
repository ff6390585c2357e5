"""Where a shard split lives: a local folder, a URL that fsspec opens, or a `pipe:` command.

    /data/cxr_shards/train                        local: tars memory-mapped (shards.reader)
    https://host/cxr_shards/train                 fsspec, streamed: http(s) (aiohttp), s3://
    s3://bucket/cxr_shards/train                  (pip install s3fs), gs:// (pip install gcsfs),
    gs://bucket/cxr_shards/train                  any other protocol fsspec knows
    pipe:aws s3 cp s3://bucket/train/{} -         a shell command that writes the file to
                                                  stdout; {} stands for the file's name in the
                                                  split (manifest.json, train-000000.tar, ...)

The manifest is read from the same place as the shards. A remote shard is read as a stream, in
one pass (tarfile's stream mode), through the same member handling as a local one (a corrupt
member or a cut file loses the rest of that shard, counted against the manifest). A stream that
breaks before the shard's recorded size (a dropped connection, a failed command) is a transient
error: the shard is opened again after a backoff (1 s, 2 s, 4 s, ...; `data.remote_retries`
times), the members it already gave are passed over, and every retry is counted and logged.
"""

from __future__ import annotations

import contextlib
import io
import shlex
import subprocess
from collections.abc import Iterator
from typing import IO

# Packages fsspec needs per protocol, named in the error when one is missing.
_PROTOCOL_PACKAGES = {
    "http": "aiohttp",
    "https": "aiohttp",
    "s3": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
}


def is_remote(location: str) -> bool:
    """True for a URL (scheme://...) other than file://, or a pipe: command."""
    text = str(location)
    return text.startswith("pipe:") or ("://" in text and not text.startswith("file://"))


def join(location: str, name: str) -> str:
    """A file of the split: folder/name, url/name, or the pipe command with {} -> name."""
    text = str(location)
    if text.startswith("pipe:"):
        if "{}" not in text:
            raise ValueError(
                f"{text}: a pipe: split needs {{}} where the file name goes, e.g. "
                "pipe:aws s3 cp s3://bucket/train/{} -"
            )
        return text.replace("{}", shlex.quote(name))
    return text.rstrip("/") + "/" + name


def basename(location: str) -> str:
    """The split's last path component (its name when the manifest records none)."""
    text = str(location)
    if text.startswith("pipe:"):
        text = text.replace("{}", "").split()[-1] if text.split() else text
    return text.rstrip("/").rsplit("/", 1)[-1] or text


class _Command(io.RawIOBase):
    """A pipe: command's stdout as a binary stream; a non-zero exit raises OSError on close
    and at the end of the stream (a failed download is never mistaken for a short file)."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.proc.stdout.readinto(buffer)
        if n == 0:
            self._check()
        return n

    def _check(self) -> None:
        code = self.proc.wait()
        if code != 0:
            raise OSError(f"{self.command}: exited with status {code}")

    def close(self) -> None:
        if not self.closed:
            self.proc.stdout.close()
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        super().close()


@contextlib.contextmanager
def open_stream(url: str) -> Iterator[IO[bytes]]:
    """A binary stream of a remote file (read it front to back)."""
    if url.startswith("pipe:"):
        stream = io.BufferedReader(_Command(url[len("pipe:") :]), buffer_size=1 << 20)
        try:
            yield stream
        finally:
            stream.close()
        return
    import fsspec

    protocol = url.split("://", 1)[0]
    # http(s): one streamed GET (block_size=0); fsspec's default reads blocks by range
    # requests, which a server without Range support answers with the whole file each time.
    options = {"block_size": 0} if protocol in ("http", "https") else {}
    try:
        handle = fsspec.open(url, "rb", **options)
        stream = handle.open()
    except ImportError as err:
        package = _PROTOCOL_PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise ImportError(
            f"{url}: reading {protocol}:// needs {package} (pip install {package})"
        ) from err
    try:
        yield stream
    finally:
        stream.close()


def read_bytes(url: str) -> bytes:
    """A whole remote file (a manifest); FileNotFoundError names the URL."""
    try:
        with open_stream(url) as stream:
            return stream.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{url}: no such file") from err
    except OSError as err:
        raise FileNotFoundError(f"{url}: cannot be read ({err})") from err


class CountingReader(io.RawIOBase):
    """Counts the bytes read through it and tells a broken stream from a damaged file: the
    transport raised (`failed`), or the stream ended (`ended`) before `size` bytes."""

    def __init__(self, stream: IO[bytes], size: int | None = None) -> None:
        self.stream, self.size, self.count = stream, size, 0
        self.failed: BaseException | None = None
        self.ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self.stream.read(len(buffer))
        except Exception as exn:  # the transport's own error types
            self.failed = exn
            raise
        n = len(data)
        buffer[:n] = data
        self.count += n
        self.ended |= n == 0
        return n

    @property
    def broke(self) -> bool:
        """The stream, not the file's content, is why reading stopped: worth a retry."""
        short = self.size is not None and self.count < self.size
        return self.failed is not None or (self.ended and short)
