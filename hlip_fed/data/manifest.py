"""Site folder indexing and the ``manifest.jsonl`` that describes a site's studies.

The folder convention is documented in ``docs/site-layout.md``. A manifest has one JSON object per
line, one per study, with paths relative to the site folder::

    {"study_id": "s0001", "split": "train", "path": "train/s0001",
     "report": "train/s0001/report.txt",            # or null, then "report_text" holds the text
     "scans": [{"path": "train/s0001/t1.nii.gz", "format": "nifti", "modality": "MR", "sequence": "T1"},
               {"path": "train/s0001/ct", "format": "dicom-series", "modality": "CT", "sequence": null}],
     "labels": {"...": ...}}                         # optional, from <study>/labels.json

Indexing only lists files and reads sidecars (and one DICOM header per series for its modality): it
never decodes images, so it is fast; ``site check`` is what reads every scan.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from hlip_fed.atomic import write_bytes_atomic
from hlip_fed.data.dicom import list_dicom_files, read_header
from hlip_fed.data.errors import DataError
from hlip_fed.data.files import DICOM_SUFFIXES, is_nifti_path, read_sidecar

SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.jsonl"
REPORT_NAME = "report.txt"
LABELS_NAME = "labels.json"


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _sidecar_or_nothing(path: Path) -> dict[str, Any]:
    try:
        return read_sidecar(path)
    except DataError:
        return {}  # reported by site check, which reads the sidecar again


def scan_sequence(path: Path) -> str | None:
    """The sequence a scan's sidecar names (``T1``, ``FLAIR``, ...), None for none or an unreadable one."""
    return _sidecar_or_nothing(path).get("sequence")


def chosen_scans(scans: list[dict], sequences: Sequence[str]) -> list[dict]:
    """The scan entries whose ``sequence`` ``sequences`` lists, or every entry when it lists none of
    them (a CT study, an MR study without such a sequence) or is empty (``data.sequences``)."""
    chosen = [scan for scan in scans if scan.get("sequence") in sequences]
    return chosen or scans


def _scan_entry(path: Path, site: Path) -> dict[str, Any]:
    fmt = "nifti" if is_nifti_path(path) else ("dicom-series" if path.is_dir() else "dicom")
    entry = {"path": path.relative_to(site).as_posix(), "format": fmt, "modality": None, "sequence": None}
    side = _sidecar_or_nothing(path)
    entry["modality"] = side.get("modality")
    entry["sequence"] = side.get("sequence")
    if entry["modality"] is None and fmt != "nifti":
        entry["modality"] = _dicom_modality(path)
    return entry


def _dicom_modality(path: Path) -> str | None:
    files = list_dicom_files(path) if path.is_dir() else [path]
    for f in files[:1]:
        try:
            return str(getattr(read_header(f), "Modality", "") or "") or None
        except DataError:
            return None
    return None


def _is_scan(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return True
    return is_nifti_path(path) or path.name.lower().endswith(DICOM_SUFFIXES)


def _study_entry(folder: Path, split: str, site: Path) -> dict[str, Any]:
    report = folder / REPORT_NAME
    entry: dict[str, Any] = {
        "study_id": folder.name,
        "split": split,
        "path": folder.relative_to(site).as_posix(),
        "report": report.relative_to(site).as_posix() if report.is_file() else None,
        "scans": [_scan_entry(p, site) for p in sorted(folder.iterdir()) if _is_scan(p)],
    }
    labels = folder / LABELS_NAME
    if labels.is_file():
        try:
            entry["labels"] = json.loads(labels.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            entry["labels_error"] = f"{labels.relative_to(site).as_posix()}: unreadable labels JSON"
    return entry


def index_site(site_dir: str | os.PathLike, previous: Iterable[dict] | None = None) -> list[dict]:
    """List the studies of a site folder (see ``docs/site-layout.md``) as manifest entries.

    ``previous`` (an earlier manifest) contributes what only a manifest can hold: ``report_text``
    for studies without a ``report.txt`` and ``labels`` for studies without a ``labels.json``.
    """
    site = Path(site_dir)
    if not site.is_dir():
        raise DataError(site, "site folder not found")
    if not os.access(site, os.R_OK | os.X_OK):
        raise DataError(site, "permission denied (site folder not readable)")
    entries = []
    for sub in _visible_dirs(site):
        if sub.name in SPLITS:
            entries.extend(_study_entry(study, sub.name, site) for study in _visible_dirs(sub))
        else:
            entries.append(_study_entry(sub, "train", site))
    old = {(e.get("split"), e.get("study_id")): e for e in previous or ()}
    for e in entries:
        prev = old.get((e["split"], e["study_id"]), {})
        if e["report"] is None and prev.get("report_text"):
            e["report_text"] = prev["report_text"]
        if "labels" not in e and "labels" in prev:
            e["labels"] = prev["labels"]
    return entries


def write_manifest(entries: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write JSONL atomically (a reader never sees half a manifest)."""
    text = "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in entries)
    return write_bytes_atomic(path, text.encode("utf-8"))


def read_manifest(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(path, "manifest not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read manifest ({type(exc).__name__})") from None
    entries = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"line {n}: not JSON ({exc.msg})") from None
        if not isinstance(e, dict) or not isinstance(e.get("study_id"), str) or not isinstance(e.get("scans"), list):
            raise DataError(path, f"line {n}: a study needs a string study_id and a scans list")
        e.setdefault("split", "train")
        e.setdefault("report", None)
        entries.append(e)
    return entries


def load_site(site_dir: str | os.PathLike, manifest: str | os.PathLike | None = None) -> list[dict]:
    """The studies of a site: from ``manifest`` if given, else ``SITE_DIR/manifest.jsonl`` if it
    exists, else by indexing the folder now."""
    site = Path(site_dir)
    if manifest is not None:
        return read_manifest(manifest)
    if (site / MANIFEST_NAME).is_file():
        return read_manifest(site / MANIFEST_NAME)
    return index_site(site)


def read_report(entry: dict, site_dir: str | os.PathLike) -> str:
    """The report text of a study, or a DataError naming the missing, unreadable or empty report."""
    site = Path(site_dir)
    text = entry.get("report_text")
    if entry.get("report"):
        path = site / entry["report"]
        if not path.is_file():
            raise DataError(path, "report file not found")
        if not os.access(path, os.R_OK):
            raise DataError(path, "permission denied (not readable)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(path, "report is not UTF-8 text") from None
        except OSError as exc:
            raise DataError(path, f"cannot read report ({exc.strerror or exc})") from None
        if not text.strip():
            raise DataError(path, "empty report")
        return text.strip()
    if text is None:
        raise DataError(site / entry.get("path", entry["study_id"]), f"missing report (no {REPORT_NAME} and no report_text)")
    if not str(text).strip():
        raise DataError(site / entry.get("path", entry["study_id"]), "empty report (report_text is blank)")
    return str(text).strip()
