"""Federation through the real ClientApp and ServerApp code, driven in-process."""

import json
import shlex

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from conftest import FAST_RUN
from hlip_fed.federation.checkpoint import load_latest
from hlip_fed.federation.local import _SITES
from hlip_fed.federation.params import federated_keys, get_arrays
from hlip_fed.federation.run import config_from_run
from hlip_fed.model import create_model
from hlip_fed.outputs.report import read_rounds
from simulations.inprocess import InProcessGrid, ServerCrash


def run_config(consortium, out, *extra):
    overrides = " ".join(shlex.quote(o) for o in FAST_RUN + list(extra))
    return {"data-root": str(consortium), "run-dir": str(out), "config": "", "overrides": overrides}


def server_context(rc, run_id=1):
    return Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=rc)


def train_message(arrays, server_round=1, node=1000, extra=None):
    from flwr.app import ConfigRecord

    config = ConfigRecord({"server-round": server_round, **(extra or {})})
    return Message(metadata=Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=node, reply_to_message_id="",
        group_id="1", created_at=0.0, ttl=600.0, message_type="train",
    ), content=RecordDict({"arrays": ArrayRecord(arrays), "config": config}))


def test_clientapp_replies_with_exactly_the_federated_arrays_and_scalar_metrics(mini_consortium, tmp_path):
    from client.app import app as client_app

    rc = run_config(mini_consortium, tmp_path)
    cfg = config_from_run(rc)
    model = create_model(cfg.model, seed=0)
    keys = federated_keys(model, cfg.federation.groups)
    arrays = get_arrays(model, keys)
    context = Context(run_id=7, node_id=1000, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config=rc)
    reply = client_app(train_message(arrays), context)
    assert not reply.has_error(), reply.error
    content = reply.content
    assert list(content.array_records) == ["arrays"] and list(content.metric_records) == ["metrics"]
    assert not content.config_records  # no strings travel
    sent = content["arrays"]
    assert list(sent.keys()) == keys and not any(k.startswith("text.encoder") for k in sent.keys())
    for k in keys:
        assert sent[k].numpy().dtype == np.float32 and sent[k].shape == tuple(arrays[k].shape)
    metrics = content["metrics"]
    assert metrics["num-examples"] == 2 * 2  # 2 local steps x batch of 2
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
    assert set(metrics) == {"num-examples", "train-loss", "train-seconds", "train-steps", "bytes-sent", "reply-seconds"}
    assert metrics["reply-seconds"] >= metrics["train-seconds"]  # the whole handler, for the round profile


def _reply(node, arrays, n):
    msg = Message(metadata=Metadata(
        run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
        group_id="1", created_at=0.0, ttl=600.0, message_type="train",
    ), content=RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}), "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})}))
    return msg


def _strategy(name="fedavg", max_examples=None):
    from hlip_fed.config import FederationConfig
    from server.strategy import build_strategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    expected = {"w": (2, 2), "b": (2,)}
    return build_strategy(FederationConfig(strategy=name, min_nodes=2), expected, offset=0, max_examples=max_examples)


