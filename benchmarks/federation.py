"""What Flower's simulation runtime costs: round wall time against the same work without Flower.

Three measurements:

1. **Overhead.** One federated run through the real runtime (``flwr run . local-simulation``, a
   temporary Flower home with one simulated SuperNode per site, each with one CPU) against the same
   rounds run directly on the library classes, at the same thread count and parallelism: a pool of
   as many worker processes as the simulation runs ClientApp actors, each with as many torch
   threads as an actor gets, each keeping its :class:`~hlip_fed.federation.local.LocalSite`
   objects per site (a process-wide cache keyed by site), and the server's work (held-out
   evaluation, checkpoint, metrics line, plot) in the parent. A round is the same work on both
   sides: every site trains ``federation.local_steps`` steps, the updates are averaged (FedAvg,
   weighted by examples), every site evaluates the new model, the server evaluates it on the
   held-out set and checkpoints it. The direct run makes the ServerApp's exchanges: with
   ``federation.evaluate_with_train`` (the default) a site evaluates the model it receives inside
   its training task, and the last round's model in a task of its own. Round wall times come from
   when each round's line appears in ``metrics.jsonl``; round 1 includes start-up (runtime, model,
   text encoder, datasets, the initial evaluation) and is reported separately. Overhead ratio =
   Flower round / direct round.
2. **Process per message.** What deployment pays when every message starts a fresh ClientApp
   process: a new interpreter that imports the ClientApp, builds the site (model, text encoder,
   dataset) and trains one round, against the same round on a cached site.
3. **Scaling.** Simulated runs with 2 to 16 sites: wall time, round time and the peak summed RSS
   of the whole process tree (``flwr``, the local SuperLink, the simulation and its Ray workers).

Bytes sent per site per round are read from the run's ``metrics.jsonl``; the same figure for the
paper-sized presets is computed from their federated parameter groups.

    python -m benchmarks.federation --data data/demo --json federation.json
    python -m benchmarks.federation --quick --json /tmp/fed.json   # smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil

from benchmarks.common import TreeMemorySampler, machine, table, write_json
from simulations.toy_consortium import write_consortium

ROOT = Path(__file__).resolve().parents[1]
TINY_TEXT = [  # a one-layer random BERT on MiniLM's vocabulary (the tests' text tower)
    "model.text.pretrained=false",
    "model.text.overrides={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}",
]


def run_config(data: Path, run: Path, sites: int, rounds: int, overrides: list[str], preset: str) -> dict:
    ov = [f"federation.min_nodes={sites}", f"federation.rounds={rounds}"] + overrides
    return {"config": preset, "overrides": " ".join(shlex.quote(o) for o in ov),
            "data-root": str(data), "run-dir": str(run)}


def watch_rounds(path: Path, times: list[float], stop: threading.Event) -> None:
    """Append the arrival time of every new line of ``metrics.jsonl``."""
    seen = 0
    while not stop.is_set():
        try:
            n = path.read_text().count("\n") if path.exists() else 0
        except OSError:
            n = seen
        now = time.perf_counter()
        times.extend([now] * (n - seen))
        seen = max(seen, n)
        stop.wait(0.05)


def per_round(t0: float, ends: list[float]) -> list[float]:
    return [b - a for a, b in zip([t0] + ends[:-1], ends)]


# --- 1a. through Flower --------------------------------------------------------------------------


def _busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def round_profile(run: Path) -> list[dict]:
    """Where each round of a run went, from the run's own records.

    Per exchange (train, evaluate): the wall time from push to the last reply; how much of it at
    least one site's handler was running (``busy``: each handler ends at its audit line's time and
    lasted its reply's ``reply-seconds``); the wait from the push to the first handler's start and
    from the last handler's end to the last reply. Per round: the server's own time between the
    previous round's held-out evaluation and the train push (checkpoint, metrics line, plot, node
    check), between the exchanges (aggregation), and before and in the held-out evaluation.
    """
    from hlip_fed.federation.audit import read_audit

    handlers: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for state in sorted((run / "sites").iterdir()):
        for e in read_audit(state):
            secs = (e.get("metrics") or {}).get("metrics", {}).get("reply-seconds")
            if secs is not None and e.get("round") is not None:
                end = dt.datetime.fromisoformat(e["time"]).timestamp()
                handlers.setdefault((int(e["round"]), e["type"]), []).append((end - secs, end))
    out, previous_end = [], None
    for rec in (json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()):
        timing = rec.get("timing")
        if not timing:
            continue
        row: dict = {"round": rec["round"]}
        server, mark = {}, previous_end
        for ex in timing["exchanges"]:
            pushed, wall = ex["pushed"], max(ex["replies_s"], default=0.0)
            spans = [(a - pushed, b - pushed) for a, b in handlers.get((rec["round"], ex["type"]), [])]
            row[ex["type"]] = {"wall": wall, "busy": _busy(spans), "messages": ex["messages"],
                               "to_first_start": min(a for a, _ in spans) if spans else None,
                               "after_last_end": wall - max(b for _, b in spans) if spans else None}
            server[f"before_{ex['type']}"] = None if mark is None else pushed - mark
            mark = pushed + wall
        server["before_heldout"] = None if mark is None else timing["heldout_started"] - mark
        server["heldout"] = timing["heldout_s"]
        row["server"] = server
        previous_end = timing["heldout_started"] + timing["heldout_s"]
        out.append(row)
    return out


def actor_pids() -> set[int]:
    """PIDs of running Ray ClientApp actors (Ray titles their processes ``ray::ClientAppActor...``)."""
    return {p.pid for p in psutil.process_iter(["cmdline"]) if "ClientAppActor" in " ".join(p.info["cmdline"] or [])}


def flower_run(data: Path, run: Path, sites: int, rounds: int, overrides: list[str], preset: str,
               timeout: float) -> dict:
    from simulations.flower_home import flower_env, local_superlink_pids, stop_local_superlink, write_flower_home

    home = run.parent / f"{run.name}-flwr-home"
    write_flower_home(home, sites)
    rc = run_config(data, run, sites, rounds, overrides, preset)
    text = " ".join(f"{k}={json.dumps(v)}" for k, v in rc.items())
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", ".", "local-simulation", "--stream", "--run-config", text]
    ends: list[float] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch_rounds, args=(run / "metrics.jsonl", ends, stop), daemon=True)
    superlink: list[int] = []

    def detached() -> list[int]:
        if not superlink:
            superlink.extend(local_superlink_pids(home))
        return superlink

    actors: set[int] = set()
    t0 = time.perf_counter()
    watcher.start()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=flower_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_lines: list[str] = []
    reader = threading.Thread(target=lambda: log_lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        with TreeMemorySampler(proc.pid, also=detached) as mem:
            deadline = time.perf_counter() + timeout
            while proc.poll() is None and len(ends) < rounds and time.perf_counter() < deadline:
                actors.update(actor_pids())
                time.sleep(0.2)
            if len(ends) >= rounds:  # the run's work is done; give the ServerApp time to save the model
                final = run / "model" / "model.safetensors"
                while proc.poll() is None and not final.exists() and time.perf_counter() < deadline:
                    time.sleep(0.1)
            wall = time.perf_counter() - t0
            try:
                proc.wait(timeout=max(1.0, min(60.0, deadline - time.perf_counter())))
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        stop.set()
        stop_local_superlink(home)
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=5)
    watcher.join()
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
    if len(records) < rounds:
        tail = "".join(log_lines[-30:])
        raise RuntimeError(f"the Flower run completed {len(records)} of {rounds} rounds:\n{tail}")
    site_seconds = [[v["train-seconds"] for v in r["train_sites"].values()] for r in records]
    return {
        "round_seconds": per_round(t0, ends[:rounds]),
        "profile": round_profile(run),
        "wall_seconds": wall,
        "train_seconds_per_site": [statistics.mean(s) for s in site_seconds],
        "bytes_per_site": [statistics.mean(r["bytes_per_site"].values()) for r in records],
        "peak_rss_mb": mem.peak / 2**20,
        "peak_processes": mem.peak_processes,
        "actors": len(actors),
    }


# --- 1b. the same rounds without Flower ----------------------------------------------------------

_WORKER: dict = {}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _site(rc: dict, index: int, sites: int):
    """This worker's LocalSite for ``index``, built on first use and kept (keyed by run and site)."""
    from hlip_fed.federation.local import LocalSite
    from hlip_fed.federation.run import config_from_run, resolve_site

    key = (rc["run-dir"], index)
    if key not in _WORKER:
        t = time.perf_counter()
        site = resolve_site(rc, {"partition-id": index, "num-partitions": sites})
        _WORKER[key] = LocalSite(config_from_run(rc), site)
        _WORKER[key].build_seconds = time.perf_counter() - t
    return _WORKER[key]


