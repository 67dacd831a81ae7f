"""A federation of 3 sites x 2 rounds through the real Flower runtime (`flwr run`), judged by the
files it writes: `flwr run --stream` exits 0 even when the ServerApp fails."""

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


from conftest import FAST_RUN
from hlip_fed.federation.checkpoint import load_latest
from simulations.flower_home import flower_env, local_superlink_pids, stop_local_superlink, write_flower_home

ROOT = Path(__file__).resolve().parents[1]


def test_three_sites_two_rounds_through_flower(mini_consortium, tmp_path):
    home, run = tmp_path / "flwr-home", tmp_path / "run"
    write_flower_home(home, sites=3)
    overrides = " ".join(shlex.quote(o) for o in FAST_RUN)
    run_config = f"data-root='{mini_consortium}' run-dir='{run}' config='' overrides=\"{overrides}\""
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", ".", "local-simulation", "--stream", "--run-config", run_config]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=flower_env(home), capture_output=True, text=True, timeout=420)
    finally:
        stop_local_superlink(home)
    log = proc.stdout + proc.stderr
    port = flower_env(home)["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    assert f"Starting local SuperLink on 127.0.0.1:{port}" in log, log[-3000:]  # this home's own SuperLink
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
    assert [r["round"] for r in rounds] == [1, 2], log[-3000:]
    for r in rounds:
        assert len(r["train_sites"]) == 3 and not r["rejected"]
        assert set(r["heldout"]) >= {"auc-mean", "r1", "r5", "r10"}
    assert load_latest(run / "checkpoints").round == 2
    assert (run / "model" / "model.safetensors").exists() and (run / "curves.png").exists()
    time.sleep(0.5)
    assert not local_superlink_pids(home)


def test_each_flower_home_has_its_own_local_superlink_ports(tmp_path):
    """Two simulations on one machine must not share Flower's fixed default SuperLink ports."""
    envs = []
    for name in ("a", "b"):
        write_flower_home(tmp_path / name, sites=2)
        envs.append(flower_env(tmp_path / name))
    keys = ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT")
    ports = [int(env[k]) for env in envs for k in keys]
    assert len(set(ports)) == 4 and "39091" not in map(str, ports)
    write_flower_home(tmp_path / "a", sites=3)  # rewriting a home keeps its ports
    assert [flower_env(tmp_path / "a")[k] for k in keys] == [envs[0][k] for k in keys]
