"""Evaluation of an HLIP model: zero-shot classification and image-report retrieval.

Zero-shot follows the paper: for each finding a prompt pair ("no X" / "X") is embedded with the
text tower; a study's probability of the finding is the softmax over the two prompt similarities.
AUC and balanced accuracy (threshold 0.5) come from scikit-learn. Retrieval ranks every report for
every study (and the reverse) by cosine similarity and reports recall at 1, 5 and 10.

Two diagnostics tell an image failure from a prompt failure when zero-shot is near chance (they
need a few dozen labelled studies, so the held-out evaluation computes them, a site's round does
not): a cross-validated logistic **probe** of the image embeddings per finding (does the image
tower encode the finding at all?) and the **prompt ceiling**, the same zero-shot rule applied to the
studies' own report embeddings from the model's text tower instead of their image embeddings (how
far can these prompts go, even for an image tower that reproduced its reports exactly?).

Metrics are flat ``name -> float`` dicts so they fit a Flower ``MetricRecord`` unchanged. A metric
that cannot be computed on a split (a finding with no positives) is reported as 0 with a companion
``<name>-count`` of 0, so every site sends the same finite keys and aggregation can weight by count.

With a locked text encoder the reports and prompts of a split are the same texts every round;
given a :class:`~hlip_fed.model.text_cache.TextFeatureCache`, their encoder features are computed
once and only the (trained) projection runs again: for the demo's MiniLM that is over half of an
evaluation's time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from tqdm import tqdm

from hlip_fed.model import HLIP
from hlip_fed.model.text_cache import TextFeatureCache
from hlip_fed.model.tokenizer import ReportTokenizer

DEFAULT_TEMPLATE = "{}"


@torch.no_grad()
def embed_images(model: HLIP, loader: Iterable, device: str = "cpu",
                 desc: str = "embedding") -> tuple[torch.Tensor, list[str], list[str]]:
    """Normalised study embeddings ``[N, E]``, the study ids and reports, in loader order.

    The one path by which studies become embeddings (evaluation, inference, retrieval, probes):
    ``loader`` yields :func:`~hlip_fed.data.dataset.collate_studies` batches; an empty batch
    (every study of it unreadable) is passed over."""
    model.eval()
    feats, ids, reports = [], [], []
    for images, scan_mask, batch_reports, batch_ids in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        if not batch_ids:
            continue
        feats.append(model.encode_image(images.to(device), scan_mask.to(device)).float().cpu())
        ids.extend(batch_ids)
        reports.extend(batch_reports)
    if not feats:
        return torch.zeros(0, model.cfg.embed_dim), [], []
    return torch.cat(feats), ids, reports


@torch.no_grad()
def embed_texts(model: HLIP, tokenizer: ReportTokenizer, texts: list[str], batch_size: int = 64, device: str = "cpu",
                cache: TextFeatureCache | None = None):
    """Normalised text embeddings ``[N, E]``; with ``cache``, encoder features come from it."""
    model.eval()
    if cache is not None and texts:
        def encode(one: list[str]) -> torch.Tensor:
            return model.text.features(**{k: v.to(device) for k, v in tokenizer(one).items()})

        features = cache.features(list(texts), encode).to(device)
        return F.normalize(model.text.proj(features), dim=-1).float().cpu()
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i : i + batch_size])
        out.append(model.encode_text(**{k: v.to(device) for k, v in tokens.items()}).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.cfg.embed_dim)


def zeroshot_probabilities(
    model: HLIP, tokenizer: ReportTokenizer, image_emb: torch.Tensor,
    prompts: dict[str, tuple[list[str], list[str]]], template: str = DEFAULT_TEMPLATE,
    text_cache: TextFeatureCache | None = None,
) -> dict[str, np.ndarray]:
    """``finding -> P(finding)`` per study from its ``(negatives, positives)`` prompts; several
    phrasings of one class are ensembled by averaging their normalised embeddings (as CLIP does)."""
    scale = model.logit_scale.detach().exp().float()
    out = {}
    for name, classes in prompts.items():
        centroids = []
        for phrasings in classes:
            emb = embed_texts(model, tokenizer, [template.format(p) for p in phrasings], cache=text_cache).mean(0)
            centroids.append(torch.nn.functional.normalize(emb, dim=-1))
        logits = scale * image_emb @ torch.stack(centroids).T  # [N, 2]
        out[name] = logits.softmax(-1)[:, 1].numpy()
    return out


def zeroshot_metrics(probs: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-finding AUC and balanced accuracy; studies labelled -1 (unknown) are left out."""
    metrics: dict[str, float] = {}
    aucs, baccs = [], []
    for name, p in probs.items():
        y = np.asarray(labels[name]).astype(int)
        p = np.asarray(p)[y >= 0]
        y = y[y >= 0]
        npos = int(y.sum())
        both = 0 < npos < len(y)
        auc = float(roc_auc_score(y, p)) if both else 0.0
        bacc = float(balanced_accuracy_score(y, p > 0.5)) if both else 0.0
        metrics[f"auc-{name}"], metrics[f"auc-{name}-count"] = auc, float(len(y) if both else 0)
        metrics[f"bacc-{name}"], metrics[f"bacc-{name}-count"] = bacc, float(len(y) if both else 0)
        metrics[f"npos-{name}"] = float(npos)
        if both:
            aucs.append(auc)
            baccs.append(bacc)
    metrics["auc-mean"], metrics["auc-mean-count"] = (float(np.mean(aucs)), float(len(aucs))) if aucs else (0.0, 0.0)
    metrics["bacc-mean"], metrics["bacc-mean-count"] = (float(np.mean(baccs)), float(len(baccs))) if baccs else (0.0, 0.0)
    return metrics