def _train(rc: dict, index: int, sites: int, arrays: dict, server_round: int, prompts: dict | None):
    """A site's training message: the received model's evaluation first when ``prompts`` come with it."""
    fresh = (rc["run-dir"], index) not in _WORKER
    site = _site(rc, index, sites)
    evaluation = site.evaluate(arrays, prompts) if prompts is not None else None
    arrays, metrics = site.train_round(arrays, server_round=server_round, proximal_mu=0.0)
    return arrays, metrics | {"build-seconds": site.build_seconds if fresh else 0.0}, evaluation


def _evaluate(rc: dict, index: int, sites: int, arrays: dict, prompts: dict):
    return _site(rc, index, sites).evaluate(arrays, prompts)


def fedavg(replies: list[tuple[dict, dict, dict | None]]) -> dict:
    """The example-weighted mean of the sites' arrays (replies as ``_train`` returns them)."""
    import torch

    total = sum(m["num-examples"] for _, m, _ in replies)
    keys = replies[0][0].keys()
    return {k: sum(a[k].double() * (m["num-examples"] / total) for a, m, _ in replies).to(torch.float32) for k in keys}


def direct_run(data: Path, run: Path, sites: int, rounds: int, overrides: list[str], preset: str,
               workers: int, worker_threads: int) -> dict:
    import multiprocessing as mp

    from hlip_fed.federation.coordinator import Coordinator
    from hlip_fed.federation.round_record import RoundRecord
    from hlip_fed.federation.run import config_from_run
    from hlip_fed.outputs.report import CurvePlotter

    rc = run_config(data, run, sites, rounds, overrides, preset)
    ends, phases, site_seconds, builds = [], [], [], []
    t0 = time.perf_counter()
    cfg = config_from_run(rc)
    run.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(worker_threads,)) as pool:
        coord = Coordinator(cfg, run, str(data))
        curves = CurvePlotter(run)  # as the ServerApp: drawn while the next round runs
        arrays = coord.initial_arrays()
        coord.evaluate_global(arrays)  # the ServerApp's initial evaluation (round 0)
        with_train = cfg.federation.evaluate_with_train  # the exchanges the ServerApp makes
        for r in range(1, rounds + 1):
            p = {}
            t = time.perf_counter()
            prompts = coord.prompts if with_train and r > 1 else None
            replies = list(pool.map(_train, *zip(*[(rc, i, sites, arrays, r, prompts) for i in range(sites)])))
            p["train"] = time.perf_counter() - t
            site_seconds.append(statistics.mean(m["train-seconds"] for _, m, _ in replies))
            builds.extend(m["build-seconds"] for _, m, _ in replies if m["build-seconds"])
            record = RoundRecord(train_sites={str(i): m for i, (_, m, _) in enumerate(replies)})
            if prompts is not None:
                carried = {str(i): e for i, (_, _, e) in enumerate(replies)}
                record.previous_eval = {"round": r - 1, "eval_sites": carried}
            arrays = fedavg(replies)
            t = time.perf_counter()
            if not with_train or r == rounds:
                evals = list(pool.map(_evaluate, *zip(*[(rc, i, sites, arrays, coord.prompts) for i in range(sites)])))
                record.eval_sites = {str(i): e for i, e in enumerate(evals)}
            p["site_evaluate"] = time.perf_counter() - t
            t = time.perf_counter()
            record.heldout = coord.evaluate_global(arrays)
            p["heldout"] = time.perf_counter() - t
            coord.end_round(r, arrays, record, {})
            curves.request()
            p["server"] = time.perf_counter() - t
            p["checkpoint_plot"] = p["server"] - p["heldout"]
            ends.append(time.perf_counter())
            phases.append(p)
        curves.close()
    return {
        "round_seconds": per_round(t0, ends),
        "phases": phases,
        "train_seconds_per_site": site_seconds,
        "site_build_seconds": builds,
        "bytes_per_site": replies[0][1]["bytes-sent"],
    }


