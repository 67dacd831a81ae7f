"""Frozen sin-cos position embeddings for HLIP.

A patch token's position is the sum of a 3D spatial term (depth, height, width of the patch in its
scan) and a 1D scan-index term (which scan of the study it belongs to). Neither is learned, which
lets the model take other input sizes (trilinear interpolation of the spatial grid) and other scan
counts (a sorted random subset of the ``max_scans`` slots in training, the first ``n`` slots at
evaluation, linear interpolation past ``max_scans``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Transformer sin-cos features of ``positions`` (any shape) -> ``[..., dim]``; ``dim`` even."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / (10000.0**omega)
    out = positions.to(torch.float64)[..., None] * omega
    return torch.cat([out.sin(), out.cos()], dim=-1).float()


def sincos_3d(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Spatial embedding ``[gd, gh, gw, dim]``: width, height and depth each get an even share."""
    d_w = d_h = 2 * (dim // 6)
    d_d = dim - d_w - d_h
    if d_d % 2 or d_d <= 0:
        raise ValueError(f"3D sin-cos embedding needs an even dimension, got {dim}")
    zd, zh, zw = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij"
    )
    return torch.cat([sincos_1d(d_w, zw), sincos_1d(d_h, zh), sincos_1d(d_d, zd)], dim=-1)


def resample_3d(embed: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear resampling of a ``[gd, gh, gw, C]`` embedding to another patch grid."""
    if tuple(embed.shape[:3]) == tuple(grid):
        return embed
    x = embed.permute(3, 0, 1, 2)[None]
    x = F.interpolate(x, size=tuple(grid), mode="trilinear", align_corners=False)
    return x[0].permute(1, 2, 3, 0)


def scan_slots(
    table: torch.Tensor, n_scans: torch.Tensor, width: int, training: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Scan-index embeddings ``[B, width, C]`` for studies with ``n_scans[b]`` real scans.

    ``table`` holds ``max_scans`` slots. At evaluation scan ``i`` takes slot ``i`` (slots
    interpolated linearly when a study has more scans than slots). In training each study takes a
    random *sorted* subset of the slots, so the model learns scan order without relying on
    absolute slot numbers. Padding positions (``i >= n_scans[b]``) get slot 0; they are masked out
    downstream.
    """
    max_slots = table.shape[0]
    if width > max_slots:
        x = table.T[None]
        table = F.interpolate(x, size=width, mode="linear", align_corners=True)[0].T
        training = False  # no room to sample: use the interpolated sequence as is
    out = table[:width][None].repeat(len(n_scans), 1, 1)
    if training:
        for b, n in enumerate(n_scans.tolist()):
            slots = torch.randperm(table.shape[0], generator=generator)[:n].sort().values
            out[b, :n] = table[slots.to(table.device)]
    return out
