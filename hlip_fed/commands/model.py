"""``hlip-fed model``: what a preset builds (``info``), and HLIP's released checkpoints read into an
hlip-fed model folder (``import``) or written back in HLIP's layout (``export``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("model", help="model presets; HLIP's released checkpoints in and out")
    cmds = parser.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    info = cmds.add_parser("info", help="parameter counts, tokens per scan and block layout of a preset")
    info.add_argument("--preset", default="tiny", help="model preset (hlip_fed/conf/model/*.yaml)")
    info.add_argument("--config", action="append", default=[], help="extra YAML config file(s)")
    info.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=run_info)
    imp = cmds.add_parser("import", help="an HLIP checkpoint (open_clip .pt, state dict, safetensors) as a model folder")
    imp.add_argument("checkpoint", type=Path)
    imp.add_argument("--preset", required=True, help="the model preset the weights were trained as")
    imp.add_argument("--out", type=Path, required=True, help="the model folder to write")
    tower = imp.add_mutually_exclusive_group(required=True)
    tower.add_argument("--vision-only", action="store_true", help="import the vision tower; keep the preset's text tower")
    tower.add_argument("--text-dir", type=Path, help="a local BERT folder (config, tokenizer) for the checkpoint's text weights")
    imp.add_argument("overrides", nargs="*", help="dotted key=value overrides of the preset, right after the checkpoint")
    imp.set_defaults(func=run_import)
    inf = cmds.add_parser("inflate", help="a 2D ViT state dict (timm names, e.g. MAE's ViT-B) inflated to a 3D preset")
    inf.add_argument("checkpoint", type=Path)
    inf.add_argument("--preset", required=True, help="the 3D model preset, e.g. vit_base_multiscan_h3_token1176")
    inf.add_argument("--out", type=Path, required=True, help="the model folder to write")
    inf.add_argument("overrides", nargs="*", help="dotted key=value overrides of the preset, right after the checkpoint")
    inf.set_defaults(func=run_inflate)
    exp = cmds.add_parser("export", help="a model folder in HLIP's checkpoint layout")
    exp.add_argument("model_dir", type=Path)
    exp.add_argument("--out", type=Path, required=True, help="the checkpoint file to write")
    exp.add_argument("--format", choices=["open_clip", "safetensors"], default="open_clip")
    exp.add_argument("--vision-only", action="store_true", help="the vision tower and temperature only")
    exp.set_defaults(func=run_export)


def run_import(args: argparse.Namespace) -> int:
    import hashlib

    from hlip_fed.model.hlip_layout import import_checkpoint
    from hlip_fed.outputs.model_card import write_model_card

    out = import_checkpoint(args.checkpoint, args.preset, args.out, text_dir=args.text_dir, overrides=args.overrides)
    digest = hashlib.sha256(args.checkpoint.read_bytes()).hexdigest()
    towers = "vision and text towers" if args.text_dir else "vision tower (text tower: the preset's)"
    # The card reads the text model from the folder's config.yaml, as import_checkpoint saved it.
    write_model_card(out, {"initial_weights": f"HLIP checkpoint {args.checkpoint.name} (sha256 {digest[:16]}), "
                                              f"{towers}, imported with hlip-fed model import",
                           "preset": args.preset})
    print(f"imported {args.checkpoint} -> {out} (preset {args.preset}, "
          f"{'vision and text towers' if args.text_dir else 'vision tower'})")
    return 0


def run_inflate(args: argparse.Namespace) -> int:
    from hlip_fed.model.hlip_layout import inflate_2d
    from hlip_fed.outputs.model_card import write_model_card

    out = inflate_2d(args.checkpoint, args.preset, args.out, overrides=args.overrides)
    write_model_card(out, {"initial_weights": f"2D ViT {args.checkpoint.name} inflated to {args.preset} "
                                              "(hlip-fed model inflate); heads and text tower initialised"})
    print(f"inflated {args.checkpoint} -> {out} (preset {args.preset})")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from hlip_fed.model.hlip_layout import export_model

    out = export_model(args.model_dir, args.out, fmt=args.format, vision_only=args.vision_only)
    print(f"exported {args.model_dir} -> {out} ({args.format})")
    return 0


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