def test_fedavg_of_two_sites_is_the_example_weighted_mean():
    s = _strategy()
    a = {"w": np.ones((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    b = {"w": np.full((2, 2), 4.0, np.float32), "b": np.ones(2, np.float32)}
    arrays, _ = s.aggregate_train(1, [_reply(1, a, 10), _reply(2, b, 30)])
    out = {k: v.numpy() for k, v in arrays.items()}
    np.testing.assert_allclose(out["w"], 0.25 * 1 + 0.75 * 4.0)
    np.testing.assert_allclose(out["b"], 0.75)
    assert out["w"].dtype == np.float32


def test_a_site_claiming_1e9_examples_is_weighted_as_an_honest_one():
    """FedAvg weights by the sites' own num-examples: one claiming 1e9 would own the average while
    its update stays inside the norm screen. The server caps claims at the run's per-round bound."""
    s = _strategy(max_examples=30)
    a = {"w": np.ones((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    b = {"w": np.full((2, 2), 4.0, np.float32), "b": np.ones(2, np.float32)}
    arrays, _ = s.aggregate_train(1, [_reply(1, a, 30), _reply(2, b, 1e9)])
    # without the cap the claim owns the average
    uncapped, _ = _strategy().aggregate_train(1, [_reply(1, a, 30), _reply(2, b, 1e9)])
    np.testing.assert_allclose(uncapped["w"].numpy(), 4.0, atol=1e-6)
    np.testing.assert_allclose(arrays["w"].numpy(), 2.5)  # equal weights, not 4.0
    assert s.round_record.capped_examples == {"2": 1e9}
    assert s.round_record.train_sites["2"]["num-examples"] == 30


@pytest.mark.parametrize("bad", ["missing", "nan", "shape", "extra"])
def test_a_bad_reply_is_dropped_and_the_round_goes_on(bad):
    s = _strategy()
    good = {"w": np.ones((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    other = {"w": np.full((2, 2), 3.0, np.float32), "b": np.ones(2, np.float32)}
    broken = {k: v.copy() for k, v in good.items()}
    if bad == "missing":
        del broken["b"]
    elif bad == "nan":
        broken["w"][0, 0] = np.nan
    elif bad == "shape":
        broken["b"] = np.zeros(3, np.float32)
    else:
        broken["zzz"] = np.zeros(1, np.float32)
    arrays, _ = s.aggregate_train(1, [_reply(1, good, 10), _reply(2, other, 10), _reply(3, broken, 10)])
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)
    assert [r["node"] for r in s.round_record.rejected] == [3]


def test_a_poisoned_evaluation_carried_by_a_training_reply_is_dropped_and_the_update_kept():
    s = _strategy()
    a = {"w": np.ones((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    b = {"w": np.full((2, 2), 3.0, np.float32), "b": np.ones(2, np.float32)}
    replies = [_reply(1, a, 10), _reply(2, b, 10)]
    replies[0].content["evaluation"] = MetricRecord({"num-examples": 4.0, "auc-mean": 0.75})
    replies[1].content["evaluation"] = MetricRecord({"num-examples": 4.0, "auc-mean": float("nan")})
    arrays, _ = s.aggregate_train(2, replies)  # round 2: its messages asked for round 1's evaluation
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)  # both updates, though one evaluation was bad
    assert s.round_record.previous_eval == {"round": 1, "eval_sites": {"1": {"num-examples": 4.0, "auc-mean": 0.75}},
                                            "eval": {"num-examples": 4.0, "auc-mean": 0.75}}
    assert not s.round_record.rejected


def _final_weights(run_dir):
    ckpt = load_latest(run_dir / "checkpoints")
    return ckpt.round, ckpt.arrays


def test_fedavgm_steps_along_the_momentum_of_the_averaged_updates():
    from flwr.app import ArrayRecord

    s = _strategy("fedavgm")  # server momentum 0.9, server learning rate 1
    w0 = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    s.inner.current_arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in w0.items()})
    one = {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}
    arrays, _ = s.aggregate_train(1, [_reply(1, one, 10), _reply(2, one, 10)])
    np.testing.assert_allclose(arrays["w"].numpy(), 1.0)  # the first step is FedAvg's
    state = s.state_arrays()
    assert sorted(state) == ["momentum/b", "momentum/w"]
    two = {"w": np.full((2, 2), 2.0, np.float32), "b": np.full(2, 2.0, np.float32)}
    resumed = _strategy("fedavgm")  # a restarted server: the momentum comes from the checkpoint
    resumed.load_state_arrays(state)
    assert resumed.state_arrays().keys() == state.keys()  # kept until a round uses it
    for strategy in (s, resumed):
        strategy.inner.current_arrays = arrays
        out, _ = strategy.aggregate_train(2, [_reply(1, two, 10), _reply(2, two, 10)])
        np.testing.assert_allclose(out["w"].numpy(), 1.0 + 1.0 + 0.9 * 1.0, rtol=1e-6)  # w + (update + 0.9 m)


@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm"])
def test_a_server_optimiser_interrupted_and_resumed_equals_an_uninterrupted_run(strategy, mini_consortium, tmp_path):
    from server.app import main as server_main

    _SITES.clear()  # sites are cached per run id, and both cases use the same ids
    extra = [f"federation.strategy={strategy}", "federation.rounds=3", "federation.server_lr=0.01"]
    rc_full = run_config(mini_consortium, tmp_path / "full", *extra)
    server_main(InProcessGrid(rc_full, run_id=11), server_context(rc_full, 11))
    _SITES.clear()

    rc = run_config(mini_consortium, tmp_path / "resumed", *extra)
    with pytest.raises(ServerCrash):
        server_main(InProcessGrid(rc, run_id=12, fail_at_round=3), server_context(rc, 12))
    assert load_latest(tmp_path / "resumed" / "checkpoints").round == 2
    _SITES.clear()  # a restarted server and fresh site processes
    grid = InProcessGrid(rc, run_id=13)
    server_main(grid, server_context(rc, 13))
    assert {r for _, r, _ in grid.sent} == {3}  # only the missing round ran again
    # round 2's evaluation by the sites, which round 3's training messages were to carry, is not lost
    assert [r.eval is not None for r in read_rounds(tmp_path / "resumed")] == [True, True, True]

    r_full, full = _final_weights(tmp_path / "full")
    r_res, resumed = _final_weights(tmp_path / "resumed")
    assert r_full == r_res == 3
    for k in full:
        np.testing.assert_allclose(resumed[k], full[k], atol=1e-6, rtol=0, err_msg=k)
    state = load_latest(tmp_path / "resumed" / "checkpoints")
    kept = {"fedadam": "m_t/", "fedavgm": "momentum/"}[strategy]  # the server optimiser's state
    assert any(k.startswith(kept) for k in state.strategy_state)
    assert (tmp_path / "resumed" / "model" / "model.safetensors").exists()
    assert (tmp_path / "resumed" / "curves.png").exists()


def test_server_survives_a_site_sending_nan(mini_consortium, tmp_path):
    from server.app import main as server_main

    def poison(node, kind, reply):
        if kind == "train" and node == 1001:
            arrays = reply.content["arrays"]
            key = next(iter(arrays.keys()))
            bad = arrays[key].numpy().copy()
            bad.flat[0] = np.nan
            arrays[key] = ArrayRecord({key: torch.from_numpy(bad)})[key]
        return reply

    rc = run_config(mini_consortium, tmp_path, "federation.rounds=1")
    server_main(InProcessGrid(rc, run_id=21, tamper=poison), server_context(rc, 21))
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert [r["node"] for r in record["rejected"]] == [1001]
    assert len(record["train_sites"]) == 2
    assert "auc-mean" in record["heldout"] and "r5" in record["heldout"]


def test_operational_settings_do_not_block_a_resume():
    from hlip_fed.config import load_config
    from hlip_fed.federation.coordinator import resume_hash

    base = load_config("tiny")
    same = load_config("tiny", overrides=["federation.rounds=9", "federation.node_wait_s=5", "federation.quorum=1",
                                          "federation.max_update_ratio=0", "train.threads=1", "data.cache_dir=/x",
                                          "federation.evaluate_with_train=false", "data.memory_cache_mb=0"])
    other = load_config("tiny", overrides=["train.lr=0.1"])
    assert resume_hash(base) == resume_hash(same) != resume_hash(other)


def test_a_site_bounds_the_scans_it_keeps_in_memory_whatever_the_run_asks(mini_consortium, tmp_path):
    from hlip_fed.errors import HlipError
    from hlip_fed.federation.local import LocalSite
    from hlip_fed.federation.run import resolve_site

    rc = run_config(mini_consortium, tmp_path, "data.memory_cache_mb=4096")
    site = resolve_site(rc, {"partition-id": 0, "num-partitions": 3, "memory-cache-mb": "1"})
    local = LocalSite(config_from_run(rc), site)
    assert site.memory_cache_mb == 1 and local.cfg.data.memory_cache_mb == 1
    assert local.train_set.cache.memory_left == local.test_set.cache.memory_left == 1 << 20
    local.train_set[0]  # a scan of 16 x 32 x 32 float32 voxels is 64 KiB: within the site's 1 MiB
    assert 0 < local.train_set.cache.memory_left < 1 << 20
    assert resolve_site(rc, {"partition-id": 0, "num-partitions": 3}).memory_cache_mb is None
    with pytest.raises(HlipError, match="site site0: node config memory-cache-mb='lots'"):
        resolve_site(rc, {"partition-id": 0, "num-partitions": 3, "memory-cache-mb": "lots"})


def test_a_sites_precision_setting_wins_over_the_runs(mini_consortium, tmp_path, caplog):
    from hlip_fed.errors import HlipError
    from hlip_fed.federation.local import LocalSite
    from hlip_fed.federation.run import resolve_site

    rc = run_config(mini_consortium, tmp_path, "train.precision=bf16")
    node = {"partition-id": 0, "num-partitions": 3}
    assert LocalSite(config_from_run(rc), resolve_site(rc, node)).cfg.train.precision == "bf16"
    with caplog.at_level("INFO", logger="hlip_fed.federation"):
        local = LocalSite(config_from_run(rc), resolve_site(rc, {**node, "precision": "fp32"}))
    assert local.cfg.train.precision == "fp32"
    assert "site site0: training precision fp32" in caplog.text
    with pytest.raises(HlipError, match="site site0: node config precision='fp8' is not one of auto, fp32"):
        resolve_site(rc, {**node, "precision": "fp8"})


def test_a_site_collates_its_training_batches_in_the_dtype_its_tower_reads(mini_consortium, tmp_path, monkeypatch):
    import hlip_fed.federation.local as local_module
    from hlip_fed.federation.local import LocalSite
    from hlip_fed.federation.run import resolve_site

    rc = run_config(mini_consortium, tmp_path)
    seen, cycle = [], local_module.cycle

    def recording(loader, seed):
        for batch in cycle(loader, seed):
            seen.append(batch[0].dtype)
            yield batch

    monkeypatch.setattr(local_module, "cycle", recording)
    for precision in ("fp32", "bf16-held"):
        local = LocalSite(config_from_run(rc), resolve_site(rc, {"partition-id": 0, "num-partitions": 3,
                                                                 "precision": precision}))
        local.train_round(get_arrays(local.model, federated_keys(local.model, local.cfg.federation.groups)), 1)
        assert set(seen) == {torch.float32 if precision == "fp32" else torch.bfloat16}
        seen.clear()


def test_truth_labels_that_do_not_apply_read_as_unknown(tmp_path):
    """A null label (the size of an absent lesion) is -1, which the metrics leave out."""
    from hlip_fed.errors import HlipError
    from hlip_fed.federation.run import read_labels

    path = tmp_path / "site.jsonl"
    path.write_text('{"study_id": "a", "labels": {"lesion": 0, "size": null}}\n'
                    '{"study_id": "b", "labels": {"lesion": 1, "size": 1}}\n')
    assert read_labels(path) == {"a": {"lesion": 0, "size": -1}, "b": {"lesion": 1, "size": 1}}
    path.write_text('{"study_id": "a", "labels": {"lesion": "yes"}}\n')
    with pytest.raises(HlipError, match="site.jsonl: cannot read labels"):
        read_labels(path)


def test_a_warm_site_does_not_parse_the_run_config_again(mini_consortium, tmp_path, monkeypatch):
    """Parsing the run config costs ~80 ms; a site kept by the worker must not pay it per message."""
    import client.app as client_module

    rc = run_config(mini_consortium, tmp_path)
    cfg = config_from_run(rc)
    model = create_model(cfg.model, seed=0)
    arrays = get_arrays(model, federated_keys(model, cfg.federation.groups))
    parsed = []
    monkeypatch.setattr(client_module, "config_from_run", lambda run: parsed.append(1) or config_from_run(run))
    context = Context(run_id=77, node_id=1000, node_config={"partition-id": 1, "num-partitions": 3},
                      state=RecordDict(), run_config=rc)
    for server_round in (1, 2):
        reply = client_module.app(train_message(arrays, server_round=server_round), context)
        assert not reply.has_error(), reply.error
    assert len(parsed) == 1


def test_site_local_norms_never_travel_and_each_site_keeps_its_own(mini_consortium, tmp_path):
    """federation.site_local=[norms] (FedBN for HLIP's LayerNorms): the replies carry no norm, the
    server's model keeps the initial norms, and every site trains and keeps its own across rounds."""
    from safetensors.torch import load_file

    from hlip_fed.config import load_config
    from hlip_fed.federation.local import latest_site_local
    from hlip_fed.federation.params import site_local_keys
    from server.app import main as server_main

    _SITES.clear()
    rc = run_config(mini_consortium, tmp_path / "run", "federation.site_local=[norms]", "federation.rounds=2")
    grid = InProcessGrid(rc, run_id=61)
    server_main(grid, server_context(rc, 61))
    cfg = load_config("tiny", overrides=FAST_RUN)
    initial = create_model(cfg.model, seed=cfg.train.seed).state_dict()
    norms = site_local_keys(create_model(cfg.model, seed=0), ["norms"])
    assert len(norms) == 2 * 2 * cfg.model.vision.depth + 2  # two LayerNorms a block, and the final one
    sent = {k for _, _, content in grid.sent for k in content.array_records["arrays"]}
    assert sent and not sent & set(norms) and "visual.blocks.0.attn.qkv.weight" in sent
    final = load_latest(tmp_path / "run" / "checkpoints").arrays
    assert not set(final) & set(norms)  # the server never holds a site's norms
    kept = {}
    for site in ("site0", "site1", "site2"):
        state = tmp_path / "run" / "sites" / site
        assert sorted(p.name for p in state.glob("site-local-round-*")) == [
            "site-local-round-0001.safetensors", "site-local-round-0002.safetensors"]
        kept[site] = load_file(latest_site_local(state))
        assert set(kept[site]) == set(norms)
        assert not torch.equal(kept[site]["visual.norm.weight"], initial["visual.norm.weight"])  # trained at the site
    assert not torch.equal(kept["site0"]["visual.norm.weight"], kept["site1"]["visual.norm.weight"])
    assert "Site-local parameters (norms) never left the sites" in (tmp_path / "run" / "model" / "MODEL_CARD.md").read_text()


def test_site_local_kinds_are_checked():
    from hlip_fed.config import ConfigError, load_config
    from hlip_fed.errors import HlipError
    from hlip_fed.federation.params import site_local_keys

    with pytest.raises(ConfigError, match="federation.site_local"):
        load_config("tiny", overrides=["federation.site_local=[batchnorm]"])
    with pytest.raises(ConfigError, match="federation.init"):
        load_config("tiny", overrides=["federation.site_local=[norms]", "federation.init=models/x"])
    with pytest.raises(HlipError, match="unknown kind"):
        site_local_keys(create_model(load_config("tiny", overrides=FAST_RUN).model, seed=0), ["batchnorm"])


def test_sites_evaluate_every_global_model_once_in_one_exchange_a_round(mini_consortium, tmp_path):
    """federation.evaluate_with_train: a site evaluates the global model it receives for training and
    sends the metrics with its update, so a round is one exchange; the final model has one of its own.
    Either way every round's record ends up with the sites' evaluation of that round's model, and
    the training is the same."""
    from server.app import main as server_main

    runs = {}
    for run_id, with_train in ((81, True), (82, False)):
        _SITES.clear()
        out = tmp_path / str(with_train)
        rc = run_config(mini_consortium, out, "federation.rounds=3", f"federation.evaluate_with_train={with_train}")
        server_main(InProcessGrid(rc, run_id=run_id), server_context(rc, run_id))
        runs[with_train] = read_rounds(out)
        exchanges = [[e["type"] for e in r.timing["exchanges"]] for r in runs[with_train]]
        assert exchanges == ([["train"], ["train"], ["train", "evaluate"]] if with_train else [["train", "evaluate"]] * 3)
        for r in runs[with_train]:
            assert sorted(r.eval_sites) == ["1000", "1001", "1002"], r.round
            assert 0.0 <= r.eval["auc-mean"] <= 1.0
    lines = [json.loads(line) for line in (tmp_path / "True" / "metrics.jsonl").read_text().splitlines()]
    # round 3's line carries round 2's evaluation; round 1's model had none yet
    assert [line.get("previous_eval", {}).get("round") for line in lines] == [None, 1, 2]
    assert "eval" not in lines[0] and lines[2]["eval"] == runs[True][2].eval
    assert runs[True][1].eval == lines[2]["previous_eval"]["eval"] and runs[True][2].previous_eval is None
    for one, other in zip(runs[True], runs[False]):
        assert one.train["train-loss"] == other.train["train-loss"]
        assert one.heldout["auc-mean"] == other.heldout["auc-mean"] and one.eval["auc-mean"] == other.eval["auc-mean"]
    (_, carried), (_, separate) = _final_weights(tmp_path / "True"), _final_weights(tmp_path / "False")
    for k in separate:
        np.testing.assert_array_equal(carried[k], separate[k], err_msg=k)


@pytest.mark.parametrize("test_split", ["none", "unreadable"])
def test_a_site_without_usable_test_studies_sends_its_update_and_no_evaluation(test_split, tmp_path):
    """A hospital may keep no test split, or one that cannot be read: asked for the received model's
    evaluation, it trains and sends no evaluation record."""
    from client.app import app as client_app
    from conftest import write_mini_consortium

    _SITES.clear()
    consortium = write_mini_consortium(tmp_path / "data", test=0 if test_split == "none" else 2)
    for scan in (consortium / "sites" / "site0" / "test").rglob("*.nii*"):
        scan.write_bytes(b"not a NIfTI file")
    rc = run_config(consortium, tmp_path / "run")
    model = create_model(config_from_run(rc).model, seed=0)
    arrays = get_arrays(model, federated_keys(model, config_from_run(rc).federation.groups))
    context = Context(run_id=91, node_id=1000, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config=rc)
    prompts = {"prompt-neg-lesion-left": ["nothing on the left"], "prompt-pos-lesion-left": ["a left focus"]}
    reply = client_app(train_message(arrays, server_round=2, extra={"evaluation": True, **prompts}), context)
    assert not reply.has_error(), reply.error
    assert list(reply.content.metric_records) == ["metrics"] and "arrays" in reply.content
