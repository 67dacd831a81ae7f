"""A learnability probe: simple supervised classifiers on model-input images of the consortium.

The benchmark must be neither trivial nor hopeless. This probe reads every study the way training
does (reader, then preprocessing to the tiny model's input size), reduces each contrast to a few
generic image statistics (an intensity histogram of the central head region, quantiles of
small-block means and of their left-right differences), and fits one logistic regression per
finding. It is deliberately weak and generic: it knows nothing about where or how the generator
draws lesions.

``heldout_cv``: 5-fold cross-validation within the held-out set (balanced, independent findings,
no site shift): can the findings be learnt from the images at all? ``pooled``: trained on the
training studies of every site together; ``local``: trained on one site's training studies only;
both scored (ROC AUC) on the held-out set, where site case mix and scanners no longer match.

:func:`lesion_conspicuity` asks the question behind a weak probe: at the model's input, how far
does each focal lesion stand out from the brain's normal left-right asymmetry at the same place?
For a lesion's mask, ``d`` = mean absolute difference between the image and its left-right mirror
inside the mask (absolute, so that a lesion with bright and dark parts - an enhancing rim around
a necrotic core - does not cancel); the same mask laid on every normal study of the same contrast
gives a null distribution of ``d``; the lesion's z-score is ``(d - mean) / sd`` of that null.
The z-score is a hard yardstick: heads are neither centred nor straight (table position, head
rotation), so a normal brain's mirror difference is large wherever tissue boundaries are.
Beside it, ``median_contrast`` is the plain signed contrast on the model's [0, 1] intensity
scale: mean inside the lesion minus mean in the mirrored region.

:func:`located_detector` asks how far a detector could go that is told where each lesion is: the
lesion's own mask laid on its scans and on the scans without the finding, each pair compared.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hlip_fed.config import DataConfig
from hlip_fed.data.preprocess import preprocess, to_model_grid, unit_intensity
from hlip_fed.data.readers import read_scan
from hlip_fed.data.volume import make_volume
from hlip_fed.synth.findings import FINDINGS
from hlip_fed.synth.truth import cohorts, load_records, site_dir

SEQUENCES = ("T1", "T2", "FLAIR", "T1C", "CT")
_QUANTILES = (0.5, 2.0, 50.0, 98.0, 99.5)


def _pool(x: np.ndarray, k: tuple[int, int, int] = (2, 4, 4)) -> np.ndarray:
    d, h, w = (s // f * f for s, f in zip(x.shape, k))
    x = x[:d, :h, :w]
    return x.reshape(d // k[0], k[0], h // k[1], k[1], w // k[2], k[2]).mean(axis=(1, 3, 5))


def scan_features(x: np.ndarray) -> np.ndarray:
    """Generic statistics of one scan ``x`` [D, H, W] (canonical axes: depth, A-P, R-L).

    An intensity histogram of the central head region, quantiles of small-block means, and
    quantiles of the left-right difference of block means (focal disease is asymmetric; ageing
    and head size are not).
    """
    d, h, w = x.shape
    core = x[d // 6: d - d // 8, h // 8: h - h // 8, w // 8: w - w // 8]
    inner = x[d // 5: d - d // 6, h // 5: h - h // 5, w // 5: w - w // 5]  # inside the skull
    hist = np.histogram(core, bins=np.linspace(0.0, 1.0, 21))[0] / core.size
    blocks = _pool(inner, (2, 3, 3))
    asym = blocks - blocks[:, :, ::-1]
    return np.concatenate([
        hist, np.percentile(blocks, _QUANTILES), np.percentile(asym, _QUANTILES),
        [core.mean(), core.std(), np.abs(asym).mean(), blocks.std()],
    ]).astype(np.float32)


def study_features(study_dir: Path, scans: list[dict], data_cfg, img_size) -> np.ndarray:
    """Per-contrast features, zeros plus a missing flag for contrasts the study lacks.

    Intensities are the model's, before its scalar normalisation: CT in the model's HU window (by
    default the brain window a radiologist reads a head CT in), MR after percentile scaling.
    """
    per = {}
    for scan in scans:
        seq = scan["sequence"]
        if seq in per:
            continue
        x = unit_intensity(preprocess(read_scan(study_dir / scan["name"]), data_cfg, img_size)[0].numpy(), data_cfg)
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
    if len(set(yte)) < 2:
        return float("nan")
    if len(set(ytr)) < 2:  # a site that never saw the finding cannot rank it
        return 0.5
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
    model.fit(Xtr, ytr)
    return float(roc_auc_score(yte, model.predict_proba(Xte)[:, 1]))


def _mean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def run_probe(consortium_dir: str | Path, img_size=(32, 96, 96), data_cfg: DataConfig | None = None) -> dict:
    """AUC per finding on the held-out set for the pooled probe and each site's local probe."""
    root = Path(consortium_dir)
    cfg = data_cfg or DataConfig()
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
        aucs["mean"] = _mean([aucs[f] for f in FINDINGS])
        return aucs

    def cross_validated() -> dict[str, float]:
        """5-fold CV within the held-out set: learnability without any site shift."""
        aucs = {}
        for i, f in enumerate(FINDINGS):
            y = Yh[:, i]
            if min(y.sum(), len(y) - y.sum()) < 5:
                aucs[f] = float("nan")
                continue
            folds = StratifiedKFold(5, shuffle=True, random_state=0).split(Xh, y)
            aucs[f] = float(np.mean([_fit_auc(Xh[tr], y[tr], Xh[te], y[te]) for tr, te in folds]))
        aucs["mean"] = _mean([aucs[f] for f in FINDINGS])
        return aucs

    result = {"heldout_cv": cross_validated(), "pooled": score(list(tables)),
              "local": {name: score([name]) for name in tables},
              "heldout_positives": {f: int(Yh[:, i].sum()) for i, f in enumerate(FINDINGS)},
              "heldout_studies": int(len(Yh))}
    return result


