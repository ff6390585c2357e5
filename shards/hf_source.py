"""A Hugging Face `datasets` dataset (saved with save_to_disk, or local data files) -> tar shards.

Sources, all local (nothing here touches the network: `datasets` runs in offline mode):

  a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk (datasets.load_from_disk)
  a .csv / .json / .jsonl / .parquet file, or a folder of such files (its top level only, read
      as one table; ``data_files_format`` picks the builder for other names or a mixed folder)

Splits: a DatasetDict of several splits keeps its own (train; validation, valid or val -> val;
test; rows of any other split are rejected unknown_split); otherwise (a Dataset, data files or a
DatasetDict of one split) the ``split_column`` gives each row's split (train, val, validation,
valid, test, case-insensitive; anything else rejected), or subjects are drawn into train / val /
test by ``split_ratios`` (shards.splits.assign_splits: all rows of a ``subject_column`` value
land in one split; each row is its own subject when no subject column is given; 3-D datasets
are stratified by the class of a subject's first row).

Images, by ``dims`` ("auto": from the column's feature type, else its first non-missing value):

  2  format medalign-cxr-v1 (shards/formats/image_multilabel.py): a grayscale S x S PNG made as
     shards.xray_images makes one from a file (short side resized to S, long side centre-
     cropped; bicubic). A cell may be a datasets Image (bytes or path), encoded image bytes
     (PNG, JPEG, ... or DICOM), a path to a JPEG / PNG / DICOM file, or a 2-D numeric array
     (nested lists or numpy; singleton axes dropped). Bit depth: 8-bit sources (JPEG, 8-bit
     PNG, colour images made gray, uint8 arrays) stay 8-bit; 16-bit PNGs and uint16 arrays are
     read by their dtype range (/ 65535) and DICOM by its window (shards.xray_images
     .read_dicom), both stored 16-bit; every other array dtype (signed integers, floats, bool)
     and 32-bit / float images are min-max scaled to [0, 1] and stored 16-bit. A split's
     manifest bit_depth is the largest of its images'.
  3  format medalign-ad-v1 (shards/formats/volume_class.py): a float16 S^3 cube in [0, 1] made
     by shards.volume as the AD writer makes one. A cell may be NIfTI bytes (a datasets Nifti
     or a dict with "bytes", or a binary column; gzip detected by its magic), a path to a
     .nii / .nii.gz file (reoriented to RAS), or a 3-D numeric array (taken as isotropic voxels
     in the axis order given; singleton axes dropped).

Relative paths are resolved against the data file's folder (PATH's folder for a file, PATH for a
folder); URLs are rejected (remote_path). Size S: 224 for 2-D, 128 for 3-D by default.

Labels. 2-D: each of ``label_columns`` is one binary label named after its column (or
``label_names``), its cells as shards.cxr_labels.parse_label_cell reads them (1 / 0 / -1, "1.0",
..., bool, None or NaN for blank); a two-class ClassLabel column gives its index (-1: blank),
when its names say which class is positive ([no, yes], [negative, positive], ...; else an error).
One-hot: a single ClassLabel column of more than two classes, or a single string column none of
whose values is a label cell, becomes one binary label per class (1.0 for the row's class, 0.0
for the others), named by the ClassLabel's names (``label_names`` renames them, same count) or
the string column's sorted distinct values (``label_names`` gives the classes and their order;
values outside it are rejected). 3-D: one label column, a class index into label_names: a
ClassLabel (its names; ``label_names`` renames them), strings (sorted distinct values, or the
order ``label_names`` gives) or integers 0..K-1 (names ``label_names``, else "0".."K-1").

Texts: ``text_column`` (empty cells rejected missing_text); 2-D datasets may have none (manifest
"texts": false), 3-D ones need one (the format's samples carry a text).

Keys: a "key" (else "id") column's value, else the row index, prefixed by the DatasetDict's split
name or else by the split the row goes to: <split>_<id>, characters outside [A-Za-z0-9_-]
replaced by "_"; a duplicate (an id that a row before it in the same dataset or DatasetDict
split has, or two ids that sanitise to one key) is rejected. study / subject: the subject
column's value, else the key. The 3-D cohort: the dataset folder's name.

Output: <out>/{train,val,test}/<split>-NNNNNN.tar + manifest.json (source "huggingface", the
label names), <out>/rejects.jsonl (every row that produced no sample: "<PATH> [<split>] row <i>",
reason, detail), <out>/report.json; records_in == written + rejected.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from shards.common import (
    RecordError,
    Reject,
    ShardSink,
    clear_old_shards,
    npy_bytes,
    parallel_map,
    safe_key,
    seeded_order,
    write_manifest,
    write_rejects,
)
from shards.cxr_labels import parse_label_cell
from shards.formats.image_multilabel import ImageMultilabel
from shards.formats.volume_class import VolumeClass
from shards.splits import SPLITS, assign_splits, check_ratios
from shards.volume import is_volume_file, load_volume, to_cube
from shards.xray_images import (
    DICOM_SUFFIX,
    draft_gray,
    encode_png,
    load_square,
    min_max,
    square_resize,
    unit_square,
)

log = logging.getLogger(__name__)

SOURCE = "huggingface"
FORMATS = {2: ImageMultilabel.name, 3: VolumeClass.name}
DEFAULT_SIZES = {2: 224, 3: 128}
DATA_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# The split names a split column or a DatasetDict may use -> the shard split.
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
KEY_COLUMNS = ("key", "id")  # the first of these a dataset has names its samples
JPEG_SUFFIXES = (".jpg", ".jpeg")  # read by shards.xray_images.load_square, as MIMIC-CXR-JPG
PROGRESS_MIN = 200  # show a progress bar from this many rows per split

_GZIP_MAGIC = b"\x1f\x8b"
_IMAGE_MAGICS = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")


@contextmanager
def _offline() -> Iterator[None]:
    """`datasets` in offline mode, its progress bars off, while a source is opened: a local
    path must never become a Hub request, and the writer has its own progress bars."""
    offline, bars = datasets.config.HF_HUB_OFFLINE, datasets.is_progress_bar_enabled()
    datasets.config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
        if bars:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------------------------------------
# Opening a source


@dataclass
class HfSource:
    """What PATH holds: its parts (the DatasetDict's splits, or one Dataset under the name "" or
    its one split's name), whether those are the splits, the folder relative paths start from
    and the dataset's name (the 3-D cohort)."""

    path: Path
    parts: dict[str, datasets.Dataset]
    own_splits: bool
    base: Path
    name: str

    def where(self, part: str, index: int) -> str:
        """A row's place for the reject log: "<PATH> [<split>] row <index>"."""
        return f"{self.path} [{part}] row {index}" if part else f"{self.path} row {index}"


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _data_files(path: Path, data_files_format: str | None) -> tuple[str, list[Path]]:
    """(builder, files) of a data file or of a folder's top-level data files."""
    builders = sorted(set(DATA_FILE_BUILDERS.values()))
    if data_files_format is not None and data_files_format not in builders:
        raise ValueError(
            f"data_files_format={data_files_format!r}: expected one of {', '.join(builders)}"
        )
    if path.is_file():
        builder = data_files_format or DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"{path}: not a data file this writer reads (.csv, .json, .jsonl, .parquet); "
                "give data_files_format (--data-files-format) to read it anyway"
            )
        return builder, [path]
    files = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_FILE_BUILDERS
    )
    if data_files_format is not None:
        files = [p for p in files if DATA_FILE_BUILDERS[p.suffix.lower()] == data_files_format]
    if not files:
        raise FileNotFoundError(
            f"{path}: neither a dataset written by save_to_disk (no dataset_dict.json or "
            "state.json) nor a folder of .csv, .json, .jsonl or .parquet files"
        )
    found = sorted({DATA_FILE_BUILDERS[p.suffix.lower()] for p in files})
    if len(found) > 1:
        raise ValueError(
            f"{path}: holds data files of several kinds ({', '.join(found)}); give "
            "data_files_format (--data-files-format) to read one kind"
        )
    return found[0], files


