"""Persistent on-site cache of preprocessed scan tensors.

Decoding a DICOM series or a gzip NIfTI and resampling it costs far more than reading a small
float32 tensor, and a site trains over the same scans every round. Entries are keyed by

* the *content* of the source (every byte of the NIfTI file or of every file of a DICOM series
  folder, plus the scan's sidecar JSON, which sets the modality), so an edited or replaced file
  misses the cache even when its name is unchanged, and
* the preprocessing settings (the intensity, geometry and normalisation keys of ``DataConfig``, the
  target ``img_size`` and :data:`PREPROCESS_VERSION`), hashed with
  :func:`hlip_fed.config.config_hash`; keys that do not change the tensor (``num_workers``,
  ``cache_dir``, ``max_scans``) are left out so that changing them keeps the cache.

Content digests are memoised per source path together with the (size, mtime, ctime, inode) of each
file, on disk and for this process in memory, so a warm epoch only ``stat``s the sources instead of
re-reading them; any change of those values triggers a re-hash. Each entry holds the tensor and a
few strings about it (which axis runs left-right). Files are written atomically (temporary file +
``os.replace``) with safetensors, so concurrent data-loader workers and interrupted runs never
leave a torn entry. The source folder is never written.

Entries read or written in this process are also kept in memory, up to ``memory_bytes`` per cache
(first come, kept until the process ends), so a site's later epochs and rounds cost no disk read and
no decoding of the safetensors file. The memory tier is keyed like the files, source content
included: a replaced source misses it too. A tensor from the memory tier is shared between calls;
callers copy before changing it (a study is stacked from its scans).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hlip_fed.atomic import write_atomic
from hlip_fed.config import config_hash
from hlip_fed.data.files import scan_stem

PREPROCESS_VERSION = 2  # bump when reading or preprocessing changes in a way the config does not express
_PREPROCESS_KEYS = ("ct_window", "ct_bone_hu", "mri_percentiles", "target_spacing", "fit", "mean", "std")


def preprocess_key(data_cfg, img_size: Sequence[int]) -> str:
    """Digest of everything that determines a preprocessed tensor apart from the source."""
    fields = {k: _plain(getattr(data_cfg, k)) for k in _PREPROCESS_KEYS}
    fields["img_size"] = [int(s) for s in img_size]
    fields["version"] = PREPROCESS_VERSION
    if data_cfg.mri_bias_correction:  # only when on, so caches written before the option stay valid
        fields["mri_bias_correction"] = True
    if data_cfg.mri_scale != "percentiles":  # likewise
        fields["mri_scale"] = data_cfg.mri_scale
    return config_hash(fields)


def _plain(value):
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return [float(v) for v in value]


def _source_files(path: Path) -> list[Path]:
    """The files whose bytes define a scan: the file or every non-hidden file under the folder,
    plus the sidecar ``<scan>.json``."""
    if path.is_dir():
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
    else:
        files = [path]
    side = path.with_name(scan_stem(path) + ".json")
    if side.is_file():
        files.append(side)
    return files


def _stat_signature(files: list[Path]) -> list[list]:
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return out


class TensorCache:
    """Preprocessed tensors under ``cache_dir``, one safetensors file per (source, settings)."""

    def __init__(self, cache_dir: str | os.PathLike, data_cfg, img_size: Sequence[int], memory_bytes: int = 0):
        self.root = Path(cache_dir)
        self.settings = preprocess_key(data_cfg, img_size)
        self.hits = 0
        self.misses = 0
        self.memory_left = int(memory_bytes)
        self._memory: dict[Path, tuple[torch.Tensor, dict[str, str]]] = {}
        self._digests: dict[Path, tuple[list, str]] = {}

    def source_digest(self, source: str | os.PathLike) -> str:
        """Content hash of a scan's files, re-computed only when a file's stat changes."""
        path = Path(source).resolve()
        files = _source_files(path)
        signature = _stat_signature(files)
        known = self._digests.get(path)
        if known is not None and known[0] == signature:
            return known[1]
        memo = self.root / "sources" / (hashlib.sha1(str(path).encode()).hexdigest() + ".json")
        try:
            saved = json.loads(memo.read_text())
            if saved.get("stat") == signature:
                self._digests[path] = (signature, saved["digest"])
                return saved["digest"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass
        h = hashlib.blake2b(digest_size=20)
        for f in files:
            h.update(os.path.relpath(f, path.parent).encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            h.update(b"\0")
        digest = h.hexdigest()
        payload = json.dumps({"path": str(path), "stat": signature, "digest": digest})
        write_atomic(memo, lambda tmp: Path(tmp).write_text(payload))
        self._digests[path] = (signature, digest)
        return digest

    def entry(self, source: str | os.PathLike) -> Path:
        key = hashlib.sha256(f"{self.source_digest(source)}:{self.settings}".encode()).hexdigest()[:32]
        return self.root / "tensors" / key[:2] / f"{key}.safetensors"

    def load(self, source: str | os.PathLike,
             compute: Callable[[], tuple[torch.Tensor, dict[str, str]]]) -> tuple[torch.Tensor, dict[str, str]]:
        """The cached tensor for ``source`` and its metadata (string pairs, e.g. which axis runs
        left-right), or ``compute()``'s, stored for next time."""
        path = self.entry(source)
        if path in self._memory:
            self.hits += 1
            return self._memory[path]
        cached = self._read(path)
        if cached is not None:
            self.hits += 1
            return self._remember(path, cached)
        self.misses += 1
        tensor, meta = compute()
        return self._remember(path, (self._write(path, source, tensor, meta), meta))

    def _remember(self, path: Path, entry: tuple[torch.Tensor, dict[str, str]]) -> tuple[torch.Tensor, dict[str, str]]:
        """Keep ``entry`` in memory while the budget lasts."""
        size = entry[0].numel() * entry[0].element_size()
        if size <= self.memory_left:
            self._memory[path] = entry
            self.memory_left -= size
        return entry

    @staticmethod
    def _read(path: Path) -> tuple[torch.Tensor, dict[str, str]] | None:
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensor = f.get_tensor("image")
        except (OSError, KeyError, SafetensorError, RuntimeError):
            return None  # a damaged entry is a miss; it is rewritten after recomputing
        meta.pop("source", None)
        meta.pop("settings", None)
        return tensor, meta

    def _write(self, path: Path, source: str | os.PathLike, tensor: torch.Tensor, meta: dict[str, str]) -> torch.Tensor:
        """Store ``tensor`` as the entry at ``path``; returns the tensor as stored (float32)."""
        meta = {**meta, "source": str(source), "settings": self.settings}
        data = {"image": tensor.detach().to("cpu", torch.float32).contiguous()}
        write_atomic(path, lambda tmp: save_file(data, tmp, metadata=meta))
        return data["image"]
