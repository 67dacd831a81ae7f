"""Shared fixtures. Tests stay small: the tiny preset, a tiny random BERT, one torch thread."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download during tests
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import pytest
import torch

torch.set_num_threads(1)

TINY_BERT = [
    "model.text.pretrained=false",
    "model.text.overrides={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}",
]


@pytest.fixture
def tiny_cfg():
    """The tiny preset with a one-layer random BERT on MiniLM's vocabulary (fast to build)."""
    from hlip_fed.config import load_config

    return load_config("tiny", overrides=TINY_BERT)


# A federation small enough for CI: 16x32x32 scans (8 patch tokens each), a one-layer text tower.
FAST_RUN = TINY_BERT + [
    "model.vision.img_size=[16, 32, 32]",
    "federation.local_steps=2",
    "federation.rounds=2",
    "federation.min_nodes=3",
    "train.batch_size=2",
    "train.warmup_steps=1",
]

FINDINGS = ("lesion-left", "lesion-right")


def write_mini_consortium(root, sites=3, train=4, test=2, heldout=4, seed=0):
    """A consortium folder in the site layout: NIfTI scans with a bright blob on one side or
    none, a report saying so, ground truth and prompts kept outside the site folders."""
    import json
    from pathlib import Path

    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    root = Path(root)
    words = {0: "No focal abnormality.", 1: "Bright lesion in the left hemisphere.", 2: "Bright lesion in the right hemisphere."}

    def study(folder, kind):
        folder.mkdir(parents=True)
        vol = rng.normal(100, 10, (32, 32, 16)).astype(np.float32)
        if kind:
            x0 = 4 if kind == 1 else 20
            vol[x0 : x0 + 8, 12:20, 4:12] += 200
        for i in range(1 + int(rng.integers(0, 2))):
            nib.save(nib.Nifti1Image(vol + rng.normal(0, 5, vol.shape).astype(np.float32), np.diag([2.0, 2.0, 4.0, 1.0])),
                     folder / f"scan{i}.nii.gz")
            (folder / f"scan{i}.json").write_text(json.dumps({"modality": "MR", "sequence": "T1"}))
        (folder / "report.txt").write_text(words[kind])
        return {"lesion-left": int(kind == 1), "lesion-right": int(kind == 2)}

    (root / "truth").mkdir(parents=True)
    for s in range(sites):
        rows = []
        for split, n in (("train", train), ("test", test)):
            for i in range(n):
                sid = f"s{s}-{split}-{i}"
                rows.append({"study_id": sid, "split": split, "labels": study(root / "sites" / f"site{s}" / split / sid, i % 3)})
        (root / "truth" / f"site{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{"study_id": f"h{i}", "split": "test", "labels": study(root / "heldout" / "test" / f"h{i}", i % 3)} for i in range(heldout)]
    (root / "truth" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prompts.json").write_text(json.dumps({
        "lesion-left": ["nothing abnormal on the left side", "a left-sided hyperintense focus"],
        "lesion-right": ["nothing abnormal on the right side", "a right-sided hyperintense focus"],
    }))
    return root


@pytest.fixture(scope="session")
def mini_consortium(tmp_path_factory):
    return write_mini_consortium(tmp_path_factory.mktemp("consortium"))