def open_source(
    path: str | Path, cache_dir: str | Path, data_files_format: str | None = None
) -> HfSource:
    """Opens PATH (see the module docstring), offline; data files are converted to Arrow in
    ``cache_dir``, which must outlive the returned datasets (they are memory-mapped from it)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    with _offline():
        if path.is_dir() and _is_saved_dataset(path):
            if data_files_format is not None:
                raise ValueError(
                    f"{path}: a dataset written by save_to_disk; data_files_format "
                    f"({data_files_format!r}) applies to data files only"
                )
            loaded = datasets.load_from_disk(str(path))
            base = path
        else:
            builder, files = _data_files(path, data_files_format)
            loaded = datasets.load_dataset(
                builder,
                data_files=[str(f) for f in files],
                split="train",  # the builder's default name for all rows: not a split of the data
                cache_dir=str(cache_dir),
            )
            base = path.parent if path.is_file() else path
    if isinstance(loaded, datasets.DatasetDict):
        parts, own = dict(loaded.items()), len(loaded) > 1
    else:
        parts, own = {"": loaded}, False
    # Python objects whatever format the dataset was saved with (numpy would strip the
    # trailing NUL bytes of binary cells, torch would make labels tensors).
    parts = {name: ds.with_format(None) for name, ds in parts.items()}
    name = (path if path.is_dir() else path.parent).resolve().name
    return HfSource(path, parts, own, base, name)


def check_columns(source: HfSource, named: dict[str, str | Sequence[str] | None]) -> None:
    """Every named column (role -> column or columns) exists in every part; a ValueError naming
    the column, its role and the columns there are otherwise."""
    for part, ds in source.parts.items():
        there = ds.column_names
        for role, columns in named.items():
            if columns is None:
                continue
            for column in [columns] if isinstance(columns, str) else columns:
                if column not in there:
                    where = f"{source.path} [{part}]" if part else str(source.path)
                    raise ValueError(
                        f"{where}: no column {column!r} (the {role} column); the columns are "
                        f"{there}"
                    )


# ---------------------------------------------------------------------------------------------
# Cells -> images and volumes


def _magic_kind(data: bytes) -> str:
    """What encoded bytes hold, by their magic: nifti (gzip, or a NIfTI-1 / NIfTI-2 / Analyze
    header), dicom (DICM at offset 128), image (PNG, JPEG, GIF, BMP, TIFF) or unknown."""
    if data[:2] == _GZIP_MAGIC:
        return "nifti"
    if len(data) >= 4 and int.from_bytes(data[:4], "little") in (348, 540):
        return "nifti"
    if len(data) >= 4 and int.from_bytes(data[:4], "big") in (348, 540):
        return "nifti"
    if data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(_IMAGE_MAGICS):
        return "image"
    return "unknown"


def _path_kind(path: str) -> str:
    """What a file name says it holds: nifti, dicom, image (a PIL-readable suffix) or unknown."""
    name = path.lower()
    if is_volume_file(Path(name)):
        return "nifti"
    if name.endswith(DICOM_SUFFIX):
        return "dicom"
    if name.endswith(tuple(Image.registered_extensions())):
        return "image"
    return "unknown"


def _resolve(text: str, base: Path | None, where: str) -> Path:
    """A path cell -> a local file path (relative to ``base``); URLs are refused."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        raise RecordError(
            "remote_path", where, f"{text!r} is a URL; this writer reads local files only"
        )
    path = Path(text).expanduser()
    return path if path.is_absolute() or base is None else base / path


def _as_array(value: Any, where: str) -> np.ndarray:
    """A numeric array cell (numpy or nested lists) with its singleton axes dropped."""
    try:
        array = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise RecordError("bad_array", where, f"not a rectangular array ({exc})") from exc
    if array.dtype.kind not in "biuf":
        raise RecordError(
            "bad_array",
            where,
            f"expected numbers, got an array of dtype {array.dtype} and shape {array.shape} "
            "(ragged nested lists, or missing values inside the array?)",
        )
    if array.size == 0:
        raise RecordError("bad_array", where, f"an empty array of shape {array.shape}")
    if array.dtype.kind == "f" and np.isnan(array).all():
        # How `datasets` reads back a missing cell of an Array2D..Array5D column.
        raise RecordError("missing_image", where, "the array cell is empty (all NaN)")
    return array.reshape([n for n in array.shape if n != 1])


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, list, tuple))


