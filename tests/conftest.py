"""Shared fixtures. Tests stay small: the tiny preset, a tiny random BERT, one torch thread."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download during tests
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import pytest
import torch

torch.set_num_threads(1)

TINY_BERT = [
    "model.text.pretrained=false",
    "model.text.overrides={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}",
]


@pytest.fixture
def tiny_cfg():
    """The tiny preset with a one-layer random BERT on MiniLM's vocabulary (fast to build)."""
    from hlip_fed.config import load_config

    return load_config("tiny", overrides=TINY_BERT)
