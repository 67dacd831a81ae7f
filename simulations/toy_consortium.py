"""A toy consortium in the site layout, for tests and benchmarks that need real files fast.

Each study is one or two small NIfTI MR scans of noise with, or without, a bright block on the
left or right, and a report that says which. Ground truth and zero-shot prompts sit outside the
site folders, as in the phantom consortium (:mod:`hlip_fed.synth`), which is the realistic one.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

PROMPTS = {
    "lesion-left": ["nothing abnormal on the left side", "a left-sided hyperintense focus"],
    "lesion-right": ["nothing abnormal on the right side", "a right-sided hyperintense focus"],
}


def write_consortium(root: str | Path, sites: int, train: int = 8, test: int = 2, heldout: int = 4,
                     shape=(48, 48, 16), max_scans: int = 2, seed: int = 0) -> Path:
    """A consortium folder in the site layout (NIfTI MR scans with or without a bright blob on one
    side, a report saying so, ground truth and prompts outside the site folders)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    words = {0: "No focal abnormality.", 1: "Bright lesion in the left hemisphere.",
             2: "Bright lesion in the right hemisphere."}
    x, y, z = shape

    def study(folder: Path, kind: int) -> dict:
        folder.mkdir(parents=True)
        vol = rng.normal(100, 10, shape).astype(np.float32)
        if kind:
            x0 = x // 8 if kind == 1 else x // 2 + x // 8
            vol[x0:x0 + x // 4, y // 3:2 * y // 3, z // 4:3 * z // 4] += 200
        for i in range(1 + int(rng.integers(0, max_scans))):
            img = nib.Nifti1Image(vol + rng.normal(0, 5, shape).astype(np.float32), np.diag([2.0, 2.0, 4.0, 1.0]))
            nib.save(img, folder / f"scan{i}.nii.gz")
            (folder / f"scan{i}.json").write_text(json.dumps({"modality": "MR", "sequence": "T1"}))
        (folder / "report.txt").write_text(words[kind])
        return {"lesion-left": int(kind == 1), "lesion-right": int(kind == 2)}

    (root / "truth").mkdir(parents=True)
    for s in range(sites):
        rows = []
        for split, n in (("train", train), ("test", test)):
            for i in range(n):
                sid = f"s{s}-{split}-{i}"
                rows.append({"study_id": sid, "split": split,
                             "labels": study(root / "sites" / f"site{s}" / split / sid, i % 3)})
        (root / "truth" / f"site{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{"study_id": f"h{i}", "split": "test", "labels": study(root / "heldout" / "test" / f"h{i}", i % 3)}
            for i in range(heldout)]
    (root / "truth" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prompts.json").write_text(json.dumps(PROMPTS))
    return root
