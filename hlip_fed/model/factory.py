"""Build HLIP models and tokenizers from config, and describe them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from hlip_fed.config import Config, ModelConfig
from hlip_fed.errors import HlipError
from hlip_fed.model.hlip import HLIP, TEXT_DIR
from hlip_fed.model.text import TextEncoder
from hlip_fed.model.tokenizer import ReportTokenizer
from hlip_fed.model.vision import HLIPVisionTransformer


def create_model(cfg: ModelConfig, seed: int | None = None) -> HLIP:
    """A fresh HLIP; with ``seed`` its random initialisation is reproducible."""
    if seed is None:
        return HLIP(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HLIP(cfg)


def create_tokenizer(cfg: ModelConfig) -> ReportTokenizer:
    return ReportTokenizer(cfg.text)


def load_pretrained(path: str | Path) -> tuple[HLIP, ReportTokenizer]:
    model = HLIP.from_pretrained(path)
    return model, ReportTokenizer(model.cfg.text, source=Path(path) / TEXT_DIR)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_info(cfg: Config) -> dict:
    """Sizes and layout of the model a config describes (builds it on the meta device: no memory)."""
    m = cfg.model
    with torch.device("meta"):
        visual = HLIPVisionTransformer(m.vision, m.embed_dim)
    info = {
        "preset": m.preset,
        "params_vision": count_params(visual),
        "params_text": None,
        "tokens_per_scan": visual.tokens_per_scan,
        "patch_grid": list(visual.grid),
        "levels": visual.levels,
        "attention": m.vision.attention.mode,
        "input_shape": ["B", "N_scans", 1, *m.vision.img_size],
        "max_scans": m.vision.max_scans,
        "embed_dim": m.embed_dim,
        "text_model": m.text.name,
    }
    try:
        with torch.device("meta"):  # the encoder's config suffices to count its parameters
            text = TextEncoder(dataclasses.replace(m.text, pretrained=False), m.embed_dim)
        info["params_text"] = count_params(text)
        info["params_text_trainable"] = 0 if m.text.lock else count_params(text.encoder)
        info["params_text_trainable"] += count_params(text.proj)
    except HlipError as exc:  # an unreachable hub model still lets the vision figures print
        info["text_error"] = str(exc)
    return info
