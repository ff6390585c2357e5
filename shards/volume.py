"""Read one MRI volume (NIfTI / NIfTI pair / Analyze) and bring it to a fixed RAS cube in [0, 1].

Steps (Alifuse preprocessing, made orientation- and spacing-safe):
reorient to RAS -> isotropic voxels -> pad to a cube -> resize to S^3 -> robust intensity scaling.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from shards.common import RecordError

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img")


def is_volume_file(path: Path) -> bool:
    """True for the volume file names this reader accepts (.nii, .nii.gz, .img of a pair)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_canonical(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Load a 3D volume reoriented to RAS.

    Returns the float32 voxel array (X, Y, Z) in RAS axis order and the voxel sizes in mm.
    Raises RecordError for a missing, unreadable, truncated, non-3D or non-finite volume.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError("missing_image", path, "expected a volume file, none exists")
    try:
        img = nib.load(str(path))
    except (EOFError, zlib.error) as exc:
        raise RecordError("truncated_nifti", path, f"file ends early ({exc})") from exc
    except Exception as exc:  # nibabel raises many types for junk (ImageFileError, ValueError, ...)
        raise RecordError(
            "unreadable_nifti", path, f"expected a NIfTI-1/2 or Analyze volume ({exc})"
        ) from exc

    shape = tuple(int(n) for n in img.shape)
    # Real OASIS pairs are stored (X, Y, Z, 1): drop trailing singleton axes, refuse time series.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 2:
        raise RecordError("not_3d", path, f"expected a 3D volume, got shape {tuple(img.shape)}")

    try:
        canonical = nib.as_closest_canonical(img)
        data = canonical.get_fdata(dtype=np.float32)
    except (EOFError, zlib.error) as exc:
        raise RecordError("truncated_nifti", path, f"voxel data ends early ({exc})") from exc
    except OSError as exc:
        # nibabel reports a short uncompressed file as "Expected N bytes, got M bytes".
        raise RecordError("truncated_nifti", path, f"voxel data ends early ({exc})") from exc
    except Exception as exc:
        raise RecordError("unreadable_nifti", path, f"cannot read voxel data ({exc})") from exc

    data = data.reshape(data.shape[:3])  # trailing singleton axes, checked above
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise RecordError(
            "non_finite_voxels",
            path,
            f"{bad} of {data.size} voxels are NaN or infinite; expected finite intensities",
        )
    zooms = np.sqrt((canonical.affine[:3, :3] ** 2).sum(axis=0))
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise RecordError("unreadable_nifti", path, f"expected positive voxel sizes, got {zooms}")
    return data, (float(zooms[0]), float(zooms[1]), float(zooms[2]))


def to_cube(
    data: np.ndarray, zooms: tuple[float, float, float], size: int = 128, source: str | Path = ""
) -> np.ndarray:
    """Resample a RAS volume to an (size, size, size) float32 cube with values in [0, 1].

    Voxels are made isotropic and the physical extent is kept: the longest side spans the
    cube and the others are padded, centred, with the volume minimum. Resampling straight to
    the final isotropic spacing does "isotropic -> pad -> resize" with one interpolation.
    Intensities are clipped at the 0.5 / 99.5 percentiles and min-max scaled.
    """
    lo_raw, hi_raw = float(data.min()), float(data.max())
    if hi_raw <= lo_raw:
        raise RecordError(
            "constant_volume", source, f"all voxels equal {lo_raw}; expected contrast"
        )
    # Percentiles of the acquired voxels (not interpolated ones, not the padding).
    lo, hi = (float(v) for v in np.percentile(data, [0.5, 99.5]))
    if hi <= lo:
        # Mostly-constant image (e.g. a sparse mask): the clip would erase it, use min-max.
        lo, hi = lo_raw, hi_raw

    extent = np.asarray(data.shape, dtype=np.float64) * np.asarray(zooms, dtype=np.float64)
    spacing = extent.max() / size
    inner = tuple(int(min(size, max(1, round(e / spacing)))) for e in extent)
    vol = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
    if tuple(vol.shape[2:]) != inner:
        vol = F.interpolate(vol, size=inner, mode="trilinear", align_corners=False)
    vol = vol[0, 0].clamp_(lo, hi).sub_(lo).div_(hi - lo)

    pads: list[int] = []
    for n in reversed(inner):  # F.pad takes the last axis first
        before = (size - n) // 2
        pads += [before, size - n - before]
    # Padding with the volume minimum, which the scaling maps to exactly 0.
    cube = F.pad(vol, pads, mode="constant", value=0.0)
    return cube.numpy()


def load_volume(path: str | Path, size: int = 128) -> np.ndarray:
    """Read a volume file and return a float32 (size, size, size) RAS cube in [0, 1].

    Raises RecordError (reason: missing_image, unreadable_nifti, truncated_nifti, not_3d,
    non_finite_voxels, constant_volume) instead of crashing on a bad file.
    """
    data, zooms = read_canonical(path)
    return to_cube(data, zooms, size=size, source=path)
