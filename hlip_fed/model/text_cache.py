"""Pooled report features of a locked text encoder, computed once and reused every step and round.

With ``model.text.lock`` the text encoder never changes during a run and runs without dropout, so
the pooled feature of a report (before ``text.proj``) is the same every time that report is drawn.
Training still needs the projection (which learns) and the normalisation, but the encoder's forward
pass — for MiniLM several times the tiny vision tower's work per report — need only run once per
report and site. :class:`TextFeatureCache` keeps those features in memory and in one file of the
site's state folder (it stays on the site, like the preprocessed-image cache), so a fresh ClientApp
process reuses them too.

Keys. A feature is looked up by the SHA-256 of the exact text fed to the tokenizer (prefix
included), inside a file named by the identity of what computes it (:func:`text_model_id`): the
``model.text`` section, the encoder's source folder, a digest of its weights (a random tower
depends on the seed, a fine-tuned one on its training), the tokenizer's vocabulary size, and the
autocast precision and device type of the training run. A changed report is a new text; a changed
model is a new file; stale files of other identities are removed on the next write.

Not used when the encoder is trained (``lock=false``: features change every step) or with
``shuffle_sentences`` (every draw is a new text, so a feature would be reused only by chance).

Each report's feature is computed alone (batch of one, no padding), so a cached feature does not
depend on which reports it was first batched with. The uncached path encodes a padded batch, whose
matrix products have other shapes; the two agree to float rounding (padding is masked out of
attention and pooling), not necessarily bit for bit.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from hlip_fed.atomic import write_atomic
from hlip_fed.config import TextConfig, config_hash
from hlip_fed.errors import HlipError

log = logging.getLogger("hlip_fed.text_cache")

CACHE_VERSION = 1


def usable(cfg: TextConfig) -> bool:
    """Whether report features can be cached for this text config (locked, no shuffling)."""
    return bool(cfg.lock) and not cfg.shuffle_sentences


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's state dict."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def text_model_id(text: torch.nn.Module, tokenizer, precision: str, device: str) -> str:
    """The identity of what turns a report into a pooled feature (see the module docstring)."""
    parts = [
        f"v{CACHE_VERSION}",
        config_hash(text.cfg),
        str(Path(text.source).resolve()) if Path(str(text.source)).exists() else str(text.source),
        weights_digest(text.encoder),
        str(len(tokenizer.hf)),
        precision,
        torch.device(device).type,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TextFeatureCache:
    """Report text -> pooled encoder feature ``[hidden]``, in memory and optionally on disk.

    ``folder`` None keeps the features in memory only (centralised training in one process).
    """

    def __init__(self, model_id: str, prefix: str = "", folder: str | Path | None = None):
        self.model_id, self.prefix = model_id, prefix
        self.folder = Path(folder) if folder is not None else None
        self.path = self.folder / f"text-features-{model_id}.pt" if self.folder is not None else None
        self.entries: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0
        self._dirty = False
        self._load()

    @classmethod
    def for_model(cls, model, tokenizer, precision: str, device: str,
                  folder: str | Path | None = None) -> "TextFeatureCache":
        """The cache of ``model``'s text tower; raises when its features are not cacheable."""
        cfg = model.text.cfg
        if not usable(cfg):
            why = "is trained (model.text.lock=false)" if not cfg.lock else "shuffles sentences"
            raise HlipError(f"report features cannot be cached: the text encoder {why}")
        return cls(text_model_id(model.text, tokenizer, precision, device), cfg.prefix, folder)

    @classmethod
    def for_training(cls, model, tokenizer, train_cfg, folder: str | Path | None = None) -> "TextFeatureCache | None":
        """The cache a training run uses (``train.text_cache`` on and the tower cacheable), else None."""
        if not (train_cfg.text_cache and usable(model.text.cfg)):
            return None
        return cls.for_model(model, tokenizer, train_cfg.autocast_precision, train_cfg.device, folder)

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            saved = torch.load(self.path, weights_only=True)
            if saved.get("model_id") != self.model_id or len(saved["keys"]) != len(saved["features"]):
                raise ValueError("identity or size mismatch")
            self.entries = dict(zip(saved["keys"], saved["features"].unbind(0)))
        except Exception as exc:  # a damaged file is rebuilt, never trusted
            log.warning("%s: ignoring the report-feature cache (%s); it will be rebuilt", self.path, exc)
            self.entries = {}

    def __len__(self) -> int:
        return len(self.entries)

    def features(self, reports: list[str], encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """``[len(reports), hidden]`` features; ``encode(reports)`` computes missing ones.

        ``encode`` is called with one report at a time (see the module docstring) and must return
        the pooled features ``[1, hidden]`` exactly as training would compute them (same autocast).
        """
        keys = [text_key(self.prefix + r) for r in reports]
        for report, key in zip(reports, keys):
            if key in self.entries:
                self.hits += 1
                continue
            self.misses += 1
            with torch.no_grad():
                self.entries[key] = encode([report])[0].detach().to("cpu").clone()
            self._dirty = True
        return torch.stack([self.entries[k] for k in keys])

    def flush(self) -> None:
        """Write the features to the state folder if any were added (atomic replace)."""
        if self.path is None or not self._dirty:
            return
        keys = list(self.entries)
        data = {"model_id": self.model_id, "keys": keys, "features": torch.stack([self.entries[k] for k in keys])}
        write_atomic(self.path, lambda tmp: torch.save(data, tmp))
        for old in self.folder.glob("text-features-*.pt"):
            if old != self.path:
                old.unlink(missing_ok=True)
        self._dirty = False
