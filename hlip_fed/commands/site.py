"""``hlip-fed site``: work with a hospital's site folder (layout in ``docs/site-layout.md``).

Subcommands are added by small ``_add_<name>(sub)`` functions so that further site subcommands
(enrolment, revocation, starting a node) can be added next to ``index`` and ``check``.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("site", help="index and check a hospital's site folder")
    sub = parser.add_subparsers(dest="site_command", required=True, metavar="SUBCOMMAND")
    _add_index(sub)
    _add_check(sub)


def _add_index(sub) -> None:
    p = sub.add_parser("index", help="write the site manifest (one line per study) from the folder")
    p.add_argument("dir", help="site folder")
    p.add_argument("--out", help="manifest path (default DIR/manifest.jsonl)")
    p.set_defaults(func=_index)


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="read every study once and list what training can use")
    p.add_argument("dir", help="site folder")
    p.add_argument("--manifest", help="manifest to check (default DIR/manifest.jsonl, else the folder)")
    p.add_argument("--split", action="append", help="only this split (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_check)


def _index(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hlip_fed.data.errors import DataError
    from hlip_fed.data.manifest import MANIFEST_NAME, index_site, read_manifest, write_manifest

    out = Path(args.out) if args.out else Path(args.dir) / MANIFEST_NAME
    previous = []
    if out.is_file():
        try:
            previous = read_manifest(out)
        except DataError:
            previous = []  # a broken manifest is simply rewritten
    entries = index_site(args.dir, previous)
    try:
        write_manifest(entries, out)
    except OSError as exc:
        raise DataError(out, f"cannot write manifest ({exc.strerror or exc})") from None
    splits: dict[str, int] = {}
    for e in entries:
        splits[e["split"]] = splits.get(e["split"], 0) + 1
    scans = sum(len(e["scans"]) for e in entries)
    no_report = sum(1 for e in entries if not e.get("report") and not e.get("report_text"))
    split_text = ", ".join(f"{k} {v}" for k, v in sorted(splits.items())) or "none"
    print(f"indexed {len(entries)} studies ({split_text}), {scans} scans -> {out}")
    if no_report:
        print(f"warning: {no_report} studies have no report; run `hlip-fed site check {args.dir}`")
    return 0


def _check(args: argparse.Namespace) -> int:
    import logging
    import warnings

    from hlip_fed.data.check import check_site

    logging.getLogger("pydicom").setLevel(logging.ERROR)  # pydicom's own warnings duplicate ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every problem that matters is in the report
        report = check_site(args.dir, manifest=args.manifest, splits=args.split)
    if args.json:
        print(json.dumps({**report.to_dict(), "usable": report.usable}, indent=2))
    else:
        print("\n".join(report.lines()))
    return 0 if report.usable else 1
