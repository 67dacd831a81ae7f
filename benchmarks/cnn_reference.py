"""Is the consortium learnable at its size? A supervised 3D CNN reference, held-out AUC per finding.

    python -m benchmarks.cnn_reference DATA [--steps 1500] [--every 300] [--sites a,b] [--sequences FLAIR] [--json OUT]

The pre-training benchmark asks what the HLIP tower learns; this one asks what a plain supervised
learner with a convolutional prior learns from the same studies, which bounds what pre-training
can be expected to find. The reference is a four-layer 3D CNN per scan (strides 1x2x2, 2, 2, 1;
GroupNorm, GELU), max- and mean-pooled over space, max-pooled over the study's scans, with a
linear head trained by binary cross-entropy on the training studies' ground truth and left-right
flips (finding presence does not depend on the side). Every ``--every`` steps it scores the head
on the training studies, within each site on its own test studies (its scanners, studies it never
saw) and on the held-out set (scanners of its own). Training AUC near 1 with site-test AUC near 0.5 is
memorisation: too few examples for the finding. Site-test AUC well above a held-out AUC near 0.5
is a learned finding that does not carry over to a new scanner.

``--sites`` trains on some sites only and scores on the held-out studies of their modalities
(e.g. the two CT sites, scored on the held-out CT studies); ``--sequences`` keeps only the scans of
some MR sequences, in every split (e.g. ``FLAIR``: one contrast at a time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, table, write_json
from benchmarks.conv_tower import ConvReference
from benchmarks.pretraining import (add_run_args, batches_drawn, head_aucs, open_consortium, site_test_aucs,
                                    supervised_steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, steps=1500, every=300, overrides="train.batch_size=8 train.lr=1e-3 train.warmup_steps=10")
    args = parser.parse_args(argv)

    from torch.utils.data import ConcatDataset

    from hlip_fed.training.train import cycle

    opened = open_consortium(args)
    if opened is None:
        return 2
    cfg, cons = opened
    chosen = list(cons.train)  # every site, or those --sites named
    for data in cons.train.values():
        data.train_scans = None  # every scan of a study, as evaluation reads it
    train = ConcatDataset(list(cons.train.values()))
    labels = cons.training_labels()
    findings = list(cons.prompts)
    torch.manual_seed(args.seed)
    net = ConvReference()
    head = nn.Linear(net.width, len(findings))
    opt = torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=cfg.train.lr, weight_decay=0.05)
    batches = cycle(cons.loader(train, shuffle=True, seed=args.seed), args.seed)
    rows, done, start = [], 0, time.monotonic()
    while done < args.steps:
        n = min(args.every, args.steps - done)
        loss = supervised_steps(net, head, batches, opt, labels, findings, n, cfg.train, done, args.steps)
        done += n
        held = head_aucs(net, head, cons, findings)
        seen = head_aucs(net, head, cons, findings, dataset=train, labels=labels)
        unseen = site_test_aucs(net, head, cons, findings)
        row = {"step": done, "epochs": done * cfg.train.batch_size / len(train), "loss": loss,
               "seconds": time.monotonic() - start}
        for f in findings:
            row[f"train_{f}"], row[f"heldout_{f}"] = seen[f"auc-{f}"], held[f"auc-{f}"]
            row[f"site_test_{f}"] = unseen[f"auc-{f}"]
        rows.append(row)
        scores = " ".join(f"{row[f'heldout_{f}']:.2f}" for f in findings)
        print(f"step {done}: loss {loss:.3f}, held-out {scores}", file=sys.stderr, flush=True)
    columns = [("step", "step", "d"), ("epochs", "epochs", ".1f"), ("loss", "train BCE", ".3f")]
    columns += [(f"train_{f}", f"train {f}", ".3f") for f in findings]
    columns += [(f"site_test_{f}", f"site test {f}", ".3f") for f in findings]
    columns += [(f"heldout_{f}", f"held-out {f}", ".3f") for f in findings]
    site_tests = sum(len(d) for d in cons.test.values())
    print(f"Supervised 3D CNN reference on {args.data} ({len(train)} training studies from "
          f"{', '.join(chosen)}; {site_tests} site test; {len(cons.heldout)} held-out; "
          f"{batches_drawn(cfg.train)})\n")
    print(table(rows, columns))
    write_json(args.json, {"machine": machine(), "data": str(args.data), "sites": chosen,
                           "sequences": args.sequences, "site_batches": cfg.train.site_batches,
                           "training_studies": len(train), "site_test_studies": site_tests,
                           "heldout_studies": len(cons.heldout), "curve": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
