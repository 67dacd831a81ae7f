"""File-level safety checks shared by the readers.

Everything here runs *before* a decoder touches the file: the file must exist and be readable, and a
header's claimed size must be plausible, so that a corrupt or hostile header can never make the
reader allocate gigabytes (a 4-byte change to a NIfTI ``dim`` field is enough to ask for terabytes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from hlip_fed.data.errors import DataError

# Largest scan accepted, in voxels (~537 M: a 1024x1024x512 volume). A 512x512x2000 whole-body CT is
# 524 M voxels, so real scans fit; anything larger is treated as a corrupt header, not allocated.
MAX_VOXELS = 1 << 29
# Largest single dimension accepted; NIfTI-1 stores int16 dims, DICOM Rows/Columns are uint16.
MAX_DIM = 65535

NIFTI_SUFFIXES = (".nii.gz", ".nii")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# Files that may sit next to DICOM slices in a series folder and are not slices.
SIDE_FILE_SUFFIXES = (".txt", ".json", ".xml", ".md", ".csv", ".html", ".htm", ".pdf", ".jpg", ".png")


def is_nifti_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def scan_stem(path: str | os.PathLike) -> str:
    """``t1.nii.gz`` -> ``t1``; ``ct/`` -> ``ct``; ``x.dcm`` -> ``x``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES + DICOM_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_readable(path: str | os.PathLike, kind: str = "file") -> Path:
    """Raise :class:`DataError` unless ``path`` is an existing, readable, non-empty file."""
    p = Path(path)
    if not p.exists():
        raise DataError(p, f"{kind} not found")
    if kind == "file" and not p.is_file():
        raise DataError(p, "not a regular file")
    if not os.access(p, os.R_OK):
        raise DataError(p, "permission denied (not readable)")
    if kind == "file":
        try:
            with open(p, "rb") as fh:
                first = fh.read(1)
        except PermissionError:
            raise DataError(p, "permission denied (not readable)") from None
        except OSError as exc:
            raise DataError(p, f"cannot read: {exc.strerror or exc}") from None
        if not first:
            raise DataError(p, "empty file (0 bytes)")
    return p


def check_size(path: str | os.PathLike, shape: tuple[int, ...], itemsize: int, what: str = "header") -> None:
    """Refuse a claimed array size that is invalid or too large to be a real scan."""
    dims = [int(d) for d in shape]
    text = "x".join(str(d) for d in dims)
    if any(d <= 0 for d in dims):
        raise DataError(path, f"{what} claims invalid dimensions {text}")
    n = int(np.prod(np.array(dims, dtype=object)))  # exact, no int64 overflow
    if any(d > MAX_DIM for d in dims) or n > MAX_VOXELS:
        gib = n * itemsize / 2**30
        raise DataError(
            path,
            f"{what} claims an absurd size {text} ({n:,} voxels, {gib:,.1f} GiB); "
            f"limit is {MAX_VOXELS:,} voxels, not allocated",
        )


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(d)) for d in shape)


def read_sidecar(scan_path: str | os.PathLike) -> dict:
    """The optional ``<scan>.json`` next to a scan (``{"modality": "MR", "sequence": "T1"}``)."""
    p = Path(scan_path)
    side = p.with_name(scan_stem(p) + ".json")
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(side, f"unreadable sidecar JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise DataError(side, "sidecar JSON must be an object such as {\"modality\": \"MR\"}")
    return data


def guess_modality(array: np.ndarray) -> str:
    """CT if the volume holds air in Hounsfield units (values near -1000), else MR.

    Only used when neither a DICOM header nor a sidecar says what the scan is; a NIfTI export of a
    CT keeps HU, and MR intensities are non-negative.
    """
    if array.size == 0:
        return "MR"
    sample = array.reshape(-1)[:: max(1, array.size // 200_000)]
    return "CT" if float(np.percentile(sample, 1.0)) < -500.0 else "MR"
