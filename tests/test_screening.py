"""Update screening before aggregation and bounded waiting for sites, on the strategy itself."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hlip_fed.config import FederationConfig, load_config
from hlip_fed.errors import HlipError
from hlip_fed.federation.screen import screen_update_norms, update_norm
from server.strategy import build_strategy, wait_for_nodes
from conftest import FakeGrid

EXPECTED = {"w": (2, 2), "b": (2,)}
GLOBAL = {"w": np.full((2, 2), 5.0, np.float32), "b": np.ones(2, np.float32)}


def _reply(node, arrays, n=10, reply_to="x"):
    return Message(metadata=Metadata(
        run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=reply_to,
        group_id="1", created_at=0.0, ttl=600.0, message_type="train",
    ), content=RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}),
                           "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})}))


def _update(delta):
    return {k: (v + delta * np.arange(1, v.size + 1, dtype=np.float32).reshape(v.shape)).astype(np.float32)
            for k, v in GLOBAL.items()}


def _strategy(name="fedavg", nodes=(1, 2, 3), **fed):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg = FederationConfig(strategy=name, min_nodes=3, **fed)
    s = build_strategy(cfg, EXPECTED, offset=0)
    grid = FakeGrid(nodes)
    messages = s.configure_train(1, ArrayRecord({k: torch.from_numpy(v) for k, v in GLOBAL.items()}),
                                 ConfigRecord({}), grid)
    return s, messages


def test_update_norm_is_of_the_update_not_the_weights():
    arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in GLOBAL.items()})
    assert update_norm(arrays, {k: v.astype(np.float64) for k, v in GLOBAL.items()}) == 0.0
    moved = ArrayRecord({k: torch.from_numpy(v) for k, v in _update(1.0).items()})
    assert update_norm(moved, GLOBAL) == pytest.approx(np.sqrt(sum(i * i for i in (1, 2, 3, 4, 1, 2))))


def test_a_1000x_scaled_update_is_rejected_and_logged_with_its_node(caplog):
    s, _ = _strategy()
    honest_a, honest_b = _update(0.01), _update(0.012)
    scaled = {k: GLOBAL[k] + 1000 * (honest_a[k] - GLOBAL[k]) for k in GLOBAL}
    with caplog.at_level(logging.WARNING, logger="hlip_fed.server"):
        arrays, _ = s.aggregate_train(1, [_reply(1, honest_a), _reply(2, honest_b), _reply(3, scaled)])
    assert [r["node"] for r in s.round_record.rejected] == [3]
    assert "update norm" in s.round_record.rejected[0]["reason"]
    assert any("node 3" in r.getMessage() and "update norm" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(arrays["w"].numpy(), (honest_a["w"] + honest_b["w"]) / 2, rtol=1e-6)
    assert set(s.round_record.update_norms) == {"1", "2", "3"}


def test_large_weights_with_a_small_update_pass():
    # Weights far from zero are normal; only the change from the global model is judged.
    s, _ = _strategy()
    replies = [_reply(n, _update(d)) for n, d in ((1, 0.01), (2, 0.02), (3, 0.05))]
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None and s.round_record.rejected == []


def test_two_sites_the_larger_outlier_is_rejected_and_ratio_zero_disables():
    ref = {k: v.astype(np.float64) for k, v in GLOBAL.items()}
    small, huge = _reply(1, _update(0.01)), _reply(2, _update(5.0))
    kept, rejected, _ = screen_update_norms([small, huge], ref, 10.0)
    assert [m.metadata.src_node_id for m in kept] == [1] and [r.node_id for r in rejected] == [2]
    kept, rejected, _ = screen_update_norms([small, huge], ref, 0.0)
    assert len(kept) == 2 and not rejected
    kept, rejected, _ = screen_update_norms([huge], ref, 10.0)  # one site is never an outlier
    assert len(kept) == 1


def test_nan_and_missing_key_are_rejected_before_the_norm_check():
    s, _ = _strategy()
    nan = _update(0.01)
    nan["w"][0, 0] = np.nan
    missing = _update(0.01)
    del missing["b"]
    arrays, _ = s.aggregate_train(1, [_reply(1, _update(0.01)), _reply(2, nan), _reply(3, missing)])
    assert {r["node"] for r in s.round_record.rejected} == {2, 3}
    np.testing.assert_allclose(arrays["w"].numpy(), _update(0.01)["w"], rtol=1e-6)


def test_superlink_error_for_an_offline_node_names_that_node_and_silent_nodes_are_listed():
    s, messages = _strategy()
    for i, m in enumerate(messages):  # what Flower's grid does when it pushes them
        m.metadata.__dict__["_message_id"] = f"sent{i}"
    by_node = {m.metadata.dst_node_id: m.metadata.message_id for m in messages}
    offline = Message(metadata=Metadata(
        run_id=1, message_id="", src_node_id=1, dst_node_id=1, reply_to_message_id=by_node[2],
        group_id="1", created_at=0.0, ttl=600.0, message_type="train",
    ), content=None, error=Error(code=5, reason="node unavailable"))
    s.aggregate_train(1, [_reply(1, _update(0.01), reply_to=by_node[1]), offline])
    assert [r["node"] for r in s.round_record.rejected] == [2]
    assert s.round_record.no_reply == [3]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, dt):
        self.t += dt


def test_wait_for_nodes_returns_as_soon_as_enough_are_connected():
    grid, clock = FakeGrid([1]), Clock()

    def sleep(dt):
        clock.sleep(dt)
        if clock.t >= 3:
            grid.nodes = [1, 2, 3]

    assert wait_for_nodes(grid, 3, 1, 60, clock=clock, sleep=sleep) == [1, 2, 3]
    assert clock.t == 3


def test_wait_for_nodes_proceeds_with_a_quorum_or_stops_naming_the_missing():
    clock = Clock()
    assert wait_for_nodes(FakeGrid([7, 9]), 3, 2, 30, clock=clock, sleep=clock.sleep) == [7, 9]
    assert clock.t == 30
    clock = Clock()
    with pytest.raises(HlipError, match=r"only 1 of 3 sites connected after 30s.*missing nodes seen in earlier rounds: \[8, 9\]"):
        wait_for_nodes(FakeGrid([7]), 3, 2, 30, known=[7, 8, 9], clock=clock, sleep=clock.sleep)


def test_a_round_goes_ahead_with_the_connected_sites_after_the_wait():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    s = build_strategy(FederationConfig(min_nodes=3, node_wait_s=0.01, quorum=2), EXPECTED, offset=0,
                       known_nodes=[1, 2, 3])
    messages = s.configure_train(1, ArrayRecord({k: torch.from_numpy(v) for k, v in GLOBAL.items()}),
                                 ConfigRecord({}), FakeGrid([1, 2]))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]
    assert s.round_record.absent == [3]
    assert s.inner.min_train_nodes == 3  # the lowered minimum was for this round only


def test_config_validates_the_new_keys():
    with pytest.raises(HlipError, match="quorum"):
        load_config("tiny", overrides=["federation.quorum=5", "federation.min_nodes=3"])
    with pytest.raises(HlipError, match="max_update_ratio"):
        load_config("tiny", overrides=["federation.max_update_ratio=0.5"])
    with pytest.raises(HlipError, match="node_wait_s"):
        load_config("tiny", overrides=["federation.node_wait_s=0"])
