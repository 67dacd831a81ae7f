"""``site check``: read every study of a site once and say which ones training can use.

A study is usable when its report is present and non-empty and at least one of its scans reads as
a 3D volume; each scan that cannot be read is a problem of its own (the study then trains on its
other scans). Every problem is one line, ``<file>: <reason>``. Nothing is written to the site.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from hlip_fed.data.errors import DataError
from hlip_fed.data.manifest import load_site, read_report
from hlip_fed.data.readers import read_scan


@dataclass
class SiteReport:
    site: str
    studies_ok: int = 0
    studies_bad: int = 0
    scans_ok: int = 0
    scans_bad: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)  # {"path", "error", "study_id"}
    warnings: list[dict[str, str]] = field(default_factory=list)  # handled issues, e.g. resampled gaps
    splits: dict[str, int] = field(default_factory=dict)  # usable studies per split

    @property
    def usable(self) -> bool:
        return self.studies_ok > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        total = self.studies_ok + self.studies_bad
        split_text = ", ".join(f"{k} {v}" for k, v in sorted(self.splits.items())) or "none"
        out = [
            f"site {self.site}: {self.studies_ok} of {total} studies usable ({split_text}), "
            f"{self.studies_bad} rejected; {self.scans_ok} scans read, {self.scans_bad} unreadable"
        ]
        out += [f"problem: {p['path']}: {p['error']}" for p in self.problems]
        out += [f"warning: {w['path']}: {w['warning']}" for w in self.warnings]
        return out


def _as_data_error(path: str | os.PathLike, exc: Exception) -> DataError:
    if isinstance(exc, DataError):
        return exc
    return DataError(path, f"unreadable ({type(exc).__name__}: {exc})")


def check_study(entry: dict, site_dir: str | os.PathLike, read: Callable | None = None):
    """Check one manifest entry. Returns (report text or None, readable scan paths, problems,
    warnings); problems are :class:`DataError` objects, warnings ``(path, text)`` pairs."""
    read = read or read_scan
    site = Path(site_dir)
    problems: list[DataError] = []
    warnings: list[tuple[str, str]] = []
    try:
        report = read_report(entry, site)
    except Exception as exc:  # noqa: BLE001 - one bad study must not stop the others
        report = None
        problems.append(_as_data_error(site / entry.get("path", entry["study_id"]), exc))
    if entry.get("labels_error"):
        warnings.append((str(site / entry.get("path", "")), entry["labels_error"]))
    good = []
    if not entry.get("scans"):
        problems.append(DataError(site / entry.get("path", entry["study_id"]), "no scans (no NIfTI file or DICOM series folder)"))
    for scan in entry.get("scans", []):
        path = site / scan["path"]
        try:
            volume = read(path)
        except Exception as exc:  # noqa: BLE001
            problems.append(_as_data_error(path, exc))
            continue
        good.append(str(path))
        warnings.extend((str(path), w) for w in getattr(volume, "warnings", []))
        del volume
    return report, good, problems, warnings


def check_site(
    site_dir: str | os.PathLike,
    manifest: str | os.PathLike | None = None,
    splits: Iterable[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SiteReport:
    """Read every study (of ``splits``, default all) once and summarise what is usable."""
    site = Path(site_dir)
    entries = load_site(site, manifest)
    if splits is not None:
        wanted = set(splits)
        entries = [e for e in entries if e.get("split", "train") in wanted]
    result = SiteReport(site=str(site))
    for n, entry in enumerate(entries, 1):
        report, good, problems, warnings = check_study(entry, site)
        usable = report is not None and bool(good)
        result.studies_ok += usable
        result.studies_bad += not usable
        result.scans_ok += len(good)
        result.scans_bad += len(entry.get("scans", [])) - len(good)
        if usable:
            split = entry.get("split", "train")
            result.splits[split] = result.splits.get(split, 0) + 1
        result.problems += [{"path": p.path, "error": p.reason, "study_id": entry["study_id"]} for p in problems]
        result.warnings += [{"path": p, "warning": w, "study_id": entry["study_id"]} for p, w in warnings]
        if progress:
            progress(n, len(entries))
    return result
