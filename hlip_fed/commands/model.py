"""``hlip-fed model info``: what a preset builds, without building it."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("model", help="inspect HLIP model presets")
    cmds = parser.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    info = cmds.add_parser("info", help="parameter counts, tokens per scan and block layout of a preset")
    info.add_argument("--preset", default="tiny", help="model preset (hlip_fed/conf/model/*.yaml)")
    info.add_argument("--config", action="append", default=[], help="extra YAML config file(s)")
    info.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    from hlip_fed.config import load_config
    from hlip_fed.model.factory import model_info

    info = model_info(load_config(args.preset, files=args.config, overrides=args.overrides))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "levels":
            value = " ".join(f"{i}:{lvl}" for i, lvl in enumerate(value))
        elif isinstance(value, int) and key.startswith("params"):
            value = f"{value:,} ({value / 1e6:.1f} M)"
        print(f"{key:<{width}}  {value}")
    return 0
