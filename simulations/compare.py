"""Does federation work? Pooled vs local-only vs FedAvg vs FedProx (and leave-one-site-out).

    python -m simulations.compare --data DIR --out OUT [--preset benchmark] [--config learning] [--seeds 3] [--overrides "..."] [--init MODEL_DIR]
        [--sites a,b] [--first-seed K]

All methods get the same compute: batch size ``train.batch_size`` and a budget of
``T = federation.rounds * federation.local_steps * n_sites`` optimizer steps in total.

* ``pooled``: one model trained centrally on the union of every site's training studies, T steps.
* ``local``: each site alone, each given the full budget T, with early stopping on a validation
  split carved from its own training studies (the run's own loss, which needs no labels), so a
  small site is not starved.
* ``fedavg`` / ``fedprox``: the real ServerApp and ClientApp (in-process, see
  :mod:`simulations.inprocess`): every site runs ``local_steps`` per round.
* ``loso``: for each site, the federation of the other sites, evaluated on that site's test split.

Everything but ``loso`` is evaluated on the consortium's held-out set. ``OUT/results.json`` has one
block per method with ``zeroshot_auc_mean``, ``balanced_acc_mean``, ``r1``, ``r5``, ``r10``,
``probe_auc_mean``, ``prompt_ceiling_mean`` and, per finding, ``zeroshot_auc_<finding>``,
``probe_auc_<finding>`` (a 5-fold cross-validated logistic probe of the held-out image embeddings:
does the image tower encode the finding?) and ``prompt_ceiling_<finding>`` (the prompts scored
against the held-out reports' embeddings from the same model's text tower: how far can zero-shot
with these prompts go?); the zero-shot AUC and the probe are also given within each modality's
held-out studies (``zeroshot_auc_ct_<finding>``, ``probe_auc_mr_<finding>``, ...). Each is the mean
over seeds, with ``_sd`` from two seeds on and ``_ci95``, the first seed's bootstrap 95 % interval
over held-out studies (zero-shot and retrieval);
``OUT/results.md`` and ``OUT/results.png`` show the same. The pooled model is saved in
``OUT/seed-<k>/pooled/model``, each federation's in ``OUT/seed-<k>/<method>/model``. If ``DIR`` does
not exist it is generated (``--preset``). ``--sites`` keeps some of the sites (every method, and the
budget, counts those alone) and scores on the held-out studies of their modalities, e.g. the two CT
sites on the held-out CT studies.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import ConcatDataset, DataLoader, Subset

from hlip_fed.atomic import write_json_atomic
from hlip_fed.config import Config, config_hash, load_config
from hlip_fed.data.dataset import SiteBatchSampler, SiteDataset, collate_studies
from hlip_fed.errors import HlipError
from hlip_fed.federation.coordinator import resume_hash
from hlip_fed.federation.local import _SITES, latest_site_local
from hlip_fed.federation.params import federated_keys, set_arrays, start_from
from hlip_fed.federation.run import consortium_sites, read_labels, read_prompts
from hlip_fed.model import HLIP, create_model, create_tokenizer
from hlip_fed.model.text_cache import TextFeatureCache
from hlip_fed.outputs.report import read_rounds
from hlip_fed.synth.consortium import build_consortium
from hlip_fed.training.evaluate import evaluate
from hlip_fed.training.train import (cycle, emulated_precision, make_optimizer, scan_dtype, train_steps,
                                    training_precision)
from simulations.inprocess import run_federation

# results.json key -> evaluate()'s metric, and the column heading in results.md
KEYS = {"zeroshot_auc_mean": "auc-mean", "balanced_acc_mean": "bacc-mean", "r1": "r1", "r5": "r5", "r10": "r10",
        "probe_auc_mean": "probe-mean", "prompt_ceiling_mean": "ceiling-mean"}
HEADINGS = {"zeroshot_auc_mean": "zero-shot AUC", "balanced_acc_mean": "balanced acc", "r1": "R@1", "r5": "R@5",
            "r10": "R@10", "probe_auc_mean": "probe AUC", "prompt_ceiling_mean": "prompt ceiling"}
# The federated methods, each a federation.strategy run at the same budget as pooled training;
# fedbn is FedAvg with the vision LayerNorms kept at each site (federation.site_local=[norms]),
# scored as the mean over the sites' own models (the global weights with each site's norms).
FEDERATED = ("fedavg", "fedprox", "fedadam", "fedavgm", "fedbn")
METHODS = ("pooled", "local", *FEDERATED, "loso")
# Per-finding families: results.json prefix (+ finding name) -> evaluate()'s metric prefix, heading
FINDING_FAMILIES = {"zeroshot_auc_": ("auc-", "zero-shot AUC"), "probe_auc_": ("probe-", "image-embedding probe AUC"),
                    "prompt_ceiling_": ("ceiling-", "prompt ceiling (prompts vs the held-out reports)"),
                    # the same findings scored within one modality's held-out studies
                    "zeroshot_auc_ct_": ("auc@CT-", "zero-shot AUC on the CT studies"),
                    "zeroshot_auc_mr_": ("auc@MR-", "zero-shot AUC on the MR studies"),
                    "probe_auc_ct_": ("probe@CT-", "image-embedding probe AUC within the CT studies"),
                    "probe_auc_mr_": ("probe@MR-", "image-embedding probe AUC within the MR studies")}


def finding_keys(run: dict) -> dict[str, str]:
    """``zeroshot_auc_<finding>``, ``probe_auc_<finding>`` and ``prompt_ceiling_<finding>`` for each
    finding a run scored: a mean near chance can hide one finding that is learnt."""
    out = {}
    for family, (metric, _) in FINDING_FAMILIES.items():
        for k, count in run.items():
            if k.startswith(metric) and k.endswith("-count") and k != f"{metric}mean-count" and count > 0:
                out[family + k[len(metric):-len("-count")]] = k[: -len("-count")]
    return out


def family_of(key: str) -> str | None:
    """The per-finding family a results.json key belongs to: the longest prefix that matches
    (``zeroshot_auc_ct_mass`` is of ``zeroshot_auc_ct_``, not ``zeroshot_auc_``)."""
    return max((f for f in FINDING_FAMILIES if key.startswith(f)), key=len, default=None)


class Consortium:
    """The consortium's datasets, built once and shared by every method and seed."""

    def __init__(self, root: Path, cfg: Config, sites: list[str] | None = None, sequences: list[str] | None = None):
        """``sites`` names the sites to keep (every site when ``None`` or empty); with a choice, the
        held-out set keeps the studies of the modalities those sites train on (e.g. the CT sites,
        scored on the held-out CT studies). An unknown site is a :class:`HlipError`. ``sequences``
        (e.g. ``["FLAIR"]``) keeps only the scans of those sequences in every split, and the studies
        that hold one; a split left without a study is a :class:`HlipError`."""
        self.root, self.cfg = root, cfg
        found = consortium_sites(root)
        self.sites = found
        if sites:
            unknown = sorted(set(sites) - {s.name for s in found})
            if unknown:
                known = ", ".join(s.name for s in found)
                raise HlipError(f"{root}: no site {', '.join(unknown)} (sites: {known})")
            self.sites = [s for s in found if s.name in sites]
        self.whole = len(self.sites) == len(found)  # False: a federation of these sites reads a view
        img = cfg.model.vision.img_size
        self.train = {s.name: SiteDataset(s, cfg.data, img, split="train", train=True) for s in self.sites}
        self.test = {s.name: SiteDataset(s, cfg.data, img, split="test") for s in self.sites}
        self.heldout = SiteDataset(root / "heldout", cfg.data, img, split=None)
        if sites:
            trained = {m for data in self.train.values() for m in modalities(data).values()}
            kind = modalities(self.heldout)
            self.heldout.entries = [e for e in self.heldout.entries if kind[e["study_id"]] in trained]
        if sequences:
            for data in [*self.train.values(), *self.test.values(), self.heldout]:
                keep_sequences(data, sequences)
        self.labels = read_labels(root / "truth" / "heldout.jsonl")
        self.site_labels = {s.name: read_labels(root / "truth" / f"{s.name}.jsonl") for s in self.sites}
        self.prompts = read_prompts(root)

    def data_root(self, out: Path) -> Path:
        """The folder a federation of the kept sites reads: the consortium's own, or a view of it
        under ``out`` when some of its sites were left out."""
        if self.whole:
            return self.root
        return site_view(self.root, [s.name for s in self.sites], out / "sites-view")

    def training_labels(self) -> dict[str, dict[str, int]]:
        """Study id -> labels of every kept site's studies, in one mapping."""
        return {i: y for labels in self.site_labels.values() for i, y in labels.items()}

    def loader(self, dataset, shuffle: bool = False, seed: int = 0, dtype: torch.dtype | None = None) -> DataLoader:
        """Batches of ``dataset``, their scans in ``dtype`` (default: as the cache holds them); a
        shuffled (training) loader reads and augments studies in ``data.num_workers`` worker
        processes, kept for every pass, and over several sites with ``train.site_batches`` draws
        each batch from one site."""
        gen = torch.Generator().manual_seed(seed)
        batch = self.cfg.train.batch_size
        workers = self.cfg.data.num_workers if shuffle else 0
        common = {"collate_fn": functools.partial(collate_studies, dtype=dtype), "num_workers": workers,
                  "persistent_workers": workers > 0}
        if shuffle and self.cfg.train.site_batches and isinstance(dataset, ConcatDataset):
            sizes = [len(d) for d in dataset.datasets]
            return DataLoader(dataset, batch_sampler=SiteBatchSampler(sizes, batch, gen), **common)
        return DataLoader(dataset, batch_size=batch, shuffle=shuffle, generator=gen,
                          drop_last=shuffle and len(dataset) > batch, **common)


