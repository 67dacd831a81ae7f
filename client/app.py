"""hlip-fed ClientApp: one hospital trains its local HLIP copy and evaluates the global model.

Everything a site does lives in :mod:`hlip_fed.federation.local`; this file only moves Flower
records in and out. The reply holds the federated arrays and scalar metrics, nothing else.
"""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hlip_fed.federation.local import local_site
from hlip_fed.federation.run import config_from_run, prompts_from_config, resolve_site

app = ClientApp()


def _site(context: Context):
    cfg = config_from_run(dict(context.run_config))
    return local_site(context.run_id, cfg, resolve_site(dict(context.run_config), dict(context.node_config)))


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = _site(context)
    config = msg.content["config"]
    arrays, metrics = site.train_round(
        msg.content["arrays"].to_torch_state_dict(),
        server_round=int(config["server-round"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = _site(context)
    prompts = prompts_from_config(dict(msg.content["config"]))
    metrics = site.evaluate(msg.content["arrays"].to_torch_state_dict(), prompts)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
