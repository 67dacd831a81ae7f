"""``make demo``: the federated pre-training of HLIP across the demo consortium, end to end.

1. generates the demo consortium (``hlip-fed synth --preset demo``) unless it exists,
2. writes a project-local Flower home with one simulated SuperNode per site,
3. runs ``flwr run . local-simulation --stream`` (progress streams to the terminal),
4. judges the run by the files it wrote (``flwr run --stream`` exits 0 even when the ServerApp
   fails) and prints the round table and where the checkpoint, metrics and plot are.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from hlip_fed.federation.run import consortium_sites
from hlip_fed.report import plot_run, read_rounds
from simulations.flower_home import flower_env, local_superlink_pids, write_flower_home

ROOT = Path(__file__).resolve().parents[1]


def ensure_consortium(data: Path, seed: int) -> None:
    if (data / "sites").is_dir():
        print(f"using the consortium in {data}")
        return
    from hlip_fed.synth.consortium import build_consortium

    print(f"generating the demo consortium in {data} ...")
    build_consortium(data, "demo", seed=seed)


def stop_local_superlink(home: Path) -> None:
    """`flwr run` leaves a detached local SuperLink behind: stop the one of this Flower home."""
    for pid in local_superlink_pids(home):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def print_table(rounds: list[dict]) -> None:
    print("\nround  train loss  held-out AUC (mean)  held-out R@1  R@5   R@10  sites  rejected")
    for r in rounds:
        h = r.get("heldout", {})
        print(f"{r['round']:5d}  {r.get('train', {}).get('train-loss', float('nan')):10.3f}  "
              f"{h.get('auc-mean', float('nan')):19.3f}  {h.get('r1', float('nan')):12.3f}  "
              f"{h.get('r5', float('nan')):4.3f} {h.get('r10', float('nan')):5.3f}  "
              f"{len(r.get('train_sites', {})):5d}  {len(r.get('rejected', [])):8d}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo", help="consortium folder (generated if absent)")
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--flower-home", default=".flwr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overrides", default="", help="dotted config overrides for the run")
    args = parser.parse_args()
    data, run, home = (Path(p).resolve() for p in (args.data, args.run_dir, args.flower_home))
    ensure_consortium(data, args.seed)
    sites = consortium_sites(data)
    write_flower_home(home, len(sites))
    overrides = f"federation.min_nodes={len(sites)} {args.overrides}".strip()
    run_config = f"config='demo' data-root='{data}' run-dir='{run}' overrides='{overrides}'"
    print(f"federating {len(sites)} sites: {', '.join(s.name for s in sites)}")
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", ".", "local-simulation", "--stream", "--run-config", run_config]
    try:
        subprocess.run(cmd, cwd=ROOT, env=flower_env(home), check=False)
    finally:
        stop_local_superlink(home)
    rounds = read_rounds(run)
    if not rounds or not (run / "model" / "model.safetensors").exists():
        print(f"the federated run did not complete: see the log above and {run}", file=sys.stderr)
        return 1
    print_table(rounds)
    plot_run(run)
    print(f"\nglobal model:   {run / 'model'}")
    print(f"checkpoints:    {run / 'checkpoints'}")
    print(f"metrics:        {run / 'metrics.jsonl'}")
    print(f"curves:         {run / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
