"""A site's policy decides what the server may ask of it, and the ClientApp enforces it first."""

import json
import shlex

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from conftest import FAST_RUN
from hlip_fed.cli import main
from hlip_fed.errors import HlipError
from hlip_fed.federation.audit import read_audit
from hlip_fed.federation.local import _SITES
from hlip_fed.security.policy import (
    DEFAULT_POLICY,
    SitePolicy,
    check_message_config,
    check_run_config,
    load_policy,
)
from test_federation import train_message

PERMISSIVE = "allow: ['*']\ndeny: []\nbounds: {}\n"


def test_the_default_policy_allows_the_bundled_presets_and_refuses_what_steers_a_site():
    assert check_run_config({"config": "demo", "overrides": "federation.rounds=5 train.lr=1e-4"}, DEFAULT_POLICY) == []
    assert check_run_config({"config": "benchmark", "overrides": ""}, DEFAULT_POLICY) == []
    assert check_run_config({"config": "learning", "overrides": ""}, DEFAULT_POLICY) == []
    cases = {
        "train.batch_size=1 federation.local_steps=1": ["train.batch_size=1 is below", "local_steps=1 is below"],
        "model.text.lock=false": ["model.text.lock=False"],
        "federation.groups=[vision,text_encoder]": ["federation.groups"],
        "data.cache_dir=/var/lib/somewhere": ["override data.cache_dir"],
        "model.text.name=someone/model": ["override model.text.name"],
        "federation.transport=${oc.env:SECRET}": ["interpolation"],
        "federation.proximal_mu=50": ["proximal_mu=50.0 is above"],
        "model.loss.name=masked": ["model.loss.name='masked'"],  # a voxel decoder trained on the scans
    }
    for overrides, expected in cases.items():
        refused = check_run_config({"config": "demo", "overrides": overrides}, DEFAULT_POLICY)
        assert len(refused) == len(expected) and all(e in r for e, r in zip(expected, refused)), (overrides, refused)


def test_config_may_only_name_a_bundled_preset(tmp_path):
    accounts = tmp_path / "passwd"
    accounts.write_text("root:x:0:0:root:/root:/bin/bash\n")
    refused = check_run_config({"config": str(accounts), "overrides": ""}, DEFAULT_POLICY)
    assert refused == [f"config {str(accounts)!r} is not one of the site's presets ['demo', 'benchmark', 'learning']"]
    assert all("root:x" not in r for r in refused)  # the file is never read


def test_message_configs_are_bounded():
    prompts = {f"prompt-neg-f{i}": ["no " + "x" * 10] for i in range(40)}
    prompts.update({f"prompt-pos-f{i}": ["a " + "x" * 10] for i in range(40)})
    assert any("80 prompts" in r for r in check_message_config(prompts, DEFAULT_POLICY))
    assert any("longer than" in r for r in check_message_config({"prompt-pos-a": ["y" * 500]}, DEFAULT_POLICY))
    assert any("proximal-mu" in r for r in check_message_config({"proximal-mu": 5.0}, DEFAULT_POLICY))
    assert any("interpolation" in r for r in check_message_config({"prompt-pos-a": ["${oc.env:HOME}"]}, DEFAULT_POLICY))
    assert check_message_config({"proximal-mu": 0.01, "prompt-pos-a": ["a bleed"]}, DEFAULT_POLICY) == []


def test_a_policy_file_is_checked(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("max_evaluations: 3\nrequire: dp\n")
    policy = load_policy(path)
    assert policy.max_evaluations == 3 and policy.presets == SitePolicy().presets
    assert any("differential privacy" in r for r in check_run_config({"config": "demo"}, policy))
    assert check_run_config({"config": "demo", "overrides": "federation.dp=server_fixed"}, policy) == []
    for text, needle in (("max_evaluation: 3\n", "max_evaluation"), ("require: maybe\n", "require must be"),
                         ("bounds: {train.lr: {above: 1}}\n", "above")):
        path.write_text(text)
        with pytest.raises(HlipError, match=needle):
            load_policy(path)


def _context(consortium, out, policy_text=None, **overrides):
    rc = {"data-root": str(consortium), "run-dir": str(out), "config": "",
          "overrides": " ".join(shlex.quote(o) for o in FAST_RUN)}
    rc.update(overrides)
    state = out / "sites" / "site0"
    if policy_text is not None:
        state.mkdir(parents=True, exist_ok=True)
        (state / "policy.yaml").write_text(policy_text)
    return Context(run_id=9, node_id=1000, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                   run_config=rc), state


def _arrays(context):
    from hlip_fed.federation.params import federated_keys
    from hlip_fed.federation.run import config_from_run
    from hlip_fed.model import create_model

    cfg = config_from_run(dict(context.run_config))
    model = create_model(cfg.model, seed=0)
    keys = federated_keys(model, cfg.federation.groups)
    return {k: v for k, v in model.state_dict().items() if k in keys}


def _evaluate_message(arrays, prompts):
    from flwr.app import ArrayRecord

    return Message(metadata=Metadata(
        run_id=9, message_id="e1", src_node_id=0, dst_node_id=1000, reply_to_message_id="", group_id="1",
        created_at=0.0, ttl=600.0, message_type="evaluate",
    ), content=RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({"server-round": 1, **prompts})}))


