"""Reports to token ids: the text encoder's own tokenizer plus HLIP's report handling.

HLIP feeds the whole radiology report, optionally behind a fixed prefix ("This MRI study shows: ")
and, in training, with its sentences shuffled so the model does not learn report order.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from hlip_fed.config import TextConfig
from hlip_fed.model.text import resolve_text_model

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def shuffle_sentences(report: str, rng: random.Random) -> str:
    sentences = [s for s in _SENTENCE_END.split(report.strip()) if s]
    rng.shuffle(sentences)
    return " ".join(sentences)


class ReportTokenizer:
    def __init__(self, cfg: TextConfig, source: str | Path | None = None):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.hf = AutoTokenizer.from_pretrained(str(source or resolve_text_model(cfg.name)))

    def __call__(
        self, reports: list[str], train: bool = False, rng: random.Random | None = None
    ) -> dict[str, torch.Tensor]:
        texts = []
        for report in reports:
            if train and self.cfg.shuffle_sentences:
                report = shuffle_sentences(report, rng or random.Random())
            texts.append(self.cfg.prefix + report)
        enc = self.hf(
            texts, padding=True, truncation=True, max_length=self.cfg.context_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def save_pretrained(self, path: str | Path) -> None:
        self.hf.save_pretrained(str(path))
