"""Compressed transport of site replies: bytes per site and the effect on the trained model.

Runs the same federation (by default the ``demo`` run preset: tiny HLIP with the MiniLM text tower,
4 rounds of 8 local steps on the demo consortium) once per transport — fp32 weights (the reference),
fp16 and bf16 deltas, fp16 weights — through the real ServerApp and ClientApp code on the
in-process Grid (:mod:`simulations.inprocess`), which is deterministic: the fp32 run repeated gives
the same bits, so every difference below comes from the transport. Reported per transport:

* bytes per site and round as the sites report them (``bytes-sent``, the encoded payload) and the
  serialised size of Flower's ``Array`` objects (payload plus one npy header per array),
* the held-out zero-shot AUC (``auc-mean``) and R@5 after every round, and the change from fp32,
* how far the final global weights moved from fp32, relative to how far fp32 training moved them
  from the initial model: ``|w_t - w_fp32| / |w_fp32 - w_0|`` (global L2 norms over the federated
  arrays). This is the comparison that does not depend on whether the model learned anything.

    python -m benchmarks.transport --data data/demo --json transport.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import tempfile
import time
from pathlib import Path


from benchmarks.common import machine, table, write_json

TRANSPORTS = [("fp32", False), ("fp16", True), ("bf16", True), ("fp16", False)]
TINY_TEXT = [
    "model.text.pretrained=false",
    "model.text.overrides={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}",
]


def run(data: Path, out: Path, preset: str, overrides: list[str], transport: str, deltas: bool, sites: int) -> dict:
    from hlip_fed.federation.checkpoint import load_latest
    from simulations.inprocess import run_federation

    extra = [f"federation.transport={transport}", f"federation.send_deltas={str(deltas).lower()}"]
    rc = {"data-root": str(data), "run-dir": str(out), "config": preset,
          "overrides": " ".join(shlex.quote(o) for o in overrides + extra)}
    t0 = time.perf_counter()
    grid = run_federation(rc, num_nodes=sites, run_id=1)
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = [r for r in records if r.get("round", 0) > 0]
    _, _, content = grid.sent[-1]
    serialised = sum(len(a.data) for a in content["arrays"].values())
    return {
        "transport": transport + (" deltas" if deltas else ""),
        "seconds": seconds,
        "bytes_per_site": max(v for r in rounds for v in r["bytes_per_site"].values()),
        "serialised_bytes": serialised,
        "rejected": sum(len(r["rejected"]) for r in rounds),
        "auc": [r["heldout"].get("auc-mean") for r in rounds],
        "r5": [r["heldout"].get("r5") for r in rounds],
        "weights": {k: v for k, v in load_latest(out / "checkpoints").arrays.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="consortium folder (hlip-fed synth --preset demo)")
    ap.add_argument("--preset", default="demo", help="run preset (default demo)")
    ap.add_argument("--overrides", nargs="*", default=[], help="extra dotted overrides for every run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 round, 2 local steps (a smoke test)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import numpy as np
    import torch

    from hlip_fed.federation.local import _SITES
    from hlip_fed.federation.run import consortium_sites
    from hlip_fed.model import create_model
    from hlip_fed.config import load_config

    torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    if args.quick:
        overrides = TINY_TEXT + ["model.vision.img_size=[16, 32, 32]", "train.batch_size=2", "train.warmup_steps=1",
                                 "federation.local_steps=2", "federation.rounds=1"] + overrides
    sites = len(consortium_sites(args.data))
    overrides.append(f"federation.min_nodes={sites}")
    results = []
    with tempfile.TemporaryDirectory(prefix="hlip-transport-") as tmp:
        for transport, deltas in TRANSPORTS:
            _SITES.clear()
            out = Path(tmp) / f"{transport}-{int(deltas)}"
            results.append(run(args.data, out, args.preset, overrides, transport, deltas, sites))
            print(f"{results[-1]['transport']}: {results[-1]['seconds']:.0f} s, AUC {results[-1]['auc']}", flush=True)
    cfg = load_config(files=[args.preset] if args.preset else [], overrides=overrides)
    initial = create_model(cfg.model, seed=cfg.train.seed).state_dict()
    ref = results[0]

    def norm(arrays: dict) -> float:
        return float(np.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in arrays.values())))

    # How far fp32 training moved the federated weights from the initial model.
    moved = norm({k: np.asarray(ref["weights"][k], np.float64) - initial[k].double().numpy() for k in ref["weights"]})
    rows = []
    for r in results:
        diff = {k: np.asarray(r["weights"][k], np.float64) - np.asarray(ref["weights"][k], np.float64) for k in ref["weights"]}
        rows.append({
            "transport": r["transport"],
            "bytes": int(r["bytes_per_site"]),
            "ratio": r["bytes_per_site"] / ref["bytes_per_site"],
            "serialised": r["serialised_bytes"],
            "serialised_ratio": r["serialised_bytes"] / ref["serialised_bytes"],
            "auc": r["auc"][-1],
            "auc_delta": (r["auc"][-1] - ref["auc"][-1]) if r["auc"][-1] is not None else None,
            "max_auc_delta_any_round": max(abs(a - b) for a, b in zip(r["auc"], ref["auc"])),
            "r5": r["r5"][-1],
            "weight_error": norm(diff) / moved if moved else None,
            "max_abs_weight_diff": max(float(np.abs(v).max()) for v in diff.values()),
            "rejected": r["rejected"],
            "seconds": r["seconds"],
            "auc_per_round": r["auc"],
        })
    print(f"\n{len(ref['auc'])} rounds, {sites} sites, preset {args.preset}; fp32 moved the weights by |w - w0| = {moved:.4g}\n")
    print(table(rows, [("transport", "transport", ""), ("bytes", "bytes/site/round", ",d"), ("ratio", "× fp32", ".3f"),
                       ("serialised", "serialised B", ",d"), ("serialised_ratio", "× fp32", ".4f"),
                       ("auc", "held-out AUC", ".4f"), ("auc_delta", "Δ AUC", "+.4f"),
                       ("max_auc_delta_any_round", "max |Δ AUC| any round", ".4f"), ("r5", "R@5", ".3f"),
                       ("weight_error", "weight error vs fp32 (rel.)", ".2e"), ("rejected", "rejected", "d")]))
    write_json(args.json, {"machine": machine(), "preset": args.preset, "overrides": overrides, "sites": sites,
                           "fp32_movement": moved, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
