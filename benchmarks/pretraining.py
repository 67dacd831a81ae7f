"""What pooled contrastive pre-training learns on a consortium, measured along the way.

    python -m benchmarks.pretraining DATA [--steps 800] [--every 100] [--sites a,b] [--sequences FLAIR]
                                          [--overrides "..."] [--json OUT]

Trains one model on every site's training studies together (the ``pooled`` reference of
``simulations.compare``) and, every ``--every`` steps, reports on the held-out set:

* the training loss (InfoNCE over the batch): how well the model tells its own batch apart;
* zero-shot AUC per finding and image->report R@5 / R@10: what the user gets;
* a linear probe per finding on the frozen image embeddings (5-fold cross-validated logistic
  regression on the held-out studies): whether the image tower encodes the findings at all, even
  where the prompts do not reach them.

A falling loss with flat probe AUCs means the tower tells training studies apart by something
other than their findings (subject, scanner, protocol) - memorisation, not pre-training.

Before training it also measures the text side, which the locked text tower fixes from the start:
a linear probe per finding on the encoder's report features (trained on the sites' reports, scored
on the held-out reports) and the prompts' zero-shot AUC against the held-out *reports* in the
encoder's own space. High figures there mean the reports and prompts carry the findings, so what
is missing must be learnt by the image tower.

``--objective supervised`` is the reference that needs labels: the same vision tower plus a
linear head trained with binary cross-entropy on the training studies' ground truth (which the
contrastive path never reads), scored by its own held-out AUC per finding, and within each site
on its own test studies (its scanners, unseen studies). If even that stays near 0.5, the data, not
the contrastive objective, is what limits the model; near 0.5 on the held-out set only, the new
scanners are.

``--tower cnn`` replaces the HLIP vision tower with the 3D CNN reference (:mod:`benchmarks.conv_tower`)
and a linear layer into the joint space, trained by the same objective: with both towers and both
objectives on the same studies, the tower and the objective can be told apart.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, table, write_json


def add_run_args(parser: argparse.ArgumentParser, steps: int, every: int, overrides: str = "") -> None:
    """The arguments every training benchmark on a consortium takes: data, config, length, seed, JSON."""
    parser.add_argument("data", type=Path, help="consortium folder (from `hlip-fed synth`)")
    parser.add_argument("--config", default="demo", help="run preset or YAML")
    parser.add_argument("--overrides", default=overrides, help="space-separated dotted config overrides")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--every", type=int, default=every)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the curve as JSON here")
    parser.add_argument("--sites", default="",
                        help="comma-separated sites to train on, scored on the held-out studies of their modalities "
                             "(default: every site, every held-out study)")
    parser.add_argument("--sequences", default="",
                        help="comma-separated scan sequences to keep (e.g. FLAIR), in training, site-test and "
                             "held-out studies alike (default: every scan)")


def open_consortium(args: argparse.Namespace):
    """``(cfg, Consortium)`` for a benchmark's arguments, or ``None`` after a one-line error."""
    from hlip_fed.config import load_config
    from hlip_fed.errors import HlipError
    from simulations.compare import Consortium

    try:
        cfg = load_config(files=[args.config] if args.config else [], overrides=shlex.split(args.overrides))
        return cfg, Consortium(args.data, cfg, sites=[s for s in args.sites.split(",") if s],
                               sequences=[s for s in args.sequences.split(",") if s])
    except HlipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def batches_drawn(train_cfg) -> str:
    """How the training batches are drawn, for a benchmark's header: the loader draws each batch
    from one site when ``train.site_batches`` is on (the learning recipe's setting)."""
    return f"batch {train_cfg.batch_size}, " + ("each from one site" if train_cfg.site_batches else "sites mixed")


