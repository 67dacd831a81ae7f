"""Reports to token ids: the text encoder's own tokenizer plus HLIP's report handling.

HLIP feeds the whole radiology report, optionally behind a fixed prefix ("This MRI study shows: ")
and, in training, with its sentences shuffled so the model does not learn report order. With
``sections: findings`` only the findings and impression are kept: the indication and technique
name the modality, the sequences and the house style, which tell a site apart, not a finding.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from hlip_fed.config import TextConfig
from hlip_fed.model.text import resolve_text_model

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Section headers of radiology reports: what the study shows, and what describes the request and
# the acquisition (which names the modality, the sequences and the house style, i.e. the site).
FINDING_SECTIONS = ("findings", "impression", "report", "conclusion", "opinion")
OTHER_SECTIONS = ("indication", "clinical history", "history", "clinical details", "technique", "sequences",
                  "comparison", "protocol")
_HEADER = re.compile(rf"^\s*({'|'.join(FINDING_SECTIONS + OTHER_SECTIONS)})\s*:", re.IGNORECASE | re.MULTILINE)


def finding_sections(report: str) -> str:
    """The findings and impression of a report (sections headed as in :data:`FINDING_SECTIONS`);
    a report without any known section header is returned whole."""
    heads = list(_HEADER.finditer(report))
    if not heads:
        return report
    kept = []
    for head, nxt in zip(heads, heads[1:] + [None]):
        if head.group(1).lower() in FINDING_SECTIONS:
            kept.append(report[head.start(): nxt.start() if nxt else len(report)].strip())
    return "\n".join(kept) if kept else report


def shuffle_sentences(report: str, rng: random.Random) -> str:
    sentences = [s for s in _SENTENCE_END.split(report.strip()) if s]
    rng.shuffle(sentences)
    return " ".join(sentences)


class ReportTokenizer:
    def __init__(self, cfg: TextConfig, source: str | Path | None = None):
        from transformers import AutoTokenizer  # lazy: a slow import that vision-only uses skip

        self.cfg = cfg
        self.hf = AutoTokenizer.from_pretrained(str(source or resolve_text_model(cfg.name)))

    def __call__(
        self, reports: list[str], train: bool = False, rng: random.Random | None = None
    ) -> dict[str, torch.Tensor]:
        texts = []
        for report in reports:
            if self.cfg.sections == "findings":
                report = finding_sections(report)
            if train and self.cfg.shuffle_sentences:
                report = shuffle_sentences(report, rng or random.Random())
            texts.append(self.cfg.prefix + report)
        enc = self.hf(
            texts, padding=True, truncation=True, max_length=self.cfg.context_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def save_pretrained(self, path: str | Path) -> None:
        self.hf.save_pretrained(str(path))