def keep_sequences(dataset: SiteDataset, sequences: list[str]) -> None:
    """Keeps only the scans of ``sequences`` in ``dataset``, and the studies that hold one; a scan
    without a sequence (a CT series) is named by its modality."""
    entries = []
    for entry in dataset.entries:
        scans = [scan for scan in entry["scans"] if (scan.get("sequence") or scan.get("modality")) in sequences]
        if scans:
            entries.append({**entry, "scans": scans})
    if not entries:
        raise HlipError(f"{dataset.site}: no {' or '.join(sequences)} scan in any study")
    dataset.entries = entries


def modalities(dataset: SiteDataset) -> dict[str, str]:
    """Study id -> the modality of its scans (``CT``, ``MR``; ``mixed`` when a study holds both)."""
    out = {}
    for entry in dataset.entries:
        kinds = {scan.get("modality") or "unknown" for scan in entry["scans"]}
        out[entry["study_id"]] = kinds.pop() if len(kinds) == 1 else "mixed"
    return out


def heldout_metrics(model: HLIP, tok, cons: Consortium, dataset=None, labels=None) -> dict[str, float]:
    """Every figure of ``model`` on the held-out set (or ``dataset``), each finding also per modality."""
    dataset = dataset if dataset is not None else cons.heldout
    return evaluate(model, tok, cons.loader(dataset), labels if labels is not None else cons.labels, cons.prompts,
                    bootstrap=200, diagnose=True, groups=modalities(dataset))