def text_side(model, tok, cons, findings) -> dict[str, dict[str, float]]:
    """Report-feature probe and prompt-vs-report zero-shot AUC per finding (no training)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from hlip_fed.data.manifest import read_report
    from hlip_fed.training.evaluate import DEFAULT_TEMPLATE

    @torch.no_grad()
    def features(texts: list[str]) -> torch.Tensor:
        out = [model.text.features(**tok(texts[i:i + 64])) for i in range(0, len(texts), 64)]
        return F.normalize(torch.cat(out), dim=-1)

    def reports(dataset) -> tuple[list[str], list[str]]:
        return [read_report(e, dataset.site) for e in dataset.entries], [e["study_id"] for e in dataset.entries]

    train_texts, train_ids = [], []
    for dataset in cons.train.values():
        texts, ids = reports(dataset)
        train_texts += texts
        train_ids += ids
    site_labels = cons.training_labels()
    held_texts, held_ids = reports(cons.heldout)
    x_train, x_held = features(train_texts).numpy(), features(held_texts)
    probe, zeroshot = {}, {}
    for f in findings:
        y_train = np.array([site_labels[i][f] for i in train_ids])
        y_held = np.array([cons.labels[i][f] for i in held_ids])
        if len(set(y_train)) < 2 or len(set(y_held)) < 2:
            probe[f] = zeroshot[f] = float("nan")
            continue
        clf = LogisticRegression(max_iter=3000).fit(x_train, y_train)
        probe[f] = float(roc_auc_score(y_held, clf.predict_proba(x_held.numpy())[:, 1]))
        negatives, positives = cons.prompts[f]
        pos = features([DEFAULT_TEMPLATE.format(p) for p in positives]).mean(0)
        neg = features([DEFAULT_TEMPLATE.format(p) for p in negatives]).mean(0)
        zeroshot[f] = float(roc_auc_score(y_held, (x_held @ (pos - neg)).numpy()))
    return {"report_probe": probe, "prompt_vs_report": zeroshot}


def supervised_steps(visual, head, batches, opt, labels, findings, steps, train_cfg, start, total) -> float:
    """``steps`` steps of multi-label BCE on the image embeddings; the mean loss."""
    import torch
    import torch.nn.functional as F

    from hlip_fed.training.train import lr_at

    visual.train()
    losses = []
    for i in range(steps):
        images, mask, _, ids = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr_at(start + i, train_cfg, total)
        y = torch.tensor([[labels[s][f] for f in findings] for s in ids], dtype=torch.float32)
        loss = F.binary_cross_entropy_with_logits(head(visual(images, mask)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


def head_scores(visual, head, cons, dataset=None):
    """``(study ids, head outputs)`` of the supervised head on the held-out set or on ``dataset``."""
    import torch

    visual.eval()
    scores, ids = [], []
    with torch.no_grad():
        for images, mask, _, batch_ids in cons.loader(cons.heldout if dataset is None else dataset):
            scores.append(head(visual(images, mask)))
            ids += batch_ids
    return ids, torch.cat(scores).numpy()


def mean_of_defined(values) -> float:
    """Mean of the values that are not NaN; NaN when none is."""
    defined = [v for v in values if v == v]
    return sum(defined) / len(defined) if defined else float("nan")


def aucs(ids, scores, labels, findings) -> dict[str, float]:
    """AUC per finding of ``scores`` (one column per finding) against ``labels``, keyed like the
    zero-shot metrics; NaN where the studies hold one class of a finding."""
    import numpy as np

    from hlip_fed.training.evaluate import label_aucs

    per_finding = label_aucs({f: scores[:, j] for j, f in enumerate(findings)},
                             {f: np.array([labels[i][f] for i in ids]) for f in findings})
    out = {f"auc-{f}": auc for f, auc in per_finding.items()}
    out["auc-mean"] = mean_of_defined(out[f"auc-{f}"] for f in findings)
    return out


def within_site_aucs(ids, scores, site_labels, findings) -> dict[str, float]:
    """AUC per finding within each site's studies, averaged over the sites that hold both classes.

    Pooled over sites, an AUC rewards telling a site with many positives from one with few (the
    sites' case mix differs); within a site only the finding ranks its studies."""
    per_site = []
    for labels in site_labels.values():
        keep = [r for r, i in enumerate(ids) if i in labels]
        if keep:
            per_site.append(aucs([ids[r] for r in keep], scores[keep], labels, findings))
    out = {f"auc-{f}": mean_of_defined(a[f"auc-{f}"] for a in per_site) for f in findings}
    out["auc-mean"] = mean_of_defined(out[f"auc-{f}"] for f in findings)
    return out


def head_aucs(visual, head, cons, findings, dataset=None, labels=None) -> dict[str, float]:
    """AUC per finding of the supervised head, keyed like the zero-shot metrics: on the held-out
    set, or on ``dataset`` with its ``labels``."""
    ids, scores = head_scores(visual, head, cons, dataset)
    return aucs(ids, scores, cons.labels if labels is None else labels, findings)


def site_test_aucs(visual, head, cons, findings) -> dict[str, float]:
    """The supervised head's AUC per finding on the kept sites' own test studies (their scanners,
    studies it never trained on), within each site (:func:`within_site_aucs`)."""
    from torch.utils.data import ConcatDataset

    ids, scores = head_scores(visual, head, cons, ConcatDataset(list(cons.test.values())))
    return within_site_aucs(ids, scores, cons.site_labels, findings)


def per_modality(metrics: dict[str, float], findings: list[str]) -> dict[str, float]:
    """``zs@<modality>_<finding>`` and ``probe@<modality>_<finding>`` from :func:`evaluate`'s per-group
    figures (NaN where the modality lacks a class of the finding)."""
    out = {}
    for key, value in metrics.items():
        kind, _, rest = key.partition("@")
        for f in findings:
            if kind in ("auc", "probe") and rest.endswith(f"-{f}"):
                name = f"{'zs' if kind == 'auc' else 'probe'}@{rest[: -len(f) - 1]}_{f}"
                out[name] = value if metrics[f"{key}-count"] else float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, steps=800, every=100)
    parser.add_argument("--objective", choices=("clip", "supervised"), default="clip")
    parser.add_argument("--tower", choices=("hlip", "cnn"), default="hlip",
                        help="image tower: the config's HLIP, or the CNN reference with a linear layer into the "
                             "joint space")
    args = parser.parse_args(argv)

    import torch
    from torch.utils.data import ConcatDataset

    from hlip_fed.model import create_model, create_tokenizer
    from hlip_fed.model.text_cache import TextFeatureCache
    from hlip_fed.training.evaluate import evaluate
    from hlip_fed.training.train import cycle, make_optimizer, train_steps
    from simulations.compare import modalities

    opened = open_consortium(args)
    if opened is None:
        return 2
    cfg, cons = opened
    torch.manual_seed(args.seed)
    model, tok = create_model(cfg.model, seed=args.seed), create_tokenizer(cfg.model)
    if args.tower == "cnn":
        from benchmarks.conv_tower import ConvTower

        model.visual = ConvTower(cfg.model.embed_dim)
    opt = make_optimizer(model, cfg.train)
    text_cache = TextFeatureCache.for_training(model, tok, cfg.train)  # a locked tower: each report once
    batches = cycle(cons.loader(ConcatDataset(list(cons.train.values())), shuffle=True, seed=args.seed), args.seed)
    findings = list(cons.prompts)  # the consortium's own finding names
    n_train = sum(len(d) for d in cons.train.values())
    text = text_side(model, tok, cons, findings)
    if args.objective == "supervised":
        labels = cons.training_labels()
        head = torch.nn.Linear(cfg.model.embed_dim, len(findings))
        opt.add_param_group({"params": head.parameters(), "weight_decay": 0.0})
    heldout_modality = modalities(cons.heldout)
    rows, done, start = [], 0, time.monotonic()
    while done < args.steps:
        n = min(args.every, args.steps - done)
        if args.objective == "clip":
            stats = train_steps(model, tok, batches, cfg.train, n, optimizer=opt, start_step=done,
                                total_steps=args.steps, text_cache=text_cache)
            loss = stats.loss
        else:
            loss = supervised_steps(model.visual, head, batches, opt, labels, findings, n, cfg.train, done, args.steps)
        done += n
        loader = cons.loader(cons.heldout)
        metrics = evaluate(model, tok, loader, cons.labels, cons.prompts, diagnose=True, groups=heldout_modality)
        probe = {f: metrics[f"probe-{f}"] if metrics[f"probe-{f}-count"] else float("nan") for f in findings}
        if args.objective == "supervised":  # the head's own held-out AUC stands in for zero-shot
            metrics.update(head_aucs(model.visual, head, cons, findings))
            site_test = site_test_aucs(model.visual, head, cons, findings)
        row = {"step": done, "epochs": done * cfg.train.batch_size / n_train, "loss": loss,
               "zs_mean": metrics["auc-mean"], "r5": metrics["r5"], "r10": metrics["r10"],
               "seconds": time.monotonic() - start}
        for f in findings:
            row[f"zs_{f}"] = metrics.get(f"auc-{f}")
            row[f"probe_{f}"] = probe[f]
            if args.objective == "supervised":
                row[f"site_test_{f}"] = site_test[f"auc-{f}"]
        row.update(per_modality(metrics, findings))
        rows.append(row)
        print(f"step {done}: loss {loss:.3f}, zero-shot {metrics['auc-mean']:.3f}, "
              f"probe {' '.join(f'{probe[f]:.2f}' for f in findings)}", file=sys.stderr, flush=True)

    columns = [("step", "step", "d"), ("epochs", "epochs", ".1f"), ("loss", "train loss", ".3f")]
    scored = "zero-shot" if args.objective == "clip" else "supervised head"
    columns += [(f"zs_{f}", f"{scored} {f}", ".3f") for f in findings] + [("zs_mean", f"{scored} mean", ".3f")]
    if args.objective == "supervised":
        columns += [(f"site_test_{f}", f"site test {f}", ".3f") for f in findings]
    columns += [("r5", "R@5", ".3f"), ("r10", "R@10", ".3f")]
    columns += [(f"probe_{f}", f"probe {f}", ".3f") for f in findings]
    print(f"Pooled {args.objective} training of the {args.tower} tower on {args.data} ({n_train} training studies, "
          f"{len(cons.heldout)} held-out; {batches_drawn(cfg.train)}; overrides: {args.overrides or 'none'})\n")
    print(table(rows, columns))
    print("\nText side (locked encoder, before any training; held-out AUC per finding):\n")
    print(table([{"what": k, **v} for k, v in text.items()],
                [("what", "measure", "")] + [(f, f, ".3f") for f in findings]))
    groups = sorted(set(heldout_modality.values()))
    if args.objective == "clip" and len(groups) > 1:  # the held-out set holds several modalities
        print(f"\nHeld-out AUC within each modality after {done} steps (zero-shot / probe):\n")
        print(table([{"group": g, **{f: f"{rows[-1][f'zs@{g}_{f}']:.3f} / {rows[-1][f'probe@{g}_{f}']:.3f}"
                                     for f in findings}} for g in groups],
                    [("group", "modality", "")] + [(f, f, "") for f in findings]))
    write_json(args.json, {"machine": machine(), "data": str(args.data), "sites": list(cons.train),
                           "sequences": args.sequences, "site_batches": cfg.train.site_batches, "config": args.config,
                           "overrides": args.overrides, "objective": args.objective, "tower": args.tower,
                           "tower_params": sum(p.numel() for p in model.visual.parameters()),
                           "training_studies": n_train, "heldout_studies": len(cons.heldout), "text_side": text,
                           "curve": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