# --- 2. process per message ----------------------------------------------------------------------


def child_round(spec: str) -> None:
    """A fresh ClientApp process: import the ClientApp, build the site, train one round."""
    t = time.perf_counter()
    import torch

    import client.app  # noqa: F401  (what a ClientApp process imports)
    from hlip_fed.federation.local import LocalSite
    from hlip_fed.federation.run import config_from_run, resolve_site

    s = json.loads(spec)
    torch.set_num_threads(s["threads"])
    t_import = time.perf_counter() - t
    t = time.perf_counter()
    rc = s["rc"]
    site = LocalSite(config_from_run(rc), resolve_site(rc, {"partition-id": 0, "num-partitions": s["sites"]}))
    t_build = time.perf_counter() - t
    arrays = torch.load(s["arrays"], weights_only=True)
    t = time.perf_counter()
    site.train_round(arrays, server_round=s["round"])
    t_train = time.perf_counter() - t
    print(json.dumps({"import_seconds": t_import, "build_seconds": t_build, "train_round_seconds": t_train}))


def process_per_message(data: Path, run: Path, sites: int, overrides: list[str], preset: str, threads: int,
                        repeats: int) -> dict:
    """Cached site vs a fresh process per message, for site 0, rounds 1..repeats+1."""
    import torch

    rc = run_config(data, run, sites, repeats + 1, overrides, preset)
    _init_worker(threads)
    t = time.perf_counter()
    site = _site(rc, 0, sites)
    build = time.perf_counter() - t
    arrays = {k: v.clone() for k, v in site.model.state_dict().items() if k in site.keys}
    site.train_round(arrays, server_round=1)  # fills the on-site cache as a previous round would
    path = run / "arrays.pt"
    torch.save(arrays, path)
    cached, fresh = [], []
    for r in range(2, repeats + 2):
        t = time.perf_counter()
        site.train_round(arrays, server_round=r)
        cached.append(time.perf_counter() - t)
        spec = json.dumps({"rc": rc, "sites": sites, "arrays": str(path), "round": r, "threads": threads})
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "benchmarks.federation", "--child-round", spec],
                             capture_output=True, text=True, env=env, cwd=ROOT)
        total = time.perf_counter() - t
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        fresh.append(json.loads(out.stdout.strip().splitlines()[-1]) | {"process_seconds": total})
    c = statistics.median(cached)
    f = statistics.median(x["process_seconds"] for x in fresh)
    return {
        "cached_round_seconds": c,
        "fresh_process_seconds": f,
        "extra_seconds_per_message": f - c,
        "ratio": f / c,
        "first_build_seconds": build,
        "fresh": fresh,
        "threads": threads,
    }