def format_result(result: dict) -> str:
    head = f"{'probe (held-out AUC)':<28}" + "".join(f"{f:>13}" for f in FINDINGS) + f"{'mean':>8}"
    lines = [head, "-" * len(head)]

    def row(name: str, aucs: dict) -> str:
        return f"{name:<28}" + "".join(f"{aucs[f]:>13.3f}" for f in FINDINGS) + f"{aucs['mean']:>8.3f}"

    lines.append(row("held-out 5-fold CV", result["heldout_cv"]))
    lines.append(row("pooled (all sites)", result["pooled"]))
    for name, aucs in result["local"].items():
        lines.append(row(f"local: {name}", aucs))
    lines.append(f"held-out: {result['heldout_studies']} studies; positives "
                 + ", ".join(f"{k} {v}" for k, v in result["heldout_positives"].items()) + "\n")
    return "\n".join(lines)


FOCAL = ("mass", "haemorrhage", "infarct")


def model_masks(path: Path, img_size, data_cfg) -> dict[str, np.ndarray]:
    """Each focal finding's truth mask (bit ``FINDINGS.index(f)``) resampled like the scans."""
    img = nib.load(str(path))
    bits = np.asarray(img.dataobj).astype(np.uint8)
    out = {}
    for f in FOCAL:
        m = ((bits >> FINDINGS.index(f)) & 1).astype(np.float32)
        if m.any():
            vol = make_volume(m, img.affine, "MR", str(path))
            out[f] = to_model_grid(torch.from_numpy(vol.array)[None, None], vol.spacing, data_cfg, img_size)[0, 0].numpy() > 0.5
    return out


def _asymmetry(x: np.ndarray) -> np.ndarray:
    """Absolute difference between ``x`` and its left-right mirror (canonical W axis)."""
    return np.abs(x - x[:, :, ::-1])


