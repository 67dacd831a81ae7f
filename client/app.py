"""hlip-fed ClientApp: one hospital trains its local HLIP copy and evaluates the global model.

Everything a site does lives in :mod:`hlip_fed.federation.local`; this file only moves Flower
records in and out. The reply holds the federated arrays (encoded for ``federation.transport``:
fp32, fp16 or bf16 bit patterns, weights or deltas; see :mod:`hlip_fed.federation.transport`) and
scalar metrics (among them the handler's own duration), nothing else, and every reply (an error
too) is appended to the site's audit log (:mod:`hlip_fed.federation.audit`) as encoded, i.e. as it
leaves, before it is handed to Flower. A failure leaves the site as an error code only
(:func:`error_code`); what went wrong, which may name the site's files or settings, stays in its
log and audit log.
"""

import logging
import time

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode  # the code Flower itself gives a ClientApp exception
from flwr.clientapp import ClientApp

from hlip_fed.config import ConfigError
from hlip_fed.data.errors import DataError
from hlip_fed.deploy.fault_injection import inject, requested_fault
from hlip_fed.errors import HlipError
from hlip_fed.federation.admission import admit
from hlip_fed.federation.audit import append_audit, audit_entry
from hlip_fed.federation.local import TextTowerMismatch, local_site
from hlip_fed.federation.run import Site, config_from_run, prompts_from_config, resolve_site
from hlip_fed.federation.transport import encode_arrays, to_array_record
from hlip_fed.security.policy import PolicyRefusal

app = ClientApp()
log = logging.getLogger("hlip_fed.site")


class SiteError(Exception):
    """A failure as it may leave the site: its error code, no detail."""


def error_code(exc: BaseException) -> str:
    """What the server learns of a site's failure: its kind, nothing of the site."""
    if isinstance(exc, PolicyRefusal):
        return "policy-refused"
    if isinstance(exc, ConfigError):
        return "config-refused"
    if isinstance(exc, DataError):
        return "data-unusable"
    if isinstance(exc, TextTowerMismatch):
        return "text-tower-differs"
    return "site-refused" if isinstance(exc, HlipError) else "site-failure"


def _site(context: Context) -> Site:
    return resolve_site(dict(context.run_config), dict(context.node_config))


def _reply(msg: Message, context: Context, site: Site, make_content) -> Message:
    """Build the reply with ``make_content()`` and audit it; a failure is logged and audited in
    full at the site and answered with its error code alone."""
    t0 = time.perf_counter()
    server_round = int(msg.content["config"]["server-round"]) if "config" in msg.content else None
    kind = msg.metadata.message_type
    try:
        content = make_content(server_round)
    except Exception as exc:  # noqa: BLE001 - every failure is answered, none with its text
        reason = f"hlip-fed site error [{error_code(exc)}]; the site's log has the details"
        detail = f"{type(exc).__name__}: {exc}"
        log.error("%s round %s failed: %s", kind, server_round, detail, exc_info=not isinstance(exc, HlipError))
        append_audit(site.state_dir, audit_entry(kind, context.run_id, server_round, None, error=reason, detail=detail))
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
    # The whole handler, so the server can tell the site's time from the runtime's (profiling).
    content["metrics"]["reply-seconds"] = float(time.perf_counter() - t0)
    append_audit(site.state_dir, audit_entry(kind, context.run_id, server_round, content))
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = _site(context)

    def content(server_round: int) -> RecordDict:
        config = msg.content["config"]
        admit("train", context.run_id, site, dict(context.node_config), dict(context.run_config), dict(config))
        fault = requested_fault(dict(context.node_config), server_round)  # test-only; see its module
        local = local_site(context.run_id, site, lambda: config_from_run(dict(context.run_config)))
        local.check_text_tower(config.get("text-tower"))
        received = msg.content["arrays"].to_torch_state_dict()
        arrays, metrics = local.train_round(
            received, server_round=server_round, proximal_mu=float(config.get("proximal-mu", 0.0)),
        )
        if fault:
            arrays = inject(fault, arrays, received)
        # What leaves the site: the arrays (or the update) in the run's transport dtype.
        fed = local.cfg.federation
        sent = encode_arrays(arrays, received, fed.transport, fed.send_deltas)
        return RecordDict({"arrays": to_array_record(sent), "metrics": MetricRecord(metrics)})

    return _reply(msg, context, site, content)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = _site(context)

    def content(server_round: int | None) -> RecordDict:
        config = dict(msg.content["config"])
        admit("evaluate", context.run_id, site, dict(context.node_config), dict(context.run_config), config)
        local = local_site(context.run_id, site, lambda: config_from_run(dict(context.run_config)))
        local.check_text_tower(config.get("text-tower"))
        prompts = prompts_from_config(config)
        metrics = local.evaluate(msg.content["arrays"].to_torch_state_dict(), prompts)
        return RecordDict({"metrics": MetricRecord(metrics)})

    return _reply(msg, context, site, content)
