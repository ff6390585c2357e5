"""Chest X-ray image files (DICOM from MIMIC-CXR, JPEG from MIMIC-CXR-JPG) -> square PNG samples.

DICOM: pixel data -> modality LUT (rescale) -> VOI LUT or window -> min-max to [0, 1] ->
inverted when MONOCHROME1, so that air is dark as in MONOCHROME2 and the JPEG release. The
values stay float32 (from 12-16 bit data) through the resize and are stored as a 16-bit PNG.

JPEG: already 8-bit and windowed: decoded as grayscale (with the decoder's DCT scaling when
the file is much larger than the target) and stored as an 8-bit PNG.

Both: keep the aspect ratio, resize the short side to S and centre-crop the long side to S
(one resample of the central square), so a sample is a grayscale S x S PNG.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError

from shards.common import RecordError

try:  # pydicom >= 3
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
except ImportError:  # pydicom 2.x
    from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

DICOM_SUFFIX = ".dcm"
RESAMPLE = Image.Resampling.BICUBIC  # antialiased when reducing (PIL scales the kernel)
PNG_LEVEL = 6


def read_dicom(path: str | Path) -> np.ndarray:
    """A DICOM radiograph -> float32 (rows, columns) in [0, 1], air dark (MONOCHROME2 sense).

    Raises RecordError: missing_image (no file), unreadable_dicom (not DICOM, no or
    undecodable pixel data, e.g. a missing decoder plugin for a compressed transfer syntax),
    not_2d (colour or multi-frame), constant_image, non_finite_pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError("missing_image", path, "expected a DICOM file, none exists")
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except InvalidDicomError as exc:
        raise RecordError("unreadable_dicom", path, f"not a DICOM file ({exc})") from exc
    except Exception as exc:  # pydicom raises many types for truncated or odd pixel data
        raise RecordError(
            "unreadable_dicom", path, f"cannot decode pixel data ({type(exc).__name__}: {exc})"
        ) from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if pixels.ndim != 2 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise RecordError(
            "not_2d",
            path,
            f"expected one grayscale frame, got shape {pixels.shape} ({photometric})",
        )
    values = apply_modality_lut(pixels, ds)
    values = apply_voi_lut(values, ds)  # a VOI LUT if present, else the first window
    # Min-max after the window: values the window clipped sit at 0 or 1.
    values = min_max(values, path)
    if photometric == "MONOCHROME1":  # high values are dark in MONOCHROME1
        np.subtract(1.0, values, out=values)
    return values


def min_max(values: np.ndarray, where: str | Path) -> np.ndarray:
    """Pixel values -> float32 in [0, 1] by their minimum and maximum; a RecordError naming
    `where` for NaN / infinite pixels or an image without contrast."""
    values = np.array(values, dtype=np.float32)  # a copy: scaled in place below
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise RecordError("non_finite_pixels", where, f"{bad} pixels are NaN or infinite")
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise RecordError("constant_image", where, f"all pixels equal {lo}; expected contrast")
    values -= lo
    values *= 1.0 / (hi - lo)
    return values


def center_square(width: int, height: int) -> tuple[float, float, float, float]:
    """The central square (left, top, right, bottom) of a width x height image."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def square_resize(img: Image.Image, size: int) -> Image.Image:
    """Short side -> ``size`` keeping the aspect ratio, long side centre-cropped: size x size."""
    return img.resize((size, size), RESAMPLE, box=center_square(*img.size))


def unit_square(values: np.ndarray, size: int) -> np.ndarray:
    """float32 (H, W) in [0, 1] -> the central square resized to size x size, uint16 (16-bit
    sources: DICOM, 16-bit arrays)."""
    small = square_resize(Image.fromarray(np.ascontiguousarray(values, dtype=np.float32)), size)
    values = np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0)  # bicubic overshoots
    return np.rint(values * 65535.0).astype(np.uint16)


def draft_gray(img: Image.Image, size: int) -> None:
    """Lets a JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding, never below `size` on the
    short side (a 3000 px image decodes several times faster); other formats ignore it."""
    scale = size / min(img.size)
    img.draft("L", (int(np.ceil(img.width * scale)), int(np.ceil(img.height * scale))))


def read_jpeg(path: str | Path, size: int | None = None) -> Image.Image:
    """A JPEG (or any PIL-readable) radiograph -> grayscale "L" image.

    With ``size``, the JPEG decoder may scale by 1/2, 1/4 or 1/8 while decoding, never below
    ``size`` on the short side (a 3000 px image decodes several times faster). Raises
    RecordError missing_image, truncated_image or unreadable_image.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError("missing_image", path, "expected a JPEG file, none exists")
    try:
        with Image.open(path) as img:
            if size is not None:
                draft_gray(img, size)
            img.load()
            return img.convert("L") if img.mode != "L" else img.copy()
    except UnidentifiedImageError as exc:
        raise RecordError("unreadable_image", path, f"not an image file ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        reason = "truncated_image" if "truncated" in str(exc) else "unreadable_image"
        raise RecordError(reason, path, f"cannot decode ({exc})") from exc


def load_square(path: str | Path, size: int) -> tuple[np.ndarray, int]:
    """An image file -> (size x size array, bits): uint8 from JPEG, uint16 from DICOM (.dcm)."""
    path = Path(path)
    if path.suffix.lower() == DICOM_SUFFIX:
        return unit_square(read_dicom(path), size), 16
    return np.asarray(square_resize(read_jpeg(path, size), size), dtype=np.uint8), 8


def encode_png(array: np.ndarray) -> bytes:
    """Grayscale uint8 (mode L) or uint16 (mode I;16) array -> PNG bytes, deterministic."""
    if array.dtype not in (np.uint8, np.uint16) or array.ndim != 2:
        raise ValueError(f"expected a 2D uint8 or uint16 array, got {array.dtype} {array.shape}")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes of a sample -> float32 (S, S) in [0, 1] (8-bit / 255, 16-bit / 65535)."""
    with Image.open(io.BytesIO(data)) as img:
        array = np.asarray(img)
    scale = 255.0 if array.dtype == np.uint8 else 65535.0
    return array.astype(np.float32) / scale


def png_job(job: tuple[str, int]) -> tuple[str, bytes | None, str, str]:
    """Worker: (image path, size) -> (path, PNG bytes or None, reject reason, detail)."""
    path, size = job
    try:
        array, _ = load_square(path, size)
    except RecordError as err:
        return path, None, err.reason, err.detail or str(err)
    except Exception as exc:  # one odd file must not end a run over 377,000 images
        return path, None, "preprocess_error", f"{type(exc).__name__}: {exc}"
    return path, encode_png(array), "", ""
