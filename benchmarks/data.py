"""Data-path throughput: decode + preprocess versus the on-site tensor cache, and augmentation.

Generates a site (each study: one CT DICOM series and one gzip NIfTI MR), then times passes over it
with :class:`hlip_fed.data.dataset.SiteDataset`: without a cache (every epoch decodes), the first
epoch with a cache (decode + write), a second epoch (cache reads), and cached training epochs with
each augmentation preset (``data.augment``). Then the cost of each augmentation transform on one
study of two scans at the model's size, the transform forced on. Prints markdown tables and, with
``--json OUT``, writes the figures.

    python -m benchmarks.data --studies 8 --json data-bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from hlip_fed.config import DataConfig
from hlip_fed.data.augment import PRESETS, StudyAugmentation
from hlip_fed.data.dataset import SiteDataset
from hlip_fed.data.dicom_writer import write_dicom_series


def make_site(root: Path, studies: int, ct_shape, mr_shape, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    axial = np.array([[0, 0, 0.7, 0], [0, 0.7, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1.0]])
    for i in range(studies):
        study = root / "train" / f"s{i:04d}"
        study.mkdir(parents=True)
        (study / "report.txt").write_text(f"Study {i}: no acute intracranial abnormality.")
        ct = rng.integers(-1024, 1500, ct_shape).astype(np.float32)
        write_dicom_series(ct, axial, study / "ct", "CT")
        mr = rng.gamma(2.0, 80.0, mr_shape).astype(np.float32)
        nib.save(nib.Nifti1Image(mr.astype(np.int16), np.diag([1.0, 1.0, 4.0, 1.0])), study / "t2.nii.gz")
        (study / "t2.json").write_text('{"modality": "MR", "sequence": "T2"}')
    return root


def epoch(ds: SiteDataset) -> float:
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return time.perf_counter() - t0


def transform_costs(img_size, scans: int = 2, repeats: int = 5) -> list[dict]:
    """Milliseconds per study of each transform of the ``scanner`` preset (also ``light``'s),
    each forced to apply."""
    from monai.transforms import OneOf

    aug = StudyAugmentation("scanner", DataConfig(), img_size)
    parts = []
    for t in aug.transforms:
        parts += list(t.transforms) if isinstance(t, OneOf) else [t]
    rows = []
    for t in parts:
        if not hasattr(t, "prob"):
            continue
        t.prob = 1.0
        t.set_random_state(0)
        data = {"image": torch.rand(scans, *img_size), "report": "left", "lr_axes": [2] * scans}
        t(dict(data))  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            t(dict(data))
        rows.append({"transform": type(t).__name__, "ms_per_study": round(1000 * (time.perf_counter() - t0) / repeats, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--ct-shape", type=int, nargs=3, default=[48, 256, 256], help="slices, rows, cols")
    ap.add_argument("--mr-shape", type=int, nargs=3, default=[192, 192, 32], help="NIfTI x, y, z")
    ap.add_argument("--img-size", type=int, nargs=3, default=[32, 96, 96])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a data-loader worker uses 1)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        site = make_site(Path(tmp) / "site", args.studies, args.ct_shape, args.mr_shape)
        cache = Path(tmp) / "cache"
        scans = 2 * args.studies
        runs = {
            "decode + preprocess (no cache)": epoch(SiteDataset(site, DataConfig(), args.img_size)),
            "first epoch with cache (decode + write)": epoch(SiteDataset(site, DataConfig(cache_dir=str(cache)), args.img_size)),
            "cached epoch": epoch(SiteDataset(site, DataConfig(cache_dir=str(cache)), args.img_size)),
        }
        for preset in PRESETS[1:]:
            cfg = DataConfig(cache_dir=str(cache), augment=preset)
            runs[f"cached epoch, augment={preset}"] = epoch(SiteDataset(site, cfg, args.img_size, train=True))
    base = runs["decode + preprocess (no cache)"]
    rows = [
        {"path": name, "seconds": round(sec, 4), "scans_per_s": round(scans / sec, 2), "speedup": round(base / sec, 2)}
        for name, sec in runs.items()
    ]
    print(f"{args.studies} studies, {scans} scans (CT DICOM {args.ct_shape}, MR NIfTI {args.mr_shape}) "
          f"-> {args.img_size}, {args.threads} torch thread(s), {platform.processor() or platform.machine()}\n")
    print("| path | seconds | scans/s | speed-up |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['path']} | {r['seconds']:.3f} | {r['scans_per_s']:.1f} | {r['speedup']:.1f}x |")
    costs = transform_costs(args.img_size)
    print(f"\nAugmentation transforms, one study of 2 scans of {args.img_size}, each forced on:\n")
    print("| transform | ms per study |\n|---|---:|")
    for r in costs:
        print(f"| {r['transform']} | {r['ms_per_study']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)}, "results": rows,
                                         "augmentation_ms": costs}, indent=2))


if __name__ == "__main__":
    main()
