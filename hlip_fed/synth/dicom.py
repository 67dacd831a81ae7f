"""Write a volume as a DICOM series: one file per slice, with valid geometry and rescale tags.

Hospitals export DICOM, not NIfTI, so at least one phantom site stores its scans this way to keep
the DICOM reading path honest. Each slice is a CT (or MR) Image Storage instance in Explicit VR
Little Endian with ImagePositionPatient / ImageOrientationPatient in LPS (DICOM's patient
frame), PixelSpacing, SliceThickness, SpacingBetweenSlices and RescaleSlope/Intercept (CT: int16
stored values with intercept -1024, so stored 0 is -1024 HU). UIDs are derived from the study's
identity, so a seed always produces byte-identical files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_LPS = np.diag([-1.0, -1.0, 1.0])


def uid(*parts: object) -> str:
    """A deterministic DICOM UID from the given identity parts.

    The 2.25 root takes a 128-bit integer (PS3.5 B.2); here it is a hash of the parts rather than
    a random UUID, so the same study always gets the same UIDs.
    """
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def write_series(folder: Path, array: np.ndarray, affine: np.ndarray, *, modality: str, description: str,
                 patient_id: str, study_uid: str, series_uid: str, series_number: int, study_date: str,
                 accession: str, slope: float = 1.0, intercept: float = 0.0) -> None:
    """Write ``array`` (values in output units: HU for CT) as one DICOM file per slice.

    ``array[i, j, k]`` with ``affine`` (voxel -> RAS mm) is written as slices along axis 2, each
    slice's pixel (row r, column c) being ``array[c, r, k]``. Stored values are
    ``round((value - intercept) / slope)`` as int16.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset  # lazy: only writing DICOM imports pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    lps = _LPS @ np.asarray(affine, dtype=np.float64)[:3]
    col_step, row_step, slice_step = lps[:, 0], lps[:, 1], lps[:, 2]
    dx, dy, dz = (float(np.linalg.norm(v)) for v in (col_step, row_step, slice_step))
    iop = [float(v) for v in np.concatenate([col_step / dx, row_step / dy])]
    stored = np.clip(np.round((array - intercept) / slope), -32768, 32767).astype(np.int16)
    sop_class = CT_STORAGE if modality == "CT" else MR_STORAGE
    n = array.shape[2]
    for k in range(n):
        sop_uid = uid(series_uid, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = uid("hlip-fed", "synth")
        ds = FileDataset(str(folder / f"{k + 1:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = uid(study_uid, "frame")
        ds.Modality = modality
        ds.PatientID = patient_id
        ds.PatientName = f"PHANTOM^{patient_id}"
        ds.AccessionNumber = accession
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.StudyID = accession[-8:]
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = description
        ds.BodyPartExamined = "HEAD"
        ds.Manufacturer = "hlip-fed phantom"
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [round(float(v), 4) for v in lps @ np.array([0.0, 0.0, k, 1.0])]
        ds.ImageOrientationPatient = [round(v, 6) for v in iop]
        ds.PixelSpacing = [round(dy, 4), round(dx, 4)]  # row spacing (between rows), column spacing
        ds.SliceThickness = round(dz, 4)
        ds.SpacingBetweenSlices = round(dz, 4)
        ds.SliceLocation = round(float(ds.ImagePositionPatient[2]), 4)
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[0])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        if modality == "CT":
            ds.RescaleType = "HU"
            ds.KVP = "120"
            ds.WindowCenter, ds.WindowWidth = "40", "80"
            ds.ConvolutionKernel = "H30s" if dz >= 4 else "H40s"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(ds.filename, enforce_file_format=True)
