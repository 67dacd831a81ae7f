"""Write a 3D array with a world affine as a DICOM series (or one enhanced multi-frame file).

Used by tests to store the same anatomy as NIfTI and DICOM, and available to anything that needs to
produce DICOM with exact geometry (phantoms, conversions). The geometry is the inverse of
:mod:`hlip_fed.data.dicom`: array axis ``slice_axis`` becomes the slice stack, the next axis the
pixel rows and the last one the pixel columns; positions, orientation cosines and spacings are
derived from the affine (RAS+, converted to DICOM's LPS). Intensities are stored as int16 with
RescaleSlope/Intercept chosen so that integer data (HU) round-trips exactly.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SOP = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
}
_ENHANCED_SOP = {
    "CT": "1.2.840.10008.5.1.4.1.1.2.1",
    "MR": "1.2.840.10008.5.1.4.1.1.4.1",
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _stored(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """int16 pixels plus (slope, intercept) with ``value = stored * slope + intercept``."""
    a = np.asarray(array, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    if np.all(a == np.round(a)) and lo >= -32768 and hi <= 32767:
        return a.astype(np.int16), 1.0, 0.0
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.round((a - lo) / slope) - 32768
    return stored.astype(np.int16), slope, lo + 32768 * slope


def _geometry(array: np.ndarray, affine: np.ndarray, slice_axis: int):
    """Move the slice axis first; return (array [k, r, c], LPS affine of that array)."""
    order = [slice_axis] + [ax for ax in range(3) if ax != slice_axis]
    arr = np.transpose(np.asarray(array), order)
    aff = np.asarray(affine, dtype=np.float64).copy()
    aff[:, :3] = aff[:, order]
    return arr, LPS_TO_RAS @ aff


def _base_dataset(modality: str, sop_class: str, series_uid: str, study_uid: str, patient_id: str, rows: int, cols: int):
    from pydicom.dataset import Dataset, FileMetaDataset  # lazy: only writing DICOM imports pydicom
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    today = datetime.date.today().strftime("%Y%m%d")
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = "Anonymous"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = today
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.SeriesNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def _ds(values) -> list:
    """Decimal strings within DICOM's 16-character limit (PS3.5 DS)."""
    from pydicom.valuerep import DSfloat  # lazy: only writing DICOM imports pydicom

    return [DSfloat(float(v), auto_format=True) for v in values]


def _cosines(lps: np.ndarray) -> tuple[list[float], float, float]:
    """ImageOrientationPatient (row cosine = along columns index, then column cosine) and spacings."""
    col_vec, row_vec = lps[:3, 1], lps[:3, 2]  # moving down rows, moving along columns
    dr, dc = float(np.linalg.norm(col_vec)), float(np.linalg.norm(row_vec))
    return [float(v) for v in np.concatenate([row_vec / dc, col_vec / dr])], dr, dc


def write_dicom_series(
    array: np.ndarray,
    affine: np.ndarray,
    out_dir: str | os.PathLike,
    modality: str = "CT",
    *,
    slice_axis: int = 0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    patient_id: str = "ANON",
    series_description: str = "",
) -> list[Path]:
    """One classic single-frame file per slice (``IM0001.dcm``...) in ``out_dir``."""
    from pydicom.uid import generate_uid  # lazy: only writing DICOM imports pydicom

    arr, lps = _geometry(array, affine, slice_axis)
    stored, slope, intercept = _stored(arr)
    orientation, dr, dc = _cosines(lps)
    step = lps[:3, 0]
    thickness = float(np.linalg.norm(step))
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    sop = _SOP.get(modality.upper(), _SECONDARY_CAPTURE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(arr.shape[0]):
        ds = _base_dataset(modality, sop, series_uid, study_uid, patient_id, arr.shape[1], arr.shape[2])
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = series_description
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = _ds(lps[:3, 3] + k * step)
        ds.ImageOrientationPatient = _ds(orientation)
        ds.PixelSpacing = _ds([dr, dc])
        ds.SliceThickness = _ds([thickness])[0]
        ds.RescaleSlope, ds.RescaleIntercept = _ds([slope, intercept])
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = out / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced_dicom(
    array: np.ndarray,
    affine: np.ndarray,
    out_path: str | os.PathLike,
    modality: str = "CT",
    *,
    slice_axis: int = 0,
    patient_id: str = "ANON",
) -> Path:
    """One enhanced multi-frame object with per-frame positions (PS3.3 C.7.6.16)."""
    from pydicom.dataset import Dataset  # lazy: only writing DICOM imports pydicom
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid  # lazy: only writing DICOM imports pydicom

    arr, lps = _geometry(array, affine, slice_axis)
    stored, slope, intercept = _stored(arr)
    orientation, dr, dc = _cosines(lps)
    step = lps[:3, 0]
    sop = _ENHANCED_SOP.get(modality.upper(), _SECONDARY_CAPTURE)
    ds = _base_dataset(modality, sop, generate_uid(), generate_uid(), patient_id, arr.shape[1], arr.shape[2])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 1
    ds.NumberOfFrames = arr.shape[0]

    measures, plane, pvt = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = _ds([dr, dc])
    measures.SliceThickness = _ds([np.linalg.norm(step)])[0]
    plane.ImageOrientationPatient = _ds(orientation)
    pvt.RescaleSlope, pvt.RescaleIntercept = _ds([slope, intercept])
    pvt.RescaleType = "HU" if modality.upper() == "CT" else "US"
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([plane])
    shared.PixelValueTransformationSequence = Sequence([pvt])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for k in range(arr.shape[0]):
        pos, content, item = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = _ds(lps[:3, 3] + k * step)
        content.InStackPositionNumber = k + 1
        item.PlanePositionSequence = Sequence([pos])
        item.FrameContentSequence = Sequence([content])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out
