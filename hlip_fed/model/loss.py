"""Contrastive image-report losses: CLIP InfoNCE and SigLIP.

Both take L2-normalised embeddings of the same ``B`` studies and reports, where pair ``i`` is the
positive of row ``i``. CLIP's temperature is a learnable log-scale clamped to ``[0, ln 100]`` after
each optimiser step (see :meth:`HLIP.clamp_logit_scale`); SigLIP adds a learnable bias and scores
every pair independently, which tolerates the small local batches of federated sites better.

CLIP's targets are one-to-one by default. With ``target_temperature > 0`` each study's target is
instead a distribution over the batch's reports, ``softmax(txt @ txt.T / target_temperature)``
(the reports' own similarities, no gradient): two studies whose reports state the same findings
are no longer pushed apart as negatives, so what separates the targets is what the reports say.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(
    img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, target_temperature: float = 0.0
) -> torch.Tensor:
    logits = logit_scale.exp() * img @ txt.T
    if target_temperature > 0:
        report = txt.detach()
        targets = F.softmax(report @ report.T / target_temperature, dim=-1)
    else:
        targets = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def siglip_loss(
    img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    logits = logit_scale.exp() * img @ txt.T + logit_bias
    labels = 2.0 * torch.eye(len(img), device=img.device, dtype=logits.dtype) - 1.0
    return -F.logsigmoid(labels * logits).sum() / len(img)
