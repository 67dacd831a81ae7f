"""``make demo``: the federated pre-training of HLIP across the demo consortium, end to end.

1. generates the demo consortium (``hlip-fed synth --preset demo``) unless it exists,
2. writes a project-local Flower home with one simulated SuperNode per site,
3. runs ``flwr run . local-simulation --stream`` with Flower's log going to ``RUN/flower.log``,
   printing one line of the round table per round as the run records it,
4. judges the run by the files it wrote (``flwr run --stream`` exits 0 even when the ServerApp
   fails; then the end of Flower's log is shown),
5. trains the reference points at equal compute — one pooled model on every site's data and each
   site alone (see :mod:`simulations.compare`) — and prints federated vs pooled vs local on the
   held-out set, then where the checkpoint, metrics and plot are.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from hlip_fed.config import load_config
from hlip_fed.federation.run import consortium_sites
from hlip_fed.model import create_tokenizer
from hlip_fed.outputs.report import format_row, read_rounds, round_table
from hlip_fed.synth.consortium import build_consortium
from simulations.compare import Consortium, federated_metrics, markdown, run_seed, summarise
from simulations.flower_home import flower_env, stop_local_superlink, write_flower_home

ROOT = Path(__file__).resolve().parents[1]


def ensure_consortium(data: Path, seed: int) -> None:
    if (data / "sites").is_dir():
        print(f"using the consortium in {data}")
        return
    print(f"generating the demo consortium in {data} ...")
    build_consortium(data, "demo", seed=seed)


class RoundLines:
    """The round table of a run, a line at a time: each call gives the lines of the rounds that
    ``metrics.jsonl`` gained since the last call (the header before the first)."""

    def __init__(self, run: Path):
        self.run, self.shown, self.widths = run, set(), None

    def new_lines(self) -> list[str]:
        try:
            rounds = read_rounds(self.run)
        except ValueError:  # a line being written: read it at the next call
            return []
        header, rows = round_table(rounds)
        lines = []
        if self.widths is None and rows:
            self.widths = [max(len(h), 6) for h in header]
            lines.append(format_row(header, self.widths))
        for record, row in zip(rounds, rows):
            if record.round not in self.shown:
                self.shown.add(record.round)
                lines.append(format_row(row, self.widths))
        return lines


def federate(cmd: list[str], env: dict, run: Path, poll_s: float = 0.5) -> None:
    """Run ``cmd`` (``flwr run``) with its output in ``RUN/flower.log``, printing round lines."""
    run.mkdir(parents=True, exist_ok=True)
    follow = RoundLines(run)
    with open(run / "flower.log", "ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                for line in follow.new_lines():
                    print(line, flush=True)
                time.sleep(poll_s)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    for line in follow.new_lines():
        print(line, flush=True)


def compare_with_baselines(data: Path, run: Path, overrides: str, seed: int) -> None:
    """Federated vs pooled vs local-only at the same compute, all on the held-out set."""
    extra = shlex.split(overrides) + [f"data.cache_dir={run / 'baselines' / 'cache'}", f"train.seed={seed}"]
    cfg = load_config(files=["demo"], overrides=extra)
    print("\ntraining the references at equal compute: pooled, then each site alone ...", flush=True)
    cons = Consortium(data, cfg)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    result = run_seed(cons, cfg, {"config": "demo", "overrides": extra}, run / "baselines", seed, ["pooled", "local"], log)
    result["fedavg"] = federated_metrics(run, cons, create_tokenizer(cfg.model))
    summary = summarise([result])
    (run / "comparison.md").write_text(markdown(summary))
    print("\nheld-out set, equal compute (1 seed; probe and prompt-ceiling tables in comparison.md):\n"
          + markdown(summary, families=("zeroshot_auc_",)).rstrip("\n"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo", help="consortium folder (generated if absent)")
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--flower-home", default=".flwr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overrides", default="", help="dotted config overrides for the run")
    parser.add_argument("--no-baselines", action="store_true", help="skip the pooled and local-only references")
    args = parser.parse_args()
    data, run, home = (Path(p).resolve() for p in (args.data, args.run_dir, args.flower_home))
    ensure_consortium(data, args.seed)
    sites = consortium_sites(data)
    write_flower_home(home, len(sites))
    overrides = f"federation.min_nodes={len(sites)} {args.overrides}".strip()
    run_config = f"config='demo' data-root='{data}' run-dir='{run}' overrides='{overrides}'"
    print(f"federating {len(sites)} sites: {', '.join(s.name for s in sites)} (Flower's log: {run / 'flower.log'})",
          flush=True)
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", ".", "local-simulation", "--stream", "--run-config", run_config]
    try:
        federate(cmd, flower_env(home), run)
    finally:
        stop_local_superlink(home, signal.SIGTERM)  # `flwr run` leaves it running
    if not read_rounds(run) or not (run / "model" / "model.safetensors").exists():
        tail = (run / "flower.log").read_text(errors="replace").splitlines()[-25:]
        print("\n".join(tail), file=sys.stderr)
        print(f"the federated run did not complete: the end of its log is above; all of it in {run / 'flower.log'}",
              file=sys.stderr)
        return 1
    if not args.no_baselines:
        compare_with_baselines(data, run, overrides, args.seed)
    print(f"\nglobal model:   {run / 'model'}")
    print(f"checkpoints:    {run / 'checkpoints'}")
    print(f"metrics:        {run / 'metrics.jsonl'}")
    print(f"curves:         {run / 'curves.png'}")
    if not args.no_baselines:
        print(f"comparison:     {run / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
