"""Zero-shot classification of studies with a saved HLIP model, and its calibration.

A study's class probabilities are CLIP's: the softmax over classes of ``exp(logit_scale) *
cos(image, prompt)``, one prompt per class (``template.format(class)``; several phrasings of a
class are averaged as normalised embeddings, as in :func:`hlip_fed.training.evaluate.zeroshot_probabilities`).

Contrastive pre-training does not make these probabilities calibrated: the learnt temperature is
tuned to pick the right report out of a batch, not to say "70 %" when the model is right 70 % of
the time. With ground truth, :func:`calibration_report` fits one temperature ``T`` (probabilities
``softmax(logits / T)``) on a calibration split by minimising the negative log-likelihood, and
reports accuracy and the expected calibration error (ECE: equal-width confidence bins, the
``|accuracy - confidence|`` gap weighted by bin size) before and after, on a *separate* held-out
split, so the improvement is not measured on the data the temperature was fitted to.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from hlip_fed.downstream.inference import embed_studies
from hlip_fed.errors import HlipError
from hlip_fed.training.evaluate import embed_texts


# --- class embeddings and logits ------------------------------------------------------------
@torch.no_grad()
def class_embeddings(model, tokenizer, labels: list[str], template: str = "{}",
                     prompts: dict[str, list[str]] | None = None) -> torch.Tensor:
    """Normalised text centroid per class, ``[K, E]``. ``prompts`` maps a class to phrasings that
    replace ``template.format(class)``."""

    out = []
    for label in labels:
        phrasings = (prompts or {}).get(label) or [template.format(label)]
        emb = embed_texts(model, tokenizer, list(phrasings)).mean(0)
        out.append(torch.nn.functional.normalize(emb, dim=-1))
    return torch.stack(out)


def class_logits(model, image_emb: torch.Tensor, text_emb: torch.Tensor) -> np.ndarray:
    """CLIP logits ``[M, K]``: the model's learnt scale times cosine similarity."""
    scale = float(model.logit_scale.detach().exp())
    logits = scale * image_emb @ text_emb.T
    if model.logit_bias is not None:  # SigLIP scores pairs with a bias; it cancels in a softmax
        logits = logits + float(model.logit_bias.detach())
    return logits.numpy().astype(np.float64)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --- calibration -----------------------------------------------------------------------------
