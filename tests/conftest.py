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
# Tests train in fp32 on every CPU; ``train.precision: auto`` (the default) has tests of its own.
FP32 = ["train.precision=fp32"]


@pytest.fixture
def tiny_cfg():
    """The tiny preset with a one-layer random BERT on MiniLM's vocabulary (fast to build)."""
    from hlip_fed.config import load_config

    return load_config("tiny", overrides=TINY_BERT + FP32)


# A federation small enough for CI: 16x32x32 scans (8 patch tokens each), a one-layer text tower.
FAST_RUN = TINY_BERT + FP32 + [
    "model.vision.img_size=[16, 32, 32]",
    "federation.local_steps=2",
    "federation.rounds=2",
    "federation.min_nodes=3",
    "train.batch_size=2",
    "train.warmup_steps=1",
]

def write_mini_consortium(root, sites=3, train=4, test=2, heldout=4, seed=0):
    """Three small sites of 32x32x16 NIfTI studies with a bright block left, right or nowhere."""
    from simulations.toy_consortium import write_consortium

    return write_consortium(root, sites=sites, train=train, test=test, heldout=heldout, shape=(32, 32, 16), seed=seed)


class FakeGrid:
    """The part of Flower's Grid that node sampling uses: which nodes are connected right now."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        from flwr.app import Message

        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)


@pytest.fixture(scope="session")
def mini_consortium(tmp_path_factory):
    return write_mini_consortium(tmp_path_factory.mktemp("consortium"))
