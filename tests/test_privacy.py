"""Central differential privacy: screening before Flower's DP wrapper, noise, clipping, accounting
per round and across a resume."""

import json
import shlex

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from conftest import FakeGrid, FAST_RUN
from hlip_fed.config import FederationConfig, load_config
from hlip_fed.errors import HlipError
from hlip_fed.federation import privacy
from hlip_fed.federation.checkpoint import load_latest
from hlip_fed.federation.local import _SITES
from simulations.inprocess import InProcessGrid, ServerCrash
from server.strategy import build_strategy

pytest.importorskip("dp_accounting", reason='central DP needs flwr[dp]')

EXPECTED = {"w": (200, 500), "b": (2,)}
GLOBAL = {"w": np.zeros((200, 500), np.float32), "b": np.ones(2, np.float32)}


def _reply(node, arrays, n=10.0):
    return Message(metadata=Metadata(
        run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
        group_id="1", created_at=0.0, ttl=600.0, message_type="train",
    ), content=RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}),
                           "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})}))


def _moved(scale, seed):
    """The global model plus an update of norm ``scale`` (random direction)."""
    rng = np.random.default_rng(seed)
    delta = {k: rng.normal(size=v.shape) for k, v in GLOBAL.items()}
    norm = np.sqrt(sum(float((d * d).sum()) for d in delta.values()))
    return {k: (GLOBAL[k] + scale * delta[k] / norm).astype(np.float32) for k in GLOBAL}


def _dp_strategy(noise=2.0, clip=0.5, nodes=(1, 2, 3), ledger=None, offset=0, **fed):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg = FederationConfig(min_nodes=3, dp="server_fixed", dp_noise_multiplier=noise, dp_clipping_norm=clip, **fed)
    s = build_strategy(cfg, EXPECTED, offset=offset, privacy_ledger=ledger)
    s.configure_train(1, ArrayRecord({k: torch.from_numpy(v) for k, v in GLOBAL.items()}), ConfigRecord({}),
                      FakeGrid(nodes))
    return s


def test_noise_added_to_the_average_has_std_z_times_c_over_sites():
    s = _dp_strategy(noise=2.0, clip=0.5)
    replies = [_moved(0.1, seed) for seed in range(3)]  # all within the clipping norm: not clipped
    arrays, _ = s.aggregate_train(1, [_reply(n + 1, r) for n, r in enumerate(replies)])
    mean = np.mean([r["w"] for r in replies], axis=0)
    noise = arrays["w"].numpy().astype(np.float64) - mean
    assert noise.std() == pytest.approx(2.0 * 0.5 / 3, rel=0.01)  # 100k samples: ~0.2% error
    assert abs(noise.mean()) < 0.01
    p = s.round_record.privacy
    assert p["noise_std"] == pytest.approx(1 / 3) and p["sites"] == 3 and p["releases"] == 1 and p["epsilon"] > 0


def test_updates_are_clipped_and_averaged_without_example_weights():
    s = _dp_strategy(noise=1e-9, clip=0.5)
    a, b, big = _moved(0.1, 0), _moved(0.2, 1), _moved(1000.0, 2)
    arrays, metrics = s.aggregate_train(1, [_reply(1, a, 10.0), _reply(2, b, 30.0), _reply(3, big, 99.0)])
    clipped = {k: GLOBAL[k] + (big[k] - GLOBAL[k]) * 0.5 / 1000.0 for k in GLOBAL}
    for k in GLOBAL:  # an equal-weight mean, the 1000-norm update scaled down to the clipping norm
        np.testing.assert_allclose(arrays[k].numpy(), (a[k] + b[k] + clipped[k]) / 3, atol=1e-6)
    assert s.round_record.rejected == []  # clipping, not the relative norm check, handles it
    assert s.round_record.privacy["clipped"] == 1
    assert "dp-weight" not in metrics


def test_a_nan_reply_is_rejected_and_the_round_is_still_released():
    s = _dp_strategy(noise=1e-9, clip=0.5)
    bad = _moved(0.1, 2)
    bad["w"][0, 0] = np.nan
    a, b = _moved(0.1, 0), _moved(0.1, 1)
    arrays, _ = s.aggregate_train(1, [_reply(1, a), _reply(2, b), _reply(3, bad)])
    assert arrays is not None  # Flower's wrapper alone would have dropped the round
    assert [r["node"] for r in s.round_record.rejected] == [3]
    np.testing.assert_allclose(arrays["w"].numpy(), (a["w"] + b["w"]) / 2, atol=1e-6)
    p = s.round_record.privacy
    assert p["sites"] == 2 and p["noise_std"] == pytest.approx(1e-9 * 0.5 / 2) and p["releases"] == 1


def test_a_round_without_usable_updates_spends_nothing():
    s = _dp_strategy()
    bad = _moved(0.1, 0)
    bad["b"][0] = np.inf
    arrays, _ = s.aggregate_train(1, [_reply(1, bad)])
    assert arrays is None and s.round_record.privacy["releases"] == 0
    assert s.round_record.privacy["epsilon"] == 0.0


def test_ledger_is_compact_and_a_restored_accountant_continues_exactly():
    acc = privacy.make_accountant(1e-5, 3)
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    for _ in range(4):
        acc.compose(GaussianPrivacyEvent(1.0, 3, 3))
    saved = json.loads(json.dumps(privacy.ledger(acc)))  # as it travels through the checkpoint
    assert len(saved["compositions"]) == 1 and saved["compositions"][0]["count"] == 4
    again = privacy.make_accountant(1e-5, 3)
    privacy.restore(again, saved)
    assert privacy.spent(again) == privacy.spent(acc)
    assert privacy.epsilon_after(4, 2.0, 1e-5, 3) == pytest.approx(privacy.spent(acc)["epsilon"])  # z=2 accounted at 1
    with pytest.raises(HlipError, match="privacy ledger"):
        privacy.restore(privacy.make_accountant(1e-6, 3), saved)  # another delta: epsilon would mean else


