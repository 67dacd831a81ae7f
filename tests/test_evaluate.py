"""Held-out evaluation: per-finding intervals, the image-embedding probe and the prompt ceiling."""

import numpy as np
import pytest
import torch

from hlip_fed.model import create_model, create_tokenizer
from hlip_fed.training.evaluate import embed_texts, evaluate, probe_aucs

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


def test_findings_are_scored_within_each_group_of_studies(tiny_cfg):
    """A model right on every CT study and wrong on every MR study is at chance over all of them;
    scored per modality, it is 1.0 on CT and 0.0 on MR, and a probe fitted within each group finds
    the finding in both."""
    model, tok = create_model(tiny_cfg.model, seed=0), create_tokenizer(tiny_cfg.model)
    neg, pos = embed_texts(model, tok, [PROMPTS["bleed"][0][0], PROMPTS["bleed"][1][0]])
    n = 40
    bleed = np.arange(n) % 2
    ct = np.arange(n) < n // 2
    looks_positive = np.where(ct, bleed, 1 - bleed).astype(bool)  # what each image embedding shows
    noise = 0.05 * torch.randn(n, neg.shape[0], generator=torch.Generator().manual_seed(0))
    shown = torch.where(torch.from_numpy(looks_positive)[:, None], pos, neg)
    img = torch.nn.functional.normalize(shown + noise, dim=-1)
    ids = [f"s{i}" for i in range(n)]
    labels = {i: {"bleed": int(b), "shrink": int(b)} for i, b in zip(ids, bleed)}
    groups = {i: "CT" if c else "MR" for i, c in zip(ids, ct)}
    m = evaluate(model, tok, None, labels, PROMPTS, embedded=(img, ids, ["a report"] * n), diagnose=True,
                 bootstrap=50, groups=groups)
    assert abs(m["auc-bleed"] - 0.5) < 0.1
    assert m["auc@CT-bleed"] == 1.0 and m["auc@MR-bleed"] == 0.0
    assert m["auc@CT-bleed-count"] == m["auc@MR-bleed-count"] == n // 2
    assert m["auc@CT-bleed-ci-low"] == pytest.approx(1.0) and m["auc@MR-bleed-ci-high"] == pytest.approx(0.0)
    assert m["probe@CT-bleed"] > 0.9 and m["probe@MR-bleed"] > 0.9 and m["probe@CT-bleed-count"] == n // 2
    assert "auc@CT-bleed" not in evaluate(model, tok, None, labels, PROMPTS, embedded=(img, ids, ["a report"] * n))
