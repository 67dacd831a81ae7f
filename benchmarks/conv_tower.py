"""The 3D CNN of the supervised reference (:mod:`benchmarks.cnn_reference`), and the same network
as an image tower with HLIP's vision-tower interface (:mod:`benchmarks.pretraining` ``--tower cnn``).

Four 3D convolutions per scan (strides 1x2x2, 2, 2, 1; GroupNorm, GELU), max- and mean-pooled over
space, max-pooled over the study's scans; left-right flips in training (finding presence does not
depend on the side).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvReference(nn.Module):
    """Per-scan 3D CNN; ``forward(images [B, N, 1, D, H, W], scan_mask [B, N]) -> [B, 2 * width]``."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 64), flip: bool = True):
        super().__init__()
        strides = [(1, 2, 2), 2, 2, 1]
        chans = (1, *widths)
        self.convs = nn.ModuleList(nn.Conv3d(chans[i], chans[i + 1], 3, stride=strides[i], padding=1)
                                   for i in range(len(widths)))
        self.norms = nn.ModuleList(nn.GroupNorm(8, c) for c in widths)
        self.flip = flip
        self.width = 2 * widths[-1]

    def forward(self, images: torch.Tensor, scan_mask: torch.Tensor) -> torch.Tensor:
        b, n = scan_mask.shape
        x = images[scan_mask]  # real scans only [S, 1, D, H, W]
        if self.training and self.flip:
            flip = torch.rand(b) < 0.5  # one draw per study, so a study's scans stay aligned
            x = torch.where(flip.repeat_interleave(scan_mask.sum(1))[:, None, None, None, None], x.flip(-1), x)
        for conv, norm in zip(self.convs, self.norms):
            x = F.gelu(norm(conv(x)))
        per_scan = torch.cat([x.amax((2, 3, 4)), x.mean((2, 3, 4))], 1)
        out = per_scan.new_full((b, n, self.width), float("-inf"))
        out[scan_mask] = per_scan
        return out.amax(1)


class ConvTower(nn.Module):
    """:class:`ConvReference` with a linear layer into a ``dim``-wide joint space: an image tower
    with HLIP's vision-tower interface, for training it against the reports."""

    def __init__(self, dim: int):
        super().__init__()
        self.cnn = ConvReference()
        self.proj = nn.Linear(self.cnn.width, dim)

    def forward(self, images: torch.Tensor, scan_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.cnn(images, scan_mask))