def array_square(array: np.ndarray, size: int, where: str = "") -> tuple[np.ndarray, int]:
    """A 2-D numeric array -> (size x size uint8 or uint16, bits): uint8 kept 8-bit, uint16
    read by its range (/ 65535), any other dtype min-max scaled; the latter two 16-bit."""
    if array.ndim != 2:
        raise RecordError(
            "not_2d", where, f"expected a 2-D image, got an array of shape {array.shape}"
        )
    if array.dtype == np.uint8:
        return np.asarray(square_resize(Image.fromarray(array), size), dtype=np.uint8), 8
    if array.dtype == np.uint16:
        return unit_square(array.astype(np.float32) / 65535.0, size), 16
    return unit_square(min_max(array, where), size), 16


def pil_square(img: Image.Image, size: int, where: str = "") -> tuple[np.ndarray, int]:
    """A PIL image -> (size x size uint8 or uint16, bits): 16-bit modes (I;16*) by their range,
    32-bit integer (I) by the 16-bit range when its values fit, else min-max, float (F)
    min-max, all stored 16-bit; every other mode made gray ("L", as read_jpeg) and 8-bit."""
    if img.mode.startswith("I;16"):
        return unit_square(np.asarray(img, dtype=np.float32) / 65535.0, size), 16
    if img.mode in ("I", "F"):
        values = np.asarray(img)
        if img.mode == "I" and values.min() >= 0 and values.max() <= 65535:
            return unit_square(values.astype(np.float32) / 65535.0, size), 16
        return unit_square(min_max(values, where), size), 16
    if img.format == "JPEG":  # decode at 1/2, 1/4, 1/8 when still >= size, as read_jpeg does
        draft_gray(img, size)
    gray = img.convert("L") if img.mode != "L" else img
    return np.asarray(square_resize(gray, size), dtype=np.uint8), 8


