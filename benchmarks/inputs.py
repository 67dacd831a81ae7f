"""What the model sees: sharpness, saturated bone and a bleed's visibility at the model input.

    python -m benchmarks.inputs DATA [--overrides "data.fit=crop data.target_spacing=[5,2.4,2.4]"] [--studies 40] [--json OUT]

Preprocesses scans of every cohort of a phantom consortium (up to ``--studies`` studies each; all
held-out CT studies) as training would, and reports on the [0, 1] intensity scale:

* sharpness per cohort: the 99th percentile of the in-plane gradient magnitude inside the head. If
  it differs between sites, sharpness alone names the site (scanner grids resampled by different
  factors); ``sharpness AUC`` is how well it tells the two CT sites apart, and the training CT
  sites from the held-out CT scanner (0.5: not at all; 1.0: perfectly);
* CT saturation: the share of head voxels at >= 0.95 of the window (bone when it is kept);
* a bleed's visibility with no parameters: the share of head voxels between 0.68 and 0.9 of the
  brain window (fresh blood) scores held-out CT haemorrhage by AUC. A halo of blood-valued voxels
  around the skull adds the same share to every CT and drowns it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, table, write_json

BLOOD = (0.68, 0.9)


def scan_figures(x) -> dict:
    """Sharpness, saturation and the blood-valued share of one model input on the [0, 1] scale."""
    import numpy as np

    head = x > 0.05
    gy, gx = np.gradient(x, axis=(1, 2))
    grad = np.hypot(gy, gx)[head]
    inside = x[head]
    return {"grad99": float(np.percentile(grad, 99)) if grad.size else 0.0,
            "saturated": float((inside >= 0.95).mean()) if inside.size else 0.0,
            "blood_share": float(((inside >= BLOOD[0]) & (inside <= BLOOD[1])).mean()) if inside.size else 0.0}


def separability(a: list[float], b: list[float]) -> float:
    """AUC of telling ``a`` from ``b`` by the value alone, folded so 0.5 is chance and 1.0 perfect."""
    from sklearn.metrics import roc_auc_score

    if not a or not b:
        return float("nan")
    auc = roc_auc_score([0] * len(a) + [1] * len(b), list(a) + list(b))
    return float(max(auc, 1.0 - auc))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="consortium folder (from `hlip-fed synth`)")
    parser.add_argument("--config", default="benchmark", help="run preset or YAML")
    parser.add_argument("--overrides", default="", help="space-separated dotted config overrides")
    parser.add_argument("--studies", type=int, default=40, help="studies per site (held-out: every CT study)")
    parser.add_argument("--json", help="write the figures as JSON here")
    args = parser.parse_args(argv)

    import numpy as np
    from sklearn.metrics import roc_auc_score

    from hlip_fed.config import load_config
    from hlip_fed.data.preprocess import preprocess, unit_intensity
    from hlip_fed.data.readers import read_scan
    from hlip_fed.errors import HlipError
    from hlip_fed.synth.truth import cohorts, load_records, site_dir

    try:
        cfg = load_config(files=[args.config] if args.config else [], overrides=shlex.split(args.overrides))
        names = cohorts(args.data) + ["heldout"]
    except HlipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    img = cfg.model.vision.img_size
    per_scan: dict[str, list[dict]] = {}
    for name in names:
        records = load_records(args.data, name)
        if name == "heldout":
            records = [r for r in records if r["modality"] == "CT"]
        else:
            records = records[: args.studies]
        rows = per_scan.setdefault(name, [])
        for r in records:
            for scan in r["scans"]:
                vol = read_scan(site_dir(args.data, name) / r["split"] / r["study_id"] / scan["name"])
                x = unit_intensity(preprocess(vol, cfg.data, img)[0].numpy(), cfg.data)
                rows.append({**scan_figures(x), "modality": r["modality"],
                             "haemorrhage": int(r["labels"].get("haemorrhage", 0))})
        print(f"{name}: {len(rows)} scans", file=sys.stderr, flush=True)

    summary = []
    for name, rows in per_scan.items():
        summary.append({"cohort": name, "modality": rows[0]["modality"] if rows else "", "scans": len(rows),
                        "grad99": float(np.mean([r["grad99"] for r in rows])),
                        "saturated": float(np.mean([r["saturated"] for r in rows])),
                        "blood_share": float(np.mean([r["blood_share"] for r in rows]))})
    ct_sites = [n for n in per_scan if n != "heldout" and per_scan[n] and per_scan[n][0]["modality"] == "CT"]
    grads = {n: [r["grad99"] for r in per_scan[n]] for n in per_scan}
    held = per_scan.get("heldout", [])
    y = [r["haemorrhage"] for r in held]
    figures = {
        "sharpness_auc_ct_sites": separability(*(grads[n] for n in ct_sites[:2])) if len(ct_sites) >= 2 else None,
        "sharpness_auc_train_vs_heldout_ct": separability(sum((grads[n] for n in ct_sites), []), grads.get("heldout", [])),
        "heldout_ct_bleed_share_auc": float(roc_auc_score(y, [r["blood_share"] for r in held])) if 0 < sum(y) < len(y) else None,
    }
    print(f"Model inputs of {args.data} (overrides: {args.overrides or 'none'}; fit {cfg.data.fit}, target spacing "
          f"{cfg.data.target_spacing}, CT bone above {cfg.data.ct_bone_hu} HU masked)\n")
    print(table(summary, [("cohort", "cohort", ""), ("modality", "modality", ""), ("scans", "scans", "d"),
                          ("grad99", "sharpness (p99 gradient)", ".3f"), ("saturated", "share >= 0.95", ".4f"),
                          ("blood_share", "share in blood range", ".4f")]))
    print()
    print(table([{"what": k, "value": v} for k, v in figures.items()], [("what", "figure", ""), ("value", "value", ".3f")]))
    write_json(args.json, {"machine": machine(), "data": str(args.data), "overrides": args.overrides,
                           "cohorts": summary, **figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
