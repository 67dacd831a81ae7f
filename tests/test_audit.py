"""The site's audit log records exactly what each reply carries, and test faults stay gated."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from hlip_fed.deploy.fault_injection import ENV_SWITCH
from hlip_fed.errors import HlipError
from hlip_fed.federation.audit import payload_sha256, read_audit
from hlip_fed.federation.local import _SITES
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
    refused = client_app(train_message(arrays, server_round=1), context)
    assert refused.has_error() and "[site-refused]" in refused.error.reason
    assert ENV_SWITCH not in refused.error.reason  # the site's details do not leave it ...
    entry = read_audit(state)[-1]
    assert entry["error"] == refused.error.reason and ENV_SWITCH in entry["detail"]  # ... they are audited

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


@pytest.mark.parametrize("bad", ["system file as config", "environment interpolation"])
def test_a_refused_run_config_answers_with_a_code_and_keeps_the_sites_details(mini_consortium, tmp_path,
                                                                               monkeypatch, bad):
    """The error text used to travel back: a system file named as ``config`` quoted its first
    lines, an interpolated override the site's environment."""
    from client.app import app as client_app

    monkeypatch.setenv("HLIP_TEST_SECRET", "s3cr3t-value")
    arrays, context, state = _setup(mini_consortium, tmp_path)
    secret_file = tmp_path / "accounts"
    secret_file.write_text("root:x:0:0:root:/root:/bin/bash\nhospital-admin:x:1000:1000::/home/admin:/bin/sh\n")
    if bad == "system file as config":
        context.run_config["config"], leak = str(secret_file), "root:x:0"
    else:
        context.run_config["overrides"] = "federation.transport=${oc.env:HLIP_TEST_SECRET}"
        leak = "s3cr3t-value"
    _SITES.clear()  # a fresh site process: it reads the run config anew
    reply = client_app(train_message(arrays, server_round=1), context)
    assert reply.has_error() and reply.error.reason.startswith("hlip-fed site error [config-refused]")
    assert leak not in reply.error.reason and str(tmp_path) not in reply.error.reason
    assert leak in read_audit(state)[-1]["detail"]  # the site keeps what went wrong


def test_a_site_whose_text_tower_differs_from_the_servers_refuses(mini_consortium, tmp_path):
    """A locked text tower never travels, so every site must build the server's: the server sends
    its hash, and a site with another tower answers with a code instead of training."""
    from client.app import app as client_app
    from hlip_fed.federation.params import text_tower_hash

    arrays, context, state = _setup(mini_consortium, tmp_path)
    server = create_model(config_from_run(context.run_config).model, seed=0)
    _SITES.clear()
    message = train_message(arrays, server_round=1)
    message.content["config"]["text-tower"] = text_tower_hash(server)
    assert not client_app(message, context).has_error()  # the same config builds the same tower
    message.content["config"]["text-tower"] = "0" * 64
    reply = client_app(message, context)
    assert reply.has_error() and reply.error.reason.startswith("hlip-fed site error [text-tower-differs]")
    assert "is not the server's" in read_audit(state)[-1]["detail"]
