"""``hlip-fed synth``: generate the phantom hospital consortium (and its overview picture).

    hlip-fed synth --out DIR [--preset demo|benchmark] [--sites K] [--studies N] [--seed S]
    hlip-fed synth --out DIR --preview-only [--png PATH]

``--studies`` is the mean number of studies per site (sites differ in size around it); values not
given come from the preset. The picture goes to ``DIR/overview.png`` unless ``--png`` says otherwise.
"""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth", help="generate the phantom hospital consortium (sites, held-out set, truth, prompts)",
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="consortium folder (created; regenerated if it holds one)")
    parser.add_argument("--preset", default="demo", choices=("demo", "benchmark"), help="size preset (default demo)")
    parser.add_argument("--sites", type=int, help="number of hospitals (default from the preset)")
    parser.add_argument("--studies", type=int, help="mean studies per site (default from the preset)")
    parser.add_argument("--heldout", type=int, help="studies in the held-out public set (default from the preset)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="generator processes (default: up to 2)")
    parser.add_argument("--png", help="overview picture path (default OUT/overview.png)")
    parser.add_argument("--no-preview", action="store_true", help="do not draw the overview picture")
    parser.add_argument("--preview-only", action="store_true", help="only redraw the picture of an existing consortium")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from hlip_fed.errors import HlipError

    out = Path(args.out)
    png = Path(args.png) if args.png else out / "overview.png"
    if args.preview_only:
        from hlip_fed.synth.preview import render_preview

        print(f"wrote {render_preview(out, png)}")
        return 0
    for name in ("sites", "studies", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise HlipError(f"--{name} must be at least 1 (got {value})")
    from hlip_fed.synth.consortium import build_consortium

    start = time.monotonic()
    desc = build_consortium(out, args.preset, sites=args.sites, studies=args.studies, seed=args.seed,
                            heldout=args.heldout, workers=args.workers)
    took = time.monotonic() - start
    for s in desc["sites"]:
        pos = ", ".join(f"{k} {v}" for k, v in s["positives"].items())
        print(f"{s['name']:<22} {s['kind']:<28} {s['modality']} {s['format']:<5} "
              f"train {s['train']:>4} test {s['test']:>3}  positives: {pos}")
    h = desc["heldout"]
    print(f"{'heldout':<22} {'public evaluation set':<28} CT+MR nifti  test {h['test']:>3}  positives: "
          + ", ".join(f"{k} {v}" for k, v in h["positives"].items()))
    print(f"generated {sum(s['studies'] for s in desc['sites']) + h['studies']} studies in {took:.1f}s into {out}")
    if not args.no_preview:
        from hlip_fed.synth.preview import render_preview

        print(f"wrote {render_preview(out, png)}")
    return 0
