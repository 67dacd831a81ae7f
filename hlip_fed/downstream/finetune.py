"""Few-shot adaptation of a saved HLIP model to a classification task, against its zero-shot baseline.

A site with a few labelled studies wants to know whether labelling pays: how much better than
zero-shot (prompts only, no labels) a head trained on 1, 5, 10 or all labelled studies per class
is. Two heads are compared, both on the same held-out split:

* **linear probe**: logistic regression on the frozen, normalised study embeddings (cheap, no
  gradient through the model, the usual CLIP evaluation);
* **full fine-tuning**: the vision tower and a linear head trained end to end with cross-entropy,
  as LP-FT (Kumar et al., ICLR 2022): the head starts as the linear probe fitted on the same
  studies, and the tower learns at a tenth of the head's rate (``backbone_lr``). A head that
  starts far from the data (random, or prompts that miss the task) sends large gradients into
  the pre-trained tower in the first steps and distorts the features a few labels cannot rebuild:
  on the phantoms of ``tests/test_inference.py``, fine-tuning from the zero-shot head with one
  rate for all (3e-4) fell from zero-shot's 0.77 to 0.50 balanced accuracy on a task zero-shot
  already knew (lesion size), with ten studies per class. When a draw holds a single
  class (no probe), the head starts as the zero-shot classifier (the class prompts' text
  embeddings times the model's logit scale). The text tower is not used after initialisation.

Each shot count is drawn ``repeats`` times with different seeds (the mean and spread are
reported), because with one or five studies per class the result depends on which studies they
were. The held-out split is the site's ``test`` split when it has one with labels, else a
stratified random fraction; training studies are drawn only from the rest.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from torch.utils.data import DataLoader
from tqdm import tqdm

from hlip_fed.data.dataset import collate_studies
from hlip_fed.data.errors import DataError
from hlip_fed.downstream.inference import load_study_tensor
from hlip_fed.downstream.predict import calibration_split, class_embeddings, class_logits
from hlip_fed.errors import HlipError
from hlip_fed.training.evaluate import embed_images

log = logging.getLogger("hlip_fed.downstream.finetune")

METHODS = ("probe", "full")


@dataclass
class LabelledSet:
    """Loaded studies of a task: tensors ``[N, 1, D, H, W]``, class indices and the split."""

    ids: list[str]
    tensors: list[torch.Tensor]
    y: np.ndarray
    train: np.ndarray  # indices of the training pool
    test: np.ndarray  # indices of the held-out split
    skipped: dict[str, str] = field(default_factory=dict)


def load_labelled(studies, truth: dict[str, int], data_cfg, img_size, holdout: float = 0.3,
                  seed: int = 0) -> LabelledSet:
    """Read the labelled studies once and split them (see the module docstring)."""

    ids, tensors, ys, splits, skipped = [], [], [], [], {}
    for s in tqdm([s for s in studies if s.study_id in truth], desc="reading studies", unit="study", leave=False,
                  disable=None):
        try:
            t, _ = load_study_tensor(s, data_cfg, img_size)
        except DataError as exc:
            skipped[s.study_id] = str(exc)
            continue
        ids.append(s.study_id)
        tensors.append(t)
        ys.append(truth[s.study_id])
        splits.append(s.split)
    if len(ids) < 4:
        raise HlipError(f"only {len(ids)} labelled, readable studies: few-shot evaluation needs more")
    y = np.array(ys, dtype=int)
    is_test = np.array([sp == "test" for sp in splits])
    if is_test.any() and (~is_test).any() and len(np.unique(y[is_test])) > 1:
        train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    else:
        test, train = calibration_split(len(y), holdout, seed, y)
    return LabelledSet(ids, tensors, y, train, test, skipped)


def sample_shots(y: np.ndarray, pool: np.ndarray, shots: int | None, seed: int) -> np.ndarray:
    """``shots`` random studies per class from ``pool`` (all of a class when it has fewer);
    ``None`` takes the whole pool."""
    if shots is None:
        return np.sort(pool)
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(y[pool]):
        members = pool[y[pool] == c]
        out.extend(rng.choice(members, size=min(shots, len(members)), replace=False))
    return np.sort(np.array(out, dtype=int))


def _batch(tensors: list[torch.Tensor], idx) -> tuple[torch.Tensor, torch.Tensor]:
    images, mask, _, _ = collate_studies([(tensors[i], "", "") for i in idx])
    return images, mask


def embed_tensors(model, tensors: list[torch.Tensor], batch_size: int = 16) -> torch.Tensor:
    """Normalised embeddings of studies already in memory, in order."""

    loader = DataLoader([(t, "", str(i)) for i, t in enumerate(tensors)], batch_size=batch_size,
                        collate_fn=collate_studies)
    return embed_images(model, loader, desc="embedding labelled studies")[0]


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {"accuracy": float((y_true == y_pred).mean()),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred))}


def fit_probe(features: np.ndarray, y: np.ndarray, n_classes: int):
    """Multinomial logistic regression; with a single class drawn it predicts that class."""
    if len(np.unique(y)) < 2:
        return None
    return LogisticRegression(C=1.0, max_iter=2000).fit(features, y)


def predict_probe(probe, features: np.ndarray, fallback: int) -> np.ndarray:
    return probe.predict(features) if probe is not None else np.full(len(features), fallback)


def probe_head(probe, n_classes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The probe as a linear head's ``(weight [C, E], bias [C])`` giving the same class
    probabilities under softmax, or None when the probe saw fewer than ``n_classes`` classes."""
    if probe is None or list(probe.classes_) != list(range(n_classes)):
        return None
    w = torch.as_tensor(probe.coef_, dtype=torch.float32)
    b = torch.as_tensor(probe.intercept_, dtype=torch.float32)
    if n_classes == 2:  # sklearn keeps one logit, w.x + b, for class 1: softmax of (-z/2, z/2) is its sigmoid
        return torch.cat([-w / 2, w / 2]), torch.cat([-b / 2, b / 2])
    return w, b


