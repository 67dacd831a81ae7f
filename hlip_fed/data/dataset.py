"""Torch dataset over a site folder: (study tensor [N, 1, D, H, W], report, study id).

Scans are read with :func:`~hlip_fed.data.readers.read_scan`, preprocessed with
:func:`~hlip_fed.data.preprocess.preprocess` and, when ``data.cache_dir`` is set, kept in the
on-site :class:`~hlip_fed.data.cache.TensorCache`, so that every epoch after the first reads small
tensors instead of decoding DICOM/NIfTI. A study whose report or every scan is unusable is skipped
with a logged reason (the next usable study takes its place, so batches keep their size); an
unreadable scan inside a usable study is skipped the same way. Studies keep at most
``data.max_scans`` scans, the first readable ones in manifest order; a training dataset with
``data.train_scans`` instead draws that many in random order each time (HLIP's scan sampling,
drawn from torch's generator so a seeded round is reproducible), and is augmented as
``data.augment`` says (:mod:`hlip_fed.data.augment`; in the DataLoader's workers when it has any).
``collate_studies`` pads studies with fewer scans and returns the mask the HLIP vision tower
consumes.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hlip_fed.data.cache import TensorCache
from hlip_fed.data.errors import DataError
from hlip_fed.data.manifest import chosen_scans, load_site, read_report
from hlip_fed.data.preprocess import lr_axis, preprocess
from hlip_fed.data.readers import read_scan

log = logging.getLogger("hlip_fed.data")


class SiteDataset(Dataset):
    def __init__(
        self,
        site_dir: str | os.PathLike,
        data_cfg,
        img_size: Sequence[int],
        split: str | None = "train",
        manifest: str | os.PathLike | None = None,
        train: bool = False,
    ):
        self.site = Path(site_dir)
        self.train_scans = data_cfg.train_scans if train else None
        self.augment = None
        if train and data_cfg.augment != "none":
            from hlip_fed.data.augment import StudyAugmentation  # here: importing MONAI takes seconds

            self.augment = StudyAugmentation(data_cfg.augment, data_cfg, img_size)
        self.data_cfg = data_cfg
        self.img_size = [int(s) for s in img_size]
        self.max_scans = int(data_cfg.max_scans)
        entries = load_site(self.site, manifest)
        if split is not None:
            entries = [e for e in entries if e.get("split", "train") == split]
        self.rejected: dict[str, str] = {}
        self.entries = []
        for e in entries:  # cheap structural checks now; decoding problems surface when loaded
            if not e.get("scans"):
                self._reject(e, f"{self.site / e.get('path', e['study_id'])}: no scans")
            else:
                self.entries.append(e)
        self.cache = None
        if data_cfg.cache_dir:
            self.cache = TensorCache(data_cfg.cache_dir, data_cfg, self.img_size, memory_bytes=data_cfg.memory_cache_mb << 20)

    def __len__(self) -> int:
        return len(self.entries)

    def _reject(self, entry: dict, reason: str) -> None:
        if entry["study_id"] not in self.rejected:
            self.rejected[entry["study_id"]] = reason
            log.warning("skipping study %s: %s", entry["study_id"], reason)

    def evaluation_view(self) -> "SiteDataset":
        """The same studies read as evaluation reads them: no scan sampling, no augmentation."""
        view = copy.copy(self)
        view.train_scans, view.augment = None, None
        return view

    def load_scan(self, path: str | os.PathLike) -> tuple[torch.Tensor, int]:
        """One preprocessed scan [1, D, H, W] and its left-right axis, from the cache when possible."""
        def compute() -> tuple[torch.Tensor, dict[str, str]]:
            volume = read_scan(path)
            return preprocess(volume, self.data_cfg, self.img_size), {"lr_axis": str(lr_axis(volume))}

        tensor, meta = self.cache.load(path, compute) if self.cache is not None else compute()
        return tensor, int(meta["lr_axis"])

    def load_study(self, entry: dict) -> tuple[torch.Tensor, str, str]:
        """Raises DataError when the study has no usable report or no readable scan."""
        report = read_report(entry, self.site)
        candidates = chosen_scans(entry["scans"], self.data_cfg.sequences)
        if self.train_scans:
            candidates = [candidates[i] for i in torch.randperm(len(candidates)).tolist()]
        scans, axes, reasons = [], [], []
        for scan in candidates:
            if len(scans) >= (self.train_scans or self.max_scans):
                break
            path = self.site / scan["path"]
            try:
                tensor, axis = self.load_scan(path)
                scans.append(tensor)
                axes.append(axis)
            except DataError as exc:
                reasons.append(str(exc))
                log.warning("skipping scan of study %s: %s", entry["study_id"], exc)
        if not scans:
            raise DataError(self.site / entry.get("path", entry["study_id"]), "no readable scan (" + "; ".join(reasons) + ")")
        if self.train_scans:  # repeat a short study's scans up to the fixed count
            repeat = -(-self.train_scans // len(scans))
            scans, axes = (scans * repeat)[: self.train_scans], (axes * repeat)[: self.train_scans]
        study = torch.stack(scans)
        if self.augment:
            study, report = self.augment(study, report, axes)
        return study, report, entry["study_id"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, str]:
        n = len(self.entries)
        for step in range(n):
            entry = self.entries[(index + step) % n]
            if entry["study_id"] in self.rejected:
                continue
            try:
                return self.load_study(entry)
            except DataError as exc:
                self._reject(entry, str(exc))
            except Exception as exc:  # noqa: BLE001 - a decoder bug must not end training
                self._reject(entry, f"{self.site / entry['path']}: unreadable ({type(exc).__name__}: {exc})")
        raise DataError(self.site, "no usable study in this site")


class SiteBatchSampler(Sampler[list[int]]):
    """Batches of a :class:`~torch.utils.data.ConcatDataset` of sites, each drawn from one site.

    Every pass shuffles each site's studies, cuts them into full batches and shuffles the batches
    of all sites together, so sites contribute in proportion to their size as with mixed batches;
    a batch never mixes sites, as a site's own training never does (in a mixed batch, telling the
    sites apart is enough to match studies with reports).
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, generator: torch.Generator | None = None):
        self.sizes, self.batch_size = [int(n) for n in sizes], int(batch_size)
        self.generator = generator if generator is not None else torch.Generator()
        if not any(n >= self.batch_size for n in self.sizes):
            raise ValueError(f"no site has a full batch of {self.batch_size} studies")

    def __iter__(self):
        batches, start = [], 0
        for n in self.sizes:
            order = (start + torch.randperm(n, generator=self.generator)).tolist()
            batches += [order[i: i + self.batch_size] for i in range(0, n - self.batch_size + 1, self.batch_size)]
            start += n
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]

    def __len__(self) -> int:
        return sum(n // self.batch_size for n in self.sizes)


def collate_studies(batch, dtype: torch.dtype | None = None):
    """Stack studies with different scan counts.

    Returns ``images`` [B, N_max, 1, D, H, W] (zero-padded; in ``dtype``, cast as they are copied in,
    default the studies'), ``scan_mask`` [B, N_max] bool (True for a real scan), the report texts and
    the study ids.
    """
    n_max = max(item[0].shape[0] for item in batch)
    first = batch[0][0]
    # written once: scans, then zero padding
    images = first.new_empty((len(batch), n_max, *first.shape[1:]), dtype=dtype)
    mask = torch.zeros(len(batch), n_max, dtype=torch.bool)
    for i, (scans, _, _) in enumerate(batch):
        images[i, : scans.shape[0]] = scans
        images[i, scans.shape[0]:] = 0
        mask[i, : scans.shape[0]] = True
    return images, mask, [item[1] for item in batch], [item[2] for item in batch]


def site_loader(site_dir, cfg, split: str | None = "train", shuffle: bool = True, **kwargs) -> DataLoader:
    """A DataLoader over one site configured from a full :class:`~hlip_fed.config.Config`."""
    dataset = SiteDataset(site_dir, cfg.data, cfg.model.vision.img_size, split=split)
    return DataLoader(
        dataset,
        batch_size=kwargs.pop("batch_size", cfg.train.batch_size),
        shuffle=shuffle,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_studies,
        **kwargs,
    )
