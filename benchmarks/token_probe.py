"""Where a lesion is lost in HLIP's vision tower: a linear probe on its tokens, stage by stage.

    python -m benchmarks.token_probe DATA [--sites a,b] [--sequences FLAIR] [--steps 600] [--overrides "..."] [--json OUT]

The supervised references find that HLIP's tower, told the labels, does not rank the MR lesions even
on its own scanners. This benchmark asks where the lesion is lost. It reads every study of the
kept sites (training and site test) and of the held-out set, and gives each patch token a label
from the phantom's truth masks, resampled as the scans are (every scan of a study shares its
study's mask): a lesion token when at least ``--lesion-share`` of the patch lies in the finding's
mask, a normal token when none of it does. At each stage of the tower it fits one logistic
regression per finding on the training studies' tokens and reports:

* token AUC on the site-test studies: is the lesion linearly readable from one token at this stage?
* study AUC from the highest token score of a study (what max pooling would give, had the tower
  learned this probe): within each site on its own test studies, and on the held-out studies.

The stages are the patch's voxels (averaged to 4 x 4 x 4 values) and their quantiles, neither
with a learned weight; the patch embedding with its position embeddings; the output of every
block (the last one after the final norm, which is what the tower pools). The tower is first trained ``--steps`` steps on the
labels, as ``benchmarks/pretraining.py --objective supervised`` trains it (0: the tower as
initialised); its own head is scored beside the probes. Token labels reach only the probes,
never the tower: a stage where the probe reads a lesion that the head does not rank is one the
study labels failed to teach, and a stage where the probe no longer reads it is where it was lost.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, table, write_json
from benchmarks.pretraining import (add_run_args, aucs, batches_drawn, head_aucs, open_consortium, site_test_aucs,
                                    supervised_steps, within_site_aucs)

LESIONS = ("mass", "haemorrhage", "infarct")
VOXEL_POOL = (2, 4, 4)  # a 8 x 16 x 16 patch's voxels averaged to 4 x 4 x 4 values
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
NEGATIVE_TOKENS = 30000  # normal training tokens the probes see (a random subset)


def patch_rows(volume, patch_size):
    """The voxels of each patch of ``volume`` [D, H, W] (a tensor), one row per patch in the tower's
    token order (as its patch embedding cuts a scan): ``[S * T, prod(patch_size)]``."""
    from hlip_fed.model.vision import cut_patches

    return cut_patches(volume, patch_size).flatten(0, 1)


def patch_shares(mask, patch_size) -> "np.ndarray":
    """Share of each patch's voxels inside ``mask`` [D, H, W], in the tower's token order [S * T]."""
    import torch

    return patch_rows(torch.from_numpy(mask.astype("float32")), patch_size).mean(1).numpy()


def patch_voxels(x, patch_size) -> "np.ndarray":
    """Each patch of a scan [1, D, H, W] averaged over :data:`VOXEL_POOL` blocks: ``[S * T, k]``."""
    import torch.nn.functional as F

    pooled = F.avg_pool3d(x[None], VOXEL_POOL)[0, 0]  # [D', H', W']
    return patch_rows(pooled, [p // v for p, v in zip(patch_size, VOXEL_POOL)]).numpy()


def patch_quantiles(x, patch_size) -> "np.ndarray":
    """Quantiles :data:`QUANTILES` of each patch's voxels of a scan [1, D, H, W]: ``[S * T, q]``.

    A small bright or dark lesion anywhere in the patch moves its upper or lower quantiles, which
    no weighted sum of the voxels (the patch embedding) computes."""
    import torch

    return torch.quantile(patch_rows(x[0], patch_size), torch.tensor(QUANTILES), dim=1).T.numpy()


def stage_tokens(visual, images) -> dict[str, "np.ndarray"]:
    """Every scan's patch tokens at each stage of ``visual`` for one study ``images [N, 1, D, H, W]``:
    ``{stage: [N, S * T, C]}`` (voxels and their quantiles, embedding, each block; the last block
    after the final norm)."""
    import numpy as np
    import torch

    n = images.shape[0]
    out = {"voxels": np.stack([patch_voxels(x, visual.cfg.patch_size) for x in images]),
           "voxel quantiles": np.stack([patch_quantiles(x, visual.cfg.patch_size) for x in images])}
    captured = []  # the first block's input (the embedded tokens), then every block's output
    hooks = [visual.blocks[0].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))]
    hooks += [b.register_forward_hook(lambda _m, _i, y: captured.append(y)) for b in visual.blocks]
    try:
        with torch.no_grad():
            visual(images[None], torch.ones(1, n, dtype=torch.bool))
    finally:
        for h in hooks:
            h.remove()
    out["embedding"] = captured.pop(0)[:, 1:].reshape(n, -1, visual.cfg.width).numpy()
    for i, y in enumerate(captured):
        tokens = y[:, 1:].reshape(n, -1, y.shape[-1])  # scan windows [N, 1 + L, C]; study [1, 1 + N L, C]
        if i == len(captured) - 1:
            with torch.no_grad():
                tokens = visual.norm(tokens)
        out[f"block {i + 1}"] = tokens.numpy()
    return out


def read_tokens(visual, dataset, masks_dir: Path, img_size) -> list[dict]:
    """For every study of ``dataset``: its id, site, tokens per stage and lesion share per token."""
    import numpy as np

    from hlip_fed.synth.probe import model_masks

    visual.eval()
    plain, studies = dataset.evaluation_view(), []
    for entry in dataset.entries:
        images = plain.load_study(entry)[0]
        masks = model_masks(masks_dir / dataset.site.name / f"{entry['study_id']}.nii.gz", img_size, dataset.data_cfg)
        n_tokens = visual.tokens_per_scan
        shares = {f: np.tile(patch_shares(masks[f], visual.cfg.patch_size), images.shape[0]) if f in masks
                  else np.zeros(n_tokens * images.shape[0], dtype=np.float32) for f in LESIONS}
        tokens = {k: v.reshape(-1, v.shape[-1]) for k, v in stage_tokens(visual, images).items()}
        studies.append({"id": entry["study_id"], "site": dataset.site.name, "tokens": tokens, "shares": shares})
    return studies


def fit_probe(train: list[dict], stage: str, finding: str, lesion_share: float, seed: int):
    """A standardised logistic regression on the training studies' lesion and normal tokens."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([s["tokens"][stage] for s in train])
    share = np.concatenate([s["shares"][finding] for s in train])
    pos, neg = np.flatnonzero(share >= lesion_share), np.flatnonzero(share == 0)
    if len(pos) == 0:
        return None
    neg = np.random.default_rng(seed).permutation(neg)[:NEGATIVE_TOKENS]
    keep = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    return clf.fit(x[keep], y)


