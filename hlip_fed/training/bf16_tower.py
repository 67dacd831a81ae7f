"""The vision tower held in bf16 for training steps (``train.precision: bf16-held``).

On a CPU with bf16 instructions a bf16 matrix product is several times faster than an fp32 one, but
autocast casts every weight and activation between the two around each operation, which costs
more than it saves on the tiny tower (docs/benchmarks.md, section 9). Here a bf16 copy of the
vision tower runs the step's forward and backward instead: weights and activations stay in bf16
(only a window beyond 2048 tokens attends in fp32, :class:`hlip_fed.model.vision.Attention`), while
the model keeps its fp32 weights, which the optimiser steps (master weights) and which every other
part of the project (evaluation, federation, checkpoints) reads as before.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

from hlip_fed.model import HLIP


class Bf16Tower:
    """A bf16 copy of ``model.visual`` that stands in for it during a training step."""

    def __init__(self, model: HLIP):
        self.model = model
        self.master = model.visual
        self.tower = copy.deepcopy(model.visual).to(torch.bfloat16)
        self.pairs = list(zip(self.master.parameters(), self.tower.parameters()))

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Within: ``model.visual`` is the bf16 tower, holding the master weights. After: its gradients,
        in fp32, added to the master weights' and ``model.visual`` the master again."""
        self.tower.train(self.master.training)
        with torch.no_grad():
            for master, held in self.pairs:
                held.copy_(master)
        self.model.visual = self.tower
        try:
            yield
        finally:
            self.model.visual = self.master
            for master, held in self.pairs:
                if held.grad is not None:
                    grad = held.grad.float()
                    master.grad = grad if master.grad is None else master.grad + grad
                    held.grad = None
