"""Loader benchmark: shard streaming vs per-file loading vs the decode ceiling; the volume codec.

    python scripts/bench_loader.py              # full run (a few minutes on 2 cores)
    python scripts/bench_loader.py --quick      # small sizes, under a minute
    python scripts/bench_loader.py --data-dir /tmp/bench --keep --workers 0 2

What is measured, side by side in one run (samples/s; ratios are what to read, not absolutes):

1. Data. N chest X-rays (a real radiograph, pydicom-data's RG1_UNCR.dcm, randomly cropped,
   re-exposed and noised per sample, S x S, 8- or 16-bit) and N brain volumes (the MNI152 T1
   template shipped with nilearn, brought to S^3 by the project's load_volume, then shifted,
   bias-field modulated and given Rician noise per sample, float16). Both are written twice:
   as tar shards exactly as the project's writers lay them out (ShardSink, members img.png /
   vol.npy + txt + json, a manifest ShardSet.load accepts), and as one file per sample (what a
   user has without shards): <key>.png for X-rays, <key>.nii.gz (nibabel, int16 + scale
   factor: 2 bytes a voxel like float16, which NIfTI cannot store) and <key>.npy for volumes,
   each with <key>.txt and <key>.json.
2. Stream: the real build_train_loader -> TrainStream with the project's decode function and
   collate (_Batcher, tokenizer None: no text tokenization), at each --workers count.
3. Per-file: a torch DataLoader (shuffled, same batch size, same _Batcher collate) over a
   map-style Dataset that opens the sample's files. Per-file .png / .npy read the same bytes as
   the shards and run the project's decode function (so only the container differs);
   per-file .nii.gz loads with nibabel (get_fdata float32) and runs the same checks.
4. Ceiling: the codec decoding the same in-memory bytes in a tight loop, no I/O (bytes ->
   the array the stream delivers: decode_png to float32; np.load of the float16 cube, which
   the trainer casts on the device). For k workers it is measured with max(1, k)
   processes running the loop at once (summed), not extrapolated: 0 and 1 workers compare
   with one process. "full decode" adds what the stream's decode function does on top of the
   codec (checks, json, labels, tensor), for diagnosis.
5. Volume codec, at each --codec-noise level (0: noise-free, the best case for
   compression): S^3 float16 volumes stored as gzip NIfTI (nibabel's level 1), raw npy
   (current), npy + gzip / zstd / lz4 (if installed), byte-shuffled fp16 + zstd. Size on disk,
   "unpack" rate (bytes -> the stored array: the codec's own cost) and "float32" rate (bytes ->
   float32 cube, numpy astype as decode_sample does; NIfTI get_fdata), each vs gzip NIfTI. The
   choice: the smallest encoding unpacking >= 2.5x gzip NIfTI (within 2% of it: the fastest).

Fairness: every loader first runs one untimed warm-up epoch (which also starts its workers)
and is then timed over whole epochs until --min-seconds pass. By default stream and per-file
both read from the page cache; --cold evicts the data's files from it (posix_fadvise
DONTNEED, no root needed) before every timed epoch, so both read from the disk. Each number is
the best of --repeats rounds (other processes share the cores). The main process runs torch
with --threads intra-op threads (default 1, as in loader workers: with 2, torch.stack in the
collate stalled on OpenMP on a loaded 2-core machine). Targets (from the issue):
stream >= 5x per-file, stream >= 0.8x ceiling, chosen volume encoding >= 2.5x gzip NIfTI.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import importlib.util
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if importlib.util.find_spec("shards") is None:  # running from a checkout without pip install -e
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from shards.common import ShardSink, write_manifest  # noqa: E402
from shards.cxr_labels import LABEL_NAMES  # noqa: E402
from shards.formats.image_multilabel import ImageMultilabel  # noqa: E402
from shards.formats.volume_class import VolumeClass  # noqa: E402
from shards.reader import (  # noqa: E402
    DataConfig,
    ShardSet,
    _Batcher,
    build_train_loader,
    sample_decoder,
)
from shards.synthetic.ad import mni_template_path  # noqa: E402
from shards.volume import load_volume  # noqa: E402
from shards.xray_images import decode_png, encode_png, read_dicom  # noqa: E402

try:
    import zstandard
except ImportError:  # optional: the codec table then says it is missing
    zstandard = None
try:
    import lz4.frame as lz4frame
except ImportError:
    lz4frame = None

TARGET_PER_FILE = 5.0
TARGET_CEILING = 0.8
TARGET_GZIP = 2.5
SPLIT = "train"
REPORT = "Clear PA chest radiograph. Heart size is normal. No focal consolidation or effusion."
NOTE = "MMSE 27, CDR 0.5. Mild memory complaints; MRI shows mild hippocampal atrophy."


# --------------------------------------------------------------------------- data


def xray_base(size: int) -> np.ndarray:
    """A real radiograph as float32 in [0, 1], downsampled to 2*size on the short side."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        raise FileNotFoundError("pydicom-data's RG1_UNCR.dcm is missing: pip install pydicom-data")
    img = Image.fromarray(read_dicom(path))
    scale = 2 * size / min(img.size)
    return np.asarray(img.resize((round(img.width * scale), round(img.height * scale))))


def xray_pixels(base: np.ndarray, size: int, bits: int, rng: np.random.Generator) -> np.ndarray:
    """One X-ray: a random crop of ``base`` resized to size^2, re-exposed and noised."""
    h, w = base.shape
    side = min(h, w) * rng.uniform(0.8, 1.0)
    top, left = rng.uniform(0, h - side), rng.uniform(0, w - side)
    img = Image.fromarray(base).resize(
        (size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
    )
    values = np.clip(np.asarray(img), 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    values = np.clip(values + rng.normal(0.0, 0.01, values.shape), 0.0, 1.0)
    top_value = (1 << bits) - 1
    return np.rint(values * top_value).astype(np.uint8 if bits == 8 else np.uint16)


def volume_base(size: int) -> np.ndarray:
    """The MNI152 T1 template as the project preprocesses a volume: float32 size^3 in [0, 1]."""
    return load_volume(mni_template_path(), size=size)


def volume_cube(base: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """One volume: ``base`` shifted, bias-field modulated, with Rician noise; float16."""
    size = base.shape[0]
    cube = np.roll(base, tuple(rng.integers(-4, 5, size=3)), axis=(0, 1, 2))
    low = torch.from_numpy(rng.standard_normal((1, 1, 4, 4, 4)).astype(np.float32))
    bias = F.interpolate(low, size=(size,) * 3, mode="trilinear", align_corners=False)[0, 0]
    cube = (cube * (1.0 + 0.08 * bias.numpy())) ** np.float32(rng.uniform(0.9, 1.1))
    real = cube + noise * rng.standard_normal(cube.shape, dtype=np.float32)
    imag = noise * rng.standard_normal(cube.shape, dtype=np.float32)
    return np.clip(np.hypot(real, imag), 0.0, 1.0).astype(np.float16)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def nifti_image(cube: np.ndarray, dtype: type = np.int16) -> nib.Nifti1Image:
    """A 1 mm RAS NIfTI of ``cube``; int16 gets a scale factor (nibabel computes it)."""
    img = nib.Nifti1Image(cube.astype(np.float32), np.eye(4))
    img.header.set_data_dtype(dtype)
    return img


def xray_sample(i: int, png: bytes, rng: np.random.Generator) -> dict[str, Any]:
    """A medalign-cxr-v1 tar sample (the member names shards/mimic_cxr.py writes)."""
    labels = [float(v) if v == v else None for v in rng.choice([1.0, 0.0, -1.0, np.nan], 14)]
    meta = {"subject": f"{10000000 + i}", "study": f"{50000000 + i}", "dicom_id": f"d{i:06d}"}
    meta |= {"view": "PA", "split": SPLIT, "labels": labels, "label_names": list(LABEL_NAMES)}
    return {
        "__key__": f"p{10000000 + i}_s{50000000 + i}_d{i:06d}",
        "img.png": png,
        "txt": REPORT.encode(),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def volume_sample(i: int, npy: bytes) -> dict[str, Any]:
    """A medalign-ad-v1 tar sample (the member names shards/ad_writer.py writes)."""
    meta = {"subject": f"S{i:04d}", "cohort": "ADNI", "image_id": f"I{i}", "split": SPLIT}
    meta |= {"diagnosis": ["CN", "MCI", "AD"][i % 3], "label": i % 3, "binary": int(i % 3 > 0)}
    return {
        "__key__": f"ADNI_S{i:04d}_I{i}",
        "vol.npy": npy,
        "txt": NOTE.encode(),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def write_files(folder: Path, sample: dict[str, Any], images: dict[str, bytes]) -> None:
    """The per-file layout of one sample: <key>.<ext> per image encoding, .txt and .json."""
    key = sample["__key__"]
    for ext, data in images.items():
        (folder / f"{key}.{ext}").write_bytes(data)
    (folder / f"{key}.txt").write_bytes(sample["txt"])
    (folder / f"{key}.json").write_bytes(sample["json"])


def build_xrays(root: Path, n: int, size: int, bits: int, per_shard: int, seed: int) -> None:
    shards, files = root / "shards", root / "files"
    shards.mkdir(parents=True), files.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    base = xray_base(size)
    sink = ShardSink(shards, SPLIT, per_shard)
    for i in range(n):
        png = encode_png(xray_pixels(base, size, bits, rng))
        sample = xray_sample(i, png, rng)
        sink.write(sample)
        write_files(files, sample, {"png": png})
    extra = {"image_size": size, "bit_depth": bits, "label_names": list(LABEL_NAMES)}
    write_manifest(shards, ImageMultilabel.name, SPLIT, sink.close(), extra)


def build_volumes(root: Path, n: int, size: int, noise: float, per_shard: int, seed: int) -> None:
    shards, files = root / "shards", root / "files"
    shards.mkdir(parents=True), files.mkdir(parents=True)
    rng = np.random.default_rng(seed + 1)
    base = volume_base(size)
    sink = ShardSink(shards, SPLIT, per_shard)
    for i in range(n):
        cube = volume_cube(base, noise, rng)
        npy = npy_bytes(cube)
        sample = volume_sample(i, npy)
        sink.write(sample)
        write_files(files, sample, {"npy": npy})
        nib.save(nifti_image(cube), files / f"{sample['__key__']}.nii.gz")
    write_manifest(shards, VolumeClass.name, SPLIT, sink.close(), {"volume_size": size})


def prepare(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """(xray folder, volume folder) under ``root``, built unless already there with these sizes."""
    per_xray = shard_size(args.xrays, args.xray_per_shard, args.workers)
    per_vol = shard_size(args.volumes, args.volume_per_shard, args.workers)
    spec = {
        "xray": [args.xrays, args.xray_size, args.xray_bits, per_xray, args.seed],
        "volume": [args.volumes, args.volume_size, args.noise, per_vol, args.seed],
    }
    marker = root / "bench.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        print(f"reusing benchmark data in {root}")
        return root / "xray", root / "volume"
    for part in ("xray", "volume"):
        shutil.rmtree(root / part, ignore_errors=True)
    start = time.perf_counter()
    build_xrays(root / "xray", *spec["xray"])
    build_volumes(root / "volume", *spec["volume"])
    marker.write_text(json.dumps(spec) + "\n")
    print(f"built benchmark data in {root} ({time.perf_counter() - start:.0f} s)")
    return root / "xray", root / "volume"


def shard_size(n: int, wanted: int, workers: Sequence[int]) -> int:
    """Samples per shard: at most ``wanted``, small enough that every worker gets a shard."""
    return max(1, min(wanted, n // max(1, *workers)))


# --------------------------------------------------------------------------- loaders


class Collate:
    """The stream's collate (_Batcher, no tokenizer) for a map-style DataLoader."""

    def __init__(self, fmt: str) -> None:
        self.batcher = _Batcher(None, 0, fmt)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return self.batcher(samples, [True] * len(samples))


class RawFiles(Dataset):
    """Per-file samples read into the shard's raw form and decoded by the project's decoder:
    the same bytes and the same decode as the stream, one open() per member."""

    def __init__(self, folder: Path, keys: list[str], member: str, ext: str, decode: Callable):
        self.folder, self.keys, self.decode = folder, keys, decode
        self.member, self.ext = member, ext

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        stem = self.folder / self.keys[index]
        raw = {"__key__": self.keys[index], "__url__": str(stem)}
        raw[self.member] = Path(f"{stem}.{self.ext}").read_bytes()
        raw["txt"] = Path(f"{stem}.txt").read_bytes()
        raw["json"] = Path(f"{stem}.json").read_bytes()
        return self.decode(raw)


class NiftiFiles(Dataset):
    """Per-file volumes as a user keeps them: nibabel loads <key>.nii.gz; same checks and
    sample fields as the stream's decode_sample."""

    def __init__(self, folder: Path, keys: list[str]) -> None:
        self.folder, self.keys = folder, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        stem = self.folder / self.keys[index]
        volume = nib.load(f"{stem}.nii.gz").get_fdata(dtype=np.float32)
        if volume.ndim != 3 or not np.isfinite(volume).all():
            raise ValueError(f"{stem}.nii.gz: expected a finite 3-D volume")
        text = Path(f"{stem}.txt").read_text().strip()
        meta = json.loads(Path(f"{stem}.json").read_text())
        return {
            "image": volume[None],
            "text": text,
            "label": int(meta["label"]),
            "key": self.keys[index],
            "cohort": meta.get("cohort", ""),
            "split": meta.get("split", ""),
        }


def endless(loader: DataLoader) -> Iterator[dict[str, Any]]:
    while True:
        yield from loader


def evict(folder: Path) -> float:
    """Drops every file under ``folder`` from the page cache (posix_fadvise DONTNEED: no root
    needed for files one can open); returns the seconds it took."""
    start = time.perf_counter()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return time.perf_counter() - start


def time_batches(
    batches: Iterator[dict[str, Any]], per_epoch: int, min_seconds: float, cold: Path | None
) -> float:
    """samples/s over whole epochs' worth of batches, after one untimed warm-up epoch.

    ``cold``: the folder whose files are evicted from the page cache before every timed epoch
    (the eviction itself is not timed; batches workers prefetched before it stay warm).
    """
    for _ in range(per_epoch):
        next(batches)
    count, start, untimed = 0, time.perf_counter(), 0.0
    while True:
        if cold is not None:
            untimed += evict(cold)
        for _ in range(per_epoch):
            count += len(next(batches)["key"])
        elapsed = time.perf_counter() - start - untimed
        if elapsed >= min_seconds:
            return count / elapsed


def stream_rate(shards: Path, workers: int, args: argparse.Namespace) -> float:
    cfg = DataConfig(
        train=str(shards),
        batch_size=args.batch_size,
        num_workers=workers,
        shuffle_buffer=args.shuffle_buffer,
    )
    loader = build_train_loader(str(shards), cfg, None, 0, rank=0, world_size=1, seed=args.seed)
    per_epoch = math.ceil(ShardSet.load(str(shards)).num_samples / args.batch_size)
    batches = iter(loader)
    try:
        return time_batches(batches, per_epoch, args.min_seconds, shards if args.cold else None)
    finally:
        del batches, loader
        gc.collect()


def per_file_rate(
    dataset: RawFiles | NiftiFiles, fmt: str, workers: int, args: argparse.Namespace
) -> float:
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=Collate(fmt),
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(args.seed),
    )
    batches = endless(loader)
    try:
        cold = dataset.folder if args.cold else None
        return time_batches(batches, len(loader), args.min_seconds, cold)
    finally:
        batches.close()
        del batches, loader
        gc.collect()


# --------------------------------------------------------------------------- ceilings


def codec_png(raw: dict[str, Any]) -> np.ndarray:
    return decode_png(raw["img.png"])


def codec_npy(raw: dict[str, Any]) -> np.ndarray:
    """The stored float16 cube, as the stream delivers it (the cast is done on the device)."""
    return np.load(io.BytesIO(raw["vol.npy"]), allow_pickle=False)


def tight_loop(fn: Callable[[Any], Any], items: Sequence[Any], min_seconds: float) -> float:
    """Calls of ``fn`` per second, cycling over ``items`` for at least ``min_seconds``."""
    count, start = 0, time.perf_counter()
    while True:
        for item in items:
            fn(item)
        count += len(items)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return count / elapsed


def _loop_child(fn: Callable, items: Sequence[Any], min_seconds: float, queue: Any) -> None:
    queue.put(tight_loop(fn, items, min_seconds))


def ceiling_rate(
    fn: Callable[[Any], Any], items: Sequence[Any], procs: int, min_seconds: float
) -> float:
    """Summed rate of ``procs`` processes running the tight loop at the same time (forked, as
    DataLoader workers are; the items are inherited, not pickled)."""
    if procs <= 1:
        return tight_loop(fn, items, min_seconds)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    children = [
        ctx.Process(target=_loop_child, args=(fn, items, min_seconds, queue)) for _ in range(procs)
    ]
    for child in children:
        child.start()
    rates = [queue.get() for _ in children]
    for child in children:
        child.join()
    return sum(rates)


def read_raw(shards: Path) -> list[dict[str, Any]]:
    """Every raw tar sample of a split, in memory (the bytes the stream decodes)."""
    urls = [{"url": path} for path, _ in ShardSet.load(str(shards)).shards]
    return list(wds.tarfile_to_samples()(iter(urls)))


# --------------------------------------------------------------------------- loader benchmark


@dataclass
class Row:
    workers: int
    stream: float
    per_file: dict[str, float]
    ceiling: float
    full_decode: float


def measure_once(
    shards: Path,
    per_file: dict[str, Dataset],
    ceilings: tuple[Callable, Callable],
    raw: list[dict[str, Any]],
    workers: int,
    args: argparse.Namespace,
) -> Row:
    """One round of every number at one worker count, back to back."""
    fmt = ShardSet.load(str(shards)).format
    procs = max(1, workers)
    return Row(
        workers,
        stream_rate(shards, workers, args),
        {name: per_file_rate(ds, fmt, workers, args) for name, ds in per_file.items()},
        ceiling_rate(ceilings[0], raw, procs, args.min_seconds),
        ceiling_rate(ceilings[1], raw, procs, args.min_seconds),
    )


def best_of(rows: list[Row]) -> Row:
    """The highest rate of each number over the rounds (the least disturbed by other load)."""
    return Row(
        rows[0].workers,
        max(r.stream for r in rows),
        {name: max(r.per_file[name] for r in rows) for name in rows[0].per_file},
        max(r.ceiling for r in rows),
        max(r.full_decode for r in rows),
    )


def bench_modality(
    folder: Path, per_file: dict[str, Dataset], codec: Callable, args: argparse.Namespace
) -> list[Row]:
    shards = folder / "shards"
    raw = read_raw(shards)
    ceilings = (codec, sample_decoder(ShardSet.load(str(shards)), DataConfig()))
    rows = []
    for workers in args.workers:
        rounds = [
            measure_once(shards, per_file, ceilings, raw, workers, args)
            for _ in range(args.repeats)
        ]
        rows.append(best_of(rounds))
        print(f"  {workers} workers done", flush=True)
    return rows


def keys_of(folder: Path) -> list[str]:
    return sorted(p.name[: -len(".json")] for p in (folder / "files").glob("*.json"))


def bench_xrays(folder: Path, args: argparse.Namespace) -> list[Row]:
    decode = sample_decoder(ShardSet.load(str(folder / "shards")), DataConfig())
    files = RawFiles(folder / "files", keys_of(folder), "img.png", "png", decode)
    return bench_modality(folder, {"png": files}, codec_png, args)


def bench_volumes(folder: Path, args: argparse.Namespace) -> list[Row]:
    keys = keys_of(folder)
    decode = sample_decoder(ShardSet.load(str(folder / "shards")), DataConfig())
    per_file = {
        "nii.gz": NiftiFiles(folder / "files", keys),
        "npy": RawFiles(folder / "files", keys, "vol.npy", "npy", decode),
    }
    return bench_modality(folder, per_file, codec_npy, args)


def verdict(value: float, target: float) -> str:
    return f"{value:6.3f}x {'PASS' if value >= target else 'MISS'}"


def print_rows(title: str, rows: list[Row]) -> None:
    names = list(rows[0].per_file)
    print(f"\n{title}  (samples/s; ratio + target verdict)")
    head = f"{'workers':>7} {'stream':>8}" + "".join(f" {'file ' + n:>11}" for n in names)
    head += f" {'ceiling':>8} {'full dec':>8}"
    head += "".join(f" {'stream/' + n:>17}" for n in names) + f" {'stream/ceiling':>17}"
    head += f" {'stream/full':>11}"
    print(head)
    for r in rows:
        line = f"{r.workers:>7} {r.stream:>8.1f}"
        line += "".join(f" {r.per_file[n]:>11.1f}" for n in names)
        line += f" {r.ceiling:>8.1f} {r.full_decode:>8.1f}"
        line += "".join(f" {verdict(r.stream / r.per_file[n], TARGET_PER_FILE):>17}" for n in names)
        line += f" {verdict(r.stream / r.ceiling, TARGET_CEILING):>17}"
        line += f" {r.stream / r.full_decode:>10.2f}x"
        print(line)


# --------------------------------------------------------------------------- volume codecs


@dataclass
class Codec:
    name: str
    encode: Callable[[np.ndarray], bytes]  # float16 cube -> stored bytes
    unpack: Callable[[bytes], np.ndarray]  # stored bytes -> the stored array (fp16, int16, ...)
    decode: Callable[[bytes], np.ndarray]  # stored bytes -> float32 cube (what a loader needs)


def _nii_gz(dtype: type) -> Codec:
    def encode(cube: np.ndarray) -> bytes:
        return gzip.compress(nifti_image(cube, dtype).to_bytes(), compresslevel=1, mtime=0)

    def image(data: bytes) -> nib.Nifti1Image:
        return nib.Nifti1Image.from_bytes(gzip.decompress(data))

    return Codec(
        f"nii.gz {np.dtype(dtype).name} (nibabel, gzip-1)",
        encode,
        lambda data: image(data).dataobj.get_unscaled(),
        lambda data: image(data).get_fdata(dtype=np.float32),
    )


def _npy_codec(name: str, pack: Callable[[bytes], bytes], unpack: Callable[[bytes], bytes]):
    def load(data: bytes) -> np.ndarray:
        return np.load(io.BytesIO(unpack(data)), allow_pickle=False)

    return Codec(
        name, lambda cube: pack(npy_bytes(cube)), load, lambda data: load(data).astype(np.float32)
    )


def _same(data: bytes) -> bytes:
    return data


def _shuffled(cube: np.ndarray) -> bytes:
    """float16 voxels as two byte planes, low bytes then high bytes (blosc's byte shuffle)."""
    return npy_bytes(np.moveaxis(cube.view(np.uint8).reshape(*cube.shape, 2), -1, 0).copy())


def _unshuffled(data: bytes) -> np.ndarray:
    planes = np.load(io.BytesIO(data), allow_pickle=False)
    out = np.empty((*planes.shape[1:], 2), dtype=np.uint8)
    out[..., 0], out[..., 1] = planes
    return out.view(np.float16)[..., 0]


def _zstd_codecs() -> list[Codec]:
    dec = zstandard.ZstdDecompressor()
    out = []
    for level in (3, 9):
        comp = zstandard.ZstdCompressor(level=level)
        out.append(_npy_codec(f"npy fp16 + zstd-{level}", comp.compress, dec.decompress))
    comp = zstandard.ZstdCompressor(level=3)

    def unpack(data: bytes) -> np.ndarray:
        return _unshuffled(dec.decompress(data))

    out.append(
        Codec(
            "fp16 byte-shuffled + zstd-3",
            lambda cube: comp.compress(_shuffled(cube)),
            unpack,
            lambda data: unpack(data).astype(np.float32),
        )
    )
    return out


def codecs() -> tuple[list[Codec], list[str]]:
    """The codecs to compare (the gzip NIfTI baseline first) and notes on missing packages."""
    out = [
        _nii_gz(np.int16),
        _nii_gz(np.float32),
        _npy_codec("npy fp16 (current)", _same, _same),
        _npy_codec("npy fp16 + gzip-6", lambda b: gzip.compress(b, 6, mtime=0), gzip.decompress),
    ]
    notes = []
    if zstandard is not None:
        out += _zstd_codecs()
    else:
        notes.append("zstandard not installed: pip install zstandard")
    if lz4frame is not None:
        out.append(_npy_codec("npy fp16 + lz4", lz4frame.compress, lz4frame.decompress))
    else:
        notes.append("lz4 not installed: pip install lz4")
    return out, notes


@dataclass
class CodecResult:
    name: str
    mb: float  # mean stored size per volume
    unpack: float  # bytes -> stored array per second, one process
    decode: float  # bytes -> float32 cube per second, one process
    max_error: float


def encode_all(codec: Codec, cubes: list[np.ndarray]) -> tuple[list[bytes], float]:
    """The stored bytes of every cube and the largest round-trip error."""
    blobs = [codec.encode(cube) for cube in cubes]
    error = max(
        float(np.abs(codec.decode(b) - c.astype(np.float32)).max())
        for b, c in zip(blobs, cubes, strict=True)
    )
    return blobs, error


def time_codecs(chosen: list[Codec], cubes: list[np.ndarray], args) -> list[CodecResult]:
    """Codecs interleaved round by round (so the machine's load hits all alike), best round kept."""
    encoded = [encode_all(c, cubes) for c in chosen]
    unpack, decode = [0.0] * len(chosen), [0.0] * len(chosen)
    seconds = args.min_seconds / 2
    for _ in range(args.repeats + 1):
        for i, (codec, (blobs, _)) in enumerate(zip(chosen, encoded, strict=True)):
            unpack[i] = max(unpack[i], tight_loop(codec.unpack, blobs, seconds))
            decode[i] = max(decode[i], tight_loop(codec.decode, blobs, seconds))
    return [
        CodecResult(c.name, sum(map(len, blobs)) / len(blobs) / 1e6, u, d, error)
        for c, (blobs, error), u, d in zip(chosen, encoded, unpack, decode, strict=True)
    ]


def print_codecs(results: list[CodecResult], raw_mb: float) -> None:
    gz = results[0]
    print(
        f"{'encoding':<32} {'MB/vol':>7} {'vs raw':>7} {'unpack/s':>9} {'vs gzip NIfTI':>14} "
        f"{'float32/s':>9} {'vs gzip NIfTI':>14}"
    )
    for r in results:
        if r is gz:
            ratios = ("baseline", "baseline")
        else:
            ratios = (
                verdict(r.unpack / gz.unpack, TARGET_GZIP),
                verdict(r.decode / gz.decode, TARGET_GZIP),
            )
        print(
            f"{r.name:<32} {r.mb:>7.2f} {r.mb / raw_mb:>6.0%} {r.unpack:>9.1f} {ratios[0]:>14} "
            f"{r.decode:>9.1f} {ratios[1]:>14}  (max err {r.max_error:.1e})"
        )


def print_choice(results: list[CodecResult]) -> None:
    """The smallest encoding whose unpack rate is >= TARGET_GZIP x gzip NIfTI (within 2% of the
    smallest size, the fastest); the float32 conversion after it is the same for every fp16 one."""
    gz = results[0]
    fast = [r for r in results[1:] if r.unpack >= TARGET_GZIP * gz.unpack]
    if not fast:
        print(f"  choice: none unpacks >= {TARGET_GZIP}x gzip NIfTI")
        return
    smallest = min(r.mb for r in fast)
    best = max((r for r in fast if r.mb <= 1.02 * smallest), key=lambda r: r.unpack)
    print(
        f"  choice: {best.name} ({best.mb:.2f} MB/vol, unpack {best.unpack / gz.unpack:.1f}x, "
        f"float32 {best.decode / gz.decode:.1f}x gzip NIfTI): the smallest (within 2%: fastest) "
        f"of those unpacking >= {TARGET_GZIP}x gzip NIfTI"
    )


def bench_codecs(args: argparse.Namespace, noise: float) -> None:
    rng = np.random.default_rng(args.seed + 2)
    base = volume_base(args.codec_size)
    cubes = [volume_cube(base, noise, rng) for _ in range(args.codec_volumes)]
    chosen, notes = codecs()
    results = time_codecs(chosen, cubes, args)
    raw_mb = cubes[0].nbytes / 1e6
    print(
        f"\nVolume codec, Rician noise {noise:g}: {args.codec_volumes} distinct "
        f"{args.codec_size}^3 float16 volumes (raw {raw_mb:.2f} MB) in memory, 1 process, best of "
        f"{args.repeats + 1} interleaved rounds.\n  unpack = bytes -> stored array (the codec); "
        "float32 = bytes -> float32 cube (numpy astype, as decode_sample; NIfTI: get_fdata)"
    )
    print_codecs(results, raw_mb)
    for note in notes:
        print(f"  note: {note}")
    print_choice(results)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, short timings")
    parser.add_argument("--data-dir", type=Path, help="build (or reuse) the data here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data folder")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", default=["xray", "volume", "codec"])
    parser.add_argument("--xrays", type=int, help="X-ray samples (default 256; quick 64)")
    parser.add_argument("--xray-size", type=int, help="X-ray side (default 512; quick 256)")
    parser.add_argument("--xray-bits", type=int, choices=(8, 16), default=8)
    parser.add_argument("--xray-per-shard", type=int, default=32)
    parser.add_argument("--volumes", type=int, help="volumes (default 64; quick 16)")
    parser.add_argument("--volume-size", type=int, help="volume side (default 128; quick 64)")
    parser.add_argument("--volume-per-shard", type=int, default=8)
    parser.add_argument("--codec-volumes", type=int, help="codec test volumes (4; quick 2)")
    parser.add_argument("--codec-size", type=int, default=128, help="codec test volume side")
    parser.add_argument("--noise", type=float, default=0.01, help="Rician noise sd of volumes")
    parser.add_argument(
        "--codec-noise",
        type=float,
        nargs="+",
        default=[0.01, 0.0],
        help="noise levels of the codec test (0: noise-free, best case for compression)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shuffle-buffer", type=int, default=128)
    parser.add_argument(
        "--min-seconds", type=float, help="timed seconds per number (1.5; quick 0.5)"
    )
    parser.add_argument("--repeats", type=int, help="rounds per number, best kept (2; quick 1)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads of the main process"
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="evict the data's files from the page cache before every timed epoch",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    defaults = {
        "xrays": (256, 64),
        "xray_size": (512, 256),
        "volumes": (64, 16),
        "volume_size": (128, 64),
        "codec_volumes": (4, 2),
        "min_seconds": (1.5, 0.5),
        "repeats": (2, 1),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    unknown = set(args.parts) - {"xray", "volume", "codec"}
    if unknown:
        parser.error(f"--parts {sorted(unknown)}: expected xray, volume, codec")
    return args


def header(args: argparse.Namespace) -> None:
    cores = len(os.sched_getaffinity(0))
    print(
        f"bench_loader: {cores} cores (load average {os.getloadavg()[0]:.1f}), torch "
        f"{torch.__version__}, main-process intra-op threads {torch.get_num_threads()} "
        f"(--threads; workers use 1), batch {args.batch_size}, workers {args.workers}, "
        f">= {args.min_seconds:g} s timed per number, best of {args.repeats} rounds"
    )
    cache = (
        "--cold: every timed epoch starts with the data's files evicted from the page cache "
        "(posix_fadvise), so stream and per-file both read from the disk."
        if args.cold
        else "Warm: each loader runs one untimed warm-up epoch, so stream and per-file both read "
        "from the page cache (--cold evicts it before every epoch)."
    )
    print(
        f"{cache}\nceiling = codec on in-memory bytes (bytes -> the array the stream delivers: "
        "float32 X-ray, float16 volume), measured with max(1, workers) processes at once; full dec = "
        "the stream's whole decode function the same way.\nTargets: stream/per-file >= "
        f"{TARGET_PER_FILE}x, stream/ceiling >= {TARGET_CEILING}x, codec >= {TARGET_GZIP}x gzip."
    )


def run(root: Path, args: argparse.Namespace) -> None:
    xray_dir, volume_dir = prepare(root, args)
    if "xray" in args.parts:
        print("X-rays ...", flush=True)
        rows = bench_xrays(xray_dir, args)
        kb = sum(p.stat().st_size for p in (xray_dir / "files").glob("*.png")) / args.xrays / 1e3
        print_rows(
            f"X-rays: {args.xrays} x {args.xray_size}^2 {args.xray_bits}-bit PNG "
            f"({kb:.0f} kB each)",
            rows,
        )
    if "volume" in args.parts:
        print("\nVolumes ...", flush=True)
        rows = bench_volumes(volume_dir, args)
        print_rows(
            f"Volumes: {args.volumes} x {args.volume_size}^3 float16 npy in shards (MNI152 + "
            f"Rician noise {args.noise:g}); per-file .nii.gz (int16 + scale) and .npy",
            rows,
        )
    if "codec" in args.parts:
        for noise in args.codec_noise:
            bench_codecs(args, noise)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    header(args)
    start = time.perf_counter()
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        run(args.data_dir, args)
    else:
        root = Path(tempfile.mkdtemp(prefix="medalign_bench_loader_", dir="/tmp"))
        try:
            run(root, args)
        finally:
            if args.keep:
                print(f"data kept in {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
