"""hlip-fed ClientApp: one hospital trains its local HLIP copy and evaluates the global model.

Everything a site does lives in :mod:`hlip_fed.federation.local`; this file only moves Flower
records in and out. The reply holds the federated arrays (encoded for ``federation.transport``:
fp32, fp16 or bf16 bit patterns, weights or deltas; see :mod:`hlip_fed.federation.transport`) and
scalar metrics (with ``federation.evaluate_with_train``, a training reply adds the scalar metrics
of the received model's evaluation), nothing else. The mods (:mod:`client.mods`) audit every reply
as it leaves and answer a failure with its error code alone.
"""

import logging

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.mods import injected_faults, server_round, site_audit
from hlip_fed.data.errors import DataError
from hlip_fed.federation.admission import admit
from hlip_fed.federation.local import LocalSite, local_site
from hlip_fed.federation.run import EVALUATION, config_from_run, prompts_from_config, resolve_site
from hlip_fed.federation.transport import encode_arrays, to_array_record

app = ClientApp(mods=[site_audit, injected_faults])
log = logging.getLogger("hlip_fed.site")


def admitted_site(kind: str, msg: Message, context: Context) -> LocalSite:
    """The site's warm local state for this run, once the message passed the site's admission."""
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    site = resolve_site(run_config, node_config)
    config = dict(msg.content["config"])
    admit(kind, context.run_id, site, node_config, run_config, config)
    local = local_site(context.run_id, site, lambda: config_from_run(run_config))
    local.check_text_tower(config.get("text-tower"))
    return local


def carried_evaluation(local: LocalSite, received: dict, config: dict) -> dict[str, float] | None:
    """One exchange a round: the received global model's evaluation, when the training message asks
    for it and the site has usable test studies (without them the site still sends its update)."""
    if not config.get(EVALUATION) or not len(local.test_set):
        return None
    try:
        return local.evaluate(received, prompts_from_config(config))
    except DataError as exc:
        log.warning("no evaluation sent with the update: %s", exc)
        return None


@app.train()
def train(msg: Message, context: Context) -> Message:
    local = admitted_site("train", msg, context)
    config = dict(msg.content["config"])
    received = msg.content["arrays"].to_torch_state_dict()
    evaluation = carried_evaluation(local, received, config)
    proximal_mu = float(config.get("proximal-mu", 0.0))
    arrays, metrics = local.train_round(received, server_round=server_round(msg), proximal_mu=proximal_mu)
    fed = local.cfg.federation  # what leaves the site: the arrays (or the update) in the run's wire dtype
    sent = encode_arrays(arrays, received, fed.transport, fed.send_deltas)
    content = RecordDict({"arrays": to_array_record(sent), "metrics": MetricRecord(metrics)})
    if evaluation is not None:
        content[EVALUATION] = MetricRecord(evaluation)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    local = admitted_site("evaluate", msg, context)
    prompts = prompts_from_config(dict(msg.content["config"]))
    metrics = local.evaluate(msg.content["arrays"].to_torch_state_dict(), prompts)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
