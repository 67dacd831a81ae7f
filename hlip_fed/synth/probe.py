"""A learnability probe: simple supervised classifiers on model-input images of the consortium.

The benchmark must be neither trivial nor hopeless. This probe reads every study the way training
does (reader, then preprocessing to the tiny model's input size), reduces each contrast to a few
generic image statistics (an intensity histogram of the central head region, a left-right
asymmetry histogram and coarse block means), and fits one logistic regression per finding. It is
deliberately weak and generic: it knows nothing about where or how the generator draws lesions.

``pooled``: trained on the training studies of every site together; ``local``: trained on one
site's training studies only. Both are scored (ROC AUC) on the held-out public set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hlip_fed.synth.findings import FINDINGS
from hlip_fed.synth.truth import cohorts, load_records, site_dir

SEQUENCES = ("T1", "T2", "FLAIR", "T1C", "CT")
_HIST_BINS = np.linspace(0.0, 1.0, 17)
_ASYM_BINS = np.array([0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 1.01])


def scan_features(x: np.ndarray) -> np.ndarray:
    """Statistics of one preprocessed scan ``x`` [D, H, W] in [0, 1]."""
    d, h, w = x.shape
    core = x[d // 5: d - d // 8, h // 8: h - h // 8, w // 8: w - w // 8]
    hist = np.histogram(core, bins=_HIST_BINS)[0] / core.size
    asym = np.abs(core - core[:, :, ::-1])
    ahist = np.histogram(asym, bins=_ASYM_BINS)[0] / asym.size
    blocks = core[: core.shape[0] // 4 * 4, : core.shape[1] // 6 * 6, : core.shape[2] // 6 * 6]
    bd, bh, bw = blocks.shape
    coarse = blocks.reshape(4, bd // 4, 6, bh // 6, 6, bw // 6).mean(axis=(1, 3, 5)).ravel()
    return np.concatenate([hist, ahist, [core.mean(), core.std(), asym.mean()], coarse]).astype(np.float32)


def study_features(study_dir: Path, scans: list[dict], data_cfg, img_size) -> np.ndarray:
    """Per-contrast features, zeros plus a missing flag for contrasts the study lacks."""
    from hlip_fed.data.preprocess import preprocess
    from hlip_fed.data.readers import read_scan

    per = {}
    for scan in scans:
        seq = scan["sequence"]
        if seq in per:
            continue
        x = preprocess(read_scan(study_dir / scan["name"]), data_cfg, img_size)[0].numpy()
        per[seq] = scan_features(x)
    size = len(scan_features(np.zeros(img_size, dtype=np.float32)))
    parts = []
    for seq in SEQUENCES:
        parts.append(per.get(seq, np.zeros(size, dtype=np.float32)))
        parts.append(np.array([seq in per], dtype=np.float32))
    return np.concatenate(parts)


def cohort_table(root: Path, cohort: str, data_cfg, img_size) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features, labels [n, len(FINDINGS)] and splits of every study of a cohort."""
    recs = load_records(root, cohort)
    base = site_dir(root, cohort)
    X = np.stack([study_features(base / r["split"] / r["study_id"], r["scans"], data_cfg, img_size) for r in recs])
    Y = np.array([[r["labels"][n] for n in FINDINGS] for r in recs])
    return X, Y, [r["split"] for r in recs]


def _fit_auc(Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, yte: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(yte)) < 2:
        return float("nan")
    if len(set(ytr)) < 2:  # a site that never saw the finding cannot rank it
        return 0.5
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
    model.fit(Xtr, ytr)
    return float(roc_auc_score(yte, model.predict_proba(Xte)[:, 1]))


def run_probe(consortium_dir: str | Path, img_size=(32, 96, 96)) -> dict:
    """AUC per finding on the held-out set for the pooled probe and each site's local probe."""
    from hlip_fed.config import DataConfig

    root = Path(consortium_dir)
    cfg = DataConfig()
    tables = {name: cohort_table(root, name, cfg, img_size) for name in cohorts(root)}
    Xh, Yh, _ = cohort_table(root, "heldout", cfg, img_size)

    def train_part(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        Xs, Ys = [], []
        for name in names:
            X, Y, splits = tables[name]
            keep = np.array([s == "train" for s in splits])
            Xs.append(X[keep])
            Ys.append(Y[keep])
        return np.concatenate(Xs), np.concatenate(Ys)

    def score(names: list[str]) -> dict[str, float]:
        Xtr, Ytr = train_part(names)
        aucs = {f: _fit_auc(Xtr, Ytr[:, i], Xh, Yh[:, i]) for i, f in enumerate(FINDINGS)}
        aucs["mean"] = float(np.nanmean([aucs[f] for f in FINDINGS]))
        return aucs

    result = {"pooled": score(list(tables)), "local": {name: score([name]) for name in tables},
              "heldout_positives": {f: int(Yh[:, i].sum()) for i, f in enumerate(FINDINGS)},
              "heldout_studies": int(len(Yh))}
    return result


def format_result(result: dict) -> str:
    head = f"{'probe (held-out AUC)':<28}" + "".join(f"{f:>13}" for f in FINDINGS) + f"{'mean':>8}"
    lines = [head, "-" * len(head)]

    def row(name: str, aucs: dict) -> str:
        return f"{name:<28}" + "".join(f"{aucs[f]:>13.3f}" for f in FINDINGS) + f"{aucs['mean']:>8.3f}"

    lines.append(row("pooled (all sites)", result["pooled"]))
    for name, aucs in result["local"].items():
        lines.append(row(f"local: {name}", aucs))
    lines.append(f"held-out: {result['heldout_studies']} studies; positives "
                 + ", ".join(f"{k} {v}" for k, v in result["heldout_positives"].items()))
    return "\n".join(lines)