def probe_scores(clf, studies: list[dict], stage: str, finding: str, lesion_share: float):
    """``(token AUC, {study id: highest token score})`` of a fitted probe on ``studies``."""
    import numpy as np

    from hlip_fed.training.evaluate import label_aucs

    token_scores, token_labels, highest = [], [], {}
    for s in studies:
        score = clf.decision_function(s["tokens"][stage])
        share = s["shares"][finding]
        sure = (share >= lesion_share) | (share == 0)
        token_scores.append(score[sure])
        token_labels.append(share[sure] >= lesion_share)
        highest[s["id"]] = float(score.max())
    auc = label_aucs({"t": np.concatenate(token_scores)}, {"t": np.concatenate(token_labels).astype(int)})["t"]
    return auc, highest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, steps=600, every=600)
    parser.add_argument("--lesion-share", type=float, default=0.1,
                        help="share of a patch inside a lesion's mask for its token to count as a lesion token")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from torch.utils.data import ConcatDataset

    from hlip_fed.model import create_model
    from hlip_fed.training.train import cycle, make_optimizer

    opened = open_consortium(args)
    if opened is None:
        return 2
    cfg, cons = opened
    findings = list(cons.prompts)
    lesions = [f for f in LESIONS if f in findings]
    torch.manual_seed(args.seed)
    model = create_model(cfg.model, seed=args.seed)
    visual = model.visual
    head = torch.nn.Linear(cfg.model.embed_dim, len(findings))
    start = time.monotonic()
    head_rows = []
    if args.steps:
        opt = make_optimizer(model, cfg.train)
        opt.add_param_group({"params": head.parameters(), "weight_decay": 0.0})
        labels = cons.training_labels()
        batches = cycle(cons.loader(ConcatDataset(list(cons.train.values())), shuffle=True, seed=args.seed), args.seed)
        loss = supervised_steps(visual, head, batches, opt, labels, findings, args.steps, cfg.train, 0, args.steps)
        site_test, held = site_test_aucs(visual, head, cons, findings), head_aucs(visual, head, cons, findings)
        head_rows.append({"what": f"the tower's own head (train BCE {loss:.3f})",
                          **{f"site_{f}": site_test[f"auc-{f}"] for f in lesions},
                          **{f"held_{f}": held[f"auc-{f}"] for f in lesions}})
    trained = time.monotonic() - start

    masks_dir = args.data / "truth" / "masks"
    img_size = cfg.model.vision.img_size
    train = [s for d in cons.train.values() for s in read_tokens(visual, d, masks_dir, img_size)]
    test = [s for d in cons.test.values() for s in read_tokens(visual, d, masks_dir, img_size)]
    held = read_tokens(visual, cons.heldout, masks_dir, img_size)
    rows = []
    for stage in train[0]["tokens"]:
        row = {"stage": stage}
        for f in lesions:
            clf = fit_probe(train, stage, f, args.lesion_share, args.seed)
            if clf is None:
                continue
            row[f"token_{f}"], test_high = probe_scores(clf, test, stage, f, args.lesion_share)
            _, held_high = probe_scores(clf, held, stage, f, args.lesion_share)
            ids, column = list(test_high), np.array([[v] for v in test_high.values()])
            row[f"site_{f}"] = within_site_aucs(ids, column, cons.site_labels, [f])[f"auc-{f}"]
            ids, column = list(held_high), np.array([[v] for v in held_high.values()])
            row[f"held_{f}"] = aucs(ids, column, cons.labels, [f])[f"auc-{f}"]
        rows.append(row)
        print(f"{stage}: " + " ".join(f"{f} {row.get(f'site_{f}', float('nan')):.2f}" for f in lesions),
              file=sys.stderr, flush=True)

    n_lesion = {f: int(sum((s["shares"][f] >= args.lesion_share).sum() for s in train)) for f in lesions}
    print(f"Token probe of the {'trained' if args.steps else 'untrained'} HLIP tower on {args.data} "
          f"({len(train)} training studies, {len(test)} site-test, {len(held)} held-out; sequences: "
          f"{args.sequences or 'all'}; {args.steps} supervised steps, {batches_drawn(cfg.train)}; lesion tokens in "
          f"training: {', '.join(f'{f} {n}' for f, n in n_lesion.items())}; overrides: {args.overrides or 'none'})\n")
    columns = [("stage", "stage", "")]
    columns += [(f"token_{f}", f"token {f} (site test)", ".3f") for f in lesions]
    columns += [(f"site_{f}", f"site test {f}", ".3f") for f in lesions]
    columns += [(f"held_{f}", f"held-out {f}", ".3f") for f in lesions]
    print(table(rows, columns))
    for r in head_rows:
        print(f"\n{r['what']}: site test " + " · ".join(f"{r[f'site_{f}']:.2f}" for f in lesions)
              + ", held-out " + " · ".join(f"{r[f'held_{f}']:.2f}" for f in lesions))
    write_json(args.json, {"machine": machine(), "data": str(args.data), "sites": list(cons.train),
                           "sequences": args.sequences, "config": args.config, "overrides": args.overrides,
                           "steps": args.steps, "lesion_share": args.lesion_share, "lesion_tokens": n_lesion,
                           "train_seconds": trained, "seconds": time.monotonic() - start, "head": head_rows,
                           "stages": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
