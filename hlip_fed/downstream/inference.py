"""Using a saved HLIP model on studies: find the studies a person points at, load, embed them.

The inference commands (``predict``, ``retrieve``, ``finetune``, ``explain``) accept studies the way
a radiologist or researcher has them:

* a NIfTI file or a DICOM series folder: a study of that one scan,
* a study folder: every scan in it (NIfTI files and DICOM series sub-folders), its ``report.txt``
  when there is one,
* a site folder (``train/``, ``val/``, ``test/`` splits, see ``docs/site-layout.md``) or a
  ``manifest.jsonl``: every study it lists,
* any other folder: every study found in its sub-folders.

Scans are read and preprocessed exactly as in training (:func:`~hlip_fed.data.readers.read_scan`,
:func:`~hlip_fed.data.preprocess.preprocess`) at the model's ``img_size``. A saved model folder
holds only the *model* config, so the data section (intensity windows, ``fit``, ``max_scans``)
is :class:`~hlip_fed.config.DataConfig`'s defaults unless the run's YAML config is given.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from hlip_fed.config import DataConfig, load_config
from hlip_fed.data.dataset import collate_studies
from hlip_fed.data.dicom import is_dicom_file
from hlip_fed.data.errors import DataError
from hlip_fed.data.files import DICOM_SUFFIXES, is_nifti_path, scan_stem
from hlip_fed.data.manifest import (MANIFEST_NAME, REPORT_NAME, SPLITS, chosen_scans, load_site, read_manifest,
                                    read_report, scan_sequence)
from hlip_fed.data.preprocess import preprocess
from hlip_fed.data.readers import read_scan
from hlip_fed.errors import HlipError
from hlip_fed.model import load_pretrained
from hlip_fed.training.evaluate import embed_images

log = logging.getLogger("hlip_fed.downstream.inference")


@dataclass
class Study:
    """One study to run the model on: its id, its scans (paths) and, when known, its report."""

    study_id: str
    scans: list[Path]
    source: Path  # what the user named (file, study folder, manifest), for messages
    report: str | None = None
    split: str | None = None
    meta: dict = field(default_factory=dict)
    sequences: dict[Path, str | None] = field(default_factory=dict)  # a manifest's, else read from the sidecars

    def chosen_scans(self, sequences) -> list[Path]:
        """The scans training reads with ``data.sequences`` = ``sequences`` (see
        :func:`~hlip_fed.data.manifest.chosen_scans`): every scan when it is empty."""
        if not sequences:
            return self.scans
        entries = [{"path": p, "sequence": self.sequences[p] if p in self.sequences else scan_sequence(p)}
                   for p in self.scans]
        return [e["path"] for e in chosen_scans(entries, sequences)]


# --- finding studies -------------------------------------------------------------------------
def _has_dicom_files(folder: Path) -> bool:
    """True when ``folder`` holds DICOM slices directly (it is a series, not a study of series)."""

    for p in folder.iterdir():
        if p.is_file() and not p.name.startswith("."):
            if p.name.lower().endswith(DICOM_SUFFIXES) or p.name.upper() == "DICOMDIR" or is_dicom_file(p):
                return True
    return False


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _study_from_folder(folder: Path) -> Study:
    scans = [p for p in _visible(folder) if (p.is_file() and is_nifti_path(p)) or (p.is_dir() and _has_dicom_files(p))]
    report = folder / REPORT_NAME
    text = report.read_text(encoding="utf-8").strip() if report.is_file() else None
    return Study(folder.name, scans, folder, report=text or None)


def _studies_from_manifest(path: Path, site: Path) -> list[Study]:
    out = []
    for entry in load_site(site, path):
        try:
            report = read_report(entry, site)
        except DataError:
            report = None
        scans = [site / s["path"] for s in entry.get("scans", [])]
        out.append(Study(entry["study_id"], scans, path, report=report, split=entry.get("split"),
                         meta={"labels": entry.get("labels")} if entry.get("labels") else {},
                         sequences={site / s["path"]: s.get("sequence") for s in entry.get("scans", [])}))
    return out


def _classify(folder: Path) -> str:
    """``site``, ``series``, ``study`` or ``collection`` for a folder (see the module docstring)."""
    if (folder / MANIFEST_NAME).is_file() or any((folder / s).is_dir() for s in SPLITS):
        return "site"
    if _has_dicom_files(folder):
        return "series"
    entries = _visible(folder)
    if any(p.is_file() and is_nifti_path(p) for p in entries):
        return "study"
    subdirs = [p for p in entries if p.is_dir()]
    if subdirs and all(_has_dicom_files(d) for d in subdirs):
        return "study"  # a study of DICOM series
    return "collection"


def _expand(path: Path, split: str | None, depth: int = 0) -> list[Study]:
    if not path.exists():
        raise HlipError(f"{path}: not found")
    if path.is_file():
        if path.name.endswith(".jsonl"):
            return _studies_from_manifest(path, path.parent)
        if is_nifti_path(path) or path.name.lower().endswith(DICOM_SUFFIXES):
            return [Study(scan_stem(path), [path], path)]
        raise HlipError(f"{path}: not a scan (.nii, .nii.gz, .dcm), a series folder, a study folder or a manifest")
    kind = _classify(path)
    if kind == "series":
        return [Study(path.name, [path], path)]
    if kind == "study":
        return [_study_from_folder(path)]
    if kind == "site":
        manifest = path / MANIFEST_NAME
        if manifest.is_file():
            studies = _studies_from_manifest(manifest, path)
        else:
            studies = []
            for s in SPLITS:
                if (path / s).is_dir():
                    for sub in _expand(path / s, None, depth + 1):
                        sub.split = sub.split or s
                        studies.append(sub)
        return [s for s in studies if split is None or s.split == split]
    if depth > 4:
        return []
    return [s for sub in _visible(path) if sub.is_dir() for s in _expand(sub, split, depth + 1)]


def find_studies(paths: list[str | os.PathLike], split: str | None = None) -> list[Study]:
    """Every study named by ``paths`` (see the module docstring), in the order given.

    Ids are made unique (``id``, ``id~2``, ...) so that a table or a cache never merges two
    studies that happen to share a folder name. ``split`` keeps only that split of sites and
    manifests. Raises :class:`HlipError` when nothing usable is named.
    """
    studies: list[Study] = []
    for p in paths:
        studies.extend(_expand(Path(p), split))
    seen: dict[str, int] = {}
    for s in studies:
        n = seen.get(s.study_id, 0) + 1
        seen[s.study_id] = n
        if n > 1:
            s.study_id = f"{s.study_id}~{n}"
    empty = [s for s in studies if not s.scans]
    for s in empty:
        log.warning("skipping %s: no scans in it", s.source)
    studies = [s for s in studies if s.scans]
    if not studies:
        raise HlipError(f"no studies with scans in {', '.join(map(str, paths))}")
    return studies


# --- the model and its input -----------------------------------------------------------------
def load_data_config(config: str | os.PathLike | None = None) -> DataConfig:
    """The data section of a run config file (or bundled preset name), else the defaults."""
    if not config:
        return DataConfig()

    return load_config(files=[config]).data


def load_model(model_dir: str | os.PathLike):
    """``(model, tokenizer)`` from a ``save_pretrained`` folder, in eval mode."""

    path = Path(model_dir)
    if not path.is_dir():
        raise HlipError(f"{path}: model folder not found (a run's final model is RUN_DIR/model)")
    model, tokenizer = load_pretrained(path)
    model.eval()
    return model, tokenizer


def load_study_tensor(study: Study, data_cfg, img_size) -> tuple[torch.Tensor, list]:
    """``[N, 1, D, H, W]`` for the first ``data_cfg.max_scans`` readable scans of those
    ``data_cfg.sequences`` chooses, as in training, and their Volumes.

    The volumes are returned too because explanations are drawn on the scan as it was read.
    Raises :class:`DataError` when no scan of the study can be read.
    """

    tensors, volumes, reasons = [], [], []
    for path in study.chosen_scans(data_cfg.sequences):
        if len(tensors) >= int(data_cfg.max_scans):
            break
        try:
            vol = read_scan(path)
        except DataError as exc:
            reasons.append(str(exc))
            log.warning("skipping scan of study %s: %s", study.study_id, exc)
            continue
        tensors.append(preprocess(vol, data_cfg, img_size))
        volumes.append(vol)
    if not tensors:
        raise DataError(study.source, "no readable scan (" + "; ".join(reasons) + ")")
    return torch.stack(tensors), volumes


class StudyTensors(Dataset):
    """The preprocessed tensors of ``studies`` for a DataLoader: ``(tensor, "", index)``, or
    ``(None, reason, index)`` for a study none of whose scans can be read (``index`` as a string,
    the place of the study in ``studies``)."""

    def __init__(self, studies: list[Study], data_cfg, img_size):
        self.studies, self.data_cfg, self.img_size = studies, data_cfg, img_size

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, index: int):
        study = self.studies[index]
        try:
            return load_study_tensor(study, self.data_cfg, self.img_size)[0], "", str(index)
        except DataError as exc:
            return None, str(exc), str(index)


def embed_studies(model, studies: list[Study], data_cfg, batch_size: int = 8, device: str = "cpu",
                  desc: str = "embedding studies") -> tuple[torch.Tensor, list[Study], dict[str, str]]:
    """Normalised embeddings ``[M, E]`` of the readable studies, those studies, and the skipped
    ones (``id -> reason``). An unreadable study is skipped rather than ending a batch run over a
    site; the caller decides whether an empty result is an error."""
    skipped: dict[str, str] = {}

    def collate_readable(items):
        for tensor, reason, index in items:
            if tensor is None:
                skipped[studies[int(index)].study_id] = reason
        readable = [item for item in items if item[0] is not None]
        return collate_studies(readable) if readable else (None, None, [], [])

    loader = DataLoader(StudyTensors(studies, data_cfg, model.cfg.vision.img_size),
                        batch_size=batch_size, collate_fn=collate_readable)
    emb, indices, _ = embed_images(model, loader, device, desc=desc)
    return emb, [studies[int(i)] for i in indices], skipped


def split_labels(text: str) -> list[str]:
    """``"no haemorrhage,haemorrhage"`` -> the class names (``;`` also separates, for names with
    commas: when the text holds a ``;`` only ``;`` separates)."""
    sep = ";" if ";" in text else ","
    labels = [t.strip() for t in text.split(sep) if t.strip()]
    if len(labels) < 2:
        raise HlipError(f"--labels needs at least two class names separated by commas, got {text!r}")
    if len(set(labels)) != len(labels):
        raise HlipError(f"--labels names a class twice: {text!r}")
    return labels


def check_template(template: str) -> str:
    if template.count("{}") != 1:
        raise HlipError(f"--template must contain one '{{}}' where the class name goes, got {template!r}")
    return template