def model_input_studies(consortium_dir: str | Path, cohort: str, img_size=(32, 96, 96),
                        data_cfg: DataConfig | None = None) -> list[dict]:
    """Every study of ``cohort`` as the model reads it: ``{"labels", "masks": {finding: bool mask},
    "scans": [(sequence, image on the [0, 1] scale)]}`` (preprocessed with ``data_cfg``, by default
    :class:`DataConfig`'s defaults)."""
    root, cfg = Path(consortium_dir), data_cfg or DataConfig()
    base = site_dir(root, cohort)
    studies = []
    for r in load_records(root, cohort):
        folder = base / r["split"] / r["study_id"]
        images = [preprocess(read_scan(folder / s["name"]), cfg, img_size)[0].numpy() for s in r["scans"]]
        scans = [(s["sequence"], unit_intensity(x, cfg)) for s, x in zip(r["scans"], images)]
        masks = model_masks(root / "truth" / "masks" / cohort / f"{r['study_id']}.nii.gz", img_size, cfg)
        studies.append({"labels": r["labels"], "masks": masks, "scans": scans})
    return studies


def lesion_conspicuity(studies: list[dict], min_null: int = 5) -> dict:
    """``{finding: {sequence: {"n", "median_z", "frac_z_above_3", "median_contrast"}}}`` over
    ``studies`` (:func:`model_input_studies`' output: the model's input).

    A lesion is scored only against at least ``min_null`` normal scans of its contrast.
    """
    scans = []  # (sequence, is_normal, left-right asymmetry map, masks)
    contrast: dict[tuple[str, str], list[float]] = {}
    for study in studies:
        masks = study["masks"]
        normal = not any(study["labels"][f] for f in FOCAL)
        for seq, x in study["scans"]:
            scans.append((seq, normal, _asymmetry(x), masks))
            for f, mask in masks.items():
                if mask.any():
                    shift = float(x[mask].mean() - x[mask[:, :, ::-1]].mean())
                    contrast.setdefault((f, seq), []).append(shift)
    z: dict[tuple[str, str], list[float]] = {}
    for seq, _, asym, masks in scans:
        for f, mask in masks.items():
            if not mask.any():
                continue
            null = [float(a[mask].mean()) for s2, normal, a, _ in scans if normal and s2 == seq]
            if len(null) < max(min_null, 2) or np.std(null) == 0:
                continue
            z.setdefault((f, seq), []).append((float(asym[mask].mean()) - float(np.mean(null))) / float(np.std(null)))
    out: dict[str, dict] = {}
    for (f, seq), values in sorted(z.items()):
        v = np.array(values)
        out.setdefault(f, {})[seq] = {"n": int(len(v)), "median_z": float(np.median(v)),
                                      "frac_z_above_3": float(np.mean(v > 3)),
                                      "median_contrast": float(np.median(contrast[(f, seq)]))}
    return out


def _study_auc(pairs: list[tuple[float, np.ndarray]]) -> float | None:
    """The share of (positive, negative) study pairs the positive wins, ties counting half."""
    wins = sum(float((p > n).sum() + 0.5 * (p == n).sum()) for p, n in pairs)
    count = sum(len(n) for _, n in pairs)
    return wins / count if count else None