def test_the_clientapp_enforces_the_sites_policy_before_anything_runs(mini_consortium, tmp_path):
    from client.app import app as client_app

    _SITES.clear()
    context, state = _context(mini_consortium, tmp_path / "strict", policy_text="")  # an empty file: the defaults
    arrays = _arrays(context)
    reply = client_app(train_message(arrays), context)
    assert reply.has_error() and "[policy-refused]" in reply.error.reason
    assert "model.text" not in reply.error.reason  # what was refused stays at the site ...
    detail = read_audit(state)[-1]["detail"]  # ... here: the tests' random text tower is not the site's
    assert "override model.text.pretrained is not one the site allows" in detail
    assert (state / "cache").exists() is False  # nothing was read or cached for a refused run

    _SITES.clear()
    context, state = _context(mini_consortium, tmp_path / "agreed", policy_text=PERMISSIVE + "max_evaluations: 2\n")
    assert not client_app(train_message(arrays), context).has_error()
    prompts = {"prompt-neg-lesion-left": ["nothing on the left"], "prompt-pos-lesion-left": ["a left focus"]}
    assert not client_app(_evaluate_message(arrays, prompts), context).has_error()
    # a training message that asks for the received model's evaluation spends one too
    carried = client_app(train_message(arrays, extra={"evaluation": True, **prompts}), context)
    assert not carried.has_error() and "auc-mean" in carried.content["evaluation"]
    for third in (_evaluate_message(arrays, prompts), train_message(arrays, extra={"evaluation": True, **prompts})):
        refused = client_app(third, context)
        assert refused.has_error() and "[policy-refused]" in refused.error.reason
        assert "evaluations the site allows" in read_audit(state)[-1]["detail"]
    assert not client_app(train_message(arrays), context).has_error()  # training alone goes on

    _SITES.clear()
    context, _ = _context(mini_consortium, tmp_path / "secagg", policy_text=PERMISSIVE + "require: secagg\n")
    refused = client_app(train_message(arrays), context)
    assert refused.has_error() and "[policy-refused]" in refused.error.reason  # only client.secagg may train


def test_a_simulated_site_without_a_policy_runs_as_before(mini_consortium, tmp_path):
    from client.app import app as client_app

    _SITES.clear()
    context, state = _context(mini_consortium, tmp_path / "free")
    assert not client_app(train_message(_arrays(context)), context).has_error()
    assert not (state / "policy.yaml").exists()


def test_policy_check_command_says_what_would_be_refused(tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    rc = main(["site", "policy", "check", "--state", str(state), "--run-config",
               "config='demo' overrides='train.batch_size=1 model.text.name=x/y'"])
    out = capsys.readouterr().out
    assert rc == 1 and "refused: override model.text.name" in out
    assert main(["site", "policy", "check", "--state", str(state), "--run-config",
                 "config='demo' overrides='federation.rounds=5'"]) == 0
    assert "allows this run config" in capsys.readouterr().out
    (state / "policy.yaml").write_text("presets: [benchmark]\n")
    assert main(["site", "policy", "check", "--state", str(state), "--run-config", "config='demo'"]) == 1
    assert main(["site", "policy", "show", "--state", str(state)]) == 0
    assert "- benchmark" in capsys.readouterr().out
    json.dumps(DEFAULT_POLICY.bounds)  # the default is plain data (YAML/JSON-ready)