def finetune_full(model, head_init: tuple[torch.Tensor, torch.Tensor], data: LabelledSet, idx: np.ndarray,
                  steps: int = 30, lr: float = 3e-4, backbone_lr: float = 3e-5, batch_size: int = 8, seed: int = 0):
    """A copy of ``model``'s vision tower and a linear head starting at ``head_init`` (weight, bias),
    trained with cross-entropy on studies ``idx`` (the head at ``lr``, the tower at
    ``backbone_lr``); returns ``(visual, head)`` (the text tower is left behind)."""
    gen = torch.Generator().manual_seed(seed)
    visual = copy.deepcopy(model.visual)
    visual.train()
    weight, bias = head_init
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    tower, head_params = [p for p in visual.parameters() if p.requires_grad], list(head.parameters())
    params = tower + head_params
    opt = torch.optim.AdamW([{"params": tower, "lr": backbone_lr}, {"params": head_params, "lr": lr}], weight_decay=0.01)
    y = torch.as_tensor(data.y)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            pick = idx[torch.randperm(len(idx), generator=gen)[:batch_size].numpy()]
            images, mask = _batch(data.tensors, pick)
            logits = head(F.normalize(visual(images, mask), dim=-1))
            loss = F.cross_entropy(logits, y[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    visual.eval()
    return visual, head


@torch.no_grad()
def predict_full(visual, head, data: LabelledSet, idx: np.ndarray, batch_size: int = 16) -> np.ndarray:
    out = []
    for i in range(0, len(idx), batch_size):
        images, mask = _batch(data.tensors, idx[i : i + batch_size])
        out.append(head(F.normalize(visual(images, mask), dim=-1)).argmax(1))
    return torch.cat(out).numpy()


def parse_shots(text: str) -> list[int | None]:
    """``"1,5,10,all"`` -> ``[1, 5, 10, None]`` (``None``: every training study)."""
    out: list[int | None] = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part == "all":
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise HlipError(f"--shots takes positive numbers and 'all', e.g. 1,5,10,all; got {part!r}")
    if not out:
        raise HlipError("--shots is empty")
    return out


def few_shot_curve(model, tokenizer, data: LabelledSet, labels: list[str], template: str = "{}",
                   prompts: dict[str, list[str]] | None = None, shots=(1, 5, 10, None), repeats: int = 3,
                   methods=METHODS, full_steps: int = 30, lr: float = 3e-4, seed: int = 0,
                   backbone_lr: float = 3e-5) -> dict:
    """Zero-shot, probe and full fine-tuning scores on ``data.test`` for each shot count.

    Returns ``{"zero_shot": {...}, "rows": [{method, shots, repeat, n_train, accuracy,
    balanced_accuracy}], "summary": [{method, shots, mean and std of both scores}], ...}`` and,
    under ``"probe"``, the probe fitted on the largest shot count (first repeat) for saving.
    """

    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise HlipError(f"unknown method {bad[0]!r}; use {', '.join(METHODS)}")
    text_emb = class_embeddings(model, tokenizer, labels, template, prompts)
    emb = embed_tensors(model, data.tensors)
    feats = emb.numpy()
    y, test = data.y, data.test
    zero = scores(y[test], class_logits(model, emb[test], text_emb).argmax(1))
    zero_head = (text_emb * model.logit_scale.detach().exp(), torch.zeros(len(labels)))
    commonest = int(np.bincount(y[data.train]).argmax())
    rows, kept_probe = [], None
    plan = [(k, r) for k in shots for r in range(1 if k is None else repeats)]
    for k, r in tqdm(plan, desc="few-shot", unit="fit", leave=False, disable=None):
        idx = sample_shots(y, data.train, k, seed + 1000 * r + (k or 0))
        base = {"shots": "all" if k is None else k, "repeat": r, "n_train": int(len(idx))}
        probe = fit_probe(feats[idx], y[idx], len(labels))  # also the full fine-tuning's first head
        if "probe" in methods:
            rows.append({"method": "probe", **base, **scores(y[test], predict_probe(probe, feats[test], commonest))})
            if r == 0:
                kept_probe = (probe, base["shots"])
        if "full" in methods:
            visual, head = finetune_full(model, probe_head(probe, len(labels)) or zero_head, data, idx,
                                         steps=full_steps, lr=lr, backbone_lr=backbone_lr, seed=seed + r)
            rows.append({"method": "full", **base, **scores(y[test], predict_full(visual, head, data, test))})
    summary = []
    for method in [m for m in METHODS if m in methods]:
        for k in shots:
            sel = [row for row in rows if row["method"] == method and row["shots"] == ("all" if k is None else k)]
            acc = np.array([row["accuracy"] for row in sel])
            bacc = np.array([row["balanced_accuracy"] for row in sel])
            summary.append({"method": method, "shots": sel[0]["shots"], "runs": len(sel),
                            "n_train": int(np.mean([row["n_train"] for row in sel])),
                            "accuracy": float(acc.mean()), "accuracy_std": float(acc.std()),
                            "balanced_accuracy": float(bacc.mean()), "balanced_accuracy_std": float(bacc.std())})
    return {"labels": labels, "template": template, "n_train_pool": int(len(data.train)),
            "n_test": int(len(test)), "test_class_counts": np.bincount(y[test], minlength=len(labels)).tolist(),
            "zero_shot": zero, "rows": rows, "summary": summary, "probe": kept_probe}


# --- outputs ---------------------------------------------------------------------------------
def format_table(result: dict, metric: str = "balanced_accuracy") -> list[str]:
    lines = [f"held-out split: {result['n_test']} studies (per class {result['test_class_counts']}); "
             f"training pool {result['n_train_pool']}; metric: {metric.replace('_', ' ')}",
             f"{'method':<8} {'shots/class':>11} {'runs':>4} {'n_train':>7} {metric.replace('_', ' '):>18}",
             f"{'zero-shot':<8} {'0':>11} {1:>4} {0:>7} {result['zero_shot'][metric]:>18.3f}"]
    for s in result["summary"]:
        spread = f" ± {s[metric + '_std']:.3f}" if s["runs"] > 1 else ""
        lines.append(f"{s['method']:<8} {str(s['shots']):>11} {s['runs']:>4} {s['n_train']:>7} "
                     f"{s[metric]:>10.3f}{spread:>8}")
    return lines


def plot_curve(result: dict, path: str | Path, metric: str = "balanced_accuracy") -> Path:
    """Score against shots per class (log axis; 'all' at the right), zero-shot as a dashed line."""
    import matplotlib  # lazy: only drawing imports pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = [s["shots"] for s in result["summary"]]
    numeric = [s for s in shots if s != "all"]
    all_x = (max(numeric) * 2 if numeric else 1) if "all" in shots else None
    fig, ax = plt.subplots(figsize=(5, 3.4))
    names = {"probe": "linear probe", "full": "full fine-tuning"}
    for method in dict.fromkeys(s["method"] for s in result["summary"]):
        sel = [s for s in result["summary"] if s["method"] == method]
        xs = [all_x if s["shots"] == "all" else s["shots"] for s in sel]
        ax.errorbar(xs, [s[metric] for s in sel], yerr=[s[metric + "_std"] for s in sel], marker="o",
                    capsize=3, label=names.get(method, method))
    ax.axhline(result["zero_shot"][metric], color="grey", linestyle="--", label="zero-shot")
    ax.set_xscale("log")
    ticks = sorted({all_x if s == "all" else s for s in shots})
    ax.set_xticks(ticks)
    ax.set_xticklabels(["all" if t == all_x else str(t) for t in ticks])
    ax.set_xlabel("labelled studies per class")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_outputs(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """``fewshot.md`` (the table), ``fewshot.json`` (every run), ``fewshot.png`` (the curve) and
    ``probe.json`` (the probe on the largest shot count: weights over the normalised embedding)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "fewshot.md", "json": out / "fewshot.json", "png": out / "fewshot.png"}
    table = format_table(result)
    paths["table"].write_text("# Few-shot classification\n\n```\n" + "\n".join(table) + "\n```\n")
    public = {k: v for k, v in result.items() if k != "probe"}
    paths["json"].write_text(json.dumps(public, indent=2))
    plot_curve(result, paths["png"])
    if result.get("probe") and result["probe"][0] is not None:
        probe, shots = result["probe"]
        paths["probe"] = out / "probe.json"
        classes = [result["labels"][int(c)] for c in probe.classes_]
        coef, intercept = probe.coef_, probe.intercept_
        if len(classes) == 2 and coef.shape[0] == 1:  # sklearn's binary form: one row for class 1
            coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
        paths["probe"].write_text(json.dumps({
            "classes": classes, "shots": shots, "input": "L2-normalised HLIP study embedding",
            "weight": coef.tolist(), "bias": intercept.tolist()}, indent=2))
    return paths