@torch.no_grad()
def validation_loss(model: HLIP, tok, loader) -> float:
    """The mean loss of the model's own objective over ``loader`` (contrastive, or masked image
    modelling for a ``masked`` model)."""
    model.eval()
    losses = []
    for images, mask, reports, _ in loader:
        if model.masked is not None:
            losses.append(model.masked_loss(images, mask).item())
            continue
        out = model(images, mask, **tok(reports))
        losses.append(model.loss(out["image"], out["text"]).item())
    return float(np.mean(losses)) if losses else math.inf


def train_central(cfg: Config, dataset, steps: int, seed: int, cons: Consortium, val=None, eval_every: int = 0):
    """Train one model on ``dataset`` for ``steps`` optimiser steps; with ``val``, keep the weights
    of the best validation loss. Returns the model, its tokenizer and the steps taken."""
    torch.manual_seed(seed)
    model, tok = create_model(cfg.model, seed=cfg.train.seed), create_tokenizer(cfg.model)
    if cfg.federation.init:  # every method starts from the same given model
        start_from(model, cfg.federation.init, federated_keys(model, cfg.federation.groups))
    opt = make_optimizer(model, cfg.train)
    batches = cycle(cons.loader(dataset, shuffle=True, seed=seed, dtype=scan_dtype(cfg)), seed)
    # A locked text tower's report features once per report, as every site does (in memory here).
    text_cache = TextFeatureCache.for_training(model, tok, cfg.train)
    chunk = eval_every if val is not None and eval_every else steps
    best, best_state, done = math.inf, None, 0
    while done < steps:
        n = min(chunk, steps - done)
        done += train_steps(model, tok, batches, cfg.train, n, optimizer=opt, start_step=done, total_steps=steps,
                            text_cache=text_cache).steps
        if val is not None:
            loss = validation_loss(model, tok, cons.loader(val))
            if loss < best:
                best, best_state = loss, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, tok, done


def federated_steps(run: Path) -> int:
    """Optimiser steps the sites of a federated run took, summed over rounds and sites."""
    return int(sum(m.get("train-steps", 0) for r in read_rounds(run) for m in (r.train_sites or {}).values()))


