"""Compressed transport of site replies: fp16/bf16, deltas, decoding before screening and FedAvg."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hlip_fed.config import ConfigError, FederationConfig, load_config
from hlip_fed.errors import HlipError
from hlip_fed.federation.audit import read_audit
from hlip_fed.federation.transport import (
    decode_arrays,
    decode_replies,
    encode_arrays,
    to_array_record,
    wire_bytes,
)
from simulations.inprocess import run_federation
from test_federation import run_config
from conftest import FakeGrid

EXPECTED = {"w": (3, 4), "b": (4,)}


def _global(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(0, 0.05, (3, 4)).astype(np.float32), "b": rng.normal(0, 1.0, 4).astype(np.float32)}


def _site(g, scale, seed):
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.normal(0, 1, v.shape)).astype(np.float32) for k, v in g.items()}


def _reply(node, arrays, n=10):
    return Message(metadata=Metadata(
        run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
        group_id="1", created_at=0.0, ttl=600.0, message_type="train",
    ), content=RecordDict({"arrays": to_array_record(arrays), "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})}))


def _strategy(g, transport, deltas, **fed):
    from server.strategy import build_strategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg = FederationConfig(min_nodes=3, transport=transport, send_deltas=deltas, **fed)
    s = build_strategy(cfg, EXPECTED, offset=0)
    s.configure_train(1, ArrayRecord({k: torch.from_numpy(v) for k, v in g.items()}), ConfigRecord({}), FakeGrid([1, 2, 3]))
    return s


@pytest.mark.parametrize("transport, rel", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_weights_round_trip_within_the_dtype_rounding(transport, rel):
    w = _site(_global(), 0.01, 1)
    sent = encode_arrays({k: torch.from_numpy(v) for k, v in w.items()}, None, transport)
    assert {v.dtype for v in sent.values()} == {np.dtype(np.float16 if transport == "fp16" else np.uint16)}
    back = decode_arrays(sent, None, transport)
    for k in w:
        assert back[k].dtype == np.float32
        np.testing.assert_array_less(np.abs(back[k] - w[k]), rel * np.abs(w[k]) + 1e-7)


def test_bf16_bits_are_torchs_bfloat16():
    x = np.array([1.0, -2.5e-3, 3.3e38, 1e-40, np.inf, np.nan], np.float32)
    bits = encode_arrays({"x": x}, None, "bf16")["x"]
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    back = decode_arrays({"x": bits}, None, "bf16")["x"]
    np.testing.assert_array_equal(back[:5], want[:5])
    assert np.isnan(back[5])


def test_fp32_deltas_reconstruct_exactly_and_compressed_deltas_within_the_update_rounding():
    g = _global()
    w = _site(g, 1e-3, 2)  # a small update: site and global weights within a factor of two
    delta = encode_arrays(w, g, "fp32", deltas=True)
    for k in w:
        np.testing.assert_array_equal(decode_arrays(delta, g, "fp32", deltas=True)[k], w[k])
    for transport, rel in (("fp16", 2.0**-11), ("bf16", 2.0**-8)):
        back = decode_arrays(encode_arrays(w, g, transport, deltas=True), g, transport, deltas=True)
        for k in w:
            update = np.abs(w[k] - g[k])
            # error relative to the update (plus one fp32 rounding of the weight), not to the weight
            np.testing.assert_array_less(np.abs(back[k] - w[k]), rel * update + 2.0**-23 * np.abs(w[k]) + 1e-9)


def test_compressed_payload_is_half_of_fp32():
    from hlip_fed.federation.params import federated_keys, get_arrays
    from hlip_fed.model import create_model

    cfg = load_config("tiny", overrides=["model.text.pretrained=false",
                                         "model.text.overrides={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}"])
    model = create_model(cfg.model, seed=0)
    arrays = get_arrays(model, federated_keys(model, cfg.federation.groups))
    sizes = {}
    for transport in ("fp32", "fp16", "bf16"):
        record = to_array_record(encode_arrays(arrays, arrays, transport, deltas=True))
        payload = sum(a.numpy().nbytes for a in record.values())
        assert payload == wire_bytes(arrays, transport)
        sizes[transport] = (payload, sum(len(a.data) for a in record.values()))  # npy bytes sent
    for transport in ("fp16", "bf16"):
        assert sizes[transport][0] == sizes["fp32"][0] // 2
        assert sizes[transport][1] <= 0.51 * sizes["fp32"][1]  # plus one npy header per array


def test_fp16_overflow_fails_on_the_site():
    with pytest.raises(HlipError, match="beyond fp16's range"):
        encode_arrays({"w": np.array([7e4], np.float32)}, None, "fp16")
    assert np.isinf(decode_arrays(encode_arrays({"w": np.array([np.inf], np.float32)}, None, "fp16"), None, "fp16")["w"]).all()


@pytest.mark.parametrize("transport", ["fp16", "bf16"])
def test_fedavg_of_compressed_deltas_is_the_fp32_mean_of_the_decoded_weights(transport):
    g = _global()
    sites = [_site(g, 1e-3, s) for s in (3, 4, 5)]
    sent = [encode_arrays(w, g, transport, deltas=True) for w in sites]
    s = _strategy(g, transport, True)
    arrays, _ = s.aggregate_train(1, [_reply(i + 1, a, n) for i, (a, n) in enumerate(zip(sent, (10, 20, 30)))])
    decoded = [decode_arrays(a, g, transport, deltas=True) for a in sent]
    assert not s.round_record.rejected
    for k in g:
        want = sum(d[k].astype(np.float64) * n for d, n in zip(decoded, (10, 20, 30))) / 60
        out = arrays[k].numpy()
        assert out.dtype == np.float32 and out.shape == EXPECTED[k]
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(out, sum(w[k] * n for w, n in zip(sites, (10, 20, 30))) / 60, rtol=0, atol=1e-5)


@pytest.mark.parametrize("transport, deltas", [("fp16", True), ("bf16", True), ("fp16", False)])
def test_screening_rejects_nan_and_scaled_updates_under_compression(transport, deltas):
    g = _global()
    honest = [_site(g, 1e-3, s) for s in (6, 7)]
    scaled = {k: g[k] + 1000 * (honest[0][k] - g[k]) for k in g}
    nan = {k: v.copy() for k, v in honest[1].items()}
    nan["w"][0, 0] = np.nan
    s = _strategy(g, transport, deltas)
    replies = [_reply(1, encode_arrays(honest[0], g, transport, deltas)),
               _reply(2, encode_arrays(honest[1], g, transport, deltas)),
               _reply(3, encode_arrays(scaled, g, transport, deltas))]
    arrays, _ = s.aggregate_train(1, replies)
    assert [r["node"] for r in s.round_record.rejected] == [3]
    assert "update norm" in s.round_record.rejected[0]["reason"]
    s = _strategy(g, transport, deltas)
    replies[2] = _reply(3, encode_arrays(nan, g, transport, deltas))
    s.aggregate_train(1, replies)
    assert [(r["node"], "non-finite" in r["reason"]) for r in s.round_record.rejected] == [(3, True)]


def test_a_reply_in_another_dtype_is_rejected_and_others_still_aggregate():
    g = _global()
    sites = [_site(g, 1e-3, s) for s in (8, 9)]
    s = _strategy(g, "fp16", True)
    replies = [_reply(1, encode_arrays(sites[0], g, "fp16", True)), _reply(2, encode_arrays(sites[1], g, "fp16", True)),
               _reply(3, sites[0])]  # full fp32 weights, as if the site ignored the transport
    arrays, _ = s.aggregate_train(1, replies)
    assert [r["node"] for r in s.round_record.rejected] == [3]
    assert "travels as float32" in s.round_record.rejected[0]["reason"]
    np.testing.assert_allclose(arrays["w"].numpy(), (sites[0]["w"] + sites[1]["w"]) / 2, atol=1e-5)


def test_decoding_leaves_the_received_messages_and_the_default_alone():
    g = _global()
    reply = _reply(1, encode_arrays(_site(g, 1e-3, 1), g, "bf16", True))
    decoded, rejected = decode_replies([reply], g, "bf16", True)
    assert not rejected and decoded[0] is not reply
    assert reply.content["arrays"]["w"].numpy().dtype == np.uint16
    assert decoded[0].content["arrays"]["w"].numpy().dtype == np.float32
    assert decode_replies([reply], g, "fp32", False)[0][0] is reply
    with pytest.raises(HlipError):
        decode_replies([reply], {}, "bf16", True)


def test_config_rejects_an_unknown_transport():
    with pytest.raises(ConfigError, match="federation.transport"):
        load_config("tiny", overrides=["federation.transport=int8"])


def test_inprocess_federation_with_fp16_deltas(mini_consortium, tmp_path):
    rc = run_config(mini_consortium, tmp_path, "federation.transport=fp16", "federation.send_deltas=true",
                    "federation.rounds=1")
    grid = run_federation(rc, num_nodes=3, run_id=31)
    assert len(grid.sent) == 3
    for _node, _round, content in grid.sent:
        assert {a.numpy().dtype for a in content["arrays"].values()} == {np.dtype(np.float16)}
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert not record["rejected"] and len(record["train_sites"]) == 3
    sent_bytes = sum(a.numpy().nbytes for a in grid.sent[0][2]["arrays"].values())
    assert set(record["bytes_per_site"].values()) == {float(sent_bytes)}
    assert all(np.isfinite(v) for v in record["update_norms"].values())
    assert np.isfinite(record["heldout"]["auc-mean"])
    audit = read_audit(tmp_path / "sites" / "site0")
    assert audit[0]["arrays"]["arrays"]["dtypes"] == ["float16"] and audit[0]["bytes"] == sent_bytes
