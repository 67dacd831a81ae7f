"""``hlip-fed predict``: zero-shot class probabilities of studies from a saved HLIP model."""

from __future__ import annotations

import argparse
import json

from hlip_fed.errors import HlipError

STUDY_HELP = ("studies: NIfTI files, DICOM series folders, study folders (all scans in them), "
              "site folders or manifest.jsonl files (every study)")
CONFIG_HELP = ("run config YAML (or bundled preset) whose data section the model was trained with; "
               "a saved model folder holds only the model config, so without it the DataConfig "
               "defaults preprocess the scans")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="saved model folder (a run's RUN_DIR/model)")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def setup_torch(args) -> None:
    import torch

    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="zero-shot class probabilities of studies",
                              description="Zero-shot classification of studies with a saved HLIP model. "
                              "With --labels-file the studies with ground truth are split in two: a "
                              "temperature is fitted on one half and accuracy and calibration error "
                              "(ECE) before and after temperature scaling are reported on the other.")
    add_model_args(p)
    p.add_argument("studies", nargs="+", metavar="STUDY", help=STUDY_HELP)
    p.add_argument("--labels", required=True,
                   help='class names, comma-separated (";" when names hold commas), e.g. "no haemorrhage,haemorrhage"')
    p.add_argument("--template", default="{}", help='prompt around each class name, e.g. "a head CT showing {}"')
    p.add_argument("--prompts", help="JSON file {class: [phrasing, ...]} replacing --template per class")
    p.add_argument("--split", help="only this split of site folders and manifests (train, val, test)")
    p.add_argument("--temperature", default="1",
                   help="divide logits by this (a number or a file written by --calibration-out)")
    p.add_argument("--labels-file", help="ground truth: JSONL/JSON/CSV of study_id -> class name or index")
    p.add_argument("--finding", help="key of the label in --labels-file (e.g. haemorrhage in a consortium truth file)")
    p.add_argument("--calibration-fraction", type=float, default=0.5, help="share of labelled studies used to fit the temperature")
    p.add_argument("--calibration-out", help="write the fitted temperature and figures to this JSON file")
    p.add_argument("--bins", type=int, default=10, help="equal-width confidence bins of the ECE")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration split")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def read_prompts_file(path: str | None) -> dict[str, list[str]] | None:
    if not path:
        return None
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HlipError(f"{path}: prompts file not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise HlipError(f"{path}: not a JSON prompts file ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise HlipError(f"{path}: prompts must be an object {{class: [phrasing, ...]}}")
    return {str(k): [v] if isinstance(v, str) else [str(x) for x in v] for k, v in data.items()}


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from hlip_fed.downstream.inference import check_template, find_studies, load_data_config, load_model, split_labels
    from hlip_fed.downstream.predict import calibration_report, predict_studies, read_labels_file, read_temperature

    setup_torch(args)
    labels = split_labels(args.labels)
    template = check_template(args.template)
    temperature = read_temperature(args.temperature)
    truth = read_labels_file(args.labels_file, labels, args.finding) if args.labels_file else None
    studies = find_studies(args.studies, split=args.split)
    model, tokenizer = load_model(args.model)
    data_cfg = load_data_config(args.config)
    res = predict_studies(model, tokenizer, studies, labels, data_cfg, template,
                          read_prompts_file(args.prompts), temperature)
    out = {k: res[k] for k in ("labels", "template", "temperature", "studies", "skipped")}
    if truth is not None:
        ids = [s.study_id for s in res["kept"]]
        have = [i for i, sid in enumerate(ids) if sid in truth]
        if not have:
            raise HlipError(f"{args.labels_file}: none of the {len(ids)} studies has a label (ids differ?)")
        y = np.array([truth[ids[i]] for i in have])
        for i in have:
            out["studies"][i]["truth"] = labels[truth[ids[i]]]
        cal = calibration_report(res["logits"][have], y, args.calibration_fraction, args.seed, args.bins)
        out["calibration"] = cal
        if args.calibration_out:
            from pathlib import Path

            Path(args.calibration_out).write_text(json.dumps(
                {"model": str(args.model), "labels": labels, "template": template, **cal}, indent=2))
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    width = max(12, *(len(s["study_id"]) for s in out["studies"]))
    cols = [lab[:24] for lab in labels]
    colw = [max(8, len(c)) for c in cols]
    print(f"{'study':<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cols, colw)) + "  prediction")
    for s in out["studies"]:
        probs = "  ".join(f"{s['probabilities'][lab]:>{w}.3f}" for lab, w in zip(labels, colw))
        truth_text = f"  (truth: {s['truth']})" if "truth" in s else ""
        print(f"{s['study_id']:<{width}}  {probs}  {s['prediction']}{truth_text}")
    for sid, why in out["skipped"].items():
        print(f"skipped {sid}: {why}")
    if "calibration" in out:
        c = out["calibration"]
        print(f"\nwith ground truth ({c['n_calibration']} studies fit the temperature, {c['n_evaluation']} evaluate it):")
        print(f"  accuracy {c['accuracy']:.3f} (commonest class alone: {c['chance']:.3f})")
        print(f"  ECE ({c['bins']} bins) {c['ece_before']:.3f} -> {c['ece_after']:.3f} after temperature "
              f"scaling (T = {c['temperature']:.3g}); NLL {c['nll_before']:.3f} -> {c['nll_after']:.3f}")
        if args.calibration_out:
            print(f"  temperature written to {args.calibration_out} (use with --temperature)")
    return 0
