"""The ``hlip-fed`` command line.

Each module in :mod:`hlip_fed.commands` adds one top-level command through ``register(subparsers)``
and sets ``func`` on its parser; heavy imports (torch, pydicom) happen inside ``func`` so that
``hlip-fed --help`` stays fast. Any :class:`~hlip_fed.errors.HlipError` becomes one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from hlip_fed import __version__, commands
from hlip_fed.errors import HlipError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hlip-fed", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hlip-fed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HlipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
