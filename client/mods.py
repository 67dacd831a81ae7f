"""ClientApp mods of a site: what wraps every handler of :mod:`client.app`.

* :func:`site_audit` times the handler, appends its reply to the site's audit log as it leaves
  (:mod:`hlip_fed.federation.audit`), and turns any failure into an error reply that carries its
  code alone (:func:`error_code`): what went wrong, which may name the site's files or settings,
  stays in the site's log and audit log.
* :func:`injected_faults` spoils a training reply on purpose when a test asks for it through the
  node config and the environment (:mod:`hlip_fed.deploy.fault_injection`; it acts on the reply
  as sent, i.e. on the weights with the default fp32 transport); otherwise it passes the reply
  through untouched.
"""

import logging
import time

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode  # the code Flower itself gives a ClientApp exception

from hlip_fed.config import ConfigError
from hlip_fed.data.errors import DataError
from hlip_fed.deploy.fault_injection import inject, requested_fault
from hlip_fed.errors import HlipError
from hlip_fed.federation.audit import append_audit, audit_entry
from hlip_fed.federation.local import TextTowerMismatch
from hlip_fed.federation.run import resolve_site
from hlip_fed.federation.transport import to_array_record
from hlip_fed.security.policy import PolicyRefusal

log = logging.getLogger("hlip_fed.site")


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


def server_round(msg: Message) -> int | None:
    return int(msg.content["config"]["server-round"]) if "config" in msg.content else None


def site_audit(msg: Message, context: Context, call_next) -> Message:
    """Run the handler; audit its reply (an error too) before it is handed to Flower."""
    site = resolve_site(dict(context.run_config), dict(context.node_config))
    kind, round_ = msg.metadata.message_type, server_round(msg)
    t0 = time.perf_counter()
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # noqa: BLE001 - every failure is answered, none with its text
        reason = f"hlip-fed site error [{error_code(exc)}]; the site's log has the details"
        detail = f"{type(exc).__name__}: {exc}"
        log.error("%s round %s failed: %s", kind, round_, detail, exc_info=not isinstance(exc, HlipError))
        append_audit(site.state_dir, audit_entry(kind, context.run_id, round_, None, error=reason, detail=detail))
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
    # The whole handler, so the server can tell the site's time from the runtime's (profiling).
    reply.content["metrics"]["reply-seconds"] = float(time.perf_counter() - t0)
    append_audit(site.state_dir, audit_entry(kind, context.run_id, round_, reply.content))
    return reply


def injected_faults(msg: Message, context: Context, call_next) -> Message:
    """Spoil a training reply as the node config's test fault asks (nothing asked: untouched)."""
    if msg.metadata.message_type != "train":
        return call_next(msg, context)
    fault = requested_fault(dict(context.node_config), server_round(msg))  # refused without the env switch
    reply = call_next(msg, context)
    if fault:
        received = msg.content["arrays"].to_torch_state_dict()
        sent = reply.content["arrays"].to_torch_state_dict()
        reply.content["arrays"] = to_array_record({k: v.numpy() for k, v in inject(fault, sent, received).items()})
    return reply