def split_validation(dataset: SiteDataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """Training and validation studies of one site; validation reads its scans as evaluation does."""
    n = len(dataset)
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * fraction))) if n > 2 else 0
    return Subset(dataset, sorted(order[k:].tolist())), Subset(dataset.evaluation_view(), sorted(order[:k].tolist()))


def federated(method: str, cfg_args: dict, data_root: Path, out: Path, n_sites: int, seed: int) -> Path:
    """Run the real ServerApp/ClientApp in-process; returns the run folder (final model in model/)."""
    run = out / method
    shutil.rmtree(run, ignore_errors=True)
    strategy, extra = ("fedavg", ["federation.site_local=[norms]"]) if method == "fedbn" else (method, [])
    overrides = cfg_args["overrides"] + extra + [f"federation.strategy={strategy}", f"federation.min_nodes={n_sites}",
                                                 f"train.seed={seed}"]
    run_config = {"config": cfg_args["config"], "overrides": " ".join(shlex.quote(o) for o in overrides),
                  "data-root": str(data_root), "run-dir": str(run)}
    _SITES.clear()
    run_federation(run_config, num_nodes=n_sites, run_id=seed * 1000 + len(str(run)))
    _SITES.clear()
    return run


def federated_metrics(run: Path, cons: Consortium, tok) -> dict[str, float]:
    """Held-out figures of a federated run's model; with site-local parameters, the mean over the
    sites' own models (the global weights with each site's kept parameters)."""
    model = HLIP.from_pretrained(run / "model")
    kept = [latest_site_local(run / "sites" / site.name) for site in cons.sites]
    if not any(kept):
        return heldout_metrics(model, tok, cons)
    per_site = []
    for path in kept:  # every site's file holds all the site-local keys: each replaces the last's
        set_arrays(model, load_file(path))
        per_site.append(heldout_metrics(model, tok, cons))
    return {k: float(np.mean([m[k] for m in per_site])) for k in per_site[0]}


def site_view(root: Path, keep: list[str], view: Path) -> Path:
    """A consortium folder at ``view`` holding only the sites named in ``keep`` (symlinks, nothing copied)."""
    shutil.rmtree(view, ignore_errors=True)
    (view / "sites").mkdir(parents=True)
    for site in consortium_sites(root):
        if site.name in keep:
            (view / "sites" / site.name).symlink_to(site.resolve())
    for name in ("heldout", "truth", "prompts.json"):
        if (root / name).exists():
            (view / name).symlink_to((root / name).resolve())
    return view


def run_settings(cfg: Config) -> str:
    """Digest of the settings a seed's figures depend on: what a federation must match to resume
    (:func:`~hlip_fed.federation.coordinator.resume_hash`) and the number of rounds, which sets
    every method's budget here."""
    return config_hash({"training": resume_hash(cfg), "rounds": cfg.federation.rounds})


