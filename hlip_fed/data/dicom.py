"""DICOM reader: a series folder, a DICOMDIR, a single file or an enhanced multi-frame object.

Geometry follows the DICOM standard (PS3.3 C.7.6.2): a pixel at row ``r``, column ``c`` of a slice
lies at ``ImagePositionPatient + c * dc * row_cosine + r * dr * col_cosine`` in LPS millimetres,
with ``PixelSpacing = [dr, dc]``. Slices are ordered by their position projected on the slice normal
``row_cosine x col_cosine``, never by file name, and by ``InstanceNumber`` only when positions are
missing. The inter-slice spacing is the real distance between slice positions (``SliceThickness``
may differ from it: overlapping or gapped reconstructions). The world affine is converted to RAS+.

Refused with a one-line :class:`~hlip_fed.data.errors.DataError` naming the file: files that are not
DICOM, objects without pixel data, colour images, headers claiming absurd sizes, compressed
transfer syntaxes without an installed decoder, folders mixing patients, series, orientations or
image sizes, duplicated slice positions (repeated acquisitions or a 4D series) and large gaps.
A small spacing irregularity is resampled onto a uniform grid and reported as a warning.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from hlip_fed.data.errors import DataError
from hlip_fed.data.files import SIDE_FILE_SUFFIXES, check_readable, check_size, read_sidecar
from hlip_fed.data.volume import Volume, make_volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_ORIENTATION_TOL = 1e-3  # direction cosines agreeing to this are one orientation
_DUPLICATE_TOL = 1e-2  # mm; slices closer than this along the normal are the same position
_SPACING_RTOL = 0.02  # spacing variation tolerated as rounding before a series is "non-uniform"
_MAX_GAP_RATIO = 3.0  # a gap larger than this many median spacings means missing slices


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file has the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_header(path: str | os.PathLike):
    """Read a DICOM dataset without its pixel data (deferred until accessed)."""
    import pydicom  # lazy: sites with NIfTI studies never import pydicom
    from pydicom.errors import InvalidDicomError

    path = str(check_readable(path))
    try:
        return pydicom.dcmread(path, defer_size="256 KB")
    except InvalidDicomError:
        pass  # maybe a file without the Part 10 preamble; try once more, then judge what came out
    except PermissionError:
        raise DataError(path, "permission denied (not readable)") from None
    except Exception as exc:  # pydicom raises many types on corrupt bytes
        raise DataError(path, f"corrupt DICOM file ({type(exc).__name__}: {exc})") from None
    try:
        ds = pydicom.dcmread(path, force=True, defer_size="256 KB")
        if "SOPClassUID" in ds or ("Rows" in ds and "Columns" in ds):
            return ds
    except Exception:
        pass
    raise DataError(path, "not a DICOM file (no DICM preamble and no DICOM header)")


@dataclass
class _Frame:
    """One 2D image of a series: a classic single-frame file or one frame of a multi-frame file."""

    file: str
    ds: Any
    index: int | None  # frame number in a multi-frame object, None for a single frame
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    slope: float
    intercept: float
    instance: int | None

    def label(self) -> str:
        name = Path(self.file).name
        return name if self.index is None else f"{name} frame {self.index + 1}"


def _get(item: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(item, name, None) if item is not None else None
        if value not in (None, ""):
            return value
    return default


def _first(seq_owner: Any, seq: str) -> Any:
    """``owner.Seq[0]`` or None."""
    value = getattr(seq_owner, seq, None) if seq_owner is not None else None
    return value[0] if value else None


def _vector(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _functional(ds: Any, per_frame: Any, seq: str, default: Any = None) -> Any:
    """A functional-group macro item, per-frame first, then shared (PS3.3 C.7.6.16)."""
    item = _first(per_frame, seq)
    if item is None:
        item = _first(_first(ds, "SharedFunctionalGroupsSequence"), seq)
    return item if item is not None else default


def _check_image(ds: Any, path: str) -> None:
    pixel_keys = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
    if not any(k in ds for k in pixel_keys):
        sop = getattr(getattr(ds, "SOPClassUID", None), "name", None) or "unknown SOP class"
        raise DataError(path, f"DICOM file without pixel data ({sop})")
    samples = int(_get(ds, "SamplesPerPixel", default=1))
    photometric = str(_get(ds, "PhotometricInterpretation", default="MONOCHROME2"))
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise DataError(path, f"colour image ({photometric}, {samples} samples) where a grey-level scan is expected")
    rows, cols = int(_get(ds, "Rows", default=0)), int(_get(ds, "Columns", default=0))
    frames = int(_get(ds, "NumberOfFrames", default=1) or 1)
    bits = int(_get(ds, "BitsAllocated", default=16))
    check_size(path, (frames, rows, cols), max(1, bits // 8), what="DICOM header")


def _frames_of(ds: Any, path: str) -> list[_Frame]:
    _check_image(ds, path)
    slope = float(_get(ds, "RescaleSlope", default=1.0))
    intercept = float(_get(ds, "RescaleIntercept", default=0.0))
    n = int(_get(ds, "NumberOfFrames", default=1) or 1)
    instance = _get(ds, "InstanceNumber")
    instance = int(instance) if instance is not None else None

    if "PerFrameFunctionalGroupsSequence" in ds:  # enhanced multi-frame (CT/MR/PET ...)
        per = ds.PerFrameFunctionalGroupsSequence
        if len(per) != n:
            raise DataError(path, f"enhanced DICOM has {len(per)} functional groups for {n} frames")
        frames = []
        for i, pf in enumerate(per):
            orient = _functional(ds, pf, "PlaneOrientationSequence")
            pos = _functional(ds, pf, "PlanePositionSequence")
            meas = _functional(ds, pf, "PixelMeasuresSequence")
            pvt = _functional(ds, pf, "PixelValueTransformationSequence")
            content = _functional(ds, pf, "FrameContentSequence")
            ps = _vector(_get(meas, "PixelSpacing"), 2)
            frames.append(
                _Frame(
                    file=path,
                    ds=ds,
                    index=i,
                    position=_vector(_get(pos, "ImagePositionPatient"), 3),
                    orientation=_vector(_get(orient, "ImageOrientationPatient"), 6),
                    pixel_spacing=tuple(ps) if ps is not None else None,
                    thickness=_get(meas, "SpacingBetweenSlices", "SliceThickness"),
                    slope=float(_get(pvt, "RescaleSlope", default=slope)),
                    intercept=float(_get(pvt, "RescaleIntercept", default=intercept)),
                    instance=_get(content, "InStackPositionNumber", default=i + 1),
                )
            )
        return frames

    position = _vector(_get(ds, "ImagePositionPatient"), 3)
    orientation = _vector(_get(ds, "ImageOrientationPatient"), 6)
    ps = _vector(_get(ds, "PixelSpacing", "ImagerPixelSpacing"), 2)
    thickness = _get(ds, "SpacingBetweenSlices", "SliceThickness")
    if n == 1:
        return [_Frame(path, ds, None, position, orientation, tuple(ps) if ps is not None else None,
                       thickness, slope, intercept, instance)]
    # Classic multi-frame (RT dose, NM): frames stacked along the normal at GridFrameOffsetVector.
    offsets = _vector(_get(ds, "GridFrameOffsetVector"), n)
    frames = []
    for i in range(n):
        pos = None
        if position is not None and orientation is not None and offsets is not None:
            pos = position + offsets[i] * np.cross(orientation[:3], orientation[3:])
        frames.append(_Frame(path, ds, i, pos, orientation, tuple(ps) if ps is not None else None,
                             thickness, slope, intercept, i + 1))
    return frames


def _check_decoder(ds: Any, path: str) -> None:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or not ts.is_compressed:
        return
    from pydicom.pixels import get_decoder  # lazy: sites with NIfTI studies never import pydicom

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DataError(path, f"unsupported transfer syntax {ts.name} ({ts})") from None
    if not decoder.is_available:
        options = "; ".join(decoder.missing_dependencies) or "a pydicom pixel data plugin"
        raise DataError(
            path, f"compressed transfer syntax {ts.name} ({ts}) needs a decoder that is not installed: {options}"
        )


def _decode(ds: Any, path: str) -> np.ndarray:
    _check_decoder(ds, path)
    from pydicom.pixels import pixel_array  # lazy: sites with NIfTI studies never import pydicom

    try:
        arr = pixel_array(ds)
    except MemoryError:
        raise DataError(path, "pixel data too large to decode") from None
    except Exception as exc:
        raise DataError(path, f"cannot decode pixel data ({type(exc).__name__}: {exc})") from None
    n = int(_get(ds, "NumberOfFrames", default=1) or 1)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if arr.size != n * rows * cols:
        raise DataError(path, f"pixel data holds {arr.size} values for {n}x{rows}x{cols}")
    return arr.reshape(n, rows, cols)


def _describe_groups(counter: Counter, unit: str = "files") -> str:
    return ", ".join(f"{key or '(none)'} ({count} {unit})" for key, count in counter.most_common(4))


def _check_consistent(frames: list[_Frame], source: str) -> None:
    patients = Counter(str(_get(f.ds, "PatientID", default="")) for f in frames)
    if len(patients) > 1:
        # Patient IDs are not printed: the message may end up in a federated log.
        raise DataError(source, f"folder mixes {len(patients)} patients (different PatientID); one scan is one series of one patient")
    series = Counter(str(_get(f.ds, "SeriesInstanceUID", default="")) for f in frames)
    if len(series) > 1:
        raise DataError(source, f"folder mixes {len(series)} series: {_describe_groups(series, 'images')}")
    sizes = Counter(f"{int(f.ds.Rows)}x{int(f.ds.Columns)}" for f in frames)
    if len(sizes) > 1:
        raise DataError(source, f"slices have different sizes: {_describe_groups(sizes, 'images')}")
    orients = [f.orientation for f in frames if f.orientation is not None]
    if orients and any(np.max(np.abs(o - orients[0])) > _ORIENTATION_TOL for o in orients):
        raise DataError(source, "slices have different orientations (a localizer or projection series, not one 3D volume)")


def _order_and_spacing(frames: list[_Frame], source: str, warnings: list[str]):
    """Sort frames through space; return (frames, positions along normal or None)."""
    have_geometry = all(f.position is not None for f in frames) and frames[0].orientation is not None
    if have_geometry:
        o = frames[0].orientation
        normal = np.cross(o[:3], o[3:])
        proj = np.array([float(np.dot(f.position, normal)) for f in frames])
        order = np.argsort(proj, kind="stable")
        frames = [frames[i] for i in order]
        proj = proj[order]
        if len(frames) > 1:
            diffs = np.diff(proj)
            dup = np.flatnonzero(diffs < _DUPLICATE_TOL)
            if dup.size:
                a, b = frames[dup[0]], frames[dup[0] + 1]
                raise DataError(
                    source,
                    f"duplicated slice position {proj[dup[0]]:.2f} mm ({a.label()}, {b.label()}; "
                    f"{dup.size} duplicate(s)): repeated acquisitions or a 4D series, not one 3D volume",
                )
        return frames, proj
    if all(f.instance is not None for f in frames):
        frames = sorted(frames, key=lambda f: int(f.instance))
        how = "InstanceNumber"
    else:
        how = "file name"
    if len(frames) > 1:
        warnings.append(f"no ImagePositionPatient; slices ordered by {how}, spacing from the header")
    return frames, None


def _stack(frames: list[_Frame]) -> np.ndarray:
    """Decode every frame once and apply its modality rescale (stored value -> HU for CT)."""
    multi: dict[int, np.ndarray] = {}  # multi-frame objects decode all frames at once
    rows, cols = int(frames[0].ds.Rows), int(frames[0].ds.Columns)
    out = np.empty((len(frames), rows, cols), dtype=np.float32)
    for k, f in enumerate(frames):
        if f.index is None:
            pixels = _decode(f.ds, f.file)[0]
        else:
            if id(f.ds) not in multi:
                multi[id(f.ds)] = _decode(f.ds, f.file)
            pixels = multi[id(f.ds)][f.index]
        out[k] = pixels.astype(np.float32) * np.float32(f.slope) + np.float32(f.intercept)
    return out


def _resample_uniform(array: np.ndarray, proj: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation of slices at positions ``proj`` onto a uniform grid of ``spacing``."""
    n = int(round((proj[-1] - proj[0]) / spacing)) + 1
    grid = proj[0] + spacing * np.arange(n)
    idx = np.clip(np.searchsorted(proj, grid, side="right") - 1, 0, len(proj) - 2)
    w = ((grid - proj[idx]) / (proj[idx + 1] - proj[idx])).astype(np.float32)[:, None, None]
    return array[idx] * (1 - w) + array[idx + 1] * w, grid


