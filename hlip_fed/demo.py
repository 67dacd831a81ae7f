"""``make demo``: train the tiny HLIP on generated two-scan studies and watch the loss fall.

Each study has two scans of smooth random texture; some carry a bright blob in the left or the right
half of both scans, and the report says where. The contrastive loss can only fall by learning to
match the blob's side in the volume to the wording of the report.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from hlip_fed.config import load_config
from hlip_fed.model import create_model, create_tokenizer
from hlip_fed.train import make_optimizer, train_steps

REPORTS = {
    0: "No focal abnormality. The brain parenchyma is unremarkable.",
    1: "There is a bright lesion in the left hemisphere.",
    2: "There is a bright lesion in the right hemisphere.",
}


def toy_batch(n: int, size: list[int], gen: torch.Generator):
    d, h, w = size
    base = F.interpolate(torch.randn(n, 2, d // 4, h // 8, w // 8, generator=gen), size=(d, h, w), mode="trilinear")
    kind = torch.randint(0, 3, (n,), generator=gen)
    zz, yy, xx = torch.meshgrid(*(torch.linspace(-1, 1, s) for s in (d, h, w)), indexing="ij")
    for i, k in enumerate(kind.tolist()):
        if k:
            cx = -0.5 if k == 1 else 0.5
            blob = ((xx - cx) ** 2 + yy**2 + zz**2 < 0.3**2).float()
            base[i] += 3.0 * blob
    images = base[:, :, None]  # [B, 2 scans, 1, D, H, W]
    return images, torch.ones(n, 2, dtype=torch.bool), [REPORTS[k] for k in kind.tolist()], [str(i) for i in range(n)]


def main() -> None:
    torch.set_num_threads(int(os.environ.get("HLIP_FED_THREADS", "2")))
    cfg = load_config("tiny", overrides=["train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=3"])
    steps = 150
    model = create_model(cfg.model, seed=cfg.train.seed)
    tokenizer = create_tokenizer(cfg.model)
    gen = torch.Generator().manual_seed(cfg.train.seed)

    def batches():
        while True:
            yield toy_batch(cfg.train.batch_size, cfg.model.vision.img_size, gen)

    print(f"training HLIP '{cfg.model.preset}' for {steps} steps on generated two-scan studies")
    t0 = time.time()
    stats = train_steps(
        model, tokenizer, batches(), cfg.train, steps, optimizer=make_optimizer(model, cfg.train),
        on_step=lambda s, loss: print(f"step {s + 1:3d}  loss {loss:.3f}") if (s + 1) % 15 == 0 else None,
    )
    first, last = sum(stats.losses[:10]) / 10, sum(stats.losses[-10:]) / 10
    print(f"mean loss, first 10 steps {first:.3f} -> last 10 steps {last:.3f} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
