"""The site's audit log records exactly what each reply carries, and test faults stay gated."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from hlip_fed.deploy.fault_injection import ENV_SWITCH
from hlip_fed.errors import HlipError
from hlip_fed.federation.audit import payload_sha256, read_audit
from hlip_fed.federation.params import federated_keys
from hlip_fed.federation.run import config_from_run
from hlip_fed.model import create_model
from test_federation import run_config, train_message


def _setup(consortium, tmp_path, **node):
    rc = run_config(consortium, tmp_path)
    cfg = config_from_run(rc)
    model = create_model(cfg.model, seed=0)
    keys = federated_keys(model, cfg.federation.groups)
    arrays = {k: v for k, v in model.state_dict().items() if k in keys}
    context = Context(run_id=7, node_id=1000, node_config={"partition-id": 0, "num-partitions": 3, **node},
                      state=RecordDict(), run_config=rc)
    return arrays, context, tmp_path / "sites" / "site0"


def test_audit_entry_matches_the_reply_exactly(mini_consortium, tmp_path):
    from client.app import app as client_app

    arrays, context, state = _setup(mini_consortium, tmp_path)
    reply = client_app(train_message(arrays, server_round=1), context)
    assert not reply.has_error(), reply.error
    evaluation = train_message(arrays, server_round=1)
    evaluation.metadata.__dict__["_message_type"] = "evaluate"
    evaluation.content["config"] = ConfigRecord({"server-round": 1})
    eval_reply = client_app(evaluation, context)
    assert not eval_reply.has_error(), eval_reply.error

    entries = read_audit(state)
    assert [(e["type"], e["round"], e["run"]) for e in entries] == [("train", 1, 7), ("evaluate", 1, 7)]
    sent, logged = reply.content, entries[0]
    assert logged["records"] == {"arrays": "ArrayRecord", "metrics": "MetricRecord"}
    assert list(logged["arrays"]) == ["arrays"]
    rec = logged["arrays"]["arrays"]
    assert rec["keys"] == list(sent["arrays"].keys())
    assert rec["sha256"] == payload_sha256(sent["arrays"])
    assert rec["bytes"] == logged["bytes"] == sum(a.numpy().nbytes for a in sent["arrays"].values())
    assert rec["shapes"] == {k: list(a.shape) for k, a in sent["arrays"].items()}
    assert logged["metrics"] == {"metrics": dict(sent["metrics"])}
    assert logged["metrics"]["metrics"]["bytes-sent"] == rec["bytes"]
    assert logged["config"] == {}
    assert entries[1]["records"] == {"metrics": "MetricRecord"} and entries[1]["bytes"] == 0
    assert entries[1]["metrics"] == {"metrics": dict(eval_reply.content["metrics"])}
    # The digest is of the payload: one changed value changes it.
    changed = sent["arrays"]
    key = next(iter(changed.keys()))
    before = payload_sha256(changed)
    values = changed[key].numpy().copy()
    values.flat[0] += 1.0
    from flwr.app import Array

    changed[key] = Array(values)
    assert payload_sha256(changed) != before


def test_test_faults_need_the_environment_switch(mini_consortium, tmp_path, monkeypatch):
    from client.app import app as client_app

    monkeypatch.delenv(ENV_SWITCH, raising=False)
    arrays, context, state = _setup(mini_consortium, tmp_path, misbehave="scale")
    with pytest.raises(HlipError, match=ENV_SWITCH):  # Flower's runtime turns it into an error reply
        client_app(train_message(arrays, server_round=1), context)
    assert ENV_SWITCH in read_audit(state)[-1]["error"]  # the error text that left is audited too

    monkeypatch.setenv(ENV_SWITCH, "1")
    arrays, context, state = _setup(mini_consortium, tmp_path / "on", misbehave="cycle")
    reply = client_app(train_message(arrays, server_round=1), context)  # round 1 of cycle: nan
    assert not reply.has_error()
    assert not all(np.isfinite(a.numpy()).all() for a in reply.content["arrays"].values())
    assert read_audit(state)[-1]["arrays"]["arrays"]["sha256"] == payload_sha256(reply.content["arrays"])


def test_unknown_fault_mode_is_refused(monkeypatch):
    from hlip_fed.deploy.fault_injection import requested_fault

    monkeypatch.setenv(ENV_SWITCH, "1")
    assert requested_fault({}, 1) is None
    assert [requested_fault({"misbehave": "cycle"}, r) for r in (1, 2, 3, 4)] == ["nan", "scale", "missing", "nan"]
    with pytest.raises(HlipError, match="not one of"):
        requested_fault({"misbehave": "boom"}, 1)