# --- bytes of the paper-sized presets ------------------------------------------------------------


def preset_bytes(presets: list[str]) -> dict:
    from hlip_fed.config import load_config
    from hlip_fed.federation.params import count_bytes, federated_keys, get_arrays
    from hlip_fed.model import create_model

    out = {}
    for name in presets:
        cfg = load_config(name, overrides=["model.text.pretrained=false"])  # MiniLM's shapes, no weights
        model = create_model(cfg.model, seed=0)
        arrays = get_arrays(model, federated_keys(model, cfg.federation.groups, cfg.federation.site_local))
        out[name] = {"bytes": count_bytes(arrays), "parameters": sum(v.numel() for v in arrays.values())}
        del model
    return out


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="consortium for the overhead run (default: generate the demo preset)")
    ap.add_argument("--preset", default="demo", help="run preset (default demo: tiny HLIP, 8 local steps, batch 4)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the overhead runs (round 1 is start-up)")
    ap.add_argument("--overrides", nargs="*", default=[], help="extra dotted overrides for every run")
    ap.add_argument("--sites", type=int, nargs="+", default=[2, 4, 8, 16], help="site counts of the scaling runs")
    ap.add_argument("--scaling-rounds", type=int, default=2)
    ap.add_argument("--scaling-overrides", nargs="*", default=["federation.local_steps=2"])
    ap.add_argument("--workers", type=int, default=os.cpu_count(),
                    help="direct run: worker processes (the simulation runs one actor per CPU)")
    ap.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker (one CPU per actor)")
    ap.add_argument("--messages", type=int, default=2, help="process-per-message repeats")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per Flower run")
    ap.add_argument("--skip", nargs="*", choices=["messages", "scaling"], default=[],
                    help="leave out the process-per-message or the scaling measurement")
    ap.add_argument("--quick", action="store_true", help="tiny everything (a smoke test)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child-round", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_round:
        child_round(args.child_round)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    overrides = list(args.overrides)
    scaling_overrides = list(args.scaling_overrides) + overrides
    if args.quick:
        quick = TINY_TEXT + ["model.vision.img_size=[16, 32, 32]", "train.batch_size=2", "train.warmup_steps=1"]
        overrides = quick + ["federation.local_steps=2"] + overrides
        scaling_overrides = quick + scaling_overrides
        args.rounds, args.scaling_rounds, args.messages = 2, 1, 1
        args.sites = [2]
    t_all = time.perf_counter()
    result: dict = {"benchmark": "federation", "machine": machine(), "preset": args.preset}
    with tempfile.TemporaryDirectory(prefix="hlip-fed-bench-") as tmp:
        tmp = Path(tmp)
        data = args.data.resolve() if args.data else None
        if data is None:
            if args.quick:
                data = write_consortium(tmp / "data", sites=2, train=4, test=2, heldout=4, shape=(32, 32, 16))
            else:
                from hlip_fed.synth.consortium import build_consortium

                print("generating the demo consortium ...", file=sys.stderr, flush=True)
                data = tmp / "data"
                build_consortium(data, "demo", seed=0)
        from hlip_fed.federation.run import consortium_sites

        n_sites = len(consortium_sites(data))
        print(f"overhead: {n_sites} sites, {args.rounds} rounds, preset {args.preset} {' '.join(overrides)}",
              file=sys.stderr, flush=True)
        flower = flower_run(data, tmp / "flower", n_sites, args.rounds, overrides, args.preset, args.timeout)
        print(f"  flower rounds: {[round(x, 1) for x in flower['round_seconds']]}", file=sys.stderr, flush=True)
        direct = direct_run(data, tmp / "direct", n_sites, args.rounds, overrides, args.preset,
                            args.workers, args.worker_threads)
        print(f"  direct rounds: {[round(x, 1) for x in direct['round_seconds']]}", file=sys.stderr, flush=True)
        ratios = [f / d for f, d in zip(flower["round_seconds"], direct["round_seconds"])]
        steady = ratios[1:]
        result["overhead"] = {
            "sites": n_sites, "rounds": args.rounds, "overrides": overrides,
            "workers": args.workers, "worker_threads": args.worker_threads,
            "flower": flower, "direct": direct,
            "ratio_per_round": ratios,
            "overhead_ratio": statistics.median(steady) if steady else None,
            "round1_flower_seconds": flower["round_seconds"][0],
            "round1_direct_seconds": direct["round_seconds"][0],
            "startup_flower_seconds": flower["round_seconds"][0] - statistics.median(flower["round_seconds"][1:] or [0.0]),
            "goal": 1.05,
        }
        result["bytes_per_site_per_round"] = statistics.mean(flower["bytes_per_site"])

        if "messages" not in args.skip:
            print("process per message ...", file=sys.stderr, flush=True)
            result["process_per_message"] = process_per_message(
                data, tmp / "ppm", n_sites, overrides, args.preset, args.worker_threads, args.messages)

        scaling = []
        for n in [] if "scaling" in args.skip else args.sites:
            print(f"scaling: {n} sites ...", file=sys.stderr, flush=True)
            sdata = write_consortium(tmp / f"scale-{n}", sites=n, train=4, test=2, heldout=4)
            r = flower_run(sdata, tmp / f"scale-run-{n}", n, args.scaling_rounds, scaling_overrides, args.preset,
                           args.timeout)
            scaling.append({"sites": n, "wall_seconds": r["wall_seconds"], "round_seconds": r["round_seconds"],
                            "last_round_seconds": r["round_seconds"][-1],
                            "seconds_per_site_round": r["round_seconds"][-1] / n,
                            "peak_rss_mb": r["peak_rss_mb"], "peak_processes": r["peak_processes"]})
        if scaling:
            result["scaling"] = {"rounds": args.scaling_rounds, "overrides": scaling_overrides, "runs": scaling}
    if not args.quick:
        result["bytes_presets"] = preset_bytes(["tiny", "vit_base_multiscan_h2_token1176"])
    result["seconds"] = time.perf_counter() - t_all

    o = result["overhead"]
    rows = [{"round": i + 1, "flower": f, "direct": d, "ratio": f / d,
             "flower_train": o["flower"]["train_seconds_per_site"][i],
             "d_train": o["direct"]["phases"][i]["train"], "d_eval": o["direct"]["phases"][i]["site_evaluate"],
             "d_server": o["direct"]["phases"][i]["server"]}
            for i, (f, d) in enumerate(zip(o["flower"]["round_seconds"], o["direct"]["round_seconds"]))]
    print(f"\noverhead: {o['sites']} sites, preset {args.preset}, {args.rounds} rounds; direct: {o['workers']} worker "
          f"processes x {o['worker_threads']} torch thread(s); Flower: {o['flower']['actors']} ClientApp actor "
          f"process(es), one CPU each (Ray sets OMP_NUM_THREADS to it)\n")
    print(table(rows, [("round", "round", "d"), ("flower", "Flower s", ".1f"), ("direct", "direct s", ".1f"),
                       ("ratio", "Flower / direct", ".2f"), ("flower_train", "train s/site (Flower)", ".1f"),
                       ("d_train", "direct: train phase s", ".1f"), ("d_eval", "site eval s", ".1f"),
                       ("d_server", "server eval+ckpt s", ".1f")]))
    prof = [{"round": r["round"], **{f"{k}_{m}": r[k][m] for k in ("train", "evaluate") if k in r
                                     for m in ("wall", "busy", "to_first_start", "after_last_end")},
             **r["server"]}
            for r in o["flower"]["profile"]]
    print("\nwhere a Flower round goes (seconds): each exchange from push to last reply, the time some site's "
          "handler ran in it, the wait to the first handler and after the last; the server's own work "
          "before each exchange and in the held-out evaluation\n")
    print(table(prof, [("round", "round", "d"), ("before_train", "server before train", ".2f"),
                       ("train_wall", "train exchange", ".2f"), ("train_busy", "sites busy", ".2f"),
                       ("train_to_first_start", "to 1st handler", ".2f"), ("train_after_last_end", "after last", ".2f"),
                       ("before_evaluate", "server between", ".2f"), ("evaluate_wall", "evaluate exchange", ".2f"),
                       ("evaluate_busy", "sites busy", ".2f"), ("evaluate_to_first_start", "to 1st handler", ".2f"),
                       ("evaluate_after_last_end", "after last", ".2f"), ("before_heldout", "server before held-out", ".2f"),
                       ("heldout", "held-out eval", ".2f")]))
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"\noverhead ratio (round 2 on, median): {fmt(o['overhead_ratio'])} (goal <= 1.05); round 1: Flower "
          f"{o['round1_flower_seconds']:.1f} s, direct {o['round1_direct_seconds']:.1f} s")
    b = o["direct"]["site_build_seconds"]
    if b:
        print(f"building a site (model, text encoder, datasets) in a warm worker: {statistics.median(b):.1f} s (median of {len(b)})")
    print(f"bytes sent per site per round: {result['bytes_per_site_per_round']:.0f} "
          f"({result['bytes_per_site_per_round'] / 2**20:.2f} MiB)")
    for name, b in result.get("bytes_presets", {}).items():
        print(f"  {name}: {b['parameters']} federated parameters, {b['bytes'] / 2**20:.1f} MiB per site per round")
    p = result.get("process_per_message")
    if p:
        print(f"\nprocess per message: cached round {p['cached_round_seconds']:.2f} s, fresh process "
              f"{p['fresh_process_seconds']:.2f} s (+{p['extra_seconds_per_message']:.2f} s per message: import "
              f"{p['fresh'][0]['import_seconds']:.1f} s, build {p['fresh'][0]['build_seconds']:.1f} s)")
    if "scaling" in result:
        print("\n" + table(result["scaling"]["runs"], [
            ("sites", "sites", "d"), ("wall_seconds", "wall s", ".1f"), ("last_round_seconds", "last round s", ".1f"),
            ("seconds_per_site_round", "s per site-round", ".2f"), ("peak_rss_mb", "peak RSS MB (tree)", ".0f"),
            ("peak_processes", "processes", "d")]))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
