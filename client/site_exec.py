"""The site's own task launcher: only approved app versions run, and they run the site's code.

``hlip-fed site start`` runs ``flower-supernode --isolation process``, which starts no ClientApp
processes itself, and this launcher beside it (``serve``): it takes the node's tasks from the
SuperNode's runtime API on the loopback, authenticated with a secret that only the two share
(``--superexec-auth-secret-file``, as Flower's own SuperExec does), and starts one ``task``
process per task. A task process pulls the message and the app bundle (FAB), checks that the
FAB's bytes have the hash the task names and that the hash is approved at this site
(:mod:`hlip_fed.security.approvals`), and then runs the *installed* ``client.app`` (or
``client.secagg``, whichever the approved FAB names): the FAB is never unpacked or imported. A
refused task is written to the site's audit log by this code and answered with an error that
names the refusal and nothing of the site.

    python -m client.site_exec serve --state STATE --runtime-api 127.0.0.1:PORT --secret-file F -- SUPERNODE_ARGV...
    python -m client.site_exec task --state STATE --runtime-api 127.0.0.1:PORT   (token on stdin)

It speaks Flower 1.42's runtime API (``flwr.supercore``, ``flwr.supernode.runtime``), which the
project pins.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import logging
import os
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from hlip_fed.federation.audit import append_audit, audit_entry
from hlip_fed.security.approvals import APPROVALS_FILE, is_approved

log = logging.getLogger("hlip_fed.site")

# The ClientApps an approved FAB may name; each runs from the site's installed package.
CLIENT_APPS = {"client.app:app", "client.secagg:app"}
NOT_APPROVED = "hlip-fed site error [app-not-approved]; the site's operator has not approved this app version"


class Refusal(Exception):
    """A task the site will not run: ``detail`` stays at the site."""


def clientapp_ref(fab: bytes) -> str:
    """The ClientApp an app bundle names (read from its pyproject.toml, nothing executed)."""
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        config = tomllib.loads(bundle.read("pyproject.toml").decode())
    return config["tool"]["flwr"]["app"]["components"]["clientapp"]


def approved_clientapp(state_dir: Path, fab_hash: str, fab: bytes):
    """The installed ClientApp to run for this FAB, or :class:`Refusal`."""
    if hashlib.sha256(fab).hexdigest() != fab_hash:
        raise Refusal(f"app bundle does not have its hash {fab_hash}")
    if not is_approved(state_dir, fab_hash):
        raise Refusal(f"app {fab_hash} is not in {state_dir / APPROVALS_FILE} (hlip-fed site approve)")
    ref = clientapp_ref(fab)
    if ref not in CLIENT_APPS:
        raise Refusal(f"app {fab_hash} names ClientApp {ref!r}, not one of {sorted(CLIENT_APPS)}")
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def run_task(state_dir: Path, runtime_api: str, token: str) -> int:
    """Pull one task, check its app, run the installed ClientApp or refuse, push the reply."""
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context: Context | None = None
    status, details, code = SubStatus.FAILED, "refused", 1
    try:
        message, context, run, fab = pull_task_input(client)
        try:
            app = approved_clientapp(state_dir, fab.hash_str, fab.content)
        except Refusal as refusal:
            log.error("site refused run %s: %s", run.run_id, refusal)
            append_audit(state_dir, audit_entry(message.metadata.message_type, run.run_id, None, None,
                                                error=NOT_APPROVED, detail=str(refusal)))
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=NOT_APPROVED),
                            reply_to=message)
        else:
            try:
                reply = app(message=message, context=context)
                status, details, code = SubStatus.COMPLETED, "", 0
            except Exception as exc:  # noqa: BLE001 - the installed apps raise codes only (client.secagg)
                log.exception("ClientApp failed")
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc).splitlines()[0]),
                                reply_to=message)
        push_message(client, reply, context)
    finally:
        push_task_output(client, context, status, details)
        heartbeat.stop()
        client.close()
    return code


def serve(state_dir: Path, runtime_api: str, secret_file: Path, supernode_argv: list[str]) -> int:
    """Run the SuperNode and take its ClientApp tasks until it exits or this process is stopped."""
    secret = secret_file.read_bytes()
    supernode = subprocess.Popen(supernode_argv)
    tasks: list[subprocess.Popen] = []

    def stop(signum, _frame):
        for proc in [supernode, *tasks]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret,
                                                   protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}))],
        retry_invoker=(retry := make_simple_http_retry_invoker()))
    retry.max_tries = 1  # this loop retries itself, and must notice when the SuperNode has exited
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value], agentapp_fab_hashes=[])
    try:
        while supernode.poll() is None:
            tasks = [t for t in tasks if t.poll() is None]
            try:
                res = client.AcquireTask(request)
            except Exception:  # noqa: BLE001 - the SuperNode is starting or restarting
                time.sleep(1.0)
                continue
            if res.HasField("task") and res.token:
                task = subprocess.Popen([sys.executable, "-m", "client.site_exec", "task", "--state", str(state_dir),
                                         "--runtime-api", runtime_api], stdin=subprocess.PIPE)
                task.stdin.write(res.token.encode())
                task.stdin.close()
                tasks.append(task)
            time.sleep(0.2)
    finally:
        client.close()
        for proc in [supernode, *tasks]:
            if proc.poll() is None:
                proc.terminate()
    return supernode.returncode or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["serve", "task"])
    parser.add_argument("--state", type=Path, required=True, help="the site's state folder (approvals, audit log)")
    parser.add_argument("--runtime-api", required=True, help="the SuperNode's runtime API, 127.0.0.1:PORT")
    parser.add_argument("--secret-file", type=Path, help="serve: the secret shared with the SuperNode")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, supernode = parser.parse_args(argv[:split]), argv[split + 1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.mode == "task":
        return run_task(args.state, args.runtime_api, sys.stdin.read().strip())
    if not supernode or args.secret_file is None:
        parser.error("serve needs --secret-file and -- flower-supernode ...")
    return serve(args.state, args.runtime_api, args.secret_file, supernode)


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    sys.exit(main())
