"""NIfTI-1/2 reader (``.nii``, ``.nii.gz``) built on nibabel.

The header is checked before any voxel is read: a 2D image, a 4D series, an absurd claimed size, a
non-numeric data type or a truncated uncompressed file is refused with a one-line
:class:`~hlip_fed.data.errors.DataError`. NaN or Inf voxels are refused after loading. The result is
reoriented to the canonical orientation of :mod:`hlip_fed.data.volume`.
"""

from __future__ import annotations

import gzip
import os
import zlib

import nibabel as nib
import numpy as np

from hlip_fed.data.errors import DataError
from hlip_fed.data.files import check_readable, check_size, guess_modality, read_sidecar, shape_text
from hlip_fed.data.volume import Volume, make_volume

_DECODE_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, MemoryError, TypeError)


def _load_header(path: str) -> nib.Nifti1Image:
    try:
        img = nib.load(path)
    except nib.filebasedimages.ImageFileError as exc:
        raise DataError(path, f"not a NIfTI file ({exc})") from None
    except gzip.BadGzipFile:
        raise DataError(path, "not a NIfTI file (corrupt or non-gzip data with a .gz name)") from None
    except (EOFError, zlib.error):
        raise DataError(path, "truncated or corrupt NIfTI header") from None
    except PermissionError:
        raise DataError(path, "permission denied (not readable)") from None
    except _DECODE_ERRORS + (nib.spatialimages.HeaderDataError,) as exc:
        raise DataError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    return img


def spatial_shape(path: str, shape: tuple[int, ...], allow_2d: bool) -> tuple[int, ...]:
    """The 3D shape of a header shape, or a DataError saying what was found instead."""
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:  # (x, y, z, 1) is a 3D volume saved as 4D
        dims.pop()
    if len(dims) > 3:
        raise DataError(path, f"{len(dims)}D volume ({shape_text(dims)}) where a 3D scan is expected")
    while len(dims) < 3:
        dims.append(1)
    if not allow_2d and sum(d > 1 for d in dims) < 3:
        raise DataError(path, f"2D image ({shape_text(shape)}) where a 3D scan is expected")
    return tuple(dims)


def read_nifti(path: str | os.PathLike, allow_2d: bool = False) -> Volume:
    path = str(path)
    check_readable(path)
    img = _load_header(path)
    header = img.header
    try:
        dtype = header.get_data_dtype()
    except Exception as exc:  # nibabel raises several types for unknown datatype codes
        raise DataError(path, f"unsupported NIfTI data type ({exc})") from None
    if dtype.fields is not None or dtype.kind not in "iufb":
        raise DataError(path, f"unsupported NIfTI data type {dtype} (expected a grey-level image)")
    check_size(path, img.shape, dtype.itemsize)
    shape3 = spatial_shape(path, img.shape, allow_2d)

    if not path.lower().endswith(".gz"):
        need = int(header.get("vox_offset", 0)) + int(np.prod(img.shape)) * dtype.itemsize
        have = os.path.getsize(path)
        if have < need:
            raise DataError(path, f"truncated NIfTI file ({have:,} bytes, header needs {need:,})")

    try:
        data = np.asanyarray(img.dataobj)
    except _DECODE_ERRORS as exc:
        raise DataError(path, f"truncated or corrupt image data ({type(exc).__name__})") from None
    data = np.asarray(data, dtype=np.float32).reshape(shape3)
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise DataError(path, f"{bad:,} NaN/Inf voxels in the image data")

    affine = np.asarray(img.affine, dtype=np.float64)
    warnings = []
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(path, "invalid (singular or non-finite) affine in the NIfTI header")
    sform, qform = int(header["sform_code"]), int(header["qform_code"])
    if sform == 0 and qform == 0:
        warnings.append("no qform/sform in the header; orientation assumed from pixdim (LAS-like)")

    side = read_sidecar(path)
    modality = str(side.get("modality") or guess_modality(data)).upper()
    return make_volume(
        data,
        affine,
        modality=modality,
        source=path,
        sequence=side.get("sequence"),
        meta={"format": "nifti", "source_shape": list(img.shape)},
        warnings=warnings,
    )


def write_nifti(volume: Volume, path: str | os.PathLike) -> str:
    """Write a volume as read (raw intensities, HU for CT) with its world affine.

    Integer-valued data that fits int16 is stored as int16 (exact, half the size); anything else as
    float32. qform and sform both carry the affine with code 1 (scanner coordinates).
    """
    path = str(path)
    if not path.lower().endswith((".nii", ".nii.gz")):
        raise DataError(path, "output must end in .nii or .nii.gz")
    a = volume.array
    integral = a.size and np.all(a == np.round(a)) and a.min() >= -32768 and a.max() <= 32767
    img = nib.Nifti1Image(a.astype(np.int16 if integral else np.float32), volume.affine)
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = f"hlip-fed {volume.modality}"[:79].encode()
    try:
        nib.save(img, path)
    except OSError as exc:
        raise DataError(path, f"cannot write ({exc.strerror or exc})") from None
    return path
