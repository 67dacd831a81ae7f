"""The house rules that code review cannot keep by eye: no import cycle between the project's
modules, the library's Flower imports, and the Flower internals the server relies on pinned to
the Flower release they were written against (an upgrade that changes them fails here first)."""

import ast
import graphlib
import inspect
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hlip_fed", "server", "client", "simulations", "benchmarks")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, name: str) -> set[str]:
    """Every module a file imports, at module level or inside functions (relative ones resolved)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def test_the_project_imports_form_no_cycle():
    mods = modules()
    graph = {name: {m for m in imports_of(path, name) if m in mods and m != name} for name, path in mods.items()}
    # A package's __init__ importing its own submodules is not a cycle of the code that uses it.
    graph = {n: {m for m in deps if not (n == m.rpartition(".")[0] and (ROOT / n.replace(".", "/") / "__init__.py").exists())}
             for n, deps in graph.items()}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


# The layers of the house (ARCHITECTURE.md), lowest first: a module imports its own row or lower ones.
ROWS = (
    ("hlip_fed.config", "hlip_fed.errors", "hlip_fed.atomic", "hlip_fed"),
    ("hlip_fed.model", "hlip_fed.data", "hlip_fed.deploy", "hlip_fed.security"),
    ("hlip_fed.training", "hlip_fed.synth"),
    ("hlip_fed.federation", "hlip_fed.downstream", "hlip_fed.outputs"),
    ("client", "server"),
    ("hlip_fed.cli", "hlip_fed.commands", "simulations", "benchmarks"),
)


def row_of(module: str) -> int:
    """The row of the longest package prefix that holds ``module``."""
    matches = [(len(p), i) for i, row in enumerate(ROWS) for p in row if module == p or module.startswith(p + ".")]
    assert matches, f"{module} is in no row of the house"
    return max(matches)[1]


def test_imports_flow_from_upper_layers_to_lower_ones():
    mods = modules()
    upward = sorted(f"{name} -> {m}" for name, path in mods.items() for m in imports_of(path, name)
                    if m in mods and row_of(m) > row_of(name))
    assert not upward, f"imports from a lower layer to a higher one: {upward}"


def test_the_library_uses_flower_only_for_records_packaging_and_privacy_accounting():
    allowed = ("flwr.app", "flwr.common.record", "flwr.cli", "flwr.supercore.privacy_accounting")
    bad = {}
    for name, path in modules().items():
        if name.split(".")[0] != "hlip_fed":
            continue
        used = {m for m in imports_of(path, name) if m == "flwr" or m.startswith("flwr.")}
        wrong = sorted(m for m in used if not m.startswith(allowed))
        if wrong:
            bad[name] = wrong
    assert not bad, f"the library imports Flower's runtime: {bad}"


def test_every_progress_bar_is_silent_off_a_terminal():
    # tqdm draws on any stream by default; disable=None turns a bar off where stderr is not a TTY
    # (a SuperNode's log, a scheduler, CI), so every bar must pass it.
    loud = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "tqdm":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("disable"), ast.Constant) and kw["disable"].value is None):
                    loud.append(f"{name}:{node.lineno}")
    assert not loud, f"progress bars drawn off a terminal: {loud}"


def test_flower_strategy_internals_used_by_the_server_are_those_of_flower_1_42():
    """server/privacy.py subclasses Flower's server-side fixed-clipping wrapper and overrides or
    reads the names below; each must still exist with the signature it was written against."""
    from flwr.app import ArrayRecord
    from flwr.serverapp import RdpAccountant
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping as Wrapper
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.differential_privacy import compute_stdv

    assert version("flwr").startswith("1.42."), "server/privacy.py was written against Flower 1.42: re-check it"
    assert list(inspect.signature(Wrapper._prepare_accounting).parameters) == ["self", "server_round", "messages"]
    assert list(inspect.signature(Wrapper._add_noise_to_aggregated_arrays).parameters) == ["self", "aggregated_arrays"]
    assert list(inspect.signature(compute_stdv).parameters) == ["noise_multiplier", "clipping_norm", "num_sampled_clients"]
    from hlip_fed.federation.privacy import make_accountant

    accountant = make_accountant(1e-5, 3)
    assert isinstance(accountant, RdpAccountant)
    wrapper = Wrapper(FedAvg(), 1.0, 1.0, 3, accountant=accountant)
    for attribute in ("_pending_events", "current_arrays", "num_sampled_clients", "noise_multiplier", "clipping_norm",
                      "accountant", "strategy"):
        assert hasattr(wrapper, attribute), attribute
    assert isinstance(wrapper._pending_events, dict) and isinstance(wrapper.current_arrays, ArrayRecord)
    # The wrapper accounts only when its inner strategy aggregates as FedAvg does.
    assert "aggregate_train" in vars(FedAvg)


def test_flower_supernode_runtime_internals_used_by_the_site_launcher_are_those_of_flower_1_42():
    """client/site_exec.py takes a SuperNode's ClientApp tasks itself through Flower's runtime
    API; the functions, classes and fields it uses must keep the signatures it was written against."""
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

    def params(f):
        return list(inspect.signature(f).parameters)

    assert version("flwr").startswith("1.42."), "client/site_exec.py was written against Flower 1.42: re-check it"
    assert params(pull_task_input) == ["client"]
    assert params(push_message) == ["client", "message", "context"]
    assert params(push_task_output) == ["client", "context", "sub_status", "details"]
    assert params(RuntimeHttpClient.from_server_address) == ["server_address", "insecure", "root_certificates",
                                                             "interceptors", "retry_invoker"]
    assert hasattr(RuntimeHttpClient, "AcquireTask") and hasattr(RuntimeHttpClient, "close")
    assert params(HeartbeatSender) == ["heartbeat_fn"] and params(make_task_heartbeat_fn_http) == ["client"]
    assert params(make_simple_http_retry_invoker) == []
    assert params(RuntimeTokenHttpInterceptor) == ["token"]
    assert params(RuntimeVersionHttpInterceptor) == ["component_name"]
    assert params(SuperExecAuthHttpInterceptor) == ["master_secret", "protected_methods"]
    assert set(AcquireTaskRequest.DESCRIPTOR.fields_by_name) >= {"supported_task_types", "agentapp_fab_hashes"}
    assert TaskType.CLIENT_APP.value == "flwr-clientapp"


def test_flower_grid_and_task_identity_used_by_the_in_process_grid_are_those_of_flower_1_42():
    """simulations/inprocess.py implements Flower's Grid and sets the task identity the runtime sets
    (messages read it when they are built); both must keep the shape it was written against."""
    from flwr.serverapp import Grid
    from flwr.supercore.task_identity import TaskIdentity

    from simulations.inprocess import InProcessGrid

    assert version("flwr").startswith("1.42."), "simulations/inprocess.py was written against Flower 1.42: re-check it"
    assert Grid.__abstractmethods__ == {"get_node_ids", "set_run", "push_messages", "send_and_receive",
                                        "create_message", "run", "pull_messages"}
    for name in Grid.__abstractmethods__ - {"run"}:
        ours, theirs = inspect.signature(getattr(InProcessGrid, name)), inspect.signature(getattr(Grid, name))
        assert list(ours.parameters) == list(theirs.parameters), name
    for attribute in ("run_id", "node_id", "task_id"):
        assert isinstance(inspect.getattr_static(type(TaskIdentity), attribute), property), attribute
    before = {k: vars(TaskIdentity)[k] for k in ("_run_id", "_node_id", "_task_id")}
    try:
        InProcessGrid({}, num_nodes=2, run_id=77)
        assert (TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id) == (77, 0, 1)
    finally:
        for k, v in before.items():
            setattr(TaskIdentity, k, v)
