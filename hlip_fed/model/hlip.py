"""HLIP: the hierarchical vision tower and the text tower in one CLIP-style model.

``save_pretrained`` writes a self-contained folder that ``from_pretrained`` reads without the hub:

    config.yaml         the resolved ``model`` section of the config
    model.safetensors   every weight, the text encoder included
    text/               the text encoder's config and tokenizer files
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_model, save_model
from torch import nn

from hlip_fed.config import ModelConfig, section_from_yaml
from hlip_fed.errors import HlipError
from hlip_fed.model.loss import clip_loss, siglip_loss
from hlip_fed.model.masked import MaskedImageHead
from hlip_fed.model.text import TextEncoder
from hlip_fed.model.vision import HLIPVisionTransformer

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TEXT_DIR = "text"


class HLIP(nn.Module):
    def __init__(self, cfg: ModelConfig, text_source: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.visual = HLIPVisionTransformer(cfg.vision, cfg.embed_dim)
        self.text = TextEncoder(cfg.text, cfg.embed_dim, source=text_source)
        siglip = cfg.loss.name == "siglip"
        init = cfg.loss.init_logit_scale
        if init is None:
            init = math.log(10.0) if siglip else math.log(1 / 0.07)
        self.logit_scale = nn.Parameter(torch.tensor(float(init)))
        self.logit_bias = nn.Parameter(torch.tensor(cfg.loss.init_logit_bias)) if siglip else None
        self.masked = MaskedImageHead(cfg.vision, cfg.loss) if cfg.loss.name == "masked" else None

    def encode_image(self, images: torch.Tensor, scan_mask: torch.Tensor | None = None, normalize: bool = True):
        x = self.visual(images, scan_mask)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True):
        x = self.text(input_ids, attention_mask)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images, scan_mask, input_ids, attention_mask) -> dict[str, torch.Tensor]:
        return {
            "image": self.encode_image(images, scan_mask),
            "text": self.encode_text(input_ids, attention_mask),
        }

    def loss(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self.logit_bias is not None:
            return siglip_loss(image, text, self.logit_scale, self.logit_bias)
        return clip_loss(image, text, self.logit_scale, self.cfg.loss.target_temperature)

    def masked_loss(self, images: torch.Tensor, scan_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Masked image modelling on a batch of studies, no report (``model.loss.name: masked``)."""
        if self.masked is None:
            raise HlipError(f"model.loss.name is {self.cfg.loss.name}: the model has no masked image modelling head")
        return self.masked(self.visual, images, scan_mask)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """CLIP keeps the temperature in ``[1, 100]``: clamp the log-scale after each step."""
        self.logit_scale.clamp_(0.0, self.cfg.loss.max_logit_scale)

    # --- persistence ------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        from transformers import AutoTokenizer  # lazy: a slow import that vision-only uses skip

        out = Path(path)
        (out / TEXT_DIR).mkdir(parents=True, exist_ok=True)
        (out / CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.structured(self.cfg)))
        self.text.encoder.config.save_pretrained(str(out / TEXT_DIR))
        if Path(self.text.source).resolve() != (out / TEXT_DIR).resolve():
            AutoTokenizer.from_pretrained(self.text.source).save_pretrained(str(out / TEXT_DIR))
        save_model(self, str(out / WEIGHTS))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "HLIP":
        src = Path(path)
        for name in (CONFIG, WEIGHTS, TEXT_DIR):
            if not (src / name).exists():
                raise HlipError(f"{src}: not a saved HLIP model ({name} is missing)")
        cfg = section_from_yaml(ModelConfig, (src / CONFIG).read_text())
        model = cls(cfg, text_source=str(src / TEXT_DIR))
        load_model(model, str(src / WEIGHTS))
        return model
