"""Write a rendered study the way its hospital stores it (see ``docs/site-layout.md``).

NIfTI sites write ``<scan>.nii.gz`` in the site's stored orientation (the affine says which; the
readers bring every orientation back to one canonical order) plus a ``<scan>.json`` sidecar with
modality and sequence; DICOM sites write one folder per series. MR values are stored as int16 in
the scanner's arbitrary units, CT values as int16 Hounsfield units. The report goes to
``report.txt``; the truth (labels, attributes and a bit-mask label map) goes elsewhere, to files the
training path never opens.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from hlip_fed.synth.dicom import uid, write_series
from hlip_fed.synth.render import RenderedStudy


def reorient(array: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """``array`` in RAS voxel order re-stored with axis codes ``codes`` (e.g. "LPS", "IPR")."""
    src = nib.orientations.axcodes2ornt("RAS")
    dst = nib.orientations.axcodes2ornt(tuple(codes))
    transform = nib.orientations.ornt_transform(src, dst)
    out = nib.orientations.apply_orientation(array, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(out), new_affine


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray, dtype: type = np.int16) -> None:
    """A NIfTI-1 file with matching sform/qform (scanner frame) and millimetre units."""
    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    # Fixed gzip timestamp (nibabel writes mtime 0) keeps files byte-identical for a seed.
    nib.save(img, str(path))


def _stored(values: np.ndarray, modality: str) -> np.ndarray:
    lo, hi = (-1024, 3071) if modality == "CT" else (0, 32767)
    return np.clip(np.round(values), lo, hi).astype(np.int16)


def write_study(study: RenderedStudy, study_dir: Path, seed: int) -> list[dict]:
    """Write scans and report of ``study`` into ``study_dir``; return the scans' descriptions."""
    plan = study.plan
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "report.txt").write_text(study.report, encoding="utf-8")
    orientation = plan.scanner.get("orientation", "RAS")
    study_uid = uid(seed, plan.cohort, plan.study_id)
    date = (dt.date(2023, 1, 2) + dt.timedelta(days=int(plan.seed[-1]) * 3 % 700)).strftime("%Y%m%d")
    described = []
    for scan in study.scans:
        stored = _stored(scan.array, scan.modality).astype(np.float32)
        if plan.fmt == "dicom":
            array, affine = reorient(stored, scan.affine, "LPS")  # DICOM's usual axial layout
            write_series(study_dir / scan.name, array, affine, modality=scan.modality,
                         description=scan.description, patient_id=f"{plan.study_id}-P",
                         study_uid=study_uid, series_uid=uid(study_uid, scan.series_number),
                         series_number=scan.series_number, study_date=date, accession=plan.study_id,
                         intercept=-1024.0 if scan.modality == "CT" else 0.0)
            described.append({"name": scan.name, "sequence": scan.sequence, "format": "dicom"})
        else:
            array, affine = reorient(stored, scan.affine, orientation)
            save_nifti(study_dir / f"{scan.name}.nii.gz", array, affine)
            sidecar = {"modality": scan.modality, "sequence": scan.sequence,
                       "slice_thickness_mm": scan.slice_mm, "series_number": scan.series_number,
                       "description": scan.description}
            (study_dir / f"{scan.name}.json").write_text(json.dumps(sidecar, indent=1) + "\n")
            described.append({"name": f"{scan.name}.nii.gz", "sequence": scan.sequence, "format": "nifti"})
    return described


def write_masks(study: RenderedStudy, path: Path) -> None:
    """The truth label map (bit i = ``FINDINGS[i]``) on the study's first acquisition grid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_nifti(path, study.label_map(), study.grid_affine, dtype=np.uint8)
