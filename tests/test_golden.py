"""Golden runs: seeded in-process federations whose final weights and round records are pinned.

Each case runs the real ServerApp and ClientApp code in this process (``InProcessGrid``) on the
mini consortium and compares with ``tests/golden/<case>.json``: every federated array by its sum,
its sum of squares and its first values, and every round record (as ``read_rounds`` gives it) with
its timings left out. A
refactor must leave them equal to 1e-6; a change of behaviour re-records them on purpose:

    HLIP_FED_GOLDEN=write .venv/bin/python -m pytest tests/test_golden.py

A few training steps amplify the rounding of the CPU's kernels, so a run on a CPU with other
vector instructions ends elsewhere (AVX2 against AVX-512: a first weight 0.2-10 % apart), and so
does one on another vendor's CPU with the same instructions (an AMD AVX-512 CPU against the Intel
one of the default records: 0.01-10 %). Where ``tests/golden/<capability>-<vendor>/<case>.json``
or ``tests/golden/<capability>/<case>.json`` exists for torch's CPU capability (``AVX2``,
``AVX512``, ...) and the CPU's vendor (``AMD``, ``Intel``), the case is compared with the first of
them instead; ``HLIP_FED_GOLDEN=write`` rewrites the record this machine reads,
``HLIP_FED_GOLDEN=write-cpu`` writes one for this machine's capability and vendor. A change of
behaviour re-records every machine's records.
"""

import json
import math
import os
import secrets
import shlex

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from conftest import FAST_RUN
from hlip_fed.federation.checkpoint import load_latest
from hlip_fed.federation.local import _SITES
from hlip_fed.outputs.report import read_rounds
from simulations.inprocess import InProcessGrid

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
CASES = {
    "fedavg": ["federation.strategy=fedavg", "federation.rounds=3"],
    "fedprox": ["federation.strategy=fedprox", "federation.rounds=2", "federation.proximal_mu=0.1"],
    "fedadam": ["federation.strategy=fedadam", "federation.rounds=2", "federation.server_lr=0.01"],
    "dp": ["federation.strategy=fedavg", "federation.rounds=2", "federation.dp=server_fixed",
           "federation.dp_noise_multiplier=0.5", "federation.dp_clipping_norm=1.0"],
    "masked": ["federation.strategy=fedavg", "federation.rounds=2", "model.loss.name=masked"],
}
# Keys of a round record that measure time or the machine rather than what was computed.
VOLATILE = ("seconds", "timing", "started", "_s", "time")


def stable(value):
    """A round record without its timings, numbers rounded to what the comparison needs."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if not any(t in k for t in VOLATILE)}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def run_case(name, consortium, tmp_path, monkeypatch):
    monkeypatch.setattr(secrets, "randbits", lambda bits: 12345)  # central DP's noise, made repeatable
    _SITES.clear()
    overrides = " ".join(shlex.quote(o) for o in FAST_RUN + CASES[name])
    rc = {"data-root": str(consortium), "run-dir": str(tmp_path / name), "config": "", "overrides": overrides}
    from server.app import main as server_main

    run_id = 900 + list(CASES).index(name)  # sites are cached per run: no other test's run id
    try:
        server_main(InProcessGrid(rc, run_id=run_id), Context(run_id=run_id, node_id=0, node_config={},
                                                              state=RecordDict(), run_config=rc))
    finally:
        _SITES.clear()
    arrays = load_latest(tmp_path / name / "checkpoints").arrays
    summary = {k: [float(np.sum(v, dtype=np.float64)), float(np.sum(np.square(v, dtype=np.float64))),
                   *[float(x) for x in np.ravel(v)[:4]]] for k, v in sorted(arrays.items())}
    # as every reader sees them: a round's site evaluation with its round, whichever exchange carried it
    rounds = [stable(r.to_json()) for r in read_rounds(tmp_path / name)]
    return {"arrays": summary, "rounds": rounds}


def assert_same(got, want, where="", tol=1e-6):
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {sorted(set(got) ^ set(want))}"
        for k in want:
            assert_same(got[k], want[k], f"{where}/{k}", tol)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]", tol)
    elif isinstance(want, float) and isinstance(got, (int, float)):
        assert math.isclose(got, want, rel_tol=tol, abs_tol=tol) or (math.isnan(got) and math.isnan(want)), \
            f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def record_path(name: str) -> str:
    """The record this machine compares ``name`` with: its capability and vendor's, its capability's,
    or the default; with ``HLIP_FED_GOLDEN=write-cpu``, its capability and vendor's."""
    capability = torch.backends.cpu.get_cpu_capability()
    vendor = "".join(c for c in torch.cpu.get_capabilities().get("cpu_name", "").split(" ")[0] if c.isalnum())
    own = [os.path.join(GOLDEN, f"{capability}-{vendor}", f"{name}.json"), os.path.join(GOLDEN, capability, f"{name}.json")]
    if os.environ.get("HLIP_FED_GOLDEN") == "write-cpu":
        return own[0]
    return next((p for p in own if os.path.exists(p)), os.path.join(GOLDEN, f"{name}.json"))


@pytest.mark.parametrize("name", list(CASES))
def test_a_seeded_federation_matches_its_golden_record(name, mini_consortium, tmp_path, monkeypatch):
    got = run_case(name, mini_consortium, tmp_path, monkeypatch)
    path = record_path(name)
    if os.environ.get("HLIP_FED_GOLDEN", "").startswith("write"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(path) as f:
        want = json.load(f)
    assert_same(json.loads(json.dumps(got)), want, name)


def config_hashes():
    """The config hash of every bundled preset (model presets alone, run presets with their model):
    checkpoints and on-site caches are keyed by it, so a change breaks resuming runs and reusing caches."""
    from hlip_fed.config import config_hash, load_config, model_presets

    hashes = {f"model/{m}": config_hash(load_config(m)) for m in model_presets()}
    for run in ("demo", "learning", "benchmark", "hlip_brain_mri", "hlip_chest_ct"):
        cfg = load_config(files=[run])
        hashes[run] = config_hash(cfg)
        hashes[f"{run}/model"] = config_hash(cfg.model)
    return hashes


def test_the_presets_config_hashes_match_their_golden_record():
    got, path = config_hashes(), os.path.join(GOLDEN, "config_hashes.json")
    if os.environ.get("HLIP_FED_GOLDEN") == "write":
        with open(path, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(path) as f:
        assert got == json.load(f)
