"""``read_scan``: one entry point for every scan format a site may hold.

Dispatch is on what the path *is*, not only on its name: a ``.nii``/``.nii.gz`` file goes to the
NIfTI reader, a folder to the DICOM series reader (through its DICOMDIR when it has one), a file
named ``DICOMDIR`` to the DICOMDIR reader, and any other file to the DICOM reader when it carries
the DICOM preamble. A file whose content does not match its extension is refused with a one-line
error instead of being fed to the wrong decoder.
"""

from __future__ import annotations

import os
from pathlib import Path

from hlip_fed.data import dicom, nifti
from hlip_fed.data.errors import DataError
from hlip_fed.data.files import DICOM_SUFFIXES, check_readable, is_nifti_path
from hlip_fed.data.volume import Volume

_GZIP_MAGIC = b"\x1f\x8b"


def _sniff(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(352)


def scan_format(path: str | os.PathLike) -> str:
    """``"nifti"``, ``"dicom"`` (a file), ``"dicom-series"`` (a folder) or ``"dicomdir"``."""
    p = Path(path)
    if p.is_dir():
        return "dicom-series"
    if p.name.upper() == "DICOMDIR":
        return "dicomdir"
    if is_nifti_path(p):
        return "nifti"
    return "dicom"


def read_scan(
    path: str | os.PathLike, *, allow_2d: bool = False, series_uid: str | None = None
) -> Volume:
    """Read a NIfTI file, a DICOM file, a DICOM series folder or a DICOMDIR as a canonical Volume.

    ``allow_2d`` accepts a single slice (for inspection and conversion; training needs 3D);
    ``series_uid`` picks one series out of a folder or DICOMDIR that holds several.
    Raises :class:`DataError` (``"<path>: <reason>"``) for anything that is not a usable scan.
    """
    p = Path(path)
    fmt = scan_format(p)
    if fmt == "dicom-series":
        return dicom.read_dicom_folder(p, series_uid=series_uid, allow_2d=allow_2d)
    check_readable(p)
    head = _sniff(p)
    if fmt == "dicomdir":
        return dicom.read_dicomdir(p, series_uid=series_uid, allow_2d=allow_2d)
    if fmt == "nifti":
        gz = p.name.lower().endswith(".gz")
        if gz and not head.startswith(_GZIP_MAGIC):
            raise DataError(p, "not a NIfTI file (a .nii.gz name but not gzip data)")
        if not gz and head[:4] not in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c", b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c"):
            raise DataError(p, "not a NIfTI file (no NIfTI-1/2 header size at byte 0)")
        return nifti.read_nifti(p, allow_2d=allow_2d)
    if head[128:132] != b"DICM" and not p.name.lower().endswith(DICOM_SUFFIXES) and "." in p.name:
        raise DataError(p, "unknown scan format (expected .nii, .nii.gz, a DICOM file or a series folder)")
    return dicom.read_dicom_files([p], str(p), series_uid=series_uid, allow_2d=allow_2d)
