"""Learnability of the phantom consortium: a simple supervised probe per finding.

    python -m benchmarks.synth_probe DIR            # an existing consortium
    python -m benchmarks.synth_probe --generate DIR # generate the benchmark preset first
    python -m benchmarks.synth_probe DIR --conspicuity-only [--mri-bias-correction]

Reads every study through the project's reader and preprocessing (the tiny model's 32x96x96
input), fits one logistic regression per finding on generic image statistics and prints held-out
ROC AUCs for the pooled probe (all sites' training studies) and for each site alone. The
benchmark is meant to sit between chance and saturation: pooled mean AUC clearly above 0.5 and at
most about 0.95, and the worst single site clearly below pooled. It then prints how conspicuous each
focal lesion is at the model's input (its signed contrast against the mirrored region, and a
z-score of its mirror difference against normal studies of the same contrast, see
``hlip_fed.synth.probe.lesion_conspicuity``), and how well a detector told where each lesion is
ranks it against the held-out studies without it (``hlip_fed.synth.probe.located_detector``).
``--mri-bias-correction`` preprocesses with ``data.mri_bias_correction`` on (N4 on every MR scan).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("consortium", help="consortium folder (from `hlip-fed synth`)")
    parser.add_argument("--generate", action="store_true", help="generate it first (preset below)")
    parser.add_argument("--preset", default="benchmark", choices=("demo", "benchmark"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", help="also write the result as JSON to this path")
    parser.add_argument("--mri-bias-correction", action="store_true", help="N4 on every MR scan first")
    parser.add_argument("--conspicuity-only", action="store_true", help="skip the learnability probe")
    args = parser.parse_args(argv)

    from hlip_fed.config import DataConfig
    from hlip_fed.synth.probe import (format_conspicuity, format_located, format_result, lesion_conspicuity,
                                      located_detector, model_input_studies, run_probe)

    root = Path(args.consortium)
    if args.generate:
        from hlip_fed.synth.consortium import build_consortium

        t = time.monotonic()
        build_consortium(root, args.preset, seed=args.seed, workers=args.workers)
        print(f"generated {args.preset} consortium in {time.monotonic() - t:.0f}s", file=sys.stderr)
    t = time.monotonic()
    cfg = DataConfig(mri_bias_correction=args.mri_bias_correction)
    result = {}
    if not args.conspicuity_only:
        result = run_probe(root, data_cfg=cfg)
        print(format_result(result))
    heldout = model_input_studies(root, "heldout", data_cfg=cfg)  # read once for both tables
    result["conspicuity"] = lesion_conspicuity(heldout)
    print("Lesion conspicuity on the held-out set (model input: contrast against the mirrored region, "
          "and asymmetry against normal studies):\n")
    print(format_conspicuity(result["conspicuity"]))
    result["located"] = located_detector(heldout)
    print("\nA detector told where each lesion is, on the held-out set (its mask laid on the lesion's scan and "
          "on every scan of the same contrast without the finding):\n")
    print(format_located(result["located"]))
    print(f"probe took {time.monotonic() - t:.0f}s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
