"""``hlip-fed app build``: the app bundle (FAB) that ``flwr run`` would send, and its SHA-256.

Sites approve app versions by this hash (``hlip-fed site approve``); a build of the same source
gives the same hash, wherever it is made.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("app", help="the federated app's bundle (FAB) and its hash")
    sub = parser.add_subparsers(dest="app_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("build", help="build the FAB as flwr run does and print its SHA-256")
    p.add_argument("--out", type=Path, required=True, help="folder to write the .fab into")
    p.add_argument("--source", type=Path, default=Path("."),
                   help="the app's source folder (holds pyproject.toml; default: here)")
    p.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    from hlip_fed.deploy.app_bundle import build_app

    path, fab_hash = build_app(args.source, args.out)
    print(f"{fab_hash}  {path}")
    return 0