def _open_pil(data: bytes | Path, where: str) -> Image.Image:
    """An image file or encoded image bytes, opened (not yet decoded) by PIL."""
    what = f"{data}" if isinstance(data, Path) else f"{len(data)} bytes starting {data[:8]!r}"
    try:
        return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except UnidentifiedImageError:
        raise RecordError(
            "unreadable_image", where, f"{what}: not an image format PIL reads (PNG, JPEG, ...)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RecordError("unreadable_image", where, f"{what}: cannot open ({exc})") from exc


def _pil_square_checked(img: Image.Image, size: int, where: str) -> tuple[np.ndarray, int]:
    try:
        with img:
            return pil_square(img, size, where)
    except RecordError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        reason = "truncated_image" if "truncated" in str(exc) else "unreadable_image"
        raise RecordError(reason, where, f"cannot decode ({exc})") from exc


def _dicom_square(data: bytes, size: int, where: str) -> tuple[np.ndarray, int]:
    with tempfile.TemporaryDirectory(prefix="medalign-hf-") as tmp:
        path = Path(tmp) / f"image{DICOM_SUFFIX}"
        path.write_bytes(data)
        try:
            return load_square(path, size)
        except RecordError as err:  # name the row, not the temporary file
            raise RecordError(err.reason, where, err.detail) from err


def image_square(
    value: Any, size: int, base: Path | None = None, where: str = ""
) -> tuple[np.ndarray, int]:
    """A 2-D image cell (see the module docstring) -> (size x size uint8 or uint16 array, bits).

    Raises RecordError: missing_image, remote_path, not_2d (a volume or an array of another
    rank), bad_array, unreadable_image, truncated_image, unreadable_dicom, constant_image,
    non_finite_pixels, unsupported_value.
    """
    if isinstance(value, dict):  # a datasets Image (or Nifti) cell: bytes, else a path
        value = value.get("bytes") or value.get("path")
    if value is None or (isinstance(value, (str, bytes)) and not value):
        raise RecordError("missing_image", where, "the image cell is empty")
    if isinstance(value, Image.Image):
        return pil_square(value, size, where)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        kind = _magic_kind(data)
        if kind == "nifti":
            raise RecordError("not_2d", where, "the cell holds NIfTI bytes, a volume")
        if kind == "dicom":
            return _dicom_square(data, size, where)
        return _pil_square_checked(_open_pil(data, where), size, where)
    if isinstance(value, str):
        path = _resolve(value, base, where)
        kind = _path_kind(path.name)
        if kind == "nifti":
            raise RecordError("not_2d", where, f"{path} is a volume file")
        if not path.is_file():
            raise RecordError("missing_image", where, f"{path}: the file does not exist")
        if kind == "dicom" or path.suffix.lower() in JPEG_SUFFIXES:
            try:
                return load_square(path, size)
            except RecordError as err:
                raise RecordError(err.reason, where, f"{path}: {err.detail}") from err
        return _pil_square_checked(_open_pil(path, where), size, where)
    if _is_array(value):
        return array_square(_as_array(value, where), size, where)
    raise RecordError("unsupported_value", where, f"an image cell of type {type(value).__name__}")


def _nifti_cube(data: bytes, size: int, where: str) -> np.ndarray:
    suffix = ".nii.gz" if data[:2] == _GZIP_MAGIC else ".nii"
    with tempfile.TemporaryDirectory(prefix="medalign-hf-") as tmp:
        path = Path(tmp) / f"volume{suffix}"
        path.write_bytes(data)
        try:
            return load_volume(path, size=size)
        except RecordError as err:  # name the row, not the temporary file
            raise RecordError(err.reason, where, err.detail) from err


def array_cube(array: np.ndarray, size: int, where: str = "") -> np.ndarray:
    """A 3-D numeric array (isotropic voxels, axes as given) -> float32 size^3 cube in [0, 1]
    (shards.volume.to_cube, as a volume file's voxels)."""
    if array.ndim != 3 or min(array.shape) < 2:
        raise RecordError(
            "not_3d", where, f"expected a 3-D volume, got an array of shape {array.shape}"
        )
    data = np.ascontiguousarray(array, dtype=np.float32)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise RecordError(
            "non_finite_voxels", where, f"{bad} of {data.size} voxels are NaN or infinite"
        )
    return to_cube(data, (1.0, 1.0, 1.0), size=size, source=where)


def volume_cube(value: Any, size: int, base: Path | None = None, where: str = "") -> np.ndarray:
    """A 3-D volume cell (see the module docstring) -> float32 (size, size, size) in [0, 1].

    Raises RecordError: missing_image, remote_path, not_3d (an image or an array of another
    rank), bad_array, unreadable_nifti, truncated_nifti, non_finite_voxels, constant_volume,
    unsupported_value.
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None or (isinstance(value, (str, bytes)) and not value):
        raise RecordError("missing_image", where, "the volume cell is empty")
    if isinstance(value, Image.Image):
        raise RecordError("not_3d", where, f"the cell holds a 2-D image ({value.mode})")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        kind = _magic_kind(data)
        if kind in ("image", "dicom"):
            raise RecordError("not_3d", where, f"the cell holds 2-D {kind} bytes, not NIfTI")
        return _nifti_cube(data, size, where)
    if isinstance(value, str):
        path = _resolve(value, base, where)
        kind = _path_kind(path.name)
        if kind in ("image", "dicom"):
            raise RecordError("not_3d", where, f"{path} is a 2-D image file, not a volume")
        if not path.is_file():
            raise RecordError("missing_image", where, f"{path}: the file does not exist")
        try:
            return load_volume(path, size=size)
        except RecordError as err:
            raise RecordError(err.reason, where, f"{path}: {err.detail}") from err
    if _is_array(value):
        return array_cube(_as_array(value, where), size, where)
    raise RecordError("unsupported_value", where, f"a volume cell of type {type(value).__name__}")


def value_dims(value: Any) -> int | None:
    """2 or 3 for a cell whose kind says it (image / volume bytes, file name, array rank)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        return 2
    if isinstance(value, (bytes, bytearray, memoryview)):
        kind = _magic_kind(bytes(value[:132]))
        return 3 if kind == "nifti" else 2 if kind in ("image", "dicom") else None
    if isinstance(value, str):
        kind = _path_kind(value)
        return 3 if kind == "nifti" else 2 if kind in ("image", "dicom") else None
    if _is_array(value):
        try:
            ndim = _as_array(value, "").ndim
        except RecordError:
            return None
        return ndim if ndim in (2, 3) else None
    return None


# ---------------------------------------------------------------------------------------------
# Workers: one row's image cell -> PNG or .npy bytes


def _image_view(ds: datasets.Dataset, column: str) -> datasets.Dataset:
    """The image column alone, as the workers read it: Image / Nifti cells undecoded (bytes or
    path: decoded here, so a bad file is a reject and not an exception inside `datasets`),
    arrays as numpy in their stored dtype (nested Python lists of a volume would be slow)."""
    ds = ds.select_columns([column])
    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    if isinstance(feature, datasets.Nifti):
        return ds.cast_column(column, datasets.Nifti(decode=False))
    if isinstance(feature, (datasets.List, datasets.LargeList, *_ARRAY_FEATURES)):
        # dtype=None: numpy's formatter would make every integer int64 and every float
        # float32, and the dtype decides how pixels are scaled.
        return ds.with_format("numpy", dtype=None)
    return ds  # strings (paths) and binary cells as Python objects (numpy strips trailing NULs)


_ARRAY_FEATURES = (datasets.Array2D, datasets.Array3D, datasets.Array4D, datasets.Array5D)


@dataclass
class _Reader:
    """What a worker needs to read and convert rows: the parts' image columns (memory-mapped
    Arrow: pickling sends their file names, not their bytes), dims, size, the base folder."""

    parts: dict[str, datasets.Dataset]
    column: str
    dims: int
    size: int
    base: Path


_READER: list[_Reader] = []  # the reader of this process (set in workers by their initializer)


def _set_reader(reader: _Reader | None, worker: bool = False) -> None:
    if worker:
        torch.set_num_threads(1)  # each process already has a core (as common._init_worker)
    _READER.clear()
    if reader is not None:
        _READER.append(reader)


def convert_job(job: tuple[str, int, str]) -> tuple[bytes | None, int, str, str]:
    """Worker: (part, row index, where) -> (PNG or float16 .npy bytes or None, bits, reject
    reason, detail); a bad cell is a reject, never an exception."""
    part, index, where = job
    reader = _READER[0]
    try:
        value = reader.parts[part][index][reader.column]
        if reader.dims == 2:
            array, bits = image_square(value, reader.size, reader.base, where)
            return encode_png(array), bits, "", ""
        cube = volume_cube(value, reader.size, reader.base, where)
        return npy_bytes(cube.astype(np.float16)), 0, "", ""
    except RecordError as err:
        return None, 0, err.reason, err.detail or str(err)
    except Exception as exc:  # one odd cell must not end a run over the whole dataset
        return None, 0, "preprocess_error", f"{type(exc).__name__}: {exc}"


def detect_dims(source: HfSource, column: str) -> int:
    """2 or 3 for the image column: from its feature (Image, Nifti), else from its first
    non-missing cell; a ValueError when that cell does not tell."""
    for ds in source.parts.values():
        feature = ds.features[column]
        if isinstance(feature, datasets.Image):
            return 2
        if isinstance(feature, datasets.Nifti):
            return 3
    for part, ds in source.parts.items():
        view = _image_view(ds, column)
        for index in range(len(view)):
            value = view[index][column]
            if isinstance(value, dict):
                value = value.get("bytes") or value.get("path")
            if value is None or (isinstance(value, (str, bytes)) and not value):
                continue
            dims = value_dims(value)
            if dims == 3 and _is_array(value) and _as_array(value, "").shape[-1] in (3, 4):
                raise ValueError(
                    f"{source.where(part, index)}: column {column!r} holds an array of shape "
                    f"{_as_array(value, '').shape}, a colour image or a volume; give dims "
                    "(2 reads 2-D grayscale arrays only, 3 reads it as a volume)"
                )
            if dims is None:
                shape = _as_array(value, "").shape if _is_array(value) else None
                raise ValueError(
                    f"{source.where(part, index)}: cannot tell 2-D from 3-D by the first value "
                    f"of column {column!r} ({type(value).__name__}"
                    f"{f' of shape {shape}' if shape is not None else ''}: {str(value)[:60]!r}); "
                    "give dims 2 or 3"
                )
            return dims
    raise ValueError(f"{source.path}: column {column!r} has no value at all; nothing to write")


# ---------------------------------------------------------------------------------------------
# Labels


def _blank(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value.strip())
    )


