"""hlip-fed ClientApp for the secure-aggregation server mode (``server.secagg:app``).

Flower 1.42's SecAgg+ exists only for the legacy workflow API: the server sends ``fitins.*``
records in stages, and Flower's ``secaggplus_mod`` runs the key exchange, takes the training
reply in the legacy ``fitres.*`` format, masks it and sends only the masked vector. The
Message-API ClientApp (``client.app:app``) reads and writes ``arrays``/``config``/``metrics``
records, so this ClientApp translates between the two and trains with the same
:class:`~hlip_fed.federation.local.LocalSite` code.

What it sends is the site's *update* Δ = w_site − w_global, not its weights: SecAgg+ quantizes
every value into ``[-clipping_range, clipping_range]`` (8 by default), which an update fits with
room to spare and a weight such as SigLIP's logit bias does not; the server adds the averaged
update to the global model. Every reply is audited before masking, as in ``client.app``, so the
site's log records the plaintext update it contributed.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from client.mods import error_code
from hlip_fed.federation.admission import admit
from hlip_fed.federation.audit import append_audit, audit_entry
from hlip_fed.federation.local import local_site
from hlip_fed.federation.run import config_from_run, resolve_site

app = ClientApp(mods=[secaggplus_mod])


class SiteError(Exception):
    """A failure as it may leave the site: its error code, no detail."""


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = resolve_site(dict(context.run_config), dict(context.node_config))
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    server_round = int(fitins.config["server-round"])
    try:
        admit("train", context.run_id, site, dict(context.node_config), dict(context.run_config),
              dict(fitins.config), secure_aggregation=True)
        local = local_site(context.run_id, site, lambda: config_from_run(dict(context.run_config)))
        shapes = {k: v.shape for k, v in local.model.state_dict().items()}
        received = {k: torch.from_numpy(np.array(v, dtype=np.float32).reshape(shapes[k]))
                    for k, v in zip(local.keys, parameters_to_ndarrays(fitins.parameters), strict=True)}
        arrays, metrics = local.train_round(received, server_round=server_round)
        # At least 1-d: SecAgg+'s masking arithmetic mishandles 0-d arrays (the temperature).
        update = [np.atleast_1d((arrays[k] - received[k]).numpy()) for k in local.keys]
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), int(metrics["num-examples"]),
                        dict(metrics))
        content = compat.fitres_to_recorddict(fitres, keep_input=False)
    except Exception as exc:  # noqa: BLE001 - leaves with its code alone, as in client.app
        reason = f"hlip-fed site error [{error_code(exc)}]; the site's log has the details"
        append_audit(site.state_dir, audit_entry("train", context.run_id, server_round, None, error=reason,
                                                 detail=f"{type(exc).__name__}: {exc}"))
        # Flower's SecAgg+ mod reads the reply's content, so an error reply would fail inside it:
        # raise instead, with nothing but the code for the runtime to send.
        raise SiteError(reason) from None
    append_audit(site.state_dir, audit_entry("train", context.run_id, server_round, content))
    return Message(content=content, reply_to=msg)