def _assemble(frames: list[_Frame], source: str, allow_2d: bool) -> Volume:
    if not frames:
        raise DataError(source, "no DICOM images found")
    warnings: list[str] = []
    _check_consistent(frames, source)
    first = frames[0]
    rows, cols = int(first.ds.Rows), int(first.ds.Columns)
    check_size(source, (len(frames), rows, cols), 4, what="series")
    if len(frames) == 1 and not allow_2d:
        raise DataError(source, f"2D image ({rows}x{cols}, a single slice) where a 3D scan is expected")

    frames, proj = _order_and_spacing(frames, source, warnings)
    array = _stack(frames)

    o = frames[0].orientation if frames[0].orientation is not None else np.array([1.0, 0, 0, 0, 1, 0])
    row_cos, col_cos = o[:3], o[3:]
    normal = np.cross(row_cos, col_cos)
    if frames[0].pixel_spacing is None:
        warnings.append("no PixelSpacing; 1 mm assumed")
    dr, dc = frames[0].pixel_spacing or (1.0, 1.0)
    header_step = float(first.thickness) if first.thickness not in (None, "") else 0.0
    origin = frames[0].position if frames[0].position is not None else np.zeros(3)

    if proj is not None and len(frames) > 1:
        diffs = np.diff(proj)
        median = float(np.median(diffs))
        lo, hi = float(diffs.min()), float(diffs.max())
        if hi - lo > _SPACING_RTOL * median + 1e-3:
            worst = int(np.argmax(diffs))
            if hi > _MAX_GAP_RATIO * median:
                raise DataError(
                    source,
                    f"non-uniform slice spacing {lo:.3g}..{hi:.3g} mm (gap of {hi:.3g} mm after "
                    f"{frames[worst].label()}; missing slices?)",
                )
            array, grid = _resample_uniform(array, proj, median)
            warnings.append(f"non-uniform slice spacing {lo:.3g}..{hi:.3g} mm; resampled to {median:.3g} mm")
            step = (frames[-1].position - frames[0].position) / (proj[-1] - proj[0]) * median
        else:
            step = (frames[-1].position - frames[0].position) / (len(frames) - 1)
    else:
        if header_step <= 0:
            header_step = 1.0
            warnings.append("no slice spacing in the header; 1 mm assumed")
        step = normal * header_step

    # Array is [slice k, row r, column c]; columns of the LPS affine follow that order.
    lps = np.eye(4)
    lps[:3, 0] = step
    lps[:3, 1] = col_cos * float(dr)
    lps[:3, 2] = row_cos * float(dc)
    lps[:3, 3] = origin
    if abs(np.linalg.det(lps[:3, :3])) < 1e-9:
        raise DataError(source, "degenerate DICOM geometry (orientation or spacing is zero)")

    ds = first.ds
    side = read_sidecar(source) if os.path.isdir(source) or source.lower().endswith(".dcm") else {}
    modality = str(side.get("modality") or _get(ds, "Modality", default="OT")).upper()
    return make_volume(
        array,
        LPS_TO_RAS @ lps,
        modality=modality,
        source=source,
        sequence=side.get("sequence"),
        meta={
            "format": "dicom",
            "series_uid": str(_get(ds, "SeriesInstanceUID", default="")),
            "series_description": str(_get(ds, "SeriesDescription", default="")),
            "slices": len(frames),
            "files": len({f.file for f in frames}),
            "transfer_syntax": str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")),
        },
        warnings=warnings,
    )


