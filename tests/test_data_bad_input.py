"""Every kind of bad input gives one line naming the file and the reason, and nothing crashes."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from hlip_fed.cli import main
from hlip_fed.data import DataError
from hlip_fed.data.dicom_writer import write_dicom_series
from hlip_fed.data.manifest import read_report
from hlip_fed.data.readers import read_scan


def _nifti(path: Path, array, affine=None) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), path)
    return path


def _series(path: Path, n=4, **kw) -> list[Path]:
    a = np.arange(n * 6 * 6, dtype=np.float32).reshape(n, 6, 6)
    return write_dicom_series(a, np.diag([2.0, 1.0, 1.0, 1.0]), path, "CT", **kw)


def _error(path, *reason_parts: str, **kw) -> str:
    """Read ``path``; assert a one-line DataError naming the file and each reason fragment."""
    with pytest.raises(DataError) as info:
        read_scan(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    assert Path(path).name in msg, msg
    for part in reason_parts:
        assert part.lower() in msg.lower(), msg
    return msg


def test_truncated_nii_gz(tmp_path):
    good = _nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).normal(size=(30, 30, 30)).astype(np.float32))
    data = good.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    _error(tmp_path / "cut.nii.gz", "truncated")
    raw = _nifti(tmp_path / "raw.nii", np.ones((20, 20, 20), np.int16))
    (tmp_path / "cut.nii").write_bytes(raw.read_bytes()[:5000])
    _error(tmp_path / "cut.nii", "truncated", "bytes")


def test_garbage_nii_gz(tmp_path):
    (tmp_path / "noise.nii.gz").write_bytes(np.random.default_rng(0).bytes(4096))
    _error(tmp_path / "noise.nii.gz", "not a NIfTI file")
    (tmp_path / "gz_noise.nii.gz").write_bytes(gzip.compress(np.random.default_rng(1).bytes(4096)))
    _error(tmp_path / "gz_noise.nii.gz", "NIfTI")


def test_nan_and_inf_voxels(tmp_path):
    a = np.zeros((8, 8, 8), np.float32)
    a[1, 2, 3], a[4, 4, 4] = np.nan, np.inf
    _error(_nifti(tmp_path / "nan.nii.gz", a), "2 NaN/Inf voxels")


def test_2d_and_4d_where_3d_is_expected(tmp_path):
    _error(_nifti(tmp_path / "flat.nii.gz", np.zeros((32, 32), np.float32)), "2D image (32x32)", "3D")
    _error(_nifti(tmp_path / "slab.nii.gz", np.zeros((32, 32, 1), np.float32)), "2D image (32x32x1)")
    _error(_nifti(tmp_path / "fmri.nii.gz", np.zeros((8, 8, 8, 3), np.float32)), "4D volume (8x8x8x3)")
    assert read_scan(_nifti(tmp_path / "single.nii.gz", np.ones((8, 8, 8, 1), np.float32))).shape == (8, 8, 8)
    _error(get_testdata_file("CT_small.dcm"), "2D image (128x128")


def test_dicom_without_pixel_data(tmp_path):
    _error(get_testdata_file("rtplan.dcm"), "without pixel data", "RT Plan")
    files = _series(tmp_path / "ser")
    ds = pydicom.dcmread(files[1])
    del ds.PixelData
    ds.save_as(files[1])
    msg = _error(tmp_path / "ser", "without pixel data")
    assert files[1].name in msg  # the offending slice, not only the folder


def test_folder_mixing_series_or_patients(tmp_path):
    _series(tmp_path / "two", n=3)
    second = _series(tmp_path / "tmp", n=3)
    for f in second:
        shutil.move(f, tmp_path / "two" / f"other_{f.name}")
    _error(tmp_path / "two", "mixes 2 series")
    _series(tmp_path / "pat", n=3)
    ds = pydicom.dcmread(tmp_path / "pat" / "IM0002.dcm")
    ds.PatientID = "SOMEONE-ELSE"
    ds.save_as(tmp_path / "pat" / "IM0002.dcm")
    msg = _error(tmp_path / "pat", "mixes 2 patients")
    assert "SOMEONE-ELSE" not in msg  # identifiers stay out of logs


def test_duplicated_slice_positions(tmp_path):
    files = _series(tmp_path / "dup")
    ds = pydicom.dcmread(files[2])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "dup" / "copy_of_3.dcm")
    _error(tmp_path / "dup", "duplicated slice position", "IM0003.dcm", "copy_of_3.dcm")


def test_missing_or_empty_report(tmp_path):
    study = tmp_path / "train" / "s1"
    study.mkdir(parents=True)
    entry = {"study_id": "s1", "path": "train/s1", "report": None, "scans": []}
    with pytest.raises(DataError, match=r"s1: missing report"):
        read_report(entry, tmp_path)
    (study / "report.txt").write_text("  \n\t")
    entry["report"] = "train/s1/report.txt"
    with pytest.raises(DataError, match=r"report\.txt: empty report"):
        read_report(entry, tmp_path)
    (study / "report.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match=r"report\.txt: report is not UTF-8"):
        read_report(entry, tmp_path)


def test_absurd_header_size_is_not_allocated(tmp_path):
    path = _nifti(tmp_path / "huge.nii", np.zeros((4, 4, 4), np.float32))
    raw = bytearray(path.read_bytes())
    raw[40:56] = struct.pack("<8h", 3, 30000, 30000, 30000, 1, 1, 1, 1)  # NIfTI-1 dim[0..7]
    path.write_bytes(bytes(raw))
    _error(path, "absurd size 30000x30000x30000", "not allocated")
    with gzip.open(tmp_path / "huge.nii.gz", "wb") as fh:
        fh.write(bytes(raw))
    _error(tmp_path / "huge.nii.gz", "absurd size")
    files = _series(tmp_path / "dcm", n=2)
    ds = pydicom.dcmread(files[0])
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 50000
    ds.save_as(files[0])
    _error(files[0], "absurd size 50000x65535x65535", allow_2d=True)


def test_unreadable_permissions(tmp_path):
    path = _nifti(tmp_path / "secret.nii.gz", np.zeros((4, 4, 4), np.float32))
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: chmod cannot make a file unreadable")
        _error(path, "permission denied")
    finally:
        path.chmod(0o644)


def test_unreadable_permissions_reported_as_such(tmp_path, monkeypatch):
    """What the OS reports (here faked, since root may read anything) becomes a one-line error."""
    path = _nifti(tmp_path / "secret.nii.gz", np.zeros((4, 4, 4), np.float32))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == path else real_access(p, mode, **kw))
    _error(path, "permission denied")


def test_non_medical_files_with_medical_extensions(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 400
    (tmp_path / "photo.nii.gz").write_bytes(png)
    _error(tmp_path / "photo.nii.gz", "not a NIfTI file")
    (tmp_path / "notes.nii").write_text("patient notes, not an image\n" * 20)
    _error(tmp_path / "notes.nii", "not a NIfTI file")
    (tmp_path / "letter.dcm").write_text("Dear colleague,\n" * 40)
    _error(tmp_path / "letter.dcm", "not a DICOM file")
    (tmp_path / "empty.dcm").write_bytes(b"")
    _error(tmp_path / "empty.dcm", "empty file")
    _series(tmp_path / "ser", n=3)
    (tmp_path / "ser" / "IM0009.dcm").write_text("not dicom")
    _error(tmp_path / "ser", "IM0009.dcm", "not a DICOM file")


def test_cli_prints_one_line_without_traceback(tmp_path, capsys):
    (tmp_path / "noise.nii.gz").write_bytes(b"garbage" * 100)
    assert main(["volume", "info", str(tmp_path / "noise.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "noise.nii.gz" in err
    assert "Traceback" not in err
