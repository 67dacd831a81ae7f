"""Masked image modelling for HLIP's vision tower: pre-training on the scans alone (SimMIM).

A random ``ratio`` of every real scan's patches is hidden: their embeddings are replaced by one
learnt mask token before the position embeddings are added, so the tower knows where a hidden
patch lies but not what it holds. The tower's final patch tokens (after its last norm) go through
one linear layer to the voxels of their patch, and the loss is the mean squared error over the
hidden patches of real scans. With ``norm_pix`` each target patch is first normalised to zero mean
and unit variance over its voxels, as MAE's ``norm_pix_loss``.

Every window of every level sees the same tokens as in contrastive training, so the tower
pre-trained this way is the one a contrastive run continues (``federation.init``); the head
(mask token and voxel decoder) is only built for ``model.loss.name: masked``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hlip_fed.config import LossConfig, VisionConfig
from hlip_fed.model.vision import HLIPVisionTransformer, cut_patches


class MaskedImageHead(nn.Module):
    def __init__(self, vision: VisionConfig, loss: LossConfig):
        super().__init__()
        self.ratio = loss.mask_ratio
        self.norm_pix = loss.norm_pix
        self.mask_token = nn.Parameter(torch.zeros(vision.width))
        self.decoder = nn.Linear(vision.width, math.prod(vision.patch_size))
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder.weight, std=0.02)
        nn.init.zeros_(self.decoder.bias)

    def targets(self, images: torch.Tensor, patch_size) -> torch.Tensor:
        """The voxels of every patch ``[B, N, S*T, P]``, normalised per patch with ``norm_pix``."""
        patches = cut_patches(images[:, :, 0], patch_size).flatten(2, 3)
        if not self.norm_pix:
            return patches
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        return (patches - mean) / (var + 1e-6).sqrt()

    def forward(self, tower: HLIPVisionTransformer, images: torch.Tensor,
                scan_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one batch: hide patches, encode, regress the hidden patches' voxels."""
        scan_mask = tower.real_scans(images, scan_mask)
        b, n = images.shape[:2]
        grid = [g // p for g, p in zip(images.shape[-3:], tower.patch_embed.patch_size)]
        hidden = torch.rand(b, n, grid[0], grid[1] * grid[2], device=images.device) < self.ratio
        _, tokens = tower.forward_tokens(images, scan_mask, hidden, self.mask_token)
        scored = hidden.flatten(2) & scan_mask[:, :, None]
        predicted = self.decoder(tower.norm(tokens[scored]))
        if not len(predicted):  # nothing hidden (a small ratio of few patches): nothing to learn
            return predicted.sum()
        target = self.targets(images, tower.patch_embed.patch_size)[scored]
        return F.mse_loss(predicted.float(), target.float())
