"""Local training of HLIP: the steps one site (or the pooled baseline) runs.

``train_steps`` is the single training loop of the project; centralised training, local-only
baselines and every federated client call it, for the contrastive objectives and for masked
image modelling on the scans alone (``model.loss.name: masked``). It supports gradient
accumulation (bigger effective batches for InfoNCE at small sites), autocast or a vision tower held in
bf16 (:mod:`hlip_fed.training.bf16_tower`), gradient clipping,
CLIP's logit-scale clamp after each step, FedProx's proximal term ``mu/2 * ||w - w_global||^2``
over the federated parameters, and a cache of a locked text encoder's report features
(:mod:`hlip_fed.model.text_cache`).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hlip_fed.config import Config, TrainConfig
from hlip_fed.model import HLIP
from hlip_fed.model.text_cache import TextFeatureCache
from hlip_fed.model.tokenizer import ReportTokenizer
from hlip_fed.training.bf16_tower import Bf16Tower

Batch = tuple[torch.Tensor, torch.Tensor, list[str], list[str]]  # images, scan_mask, reports, ids


@dataclass
class TrainStats:
    steps: int = 0
    examples: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def make_optimizer(model: HLIP, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not norms, biases, tokens, temperature)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "cls_token" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=cfg.fused_optimizer or None)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up then cosine decay to zero over ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def autocast(cfg: TrainConfig) -> contextlib.AbstractContextManager:
    if cfg.autocast_precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.autocast_precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=dtype)


def native_bf16() -> bool | None:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX); None when torch cannot tell."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return None
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def step_precision(cfg: TrainConfig, masked: bool = False) -> str:
    """The precision ``cfg.precision`` trains in on this machine: ``auto`` holds the vision tower in
    bf16 on a CPU that multiplies bf16 in hardware and trains in fp32 elsewhere (CUDA included).
    Masked image modelling (``masked``) never holds the tower in bf16 (the held tower serves the
    contrastive losses only), so a site's ``bf16-held`` trains it in fp32."""
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16-held" if torch.device(cfg.device).type == "cpu" and native_bf16() else "fp32"
    return "fp32" if masked and precision == "bf16-held" else precision


def training_precision(cfg: Config) -> str:
    """The precision a run with ``cfg`` trains in on this machine (:func:`step_precision`)."""
    return step_precision(cfg.train, masked=cfg.model.loss.name == "masked")


def scan_dtype(cfg: Config) -> torch.dtype | None:
    """The dtype a run's training batches collate their scans in on this machine: bf16 where it
    holds the tower in bf16 (:func:`training_precision`), whose patch embedding reads them in bf16
    anyway (the same values, half the bytes to move); None, as the cache holds them, otherwise."""
    return torch.bfloat16 if training_precision(cfg) == "bf16-held" else None


def emulated_precision(cfg: TrainConfig) -> str | None:
    """Why ``cfg.precision`` would train slower than fp32 on this machine, or None: bf16 autocast on
    a CPU without bf16 instructions emulates every bf16 product (docs/benchmarks.md, section 9)."""
    if not cfg.precision.startswith("bf16") or torch.device(cfg.device).type != "cpu" or native_bf16() is not False:
        return None
    return (f"train.precision {cfg.precision} on a CPU without bf16 instructions "
            f"({torch.backends.cpu.get_cpu_capability()}): "
            "bf16 is emulated here and trains several times slower than fp32")


def _text_features(model: HLIP, tokenizer: ReportTokenizer, reports: list[str], cfg: TrainConfig,
                   device: torch.device) -> torch.Tensor:
    """Pooled text-encoder features of ``reports`` as the training forward computes them."""
    tokens = tokenizer(reports)  # the cache is off with shuffle_sentences: the training text is this
    with autocast(cfg):
        return model.text.features(**{k: v.to(device) for k, v in tokens.items()})


def cycle(loader, seed: int) -> Iterator[Batch]:
    """Endless batches: a new shuffled pass whenever the previous one ends (seeded per pass)."""
    epoch = 0
    while True:
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "generator") and loader.sampler.generator is not None:
            loader.sampler.generator.manual_seed(seed + epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("no training studies to draw batches from")
        epoch += 1


def train_steps(
    model: HLIP,
    tokenizer: ReportTokenizer,
    batches: Iterator[Batch],
    cfg: TrainConfig,
    steps: int,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    total_steps: int | None = None,
    proximal_mu: float = 0.0,
    anchor: dict[str, torch.Tensor] | None = None,
    on_step=None,
    text_cache: TextFeatureCache | None = None,
) -> TrainStats:
    """Run ``steps`` optimiser steps of ``cfg.grad_accum`` micro-batches each.

    ``start_step``/``total_steps`` place these steps on the learning-rate schedule (a federated
    round continues the schedule of the rounds before it). With ``proximal_mu > 0`` the loss gains
    FedProx's term towards ``anchor`` (name -> tensor, normally the global weights of the round).
    With ``text_cache`` (a locked text encoder only) the report features before ``text.proj``
    come from the cache and the encoder runs only for reports it has not seen; the loss is the
    same function of the trainable weights (see :mod:`hlip_fed.model.text_cache`).
    """
    device = torch.device(cfg.device)
    optimizer = optimizer or make_optimizer(model, cfg)
    total_steps = total_steps or start_step + steps
    rng = random.Random(cfg.seed + start_step)
    params = dict(model.named_parameters())
    prox = {}
    if proximal_mu > 0 and anchor:
        prox = {k: v.to(device) for k, v in anchor.items() if k in params and params[k].requires_grad}
    stats = TrainStats()
    model.train()
    held = Bf16Tower(model) if step_precision(cfg, masked=model.masked is not None) == "bf16-held" else None
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc="local training", unit="step", leave=False, disable=None)
    for i in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(start_step + i, cfg, total_steps)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        with held.step() if held else contextlib.nullcontext():
            for _ in range(cfg.grad_accum):
                images, scan_mask, reports, _ids = next(batches)
                if model.masked is not None:  # the scans alone: the batch's reports are not used
                    with autocast(cfg):
                        loss = model.masked_loss(images.to(device), scan_mask.to(device))
                elif text_cache is not None:
                    features = text_cache.features(reports, lambda r: _text_features(model, tokenizer, r, cfg, device))
                    with autocast(cfg):
                        image = model.encode_image(images.to(device), scan_mask.to(device))
                        text = F.normalize(model.text.proj(features.to(device)), dim=-1)
                        loss = model.loss(image.float(), text.float())
                else:
                    tokens = tokenizer(reports, train=True, rng=rng)
                    with autocast(cfg):
                        tokens = {k: v.to(device) for k, v in tokens.items()}
                        out = model(images.to(device), scan_mask.to(device), **tokens)
                        loss = model.loss(out["image"].float(), out["text"].float())
                if prox:
                    loss = loss + 0.5 * proximal_mu * sum((params[k] - w).pow(2).sum() for k, w in prox.items())
                (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                stats.examples += len(images)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"training diverged: loss {step_loss} at step {start_step + i}")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        model.clamp_logit_scale()
        stats.steps += 1
        stats.losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}")
        if on_step is not None:
            on_step(start_step + i, step_loss)
    bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats
