"""The locked text encoder's report-feature cache: time of a site's local training round and evaluation.

One site of the consortium (by default the demo run preset: tiny HLIP, MiniLM text tower, batch 4,
8 local steps) is built twice in one process, with ``train.text_cache`` on and off, each with its own
state folder. Both train the same rounds from the same global model (same seeds, same batches),
interleaved (cached, uncached, cached, ...) so that a change of machine load hits both alike:

* round 1 with the cache cold: every report drawn is encoded once and stored,
* rounds 2.. with the cache warm: the text encoder does not run at all once every report was seen.

Reported: ``train-seconds`` of each round (the site's own timing of its local steps), the median
over the warm rounds, the speed-up, and the share of the uncached round that the text encoder took
(measured separately: the encoder's forward over the same number of batches). After each round
the site evaluates the trained model on its test split with the consortium's prompts, as the
federation's evaluate message does: its time, and whether both variants' metrics agree.

    python -m benchmarks.text_cache --data data/demo --json text-cache.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, table, write_json

TINY_TEXT = [
    "model.text.pretrained=false",
    "model.text.overrides={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="consortium folder (hlip-fed synth --preset demo)")
    ap.add_argument("--site", type=int, default=0, help="index of the site in sites/")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--overrides", nargs="*", default=[])
    ap.add_argument("--rounds", type=int, default=5, help="rounds per variant (round 1 is the cold cache)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 rounds of 2 steps (a smoke test)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from hlip_fed.config import load_config
    from hlip_fed.federation.local import LocalSite
    from hlip_fed.federation.params import get_arrays
    from hlip_fed.federation.run import Site, consortium_sites, read_prompts
    from hlip_fed.training.train import autocast

    torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    if args.quick:
        overrides = TINY_TEXT + ["model.vision.img_size=[16, 32, 32]", "train.batch_size=2",
                                 "federation.local_steps=2"] + overrides
        args.rounds = 2
    overrides.append(f"federation.rounds={args.rounds}")
    data_dir = consortium_sites(args.data)[args.site]
    prompts = read_prompts(args.data)
    rows, variants = [], {}
    with tempfile.TemporaryDirectory(prefix="hlip-text-cache-") as tmp:
        for name, flag in (("cached", "true"), ("uncached", "false")):
            cfg = load_config(files=[args.preset], overrides=overrides + [f"train.text_cache={flag}"])
            site = Site(data_dir.name, data_dir, Path(tmp) / name, None)
            variants[name] = LocalSite(cfg, site)
        cached, plain = variants["cached"], variants["uncached"]
        assert cached.text_cache is not None and plain.text_cache is None
        arrays = get_arrays(plain.model, plain.keys)
        for r in range(1, args.rounds + 1):
            for name in (("cached", "uncached") if r % 2 else ("uncached", "cached")):
                local = variants[name]
                misses = local.text_cache.misses if local.text_cache is not None else None
                trained, metrics = local.train_round(arrays, server_round=r)
                t0 = time.perf_counter()
                evaluation = local.evaluate(trained, prompts)
                rows.append({"round": r, "variant": name, "seconds": metrics["train-seconds"],
                             "eval_seconds": time.perf_counter() - t0, "metrics": evaluation,
                             "loss": metrics["train-loss"],
                             "encoded": (local.text_cache.misses - misses) if misses is not None else None})
            print(rows[-2:], flush=True)
        # The text encoder's share of an uncached round: its forward over as many batches.
        cfg = plain.cfg
        reports = [plain.train_set[i][1] for i in range(min(len(plain.train_set), cfg.train.batch_size))]
        steps = cfg.federation.local_steps * cfg.train.grad_accum
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                tokens = plain.tokenizer(reports, train=True)
                with autocast(cfg.train):
                    plain.model.text.features(**tokens)
        encoder_seconds = time.perf_counter() - t0
    warm = {n: [x["seconds"] for x in rows if x["variant"] == n and x["round"] > 1] for n in variants}
    cold = {n: next(x["seconds"] for x in rows if x["variant"] == n and x["round"] == 1) for n in variants}
    med = {n: statistics.median(v) if v else cold[n] for n, v in warm.items()}
    losses_equal = all(
        abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"]))
        for a in rows if a["variant"] == "cached" for b in rows if b["variant"] == "uncached" and b["round"] == a["round"]
    )
    eval_warm = {n: statistics.median([x["eval_seconds"] for x in rows if x["variant"] == n and x["round"] > 1]
                                      or [x["eval_seconds"] for x in rows if x["variant"] == n]) for n in variants}
    metrics_equal = all(
        a["metrics"].keys() == b["metrics"].keys()
        and all(abs(a["metrics"][k] - b["metrics"][k]) <= 1e-4 for k in a["metrics"])
        for a in rows if a["variant"] == "cached" for b in rows if b["variant"] == "uncached" and b["round"] == a["round"]
    )
    summary = {
        "cold_round_seconds": cold,
        "warm_round_median_seconds": med,
        "speedup_warm": med["uncached"] / med["cached"],
        "speedup_cold": cold["uncached"] / cold["cached"],
        "encoder_forward_seconds_per_round": encoder_seconds,
        "encoder_share_of_uncached_round": encoder_seconds / med["uncached"],
        "losses_agree": losses_equal,
        "eval_median_seconds": eval_warm,
        "eval_speedup": eval_warm["uncached"] / eval_warm["cached"],
        "eval_metrics_agree": metrics_equal,
    }
    print()
    print(table(rows, [("round", "round", "d"), ("variant", "variant", ""), ("seconds", "train s", ".2f"),
                       ("encoded", "texts encoded", "d"), ("loss", "loss", ".5f"), ("eval_seconds", "evaluate s", ".2f")]))
    print()
    print(f"warm rounds: uncached {med['uncached']:.2f} s, cached {med['cached']:.2f} s -> "
          f"{summary['speedup_warm']:.2f}x; cold round {summary['speedup_cold']:.2f}x; the encoder's forward "
          f"alone takes {encoder_seconds:.2f} s per round ({100 * summary['encoder_share_of_uncached_round']:.0f} % "
          f"of an uncached round); losses agree: {losses_equal}")
    print(f"evaluation (test split, reports and prompts): uncached {eval_warm['uncached']:.2f} s, cached "
          f"{eval_warm['cached']:.2f} s -> {summary['eval_speedup']:.2f}x; metrics agree: {metrics_equal}")
    write_json(args.json, {"machine": machine(), "preset": args.preset, "overrides": overrides,
                           "site": data_dir.name, "rows": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