def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """ECE of the top-class confidence over ``bins`` equal-width bins of ``(0, 1]``."""
    probs, y = np.asarray(probs), np.asarray(y).astype(int)
    if len(y) == 0:
        return float("nan")
    conf = probs.max(1)
    correct = (probs.argmax(1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    p = softmax(logits, temperature)[np.arange(len(y)), np.asarray(y).astype(int)]
    return float(-np.log(np.clip(p, 1e-12, 1.0)).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)`` on ``(logits, y)``.

    One parameter, so a bounded scalar search over ``log T`` is exact enough and cannot diverge;
    the bounds (T in [0.01, 100]) keep a degenerate split (all one class, perfectly separated)
    from driving T to zero or infinity.
    """
    if len(y) == 0:
        raise HlipError("cannot fit a temperature without labelled studies")
    res = minimize_scalar(lambda t: nll(logits, y, math.exp(t)), bounds=(math.log(0.01), math.log(100.0)),
                          method="bounded", options={"xatol": 1e-4})
    return float(math.exp(res.x))


def calibration_split(n: int, fraction: float = 0.5, seed: int = 0, y: np.ndarray | None = None):
    """Disjoint ``(calibration, evaluation)`` index arrays; stratified by class when ``y`` is given,
    so both halves see every class."""
    rng = np.random.default_rng(seed)
    cal, ev = [], []
    groups = [np.arange(n)] if y is None else [np.flatnonzero(np.asarray(y) == c) for c in np.unique(y)]
    for g in groups:
        g = rng.permutation(g)
        k = int(round(len(g) * fraction))
        if len(g) >= 2:
            k = min(max(k, 1), len(g) - 1)
        cal.extend(g[:k])
        ev.extend(g[k:])
    return np.sort(np.array(cal, dtype=int)), np.sort(np.array(ev, dtype=int))


def calibration_report(logits: np.ndarray, y: np.ndarray, fraction: float = 0.5, seed: int = 0,
                       bins: int = 10) -> dict:
    """Accuracy and ECE before/after temperature scaling (fitted on one split, measured on the
    other). Keys: ``n_calibration``, ``n_evaluation``, ``temperature``, ``accuracy``, ``chance``,
    ``ece_before``, ``ece_after``, ``nll_before``, ``nll_after`` (evaluation split) and
    ``accuracy_all`` (every labelled study)."""
    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y).astype(int)
    if len(y) < 4:
        raise HlipError(f"calibration needs at least 4 labelled studies, got {len(y)}")
    cal, ev = calibration_split(len(y), fraction, seed, y)
    t = fit_temperature(logits[cal], y[cal])
    p_before, p_after = softmax(logits[ev]), softmax(logits[ev], t)
    counts = np.bincount(y, minlength=logits.shape[1])
    return {
        "n_calibration": int(len(cal)),
        "n_evaluation": int(len(ev)),
        "temperature": t,
        "accuracy": float((p_before.argmax(1) == y[ev]).mean()),
        "accuracy_all": float((logits.argmax(1) == y).mean()),
        "chance": float(counts.max() / counts.sum()),  # always guessing the commonest class
        "ece_before": expected_calibration_error(p_before, y[ev], bins),
        "ece_after": expected_calibration_error(p_after, y[ev], bins),
        "nll_before": nll(logits[ev], y[ev]),
        "nll_after": nll(logits[ev], y[ev], t),
        "bins": bins,
    }


def read_temperature(value: str) -> float:
    """``--temperature``: a number, or a JSON file written by ``--calibration-out``."""
    try:
        t = float(value)
    except ValueError:
        path = Path(value)
        try:
            t = float(json.loads(path.read_text())["temperature"])
        except FileNotFoundError:
            raise HlipError(f"{path}: temperature file not found") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HlipError(f"{path}: not a calibration file with a temperature ({type(exc).__name__})") from None
    if not (t > 0 and math.isfinite(t)):
        raise HlipError(f"temperature must be a positive number, got {t}")
    return t


# --- ground truth ----------------------------------------------------------------------------
def _class_index(value, labels: list[str], where: str) -> int | None:
    """A label value -> class index: an int/bool indexes ``labels``; a string names a class (or is
    a digit string). ``None`` (no value) leaves the study unlabelled."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, str):
        if value in labels:
            return labels.index(value)
        if value.strip().lstrip("-").isdigit():
            value = int(value)
        else:
            raise HlipError(f"{where}: label {value!r} is not one of {', '.join(labels)}")
    if isinstance(value, (int, float)) and float(value).is_integer() and 0 <= int(value) < len(labels):
        return int(value)
    raise HlipError(f"{where}: label {value!r} is not a class index 0..{len(labels) - 1} or a class name")


def read_labels_file(path: str | os.PathLike, labels: list[str], finding: str | None = None) -> dict[str, int]:
    """``study_id -> class index`` from a ground-truth file.

    Formats: JSONL with ``study_id`` and ``label`` per line, or ``labels`` (an object) with
    ``finding`` naming the key to use (the consortium's ``truth/<cohort>.jsonl``: 0/1 per finding,
    so ``--labels "no bleed,bleed" --finding haemorrhage``); a JSON object ``{study_id: label}``;
    CSV/TSV with a ``study_id`` column and a ``label`` (or ``finding``) column. A label is a class
    name from ``labels`` or its index. Studies whose value is missing or null are left out.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HlipError(f"{p}: labels file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HlipError(f"{p}: cannot read labels ({type(exc).__name__})") from None
    key = finding or "label"
    rows: list[tuple[str, object]] = []
    if p.suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if p.suffix == ".tsv" else ",")
        if not reader.fieldnames or "study_id" not in reader.fieldnames or key not in reader.fieldnames:
            raise HlipError(f"{p}: a labels CSV needs the columns study_id and {key}")
        rows = [(r["study_id"], r[key]) for r in reader]
    elif p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HlipError(f"{p}: not JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise HlipError(f"{p}: a JSON labels file must map study ids to labels")
        rows = [(k, v[key] if isinstance(v, dict) else v) for k, v in data.items()]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HlipError(f"{p}: line {n}: not JSON ({exc.msg})") from None
            if not isinstance(rec, dict) or "study_id" not in rec:
                raise HlipError(f"{p}: line {n}: needs a study_id")
            if finding is not None:
                value = (rec.get("labels") or {}).get(finding, rec.get(finding))
            else:
                value = rec.get("label")
            rows.append((str(rec["study_id"]), value))
    out = {}
    for sid, value in rows:
        idx = _class_index(value, labels, f"{p}: study {sid}")
        if idx is not None:
            out[str(sid)] = idx
    if not out:
        hint = f" (no value for {key!r}; pass --finding NAME for per-finding truth files)" if finding is None else ""
        raise HlipError(f"{p}: no labelled studies{hint}")
    return out


# --- the whole prediction --------------------------------------------------------------------
def predict_studies(model, tokenizer, studies, labels: list[str], data_cfg, template: str = "{}",
                    prompts: dict[str, list[str]] | None = None, temperature: float = 1.0,
                    batch_size: int = 8) -> dict:
    """Probabilities per study and class. Returns ``{"studies": [...], "logits": array, "skipped":
    {...}, "labels": [...]}``, each study row holding ``study_id``, ``source``, ``probabilities``
    (class -> p) and ``prediction``."""

    emb, kept, skipped = embed_studies(model, studies, data_cfg, batch_size=batch_size)
    if not kept:
        raise HlipError("no study could be read: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    logits = class_logits(model, emb, class_embeddings(model, tokenizer, labels, template, prompts))
    probs = softmax(logits, temperature)
    rows = []
    for study, p in zip(kept, probs):
        rows.append({
            "study_id": study.study_id,
            "source": str(study.source),
            "probabilities": {lab: float(v) for lab, v in zip(labels, p)},
            "prediction": labels[int(p.argmax())],
        })
    return {"labels": labels, "template": template, "temperature": temperature, "studies": rows,
            "logits": logits, "kept": kept, "skipped": skipped}