def test_a_round_is_accounted_as_replace_one_at_half_the_noise_multiplier():
    """The site count is public, so a neighbouring run replaces one site's clipped update: the sum
    moves by up to 2C under noise z*C. Add-or-remove-one accounting at z/2 is that release."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    s = _dp_strategy(noise=2.0, clip=0.5)
    s.aggregate_train(1, [_reply(n + 1, _moved(0.1, n)) for n in range(3)])
    at_half = privacy.make_accountant(1e-5, 3)
    at_half.compose(GaussianPrivacyEvent(1.0, 3, 3))
    assert s.round_record.privacy["epsilon"] == pytest.approx(privacy.spent(at_half)["epsilon"])
    assert s.round_record.privacy["accounted_multiplier"] == 1.0
    assert s.round_record.privacy["noise_std"] == pytest.approx(2.0 * 0.5 / 3)  # the noise keeps z
    assert privacy.epsilon_after(1, 2.0, 1e-5, 3) == pytest.approx(privacy.spent(at_half)["epsilon"])
    assert privacy.epsilon_after(1, 2.0, 1e-5, 3) > privacy.epsilon_after(1, 4.0, 1e-5, 3)


def test_resuming_without_a_ledger_is_refused():
    with pytest.raises(HlipError, match="privacy ledger"):
        _dp_strategy(offset=2)


def test_config_refuses_dp_with_aggregations_flower_cannot_account():
    with pytest.raises(HlipError, match="fedavg or fedprox"):
        load_config("tiny", overrides=["federation.dp=server_fixed", "federation.strategy=fedadam"])
    with pytest.raises(HlipError, match="federation.dp.*server_fixed"):
        load_config("tiny", overrides=["federation.dp=local"])
    with pytest.raises(HlipError, match="dp_delta"):
        load_config("tiny", overrides=["federation.dp=server_fixed", "federation.dp_delta=1"])


def _rc(consortium, out, *extra):
    overrides = FAST_RUN + ["federation.dp=server_fixed", "federation.dp_noise_multiplier=0.5",
                            "federation.dp_clipping_norm=0.1"] + list(extra)
    return {"data-root": str(consortium), "run-dir": str(out), "config": "",
            "overrides": " ".join(shlex.quote(o) for o in overrides)}


def _context(rc, run_id):
    return Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=rc)


def _epsilons(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["round"], r["privacy"]["epsilon"]) for r in rows]


def test_dp_federation_reports_growing_epsilon_and_a_resume_continues_it(mini_consortium, tmp_path):
    from server.app import main as server_main

    rc_full = _rc(mini_consortium, tmp_path / "full", "federation.rounds=3")
    server_main(InProcessGrid(rc_full, run_id=31), _context(rc_full, 31))
    full = _epsilons(tmp_path / "full")
    assert [r for r, _ in full] == [1, 2, 3]
    assert 0 < full[0][1] < full[1][1] < full[2][1]
    expected = [privacy.epsilon_after(r, 0.5, 1e-5, 3) for r in (1, 2, 3)]
    assert [e for _, e in full] == pytest.approx(expected)
    ckpt = load_latest(tmp_path / "full" / "checkpoints")
    assert ckpt.state[privacy.LEDGER_KEY]["compositions"][0]["count"] == 3

    rc = _rc(mini_consortium, tmp_path / "resumed", "federation.rounds=3")
    with pytest.raises(ServerCrash):
        server_main(InProcessGrid(rc, run_id=32, fail_at_round=3), _context(rc, 32))
    _SITES.clear()
    grid = InProcessGrid(rc, run_id=33)
    server_main(grid, _context(rc, 33))
    assert {r for _, r, _ in grid.sent} == {3}
    assert _epsilons(tmp_path / "resumed") == full  # accounting continued exactly, not restarted


def test_a_run_stops_cleanly_before_it_would_exceed_its_max_epsilon(mini_consortium, tmp_path):
    from hlip_fed.model import HLIP
    from server.app import main as server_main

    limit = (privacy.epsilon_after(1, 0.5, 1e-5, 3) + privacy.epsilon_after(2, 0.5, 1e-5, 3)) / 2
    rc = _rc(mini_consortium, tmp_path / "capped", "federation.rounds=3", f"federation.dp_max_epsilon={limit}")
    server_main(InProcessGrid(rc, run_id=34), _context(rc, 34))  # returns: no crash
    spent = _epsilons(tmp_path / "capped")
    assert [r for r, _ in spent] == [1] and spent[0][1] <= limit  # round 2 would have exceeded it
    model = HLIP.from_pretrained(tmp_path / "capped" / "model")  # the last released model is saved
    final = {k: v for k, v in model.state_dict().items() if k in load_latest(tmp_path / "capped" / "checkpoints").arrays}
    ckpt = load_latest(tmp_path / "capped" / "checkpoints")
    assert ckpt.round == 1 and all(np.allclose(v.numpy(), ckpt.arrays[k]) for k, v in final.items())
    with pytest.raises(HlipError, match="dp_max_epsilon"):
        load_config("tiny", overrides=["federation.dp=server_fixed", "federation.dp_max_epsilon=0"])