def list_dicom_files(folder: str | os.PathLike) -> list[Path]:
    """Candidate slice files under ``folder`` (recursively), skipping hidden and side files."""
    def fail(exc: OSError) -> None:
        raise DataError(exc.filename or folder, f"cannot list folder ({exc.strerror or exc})")

    out = []
    for root, dirs, files in os.walk(folder, onerror=fail):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.upper() == "DICOMDIR" or name.lower().endswith(SIDE_FILE_SUFFIXES):
                continue
            out.append(Path(root) / name)
    return out


def _select_series(frames: list[_Frame], series_uid: str | None, source: str) -> list[_Frame]:
    if series_uid is None:
        return frames
    chosen = [f for f in frames if str(_get(f.ds, "SeriesInstanceUID", default="")) == series_uid]
    if not chosen:
        raise DataError(source, f"no images of series {series_uid}")
    return chosen


def read_dicom_files(
    files: Iterable[str | os.PathLike], source: str, series_uid: str | None = None, allow_2d: bool = False
) -> Volume:
    frames: list[_Frame] = []
    for f in files:
        frames.extend(_frames_of(read_header(f), str(f)))
    return _assemble(_select_series(frames, series_uid, source), source, allow_2d)


def read_dicomdir(path: str | os.PathLike, series_uid: str | None = None, allow_2d: bool = False) -> Volume:
    """Read the image files a DICOMDIR references (one series, or the one named by ``series_uid``)."""
    from pydicom.fileset import FileSet  # lazy: sites with NIfTI studies never import pydicom

    ds = read_header(path)
    if "DirectoryRecordSequence" not in ds:
        raise DataError(path, "not a DICOMDIR (no directory records)")
    try:
        fileset = FileSet(ds)
        files = [inst.path for inst in fileset if getattr(inst, "ReferencedFileID", None) is not None]
    except Exception as exc:
        raise DataError(path, f"corrupt DICOMDIR ({type(exc).__name__}: {exc})") from None
    if not files:
        raise DataError(path, "DICOMDIR references no image files")
    return read_dicom_files(files, str(path), series_uid=series_uid, allow_2d=allow_2d)


def read_dicom_folder(folder: str | os.PathLike, series_uid: str | None = None, allow_2d: bool = False) -> Volume:
    folder = Path(folder)
    check_readable(folder, kind="folder")
    if (folder / "DICOMDIR").is_file():
        return read_dicomdir(folder / "DICOMDIR", series_uid=series_uid, allow_2d=allow_2d)
    files = list_dicom_files(folder)
    if not files:
        raise DataError(folder, "empty series folder (no DICOM files)")
    return read_dicom_files(files, str(folder), series_uid=series_uid, allow_2d=allow_2d)
