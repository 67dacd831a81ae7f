"""``hlip-fed report RUN_DIR``: the round table, the curves and a self-contained run report."""

from __future__ import annotations

import argparse
import json

from hlip_fed.errors import HlipError


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="summarise a run folder: round table, curves, HTML/markdown report",
                              description="Prints the round table of RUN_DIR/metrics.jsonl, writes "
                              "RUN_DIR/curves.png and a report (HTML with the curves embedded, or markdown).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (holds metrics.jsonl)")
    p.add_argument("--format", choices=("html", "md"), default="html", help="report format (default html)")
    p.add_argument("--out", help="report path (default RUN_DIR/report.html or .md)")
    p.add_argument("--tensorboard", action="store_true", help="also (re)write RUN_DIR/tensorboard from metrics.jsonl")
    p.add_argument("--json", action="store_true", help="print the rounds as JSON instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hlip_fed.outputs.report import export_tensorboard, format_round_table, read_rounds, write_run_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise HlipError(f"{run_dir}: run folder not found")
    rounds = read_rounds(run_dir)
    if not rounds:
        raise HlipError(f"{run_dir}: no completed rounds (no metrics.jsonl lines yet)")
    path = write_run_report(run_dir, args.format, args.out)
    tb = export_tensorboard(run_dir) if args.tensorboard else None
    if args.json:
        print(json.dumps({"rounds": [r.to_json() for r in rounds], "report": str(path), "tensorboard": str(tb) if tb else None}, indent=2))
        return 0
    print(format_round_table(rounds))
    print(f"\nreport: {path}")
    print(f"curves: {path.with_name('curves.png') if args.out else run_dir / 'curves.png'}")
    if args.tensorboard:
        print(f"tensorboard: {tb}" if tb else "tensorboard: not installed (pip install tensorboard)")
    return 0
