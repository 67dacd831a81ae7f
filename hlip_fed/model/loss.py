"""Contrastive image-report losses: CLIP InfoNCE and SigLIP.

Both take L2-normalised embeddings of the same ``B`` studies and reports, where pair ``i`` is the
positive of row ``i``. CLIP's temperature is a learnable log-scale clamped to ``[0, ln 100]`` after
each optimiser step (see :meth:`HLIP.clamp_logit_scale`); SigLIP adds a learnable bias and scores
every pair independently, which tolerates the small local batches of federated sites better.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    logits = logit_scale.exp() * img @ txt.T
    labels = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def siglip_loss(
    img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    logits = logit_scale.exp() * img @ txt.T + logit_bias
    labels = 2.0 * torch.eye(len(img), device=img.device, dtype=logits.dtype) - 1.0
    return -F.logsigmoid(labels * logits).sum() / len(img)
