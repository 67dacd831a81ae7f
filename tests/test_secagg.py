"""The secure-aggregation server mode (Flower's SecAgg+) with the same site training code."""

import copy
import json
import shlex
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Context, Message, Metadata, RecordDict

from conftest import FAST_RUN
from hlip_fed.errors import HlipError
from hlip_fed.federation.audit import read_audit
from hlip_fed.federation.checkpoint import load_latest
from hlip_fed.federation.local import local_site
from hlip_fed.federation.params import federated_keys, get_arrays
from hlip_fed.federation.run import config_from_run, resolve_site
from hlip_fed.model import create_model
from simulations.inprocess import InProcessGrid


class SecAggGrid(InProcessGrid):
    """The in-process grid for the SecAgg+ ClientApp: each node keeps one Context across the
    protocol's stages (the mod keeps its keys and shares in ``context.state``)."""

    def __init__(self, run_config, num_nodes=3, run_id=1):
        super().__init__(run_config, num_nodes=num_nodes, run_id=run_id)
        self.contexts = {node: Context(
            run_id=run_id, node_id=node, node_config={"partition-id": pid, "num-partitions": num_nodes},
            state=RecordDict(), run_config=self.run_config) for node, pid in self.nodes.items()}
        self.plain = []  # (node, content) of every plaintext training reply, before masking

    @property
    def run(self):
        return SimpleNamespace(run_id=self.run_id)

    def send_and_receive(self, messages, *, timeout=None):
        from client.secagg import app as secagg_client

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            incoming = Message(metadata=Metadata(
                run_id=self.run_id, message_id=f"m{next(self.ids)}", src_node_id=0, dst_node_id=node,
                reply_to_message_id="", group_id=msg.metadata.group_id, created_at=msg.metadata.created_at,
                ttl=msg.metadata.ttl, message_type=msg.metadata.message_type,
            ), content=copy.deepcopy(msg.content))  # a transport gives each node its own copy
            replies.append(secagg_client(incoming, self.contexts[node]))
        return replies


def _rc(consortium, out, *extra):
    overrides = " ".join(shlex.quote(o) for o in FAST_RUN + ["federation.rounds=1"] + list(extra))
    return {"data-root": str(consortium), "run-dir": str(out), "config": "", "overrides": overrides}


def test_secagg_round_equals_plain_fedavg_of_the_same_training(mini_consortium, tmp_path):
    from server.secagg import main as secagg_main

    rc = _rc(mini_consortium, tmp_path / "secagg")
    grid = SecAggGrid(rc, run_id=41)
    secagg_main(grid, Context(run_id=41, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    ckpt = load_latest(tmp_path / "secagg" / "checkpoints")
    assert ckpt.round == 1 and (tmp_path / "secagg" / "model" / "model.safetensors").exists()
    record = json.loads((tmp_path / "secagg" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["aggregation"] == "secagg+" and record["sites_in_sum"] == 3 and "auc-mean" in record["heldout"]

    # Plain FedAvg of the same replies: the same sites' round-1 training (same seeds) from the same
    # initial model, averaged in the clear (equal example counts: the weighted mean is the mean).
    cfg = config_from_run(rc)
    model = create_model(cfg.model, seed=cfg.train.seed)
    keys = federated_keys(model, cfg.federation.groups)
    start = get_arrays(model, keys)
    ref_rc = dict(rc, **{"run-dir": str(tmp_path / "reference")})
    updates = []
    for pid in range(3):
        site = resolve_site(ref_rc, {"partition-id": pid, "num-partitions": 3})
        trained, metrics = local_site(42, site, lambda: config_from_run(ref_rc)).train_round(dict(start), server_round=1)
        assert metrics["num-examples"] == 4.0
        updates.append({k: (trained[k] - start[k]).numpy() for k in keys})
    step = 2 * 8.0 / 4194304  # one quantization step of SecAgg+ over [-8, 8]
    for k in keys:
        plain = start[k].numpy() + np.mean([u[k] for u in updates], axis=0)
        np.testing.assert_allclose(ckpt.arrays[k], plain, atol=4 * step, rtol=0, err_msg=k)
        assert not np.allclose(ckpt.arrays[k], start[k].numpy(), atol=0, rtol=0) or k.startswith("logit_bias")

    # Each site audited the plaintext update it contributed, before masking.
    entries = read_audit(tmp_path / "secagg" / "sites" / "site0")
    assert [e["round"] for e in entries] == [1] and entries[0]["type"] == "train"


def test_secagg_server_refuses_what_it_cannot_do(mini_consortium, tmp_path):
    from server.secagg import main as secagg_main

    for extra, match in (("federation.strategy=fedmedian", "only average"), ("federation.dp=server_fixed", "DP noise")):
        rc = _rc(mini_consortium, tmp_path / "x", extra)
        with pytest.raises(HlipError, match=match):
            secagg_main(SecAggGrid(rc, run_id=43), Context(run_id=43, node_id=0, node_config={}, state=RecordDict(),
                                                           run_config=rc))
