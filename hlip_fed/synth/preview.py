"""A picture of the consortium: one example study per site, every contrast, lesions outlined.

Reads the files back the way training does (``hlip_fed.data.readers.read_scan``), so the picture
shows what is actually on disk: one row per site (plus the held-out set), one column per contrast,
the axial slice through the study's largest lesion, the truth mask outlined in red and the row
labelled with what the report says. A person can check at a glance that it looks like a head and
that the lesions are where the reports put them.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np

from hlip_fed.data.readers import read_scan
from hlip_fed.data.volume import make_volume
from hlip_fed.synth.consortium import HELDOUT
from hlip_fed.synth.findings import FINDINGS
from hlip_fed.synth.truth import load_consortium, load_records

COLUMNS = ("T1", "T2", "FLAIR", "T1C", "CT")


def _pick(records: list[dict]) -> dict:
    """The study with the most scans among those with the most focal findings."""
    def score(r: dict) -> tuple:
        focal = sum(r["labels"][n] for n in ("mass", "haemorrhage", "infarct"))
        return (focal > 0, len({s["sequence"] for s in r["scans"]}), focal, r["study_id"])
    return max(records, key=score)


def _caption(rec: dict) -> str:
    parts = []
    for f in rec["findings"]:
        if f["name"] == "atrophy":
            parts.append(f"{f.get('severity', '')} atrophy")
        else:
            parts.append(f"{f['laterality']} {f['region']} {f['name']}" + (f" ({f['territory']})" if f.get("territory") else ""))
    return "; ".join(parts) or "normal"


def render_preview(consortium_dir: str | Path, out_png: str | Path, dpi: int = 60) -> Path:
    """Write the overview PNG and return its path."""
    import matplotlib  # lazy: only drawing imports pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(consortium_dir)
    desc = load_consortium(root)
    rows = [(s["name"], f"sites/{s['name']}", s["kind"]) for s in desc["sites"]] + [(HELDOUT, HELDOUT, "public evaluation set")]
    fig, axes = plt.subplots(len(rows), len(COLUMNS), figsize=(1.9 * len(COLUMNS), 2.0 * len(rows)))
    axes = np.atleast_2d(axes)
    for r, (cohort, rel, kind) in enumerate(rows):
        rec = _pick(load_records(root, cohort))
        folder = root / rel / rec["split"] / rec["study_id"]
        mask_img = nib.load(str(root / "truth" / "masks" / cohort / f"{rec['study_id']}.nii.gz"))
        mask = make_volume(np.asarray(mask_img.dataobj), mask_img.affine, "MR", "mask").array.astype(np.uint8)
        focal = mask & sum(1 << FINDINGS.index(n) for n in ("mass", "haemorrhage", "infarct"))
        z = int(np.argmax((focal > 0).sum(axis=(1, 2)))) if focal.any() else mask.shape[0] // 2 + 2
        shown = {}
        for scan in rec["scans"]:
            if scan["sequence"] not in shown:
                shown[scan["sequence"]] = folder / scan["name"]
        for c, seq in enumerate(COLUMNS):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if r == 0:
                ax.set_title(seq, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{cohort}\n({kind})", fontsize=7)
            if seq not in shown:
                continue
            vol = read_scan(shown[seq])
            img = vol.array[min(z, vol.shape[0] - 1)]
            lo, hi = (0.0, 80.0) if seq == "CT" else np.percentile(vol.array, (1, 99.5))
            ax.imshow(np.clip(img, lo, hi)[:, ::-1], cmap="gray", origin="lower", vmin=lo, vmax=hi)
            if vol.shape == mask.shape and focal[z].any():
                ax.contour((focal[z] > 0)[:, ::-1].astype(float), levels=[0.5], colors="red", linewidths=0.6, origin="lower")
        axes[r, len(COLUMNS) - 1].text(
            1.04, 0.5, "\n".join(textwrap.wrap(f"{rec['study_id']}: {_caption(rec)}", 26)),
            transform=axes[r, len(COLUMNS) - 1].transAxes, fontsize=6.5, va="center")
    fig.suptitle("Phantom consortium: one study per site (axial, radiological view; red = truth mask)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.86, 0.97))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