def run_seed(cons: Consortium, cfg: Config, cfg_args: dict, out: Path, seed: int, methods: list[str], log,
             resume: bool = False) -> dict:
    """Every method for one seed. After each method the figures so far and each method's wall time
    go to ``out/progress.json``; with ``resume`` the methods found there are not run again."""
    fed = cfg.federation
    n = len(cons.sites)
    budget = fed.rounds * fed.local_steps * n
    progress_file = out / "progress.json"
    saved = json.loads(progress_file.read_text()) if resume and progress_file.is_file() else {}
    settings = run_settings(cfg)
    if saved.get("settings", settings) != settings:  # files from before the digest was kept carry none
        raise HlipError(f"{progress_file}: its methods ran under other settings ({saved['settings']}, now "
                        f"{settings}); resume with the same --config and --overrides, or write to another --out")
    res: dict = saved.get("metrics", {})
    seconds: dict = saved.get("seconds", {})
    steps: dict = saved.get("steps", {})  # optimiser steps each method took: the budget, for every one

    def done(method: str, started: float, taken: int) -> None:
        seconds[method], steps[method] = round(time.time() - started, 1), taken
        write_json_atomic(progress_file, {"metrics": res, "seconds": seconds, "steps": steps, "settings": settings})

    if "pooled" in methods and "pooled" not in res:
        log(f"seed {seed}: pooled, {budget} steps")
        started = time.time()
        model, tok, taken = train_central(cfg, ConcatDataset(list(cons.train.values())), budget, seed, cons)
        model.save_pretrained(out / "pooled" / "model")  # beside the federated runs' models
        res["pooled"] = heldout_metrics(model, tok, cons)
        done("pooled", started, taken)
    if "local" in methods:
        res.setdefault("local", {})
        for site, data in cons.train.items():
            if site in res["local"]:
                continue
            log(f"seed {seed}: local-only {site}, up to {budget} steps")
            started = time.time()
            train, val = split_validation(data, 0.2, seed)
            model, tok, taken = train_central(cfg, train, budget, seed, cons, val=val if len(val) else None,
                                              eval_every=max(1, budget // 8))
            res["local"][site] = heldout_metrics(model, tok, cons)
            done(f"local-{site}", started, taken)
    for method in FEDERATED:
        if method in methods and method not in res:
            log(f"seed {seed}: {method}, {fed.rounds} rounds x {fed.local_steps} local steps x {n} sites")
            started = time.time()
            run = federated(method, cfg_args, cons.data_root(out), out, n, seed)
            res[method] = federated_metrics(run, cons, create_tokenizer(cfg.model))
            done(method, started, federated_steps(run))
    if "loso" in methods:
        res.setdefault("loso", {})
        for site in cons.sites:
            if site.name in res["loso"]:
                continue
            log(f"seed {seed}: federation without {site.name}")
            started = time.time()
            others = [s.name for s in cons.sites if s != site]
            view = site_view(cons.root, others, out / "loso" / f"without-{site.name}")
            run = federated("fedavg", cfg_args, view, out / "loso" / site.name, n - 1, seed)
            model = HLIP.from_pretrained(run / "model")
            res["loso"][site.name] = heldout_metrics(model, create_tokenizer(cfg.model), cons,
                                                     cons.test[site.name], cons.site_labels[site.name])
            done(f"loso-{site.name}", started, federated_steps(run))
    return {m: res[m] for m in METHODS if m in res and m in methods}


def summarise(per_seed: list[dict]) -> dict:
    """Mean, sd over seeds, and the first seed's bootstrap interval, per method (and site)."""

    def block(runs: list[dict]) -> dict:
        out = {}
        for name, key in {**KEYS, **finding_keys(runs[0])}.items():
            vals = [r[key] for r in runs if key in r]
            if not vals:
                continue
            out[name] = float(np.mean(vals))
            if len(vals) > 1:  # one seed has no spread to report
                out[f"{name}_sd"] = float(np.std(vals, ddof=1))
            lo, hi = runs[0].get(f"{key}-ci-low"), runs[0].get(f"{key}-ci-high")
            if lo is not None:
                out[f"{name}_ci95"] = [lo, hi]
        return out

    summary: dict = {}
    for method in per_seed[0]:
        if isinstance(next(iter(per_seed[0][method].values())), dict):  # per-site blocks
            summary[method] = {s: block([r[method][s] for r in per_seed]) for s in per_seed[0][method]}
        else:
            summary[method] = block([r[method] for r in per_seed])
    if "local" in summary:
        worst = min(summary["local"], key=lambda s: summary["local"][s].get("zeroshot_auc_mean", 0.0))
        summary["local_worst"] = {"site": worst, **summary["local"][worst]}
    return summary


def markdown(summary: dict, families: tuple[str, ...] = tuple(FINDING_FAMILIES)) -> str:
    """The methods' headline table, then one table per finding family in ``families`` (by default
    all: zero-shot, probe, ceiling)."""
    per: list[tuple[str, dict]] = []
    worst = summary.get("local_worst", {}).get("site")
    for method, b in summary.items():
        if method == "local_worst":
            continue  # marked on its own row among the local sites
        elif method in ("local", "loso"):
            per += [(f"{method} ({site}{', worst' if method == 'local' and site == worst else ''})", bb)
                    for site, bb in b.items()]
        else:
            per.append((method, b))

    def fmt(b: dict, k: str) -> str:
        if k not in b:
            return "–"
        text = f"{b[k]:.3f} ± {b[k + '_sd']:.3f}" if k + "_sd" in b else f"{b[k]:.3f}"
        if k + "_ci95" in b and k.startswith("zeroshot_auc_") and k != "zeroshot_auc_mean":
            text += " [{:.2f}, {:.2f}]".format(*b[k + "_ci95"])
        return text

    def rows(columns: list[str], headings: list[str]) -> list[str]:
        out = ["| method | " + " | ".join(headings) + " |", "|---" * (len(columns) + 1) + "|"]
        return out + [f"| {label} | " + " | ".join(fmt(b, k) for k in columns) + " |" for label, b in per]

    lines = rows(list(KEYS), [HEADINGS[k] for k in KEYS])
    for family in families:
        title = FINDING_FAMILIES[family][1]
        names = sorted({k[len(family):] for _, b in per for k in b if family_of(k) == family
                        and not k.endswith(("_sd", "_ci95")) and k[len(family):] != "mean"})
        if names:
            interval = " [bootstrap 95 % interval, first seed]" if family.startswith("zeroshot_auc_") else ""
            lines += ["", f"{title[0].upper()}{title[1:]} per finding{interval}:", ""]
            lines += rows([family + n for n in names], names)
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib  # lazy: only drawing imports pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, aucs, r5s = [], [], []
    for method in ("pooled", *FEDERATED):
        if method in summary:
            labels.append(method)
            aucs.append(summary[method].get("zeroshot_auc_mean", np.nan))
            r5s.append(summary[method].get("r5", np.nan))
    for site, b in summary.get("local", {}).items():
        labels.append(f"local\n{site}")
        aucs.append(b.get("zeroshot_auc_mean", np.nan))
        r5s.append(b.get("r5", np.nan))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(labels)) * 2, 3.5))
    for ax, vals, title in ((axes[0], aucs, "held-out zero-shot AUC (mean)"), (axes[1], r5s, "held-out R@5")):
        ax.bar(range(len(vals)), vals, color=["C0" if not lbl.startswith("local") else "C7" for lbl in labels])
        ax.set_xticks(range(len(vals)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        if "AUC" in title:
            ax.axhline(0.5, color="k", lw=0.8, ls=":")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config", default=None,
                        help="run preset or YAML (as for flwr run; default: learning for --preset benchmark, else demo)")
    parser.add_argument("--overrides", default="", help="space-separated dotted config overrides")
    parser.add_argument("--resume", action="store_true",
                        help="keep the methods a previous run of the same --out finished (OUT/seed-K/progress.json); "
                             "refused if that run's settings differ")
    parser.add_argument("--init", type=Path, help="a saved model folder every method starts from (federation.init)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="run seeds FIRST .. FIRST+SEEDS-1 (e.g. one more seed of an earlier comparison)")
    parser.add_argument("--methods", default="pooled,local,fedavg,fedprox,loso",
                        help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--preset", default="demo", help="synth preset when --data must be generated")
    parser.add_argument("--sites", default="",
                        help="comma-separated sites to keep, scored on the held-out studies of their modalities "
                             "(default: every site, every held-out study)")
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = "learning" if args.preset == "benchmark" else "demo"
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    data, out = args.data.resolve(), args.out.resolve()
    if not (data / "sites").is_dir():
        log(f"generating the {args.preset} consortium in {data}")
        build_consortium(data, args.preset, seed=0)
    overrides = shlex.split(args.overrides) + ([f"federation.init={args.init.resolve()}"] if args.init else [])
    cfg = load_config(files=[args.config] if args.config else [], overrides=overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if slow := emulated_precision(cfg.train):
        log(f"warning: {slow}")
    log(f"training precision {training_precision(cfg)}")
    if cfg.data.cache_dir is None:
        cfg.data.cache_dir = str(out / "cache")
        overrides = overrides + [f"data.cache_dir={cfg.data.cache_dir}"]
    cfg_args = {"config": args.config, "overrides": overrides}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown method(s) {', '.join(unknown)}")
    try:
        cons = Consortium(data, cfg, sites=[s for s in args.sites.split(",") if s])
    except HlipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    per_seed = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        seed_cfg = load_config(files=[args.config] if args.config else [], overrides=overrides + [f"train.seed={seed}"])
        try:
            per_seed.append(run_seed(cons, seed_cfg, cfg_args, out / f"seed-{seed}", seed, methods, log, args.resume))
        except HlipError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    summary = summarise(per_seed)
    fed = cfg.federation
    result = {
        "data": str(data), "seeds": args.seeds, "first_seed": args.first_seed, "sites": [s.name for s in cons.sites],
        "budget_steps": fed.rounds * fed.local_steps * len(cons.sites), "batch_size": cfg.train.batch_size,
        "rounds": fed.rounds, "local_steps": fed.local_steps, **summary, "per_seed": per_seed,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    table = markdown(summary)
    (out / "results.md").write_text(table)
    plot(summary, out / "results.png")
    print(table)
    log(f"wrote {out / 'results.json'}, results.md, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