def _scored(y: np.ndarray) -> np.ndarray:
    """Which studies have a known label (0 or 1; -1 is unknown)."""
    return np.asarray(y).astype(int) >= 0


def _counted(score: float, y: np.ndarray) -> tuple[float, float]:
    """A score and how many studies with a known label it covers; an uncomputable (NaN) score is 0
    with a count of 0, as zero-shot reports it."""
    return (score, float(_scored(y).sum())) if math.isfinite(score) else (0.0, 0.0)


def probe_aucs(embeddings: torch.Tensor, labels: dict[str, np.ndarray], folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Per finding, the AUC of a ``folds``-fold cross-validated logistic regression on frozen
    ``embeddings`` [N, E] (studies labelled -1 left out); NaN when a class has fewer than ``folds``
    studies."""
    x = embeddings.float().numpy()
    out = {}
    for name, y in labels.items():
        keep = _scored(y)
        yk = np.asarray(y)[keep].astype(int)
        if min(yk.sum(), len(yk) - yk.sum()) < folds:
            out[name] = float("nan")
            continue
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        p = cross_val_predict(LogisticRegression(max_iter=2000), x[keep], yk, cv=cv, method="predict_proba")[:, 1]
        out[name] = float(roc_auc_score(yk, p))
    return out


def label_aucs(probs: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """AUC of ``probs`` per finding (studies labelled -1 left out; NaN with one class only)."""
    out = {}
    for name, p in probs.items():
        keep = _scored(labels[name])
        y = np.asarray(labels[name])[keep].astype(int)
        out[name] = float(roc_auc_score(y, np.asarray(p)[keep])) if 0 < y.sum() < len(y) else float("nan")
    return out


def recall_at_k(sim: torch.Tensor, ks: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of rows whose own column (the diagonal) ranks within the top ``k``."""
    n = sim.shape[0]
    if n == 0:
        return {k: 0.0 for k in ks}
    own = sim.diagonal()[:, None]
    rank = (sim > own).sum(1)  # how many candidates beat the true match
    return {k: float((rank < k).float().mean()) for k in ks}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    sim = image_emb @ text_emb.T
    i2t, t2i = recall_at_k(sim, ks), recall_at_k(sim.T, ks)
    out = {}
    for k in ks:
        out[f"i2t-r{k}"], out[f"t2i-r{k}"] = i2t[k], t2i[k]
        out[f"r{k}"] = 0.5 * (i2t[k] + t2i[k])
    return out


def group_zeroshot_metrics(probs: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                           groups: np.ndarray) -> dict[str, float]:
    """Per group of studies (``groups[i]`` names study i's group, e.g. its modality) and finding,
    ``auc@<group>-<finding>`` over that group's studies alone, with its ``-count`` (0 when the group
    lacks a class of the finding)."""
    out: dict[str, float] = {}
    for group in sorted(set(groups.tolist())):
        rows = groups == group
        m = zeroshot_metrics({f: np.asarray(p)[rows] for f, p in probs.items()},
                             {f: np.asarray(labels[f])[rows] for f in probs})
        for f in probs:
            out[f"auc@{group}-{f}"], out[f"auc@{group}-{f}-count"] = m[f"auc-{f}"], m[f"auc-{f}-count"]
    return out


def _split_metrics(image_emb, text_emb, probs, y, groups=None) -> dict[str, float]:
    metrics = retrieval_metrics(image_emb, text_emb)
    if probs is not None:
        metrics.update(zeroshot_metrics(probs, y))
        if groups is not None:
            metrics.update(group_zeroshot_metrics(probs, y, groups))
    return metrics


def evaluate(
    model: HLIP, tokenizer: ReportTokenizer, loader: Iterable,
    labels: dict[str, dict[str, int]] | None, prompts: dict[str, tuple[list[str], list[str]]] | None,
    template: str = DEFAULT_TEMPLATE, device: str = "cpu", bootstrap: int = 0, seed: int = 0,
    embedded: tuple[torch.Tensor, list[str], list[str]] | None = None,
    text_cache: TextFeatureCache | None = None, diagnose: bool = False, groups: dict[str, str] | None = None,
) -> dict[str, float]:
    """All metrics on one split. ``labels`` maps study id -> {finding: 0/1} (studies without
    labels are left out of zero-shot); ``prompts`` maps finding -> (negatives, positives).

    With ``bootstrap > 0`` the studies are resampled that many times and ``<metric>-ci-low`` /
    ``<metric>-ci-high`` give the 95 % interval of the headline metrics. ``embedded`` is
    :func:`embed_images`' result for ``loader`` when the caller already has it; ``text_cache``
    (a locked text encoder's, computed in fp32) supplies the reports' and prompts' encoder features.

    The bootstrap also gives each finding's ``auc-<finding>-ci-low`` / ``-ci-high`` (draws without
    both classes are skipped). With ``diagnose`` (and prompts) the metrics gain ``probe-<finding>``
    (:func:`probe_aucs` of the image embeddings) and ``ceiling-<finding>`` (the zero-shot rule on
    the studies' report embeddings), each with a ``-mean`` over findings.

    ``groups`` maps study id -> a group name (e.g. the study's modality): each finding is then also
    scored within each group, zero-shot as ``auc@<group>-<finding>`` (with bootstrap intervals) and,
    with ``diagnose``, by a probe fitted on that group's studies alone, ``probe@<group>-<finding>``.
    """
    image_emb, ids, reports = embedded if embedded is not None else embed_images(model, loader, device)
    text_emb = embed_texts(model, tokenizer, reports, device=device, cache=text_cache)
    probs = y = None
    if prompts:
        probs = zeroshot_probabilities(model, tokenizer, image_emb, prompts, template, text_cache)
        known = labels or {}
        y = {f: np.array([known[sid][f] if sid in known else -1 for sid in ids]) for f in prompts}
    g = np.array([groups.get(sid, "other") for sid in ids]) if groups and probs is not None else None
    metrics = {"num-examples": float(len(ids)), **_split_metrics(image_emb, text_emb, probs, y, g)}
    if diagnose and probs is not None:
        ceiling = label_aucs(zeroshot_probabilities(model, tokenizer, text_emb, prompts, template, text_cache), y)
        for prefix, scores in (("probe", probe_aucs(image_emb, y, seed=seed)), ("ceiling", ceiling)):
            for f, v in scores.items():
                metrics[f"{prefix}-{f}"], metrics[f"{prefix}-{f}-count"] = _counted(v, y[f])
            known = [v for v in scores.values() if math.isfinite(v)]
            metrics[f"{prefix}-mean"], metrics[f"{prefix}-mean-count"] = (
                (float(np.mean(known)), float(len(known))) if known else (0.0, 0.0))
        for group in sorted(set(g.tolist())) if g is not None else ():
            rows = g == group
            scores = probe_aucs(image_emb[torch.from_numpy(rows)], {f: v[rows] for f, v in y.items()}, seed=seed)
            for f, v in scores.items():
                metrics[f"probe@{group}-{f}"], metrics[f"probe@{group}-{f}-count"] = _counted(v, y[f][rows])
    if bootstrap and len(ids) > 1:
        rng = np.random.default_rng(seed)
        heads = ("auc-mean", "bacc-mean", "r1", "r5", "r10", *(f"auc-{f}" for f in (prompts or {})),
                 *(k for k in metrics if k.startswith("auc@") and not k.endswith("-count")))
        draws: dict[str, list[float]] = {k: [] for k in heads}
        for _ in range(bootstrap):
            idx = rng.integers(0, len(ids), len(ids))
            t = torch.from_numpy(idx)
            m = _split_metrics(
                image_emb[t], text_emb[t],
                {f: p[idx] for f, p in probs.items()} if probs is not None else None,
                {f: v[idx] for f, v in y.items()} if y is not None else None,
                g[idx] if g is not None else None,
            )
            for k in heads:
                if k in m and m.get(f"{k}-count", 1) > 0:
                    draws[k].append(m[k])
        for k, v in draws.items():
            if v:
                metrics[f"{k}-ci-low"], metrics[f"{k}-ci-high"] = (float(x) for x in np.percentile(v, [2.5, 97.5]))
    return {k: (v if math.isfinite(v) else 0.0) for k, v in metrics.items()}


def aggregate_site_metrics(per_site: list[dict[str, float]], weight_key: str = "num-examples") -> dict[str, float]:
    """Average site metrics: ``X`` weighted by ``X-count`` when present, else by ``weight_key``."""
    if not per_site:
        return {}
    out: dict[str, float] = {}
    for key in per_site[0]:
        if key == weight_key or key.endswith("-count") or key.startswith("npos-"):
            out[key] = float(sum(m[key] for m in per_site))
            continue
        weights = [m.get(f"{key}-count", m[weight_key]) for m in per_site]
        total = sum(weights)
        out[key] = float(sum(w * m[key] for w, m in zip(weights, per_site)) / total) if total else 0.0
    return out
