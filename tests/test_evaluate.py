"""Held-out evaluation: per-finding intervals, the image-embedding probe and the prompt ceiling."""

import numpy as np
import torch

from hlip_fed.model import create_model, create_tokenizer
from hlip_fed.training.evaluate import evaluate, probe_aucs

PROMPTS = {"bleed": (["no bleed seen"], ["an obvious bleed"]), "shrink": (["normal volume"], ["marked shrinkage"])}


def test_probe_finds_a_planted_direction_and_not_noise():
    rng = np.random.default_rng(0)
    y = (np.arange(60) % 3 == 0).astype(int)
    noise = torch.from_numpy(rng.normal(size=(60, 16))).float()
    planted = noise.clone()
    planted[:, 3] += torch.from_numpy(y * 3.0).float()
    unknown = y.copy()
    unknown[:6] = -1  # unknown labels are left out, not read as negatives
    assert probe_aucs(planted, {"f": unknown})["f"] > 0.95
    assert abs(probe_aucs(noise, {"f": y})["f"] - 0.5) < 0.2
    assert np.isnan(probe_aucs(noise, {"f": np.r_[np.ones(4), np.zeros(56)].astype(int)})["f"])  # 4 positives < 5 folds


def test_prompt_ceiling_is_one_when_every_report_is_a_prompt(tiny_cfg):
    """The ceiling scores the prompts against the reports' own text embeddings: a report that *is*
    the positive prompt must rank above one that is the negative prompt, whatever the image tower."""
    torch.manual_seed(0)
    model, tok = create_model(tiny_cfg.model, seed=0), create_tokenizer(tiny_cfg.model)
    n = 12
    img = torch.nn.functional.normalize(torch.randn(n, tiny_cfg.model.embed_dim), dim=-1)
    bleed, shrink = np.arange(n) % 2, (np.arange(n) // 2) % 2
    reports = [f"{PROMPTS['bleed'][b][0]} {PROMPTS['shrink'][s][0]}" for b, s in zip(bleed, shrink)]
    # reports made of one finding's prompt only, for that finding's ceiling
    only_bleed = [PROMPTS["bleed"][b][0] for b in bleed]
    ids = [f"s{i}" for i in range(n)]
    labels = {i: {"bleed": int(b), "shrink": int(s)} for i, b, s in zip(ids, bleed, shrink)}
    m = evaluate(model, tok, None, labels, PROMPTS, embedded=(img, ids, only_bleed), diagnose=True, bootstrap=50)
    assert m["ceiling-bleed"] == 1.0 and m["ceiling-bleed-count"] == n
    assert 0.0 <= m["ceiling-shrink"] <= 1.0
    # the probe reads the image embeddings, which here are random
    assert m["probe-bleed-count"] == n and 0.0 <= m["probe-bleed"] <= 1.0
    m2 = evaluate(model, tok, None, labels, PROMPTS, embedded=(img, ids, reports), bootstrap=50)
    assert "ceiling-bleed" not in m2 and "probe-bleed" not in m2  # rounds keep zero-shot only
    for name in PROMPTS:
        lo, hi = m[f"auc-{name}-ci-low"], m[f"auc-{name}-ci-high"]
        assert 0.0 <= lo <= hi <= 1.0