def binary_cell(value: Any) -> float | None:
    """A binary label cell -> 1.0, 0.0, -1.0 (uncertain) or None (blank): bool, the numbers
    1 / 0 / -1, strings as shards.cxr_labels.parse_label_cell reads them, None or NaN for blank.
    Anything else raises ValueError naming the value."""
    if _blank(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        if value in (1, 0, -1):
            return float(value)
        raise ValueError(f"label value {value!r} is not 1, 0, -1, a bool or blank")
    if isinstance(value, str):
        return parse_label_cell(value)
    raise ValueError(f"label value {value!r} ({type(value).__name__}) is not 1, 0, -1 or blank")


def _is_cell(value: Any) -> bool:
    try:
        return binary_cell(value) is not None
    except ValueError:
        return False


# Two-class ClassLabel names read as (negative, positive); any other pair is an error.
_BINARY_PAIRS = frozenset(
    {
        ("no", "yes"),
        ("false", "true"),
        ("negative", "positive"),
        ("absent", "present"),
        ("normal", "abnormal"),
        ("0", "1"),
    }
)


def _class_label(feature: Any) -> datasets.ClassLabel | None:
    return feature if isinstance(feature, datasets.ClassLabel) else None


def _is_string(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _names(given: Sequence[str] | None, count: int | None, what: str) -> list[str] | None:
    """``given`` label names checked: distinct non-empty strings, ``count`` of them if set."""
    if given is None:
        return None
    names = [str(n) for n in given]
    if not names or not all(n.strip() for n in names) or len(set(names)) != len(names):
        raise ValueError(f"label_names {names}: expected distinct, non-empty names")
    if count is not None and len(names) != count:
        raise ValueError(f"label_names {names}: {len(names)} names for {count} {what}")
    return names


@dataclass
class LabelSpec:
    """How a row's label cells become a sample's label(s).

    mode: "binary" (2-D: one label per column), "onehot" (2-D: one label per class of one
    column), "class" (3-D: one class index). ``classes`` maps a string cell to its class index
    (string columns; else cells are integer indices); ``classlabels``: the columns that are
    ClassLabels (their cells are indices, -1 for no label).
    """

    mode: str
    columns: tuple[str, ...]
    names: list[str]
    classes: dict[str, int] | None = None
    classlabels: frozenset[str] = frozenset()

    def parse(self, row: dict[str, Any]) -> list[float | None] | int:
        """The row's labels (a list of raw binary values, or a class index); ValueError naming
        the column and the value when a cell is not a label."""
        if self.mode == "binary":
            values: list[float | None] = []
            for column in self.columns:
                cell = row[column]
                try:
                    if column in self.classlabels and (cell is None or cell == -1):
                        values.append(None)  # ClassLabel's "no label"
                    else:
                        values.append(binary_cell(cell))
                except ValueError as exc:
                    raise ValueError(f"column {column!r}: {exc}") from None
            return values
        column = self.columns[0]
        index = self._index(row[column], column)
        if self.mode == "onehot":
            return [1.0 if i == index else 0.0 for i in range(len(self.names))]
        return index

    def _index(self, cell: Any, column: str) -> int:
        if _blank(cell) or (column in self.classlabels and cell == -1):
            raise _MissingLabel(f"column {column!r} is empty")
        if self.classes is not None:
            if isinstance(cell, str) and cell.strip() in self.classes:
                return self.classes[cell.strip()]
            raise ValueError(
                f"column {column!r}: value {cell!r} is not one of the classes {self.names}"
            )
        index = _integer(cell)
        if index is None or not 0 <= index < len(self.names):
            raise ValueError(
                f"column {column!r}: value {cell!r} is not a class index in "
                f"0..{len(self.names) - 1} ({', '.join(self.names)})"
            )
        return index


class _MissingLabel(ValueError):
    """A blank class cell (reject reason missing_label rather than invalid_label)."""


def _integer(cell: Any) -> int | None:
    """An integral number cell as an int (a float column of whole numbers too), else None."""
    if isinstance(cell, (bool, np.bool_)):
        return int(cell)
    if isinstance(cell, (int, np.integer)):
        return int(cell)
    if isinstance(cell, (float, np.floating)) and math.isfinite(cell) and float(cell).is_integer():
        return int(cell)
    return None


def label_spec(
    dims: int,
    columns: Sequence[str],
    features: datasets.Features,
    cells: dict[str, list[Any]],
    label_names: Sequence[str] | None,
) -> LabelSpec:
    """The label mode and names of the dataset (see the module docstring). ``cells``: every
    row's value of each label column (string classes and integer counts are read off them)."""
    columns = tuple(columns)
    if dims == 3:
        if len(columns) != 1:
            raise ValueError(
                f"label columns {list(columns)}: a 3-D dataset has one class column "
                "(format medalign-ad-v1)"
            )
        column = columns[0]
        feature = features[column]
        if (cl := _class_label(feature)) is not None:
            names = _names(label_names, cl.num_classes, f"classes of ClassLabel {column!r}")
            return LabelSpec(
                "class", columns, names or list(cl.names), classlabels=frozenset(columns)
            )
        if _is_string(feature):
            return _string_classes("class", column, cells[column], label_names)
        if isinstance(feature, datasets.Value) and (
            feature.dtype.startswith(("int", "uint", "float")) or feature.dtype == "bool"
        ):
            names = _names(label_names, None, "classes")
            if names is None:
                found = [i for i in map(_integer, cells[column]) if i is not None and i >= 0]
                names = [str(i) for i in range(max(found) + 1)] if found else []
            return LabelSpec("class", columns, names)
        raise ValueError(
            f"label column {column!r} is {feature}; a 3-D dataset's class column must be a "
            "ClassLabel, strings or integers"
        )
    if len(columns) == 1:
        column = columns[0]
        feature = features[column]
        cl = _class_label(feature)
        if cl is not None and cl.num_classes > 2:
            names = _names(label_names, cl.num_classes, f"classes of ClassLabel {column!r}")
            return LabelSpec(
                "onehot", columns, names or list(cl.names), classlabels=frozenset(columns)
            )
        values = cells[column]
        if (
            _is_string(feature)
            and any(not _blank(v) for v in values)
            and not any(_is_cell(v) for v in values)
        ):
            return _string_classes("onehot", column, values, label_names)
    names = _names(label_names, len(columns), "label columns") or list(columns)
    classlabels = frozenset(c for c in columns if _class_label(features[c]) is not None)
    for column in sorted(classlabels):  # its index is the label: class 1 must be the positive
        pair = tuple(n.strip().lower() for n in features[column].names)
        if len(pair) == 2 and pair not in _BINARY_PAIRS:
            raise ValueError(
                f"label column {column!r} is a ClassLabel of {features[column].names}: which "
                "class is positive is not clear; expected names such as [no, yes] or "
                "[negative, positive] (the second positive), or a 0 / 1 integer column"
            )
    return LabelSpec("binary", columns, names, classlabels=classlabels)


def _string_classes(
    mode: str, column: str, values: list[Any], label_names: Sequence[str] | None
) -> LabelSpec:
    names = _names(label_names, None, "classes")
    if names is None:
        names = sorted({v.strip() for v in values if isinstance(v, str) and v.strip()})
    return LabelSpec(mode, (column,), names, classes={n: i for i, n in enumerate(names)})


# ---------------------------------------------------------------------------------------------
# Rows -> records


@dataclass(frozen=True)
class HfRecord:
    """One row that passed every check short of its image: where it is, its sample fields."""

    part: str
    index: int
    where: str
    split: str
    key: str
    ident: str  # the key / id cell, else the row index
    subject: str
    text: str
    labels: Any  # list of raw binary values (2-D) or a class index (3-D)


def _cell_text(value: Any) -> str:
    """A subject / id / split cell as text (a whole float as an integer: CSV columns with blanks
    are read as floats); "" for a blank cell."""
    if _blank(value):
        return ""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


@dataclass
class RowScan:
    """Every row read: the records (images still to convert), the rejects, how many rows."""

    records: list[HfRecord] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    records_in: int = 0
    key_column: str | None = None


def _row_split(source: HfSource, part: str, row: dict[str, Any], split_column: str | None) -> str:
    """The shard split of a row, from the DatasetDict or the split column ("" when drawn by
    ratios later); RecordError unknown_split / missing_split."""
    if source.own_splits:
        if part.lower() not in SPLIT_NAMES:
            raise RecordError(
                "unknown_split",
                "",
                f"split {part!r} of the DatasetDict: expected one of {', '.join(SPLIT_NAMES)}",
            )
        return SPLIT_NAMES[part.lower()]
    if split_column is None:
        return ""
    value = row[split_column]
    name = _cell_text(value).lower()
    if not name:
        raise RecordError("missing_split", "", f"column {split_column!r} is empty")
    if name not in SPLIT_NAMES:
        raise RecordError(
            "unknown_split",
            "",
            f"column {split_column!r}: value {value!r} is not one of {', '.join(SPLIT_NAMES)}",
        )
    return SPLIT_NAMES[name]


def _row_fields(
    row: dict[str, Any],
    spec: LabelSpec,
    text_column: str | None,
    subject_column: str | None,
) -> tuple[str, str, Any]:
    """(subject, text, labels) of a row; RecordError missing_subject, missing_label,
    invalid_label or missing_text."""
    subject = ""
    if subject_column is not None:
        subject = _cell_text(row[subject_column])
        if not subject:
            raise RecordError("missing_subject", "", f"column {subject_column!r} is empty")
    try:
        labels = spec.parse(row)
    except _MissingLabel as exc:
        raise RecordError("missing_label", "", str(exc)) from None
    except ValueError as exc:
        raise RecordError("invalid_label", "", str(exc)) from None
    text = ""
    if text_column is not None:
        cell = row[text_column]
        text = "" if _blank(cell) else str(cell).strip()
        if not text:
            raise RecordError("missing_text", "", f"column {text_column!r} is empty")
    return subject, text, labels


def _draw_splits(
    rows: list[HfRecord], ratios: tuple[float, float, float], seed: int, by_subject: bool, dims: int
) -> list[HfRecord]:
    """Rows (split "") -> the same rows with a split drawn per subject (each row its own subject
    without a subject column); 3-D datasets stratified by the class of a subject's first row."""
    unit_of = {id(r): ("", r.subject) if by_subject else (r.part, f"{r.index:012d}") for r in rows}
    strata: dict[tuple[str, str], str] = {}
    for rec in rows:
        strata.setdefault(unit_of[id(rec)], str(rec.labels) if dims == 3 else "")
    assignment = assign_splits(strata, ratios, seed)
    return [replace(rec, split=assignment[unit_of[id(rec)]]) for rec in rows]


def scan_rows(
    source: HfSource,
    dims: int,
    label_columns: Sequence[str],
    label_names: Sequence[str] | None = None,
    text_column: str | None = None,
    subject_column: str | None = None,
    split_column: str | None = None,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> tuple[RowScan, LabelSpec]:
    """Every row -> a record (split, key, subject, text, labels) or a reject with its reason;
    the images are not read here. Returns the scan and the dataset's LabelSpec."""
    parts = source.parts
    key_column = next(
        (c for c in KEY_COLUMNS if all(c in ds.column_names for ds in parts.values())), None
    )
    wanted = [*label_columns, text_column, subject_column, split_column, key_column]
    columns = list(dict.fromkeys(c for c in wanted if c is not None))
    # Column-wise: the cells of these columns only (never the images), as Python values.
    tables = {
        part: ds.select_columns(columns)[:] if len(ds) else {c: [] for c in columns}
        for part, ds in parts.items()
    }
    features = next(iter(parts.values())).features
    cells = {c: [v for table in tables.values() for v in table[c]] for c in label_columns}
    spec = label_spec(dims, label_columns, features, cells, label_names)

    scan = RowScan(key_column=key_column)
    kept: list[HfRecord] = []
    for part, table in tables.items():
        for index in range(len(parts[part])):
            scan.records_in += 1
            row = {c: table[c][index] for c in columns}
            where = source.where(part, index)
            try:
                split = _row_split(source, part, row, split_column)
                subject, text, labels = _row_fields(row, spec, text_column, subject_column)
            except RecordError as err:
                scan.rejects.append(Reject(where, err.reason, err.detail))
                continue
            ident = str(index) if key_column is None else _cell_text(row[key_column])
            if not ident:
                scan.rejects.append(Reject(where, "missing_key", f"column {key_column!r} is empty"))
                continue
            kept.append(HfRecord(part, index, where, split, "", ident, subject, text, labels))

    if not source.own_splits and split_column is None:
        kept = _draw_splits(kept, ratios, seed, subject_column is not None, dims)

    first: dict[tuple[str, str], str] = {}  # (part, id) -> the row that has it
    by_key: dict[str, str] = {}
    for rec in kept:
        key = safe_key(f"{rec.part if source.own_splits else rec.split}_{rec.ident}")
        if (rec.part, rec.ident) in first:
            what = f"{key_column} {rec.ident!r}" if key_column else f"row {rec.ident}"
            detail = f"{what} already used by {first[(rec.part, rec.ident)]}"
            scan.rejects.append(Reject(rec.where, "duplicate_key", detail))
            continue
        if key in by_key:  # two ids that sanitise to one key
            detail = f"key {key} already used by {by_key[key]}"
            scan.rejects.append(Reject(rec.where, "duplicate_key", detail))
            continue
        first[(rec.part, rec.ident)] = by_key[key] = rec.where
        scan.records.append(replace(rec, key=key, subject=rec.subject or key))
    return scan, spec


# ---------------------------------------------------------------------------------------------
# Writing


def _sample(rec: HfRecord, data: bytes, dims: int, cohort: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "split": rec.split,
        "subject": rec.subject,
        "id": rec.ident,
        "row": rec.index,
        "source_path": rec.where,
    }
    if rec.part:
        meta["source_split"] = rec.part
    if dims == 2:
        # The group: a text's images (retrieval counts any image of the group as a match) and
        # the bootstrap's unit. Each row has its own text, so with texts every image is its own
        # group; without texts the subject's images are resampled together.
        meta.update(labels=list(rec.labels), study=rec.subject if not rec.text else rec.key)
        return ImageMultilabel.encode(rec.key, data, rec.text, meta)
    meta.update(label=int(rec.labels), cohort=cohort, binary=False)
    return VolumeClass.encode(rec.key, data, rec.text, meta)


@dataclass
class _SplitWriter:
    """What every split's writing shares."""

    out: Path
    dims: int
    size: int
    cohort: str
    spec: LabelSpec
    texts: bool
    samples_per_shard: int
    rejects: list[Reject]
    subjects: dict[str, set[str]] = field(default_factory=dict)  # subject -> splits written
    bits: Counter[int] = field(default_factory=Counter)

    def write(
        self,
        split: str,
        records: list[HfRecord],
        results: Iterator[tuple[bytes | None, int, str, str]],
    ) -> dict[str, Any]:
        """Write one split from ``records`` and their converted images, taken in order from
        ``results`` (one iterator shared by the splits, so one worker pool serves them all)."""
        folder = self.out / split
        folder.mkdir(parents=True, exist_ok=True)
        clear_old_shards(folder, split)
        sink = ShardSink(folder, split, self.samples_per_shard)
        unit = "img" if self.dims == 2 else "vol"
        bar = tqdm(
            total=len(records),
            desc=f"{split} {'images' if self.dims == 2 else 'volumes'}",
            unit=unit,
            disable=len(records) < PROGRESS_MIN,
        )
        written, bits = 0, set()
        for rec, (data, depth, reason, detail) in zip(
            records, islice(results, len(records)), strict=True
        ):
            bar.update()
            if data is None:
                log.warning("reject %s: %s (%s)", rec.where, reason, detail)
                self.rejects.append(Reject(rec.where, reason, detail))
                continue
            sink.write(_sample(rec, data, self.dims, self.cohort))
            self.subjects.setdefault(rec.subject, set()).add(split)
            if self.dims == 2:
                bits.add(depth)
                self.bits[depth] += 1
            written += 1
        bar.close()
        extra: dict[str, Any]
        if self.dims == 2:
            extra = {
                "image_size": self.size,
                "bit_depth": max(bits, default=8),
                "label_names": list(self.spec.names),
                "texts": self.texts,
            }
        else:
            extra = {
                "volume_size": self.size,
                "label_names": list(self.spec.names),
                "cohort": self.cohort,
            }
        extra.update(source=SOURCE, label_mode=self.spec.mode)
        manifest = write_manifest(folder, FORMATS[self.dims], split, sink.close(), extra)
        assert manifest["num_samples"] == written
        return manifest


def summary_line(report: dict[str, Any]) -> str:
    """One line: records in, written per split, rejected by reason."""
    w, r = report["written"], report["rejected"]
    splits = " ".join(f"{s}={w[s]}" for s in SPLITS)
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(r["by_reason"].items())) or "none"
    return (
        f"HF shards ({report['format']}): {report['records_in']} records in -> {w['total']} "
        f"written ({splits}), {r['total']} rejected ({reasons}) in {report['seconds']:.1f}s "
        f"-> {report['out_dir']}"
    )


def _check_dims(source: HfSource, column: str, dims: int | str) -> int:
    """The dims to write: ``dims`` (2, 3) checked against the column's feature, or detected."""
    if dims == "auto":
        return detect_dims(source, column)
    if dims not in (2, 3):
        raise ValueError(f"dims={dims!r}: expected 'auto', 2 or 3")
    for ds in source.parts.values():
        feature = ds.features[column]
        kind = (
            2
            if isinstance(feature, datasets.Image)
            else 3
            if isinstance(feature, datasets.Nifti)
            else None
        )
        if kind is not None and kind != dims:
            raise ValueError(
                f"{source.path}: column {column!r} is a datasets {type(feature).__name__} "
                f"({kind}-D), dims={dims}"
            )
    return int(dims)


def _as_dims(dims: int | str) -> int | str:
    if isinstance(dims, str) and dims.strip() in ("2", "3"):
        return int(dims)
    return dims


def write_hf_shards(
    path: str | Path,
    out: str | Path,
    image_column: str,
    label_columns: Sequence[str],
    text_column: str | None = None,
    subject_column: str | None = None,
    split_column: str | None = None,
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    label_names: Sequence[str] | None = None,
    dims: int | str = "auto",
    size: int | None = None,
    samples_per_shard: int = 512,
    workers: int = 1,
    seed: int = 0,
    data_files_format: str | None = None,
) -> dict[str, Any]:
    """Read a local Hugging Face dataset or data files at PATH and write WebDataset shards.

    See the module docstring for the sources, splits, image conversion, labels and keys.
    ``workers`` processes convert images (each reads its rows from the memory-mapped dataset
    itself); the shards are byte-identical for any worker count. Every row is written or
    rejected with a reason; returns the report also saved as <out>/report.json. Raises
    ValueError / FileNotFoundError (naming PATH, the column, the value) for what no row can fix:
    an unknown column, contradictory options, a source that is not a dataset.
    """
    label_columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
    if not label_columns:
        raise ValueError("label_columns: expected at least one label column")
    if len(set(label_columns)) != len(label_columns):
        raise ValueError(f"label_columns {label_columns}: a column is named twice")
    dims = _as_dims(dims)
    if dims not in ("auto", 2, 3):
        raise ValueError(f"dims={dims!r}: expected 'auto', 2 or 3")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    ratios = check_ratios(tuple(split_ratios))
    started = time.perf_counter()
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="medalign-hf-cache-") as cache:
        source = open_source(path, cache, data_files_format)
        if source.own_splits and split_column is not None:
            raise ValueError(
                f"{source.path}: a DatasetDict with splits {list(source.parts)}, and a split "
                f"column {split_column!r}: the dataset's own splits are used; drop the column"
            )
        check_columns(
            source,
            {
                "image": image_column,
                "label": label_columns,
                "text": text_column,
                "subject": subject_column,
                "split": split_column,
            },
        )
        ndims = _check_dims(source, image_column, dims)
        size = DEFAULT_SIZES[ndims] if size is None else int(size)
        if size < (8 if ndims == 2 else 2):
            raise ValueError(f"size must be >= {8 if ndims == 2 else 2}, got {size}")
        if ndims == 3 and text_column is None:
            raise ValueError(
                f"{source.path}: a 3-D dataset needs a text column (format {FORMATS[3]} "
                "samples carry a text); give text_column (--text-column)"
            )
        scan, spec = scan_rows(
            source,
            ndims,
            label_columns,
            label_names,
            text_column,
            subject_column,
            split_column,
            ratios,
            seed,
        )
        rejects = list(scan.rejects)
        log.info("%d rows in, %d rejected before reading images", scan.records_in, len(rejects))
        out.mkdir(parents=True, exist_ok=True)
        ordered = {
            split: seeded_order([r for r in scan.records if r.split == split], split, seed)
            for split in SPLITS
        }
        reader = _Reader(
            {part: _image_view(ds, image_column) for part, ds in source.parts.items()},
            image_column,
            ndims,
            size,
            source.base,
        )
        jobs = [(rec.part, rec.index, rec.where) for split in SPLITS for rec in ordered[split]]
        writer = _SplitWriter(
            out, ndims, size, source.name, spec, text_column is not None, samples_per_shard, rejects
        )
        manifests: dict[str, dict[str, Any]] = {}
        if workers > 1:
            results = parallel_map(
                convert_job, jobs, workers, initializer=partial(_set_reader, reader, True)
            )
        else:
            _set_reader(reader)
            results = parallel_map(convert_job, jobs, 1)
        try:
            for split in SPLITS:
                manifests[split] = writer.write(split, ordered[split], results)
        finally:
            results.close()  # ends the worker pool
            _set_reader(None)
    write_rejects(out / "rejects.jsonl", rejects)

    written = {split: manifests[split]["num_samples"] for split in SPLITS}
    written["total"] = sum(written.values())
    subjects = Counter(split for splits in writer.subjects.values() for split in splits)
    across = sum(1 for splits in writer.subjects.values() if len(splits) > 1)
    if across:
        log.warning(
            "%d subjects have samples in more than one split (from the %s): their samples are "
            "not independent, test scores are optimistic",
            across,
            "DatasetDict's splits" if source.own_splits else f"split column {split_column!r}",
        )
    report: dict[str, Any] = {
        "format": FORMATS[ndims],
        "source": SOURCE,
        "path": str(source.path),
        "out_dir": str(out),
        "dims": ndims,
        "image_size" if ndims == 2 else "volume_size": size,
        "seed": seed,
        "splits_from": (
            "dataset_dict"
            if source.own_splits
            else "split_column"
            if split_column is not None
            else "ratios"
        ),
        "split_ratios": list(ratios),
        "columns": {
            "image": image_column,
            "labels": label_columns,
            "text": text_column,
            "subject": subject_column,
            "split": split_column,
            "key": scan.key_column,
        },
        "label_mode": spec.mode,
        "label_names": list(spec.names),
        "records_in": scan.records_in,
        "written": written,
        "rejected": {"total": len(rejects), "by_reason": dict(Counter(r.reason for r in rejects))},
        "subjects": {split: subjects.get(split, 0) for split in SPLITS},
        "subjects_in_several_splits": across,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if ndims == 2:
        report["bit_depths"] = {str(k): v for k, v in sorted(writer.bits.items())}
    else:
        report["cohort"] = source.name
    # The promise of this writer: nothing is silently dropped.
    assert scan.records_in == written["total"] + len(rejects), report
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary_line(report))
    return report