def located_aucs(studies: list[dict], finding: str) -> dict:
    """How well a detector told where each lesion of ``finding`` is ranks it, per contrast and per study.

    ``studies``: ``{"labels": {finding: 0|1}, "masks": {finding: bool [D, H, W]}, "scans": [(sequence,
    image [D, H, W])]}`` on one grid. Each positive study's own mask is laid on its scans and on every
    scan of the same contrast in the studies without the finding, and each pair (the lesion's scan, a
    scan without it) is compared, ties counting half:

    * ``asymmetry``: the mean absolute mirror difference inside the mask (higher is the lesion);
    * ``contrast``: the mean inside the mask minus the mirrored region's, folded (the better of the
      two directions), so an upper estimate for a detector that knows each contrast's direction too.

    At the study level each scan's figure is standardised against the negatives' scans of its
    contrast under that mask (the contrast turned the way its contrast's pairs favour) and a study
    is scored by its highest scan: ``study`` (asymmetry) and ``study_contrast``.

    Returns ``{"n_pos", "n_neg", "study", "study_contrast", "per_contrast": {sequence: {"pairs",
    "asymmetry", "contrast"}}}``; a study AUC is None where there is no pair.
    """
    pos = [s for s in studies if s["labels"][finding] and finding in s["masks"] and s["masks"][finding].any()]
    neg = [s for s in studies if not s["labels"][finding]]
    laid = []  # per positive: [(sequence, its asymmetry, its contrast, negative study index, theirs, theirs)]
    for p in pos:
        mask = p["masks"][finding]
        inside, mirrored = np.flatnonzero(mask), np.flatnonzero(mask[:, :, ::-1])

        def stats(x: np.ndarray) -> tuple[float, float]:
            a, b = x.reshape(-1)[inside], x.reshape(-1)[mirrored]
            return float(np.abs(a - b).mean()), float(a.mean() - b.mean())

        neg_stats: dict[str, list] = {}
        for i, n in enumerate(neg):
            for seq, x in n["scans"]:
                neg_stats.setdefault(seq, []).append((i, *stats(x)))
        laid.append([(seq, *stats(x), *(np.array(v) for v in zip(*neg_stats[seq])))
                     for seq, x in p["scans"] if seq in neg_stats])
    wins: dict[str, np.ndarray] = {}  # sequence -> [asymmetry wins, contrast wins, pairs]
    for scans in laid:
        for seq, a, c, _, na, nc in scans:
            wins.setdefault(seq, np.zeros(3))
            wins[seq] += [(a > na).sum() + 0.5 * (a == na).sum(), (c > nc).sum() + 0.5 * (c == nc).sum(), len(na)]
    sign = {seq: 1.0 if w[1] >= w[2] - w[1] else -1.0 for seq, w in wins.items()}

    def best_per_study(scans: list, column: int) -> tuple[float, np.ndarray]:
        pos_best, neg_best = -np.inf, np.full(len(neg), -np.inf)
        for scan in scans:
            seq, mine, theirs, idx = scan[0], scan[column], scan[column + 3], scan[3].astype(int)
            turn = sign[seq] if column == 2 else 1.0
            mu, sd = theirs.mean(), theirs.std() or 1.0
            pos_best = max(pos_best, turn * (mine - mu) / sd)
            np.maximum.at(neg_best, idx, turn * (theirs - mu) / sd)
        return pos_best, neg_best[np.isfinite(neg_best)]

    per = {seq: {"pairs": int(w[2]), "asymmetry": float(w[0] / w[2]),
                 "contrast": float(max(w[1], w[2] - w[1]) / w[2])} for seq, w in sorted(wins.items())}
    return {"n_pos": len(pos), "n_neg": len(neg), "per_contrast": per,
            "study": _study_auc([best_per_study(scans, 1) for scans in laid if scans]),
            "study_contrast": _study_auc([best_per_study(scans, 2) for scans in laid if scans])}


def located_detector(studies: list[dict]) -> dict:
    """:func:`located_aucs` of every focal finding over ``studies`` (:func:`model_input_studies`' output)."""
    return {f: located_aucs(studies, f) for f in FOCAL}


def format_located(result: dict) -> str:
    lines = ["| finding | contrast | pairs | asymmetry AUC | contrast AUC (folded) |", "|---|---|---:|---:|---:|"]
    for f, r in result.items():
        for seq, c in r["per_contrast"].items():
            lines.append(f"| {f} | {seq} | {c['pairs']} | {c['asymmetry']:.3f} | {c['contrast']:.3f} |")
        study, turned = ("–" if v is None else f"{v:.3f}" for v in (r["study"], r["study_contrast"]))
        lines.append(f"| {f} | study ({r['n_pos']} positives, {r['n_neg']} negatives) | | {study} | {turned} |")
    return "\n".join(lines)


def format_conspicuity(result: dict) -> str:
    lines = ["| finding | contrast | lesions | median z | share with z > 3 | median contrast |",
             "|---|---|---:|---:|---:|---:|"]
    for f, per in result.items():
        for seq, r in per.items():
            lines.append(f"| {f} | {seq} | {r['n']} | {r['median_z']:.1f} | {r['frac_z_above_3']:.2f} "
                         f"| {r['median_contrast']:+.3f} |")
    return "\n".join(lines)
