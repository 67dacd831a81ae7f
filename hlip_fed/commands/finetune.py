"""``hlip-fed finetune``: few-shot linear probe and full fine-tuning against the zero-shot baseline."""

from __future__ import annotations

import argparse
import json

from hlip_fed.commands.predict import add_model_args, read_prompts_file, setup_torch


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="few-shot linear probe and full fine-tuning vs zero-shot",
                              description="Trains classification heads on 1, 5, 10 or all labelled studies "
                              "per class of a site (linear probe on frozen embeddings; full fine-tuning of "
                              "the vision tower from the probe's head, LP-FT) and scores them and the zero-shot "
                              "baseline on the held-out split (the site's test split, else a random share). "
                              "Writes fewshot.md, fewshot.json, fewshot.png and probe.json to --out.")
    add_model_args(p)
    p.add_argument("--data", required=True, nargs="+", metavar="SITE_DIR",
                   help="site folder(s) or manifest(s) with the labelled studies")
    p.add_argument("--labels-file", required=True, help="ground truth: JSONL/JSON/CSV of study_id -> class name or index")
    p.add_argument("--finding", help="key of the label in --labels-file (e.g. haemorrhage in a consortium truth file)")
    p.add_argument("--labels", required=True, help='class names in index order, e.g. "no haemorrhage,haemorrhage" (also the zero-shot prompts)')
    p.add_argument("--template", default="{}", help="zero-shot prompt around each class name")
    p.add_argument("--prompts", help="JSON file {class: [phrasing, ...]} for the zero-shot baseline")
    p.add_argument("--shots", default="1,5,10,all", help="labelled studies per class, e.g. 10 or 1,5,10,all (default)")
    p.add_argument("--repeats", type=int, default=3, help="random draws per shot count (default 3)")
    p.add_argument("--methods", default="probe,full", help="probe, full or both (default)")
    p.add_argument("--steps", type=int, default=30, help="optimiser steps of full fine-tuning (default 30)")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of the head in full fine-tuning")
    p.add_argument("--backbone-lr", type=float, default=3e-5,
                   help="learning rate of the vision tower in full fine-tuning (default a tenth of --lr's default)")
    p.add_argument("--holdout", type=float, default=0.3, help="held-out share when the site has no labelled test split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fewshot", help="output folder (default ./fewshot)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hlip_fed.downstream.finetune import few_shot_curve, format_table, load_labelled, parse_shots, write_outputs
    from hlip_fed.downstream.inference import check_template, find_studies, load_data_config, load_model, split_labels
    from hlip_fed.downstream.predict import read_labels_file

    setup_torch(args)
    labels = split_labels(args.labels)
    template = check_template(args.template)
    shots = parse_shots(args.shots)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    truth = read_labels_file(args.labels_file, labels, args.finding)
    studies = find_studies(args.data)
    model, tokenizer = load_model(args.model)
    data = load_labelled(studies, truth, load_data_config(args.config), model.cfg.vision.img_size,
                         args.holdout, args.seed)
    result = few_shot_curve(model, tokenizer, data, labels, template, read_prompts_file(args.prompts), shots,
                            max(1, args.repeats), methods, args.steps, args.lr, args.seed, args.backbone_lr)
    paths = write_outputs(result, args.out)
    if args.json:
        print(json.dumps({**{k: v for k, v in result.items() if k != "probe"},
                          "files": {k: str(v) for k, v in paths.items()}}, indent=2))
        return 0
    print("\n".join(format_table(result)))
    for sid, why in data.skipped.items():
        print(f"skipped {sid}: {why}")
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0
