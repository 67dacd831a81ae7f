"""What a federated run needs to know, read from Flower's run config and node config.

The run config (``[tool.flwr.app.config]`` in pyproject, or ``flwr run --run-config``) only points
at the typed :class:`~hlip_fed.config.Config` and says where things are:

=============  ==================================================================================
``config``     a bundled run preset (``demo``) or a YAML file
``overrides``  space-separated dotted overrides, e.g. ``federation.rounds=5 train.lr=1e-4``
``data-root``  the consortium folder (simulation: site ``i`` is the ``i``-th folder of
               ``sites/``; the server evaluates on ``heldout/``)
``run-dir``    where checkpoints, metrics, plots and the final model go
=============  ==================================================================================

In deployment a SuperNode says where its data is through ``--node-config``: ``data-path`` (the
site folder), optionally ``truth-path`` (labels of its test split, for local zero-shot metrics) and
``state-path`` (where the site keeps caches and optimiser state between rounds; default beside
the run folder, never inside the data folder).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from hlip_fed.config import Config, load_config, site_memory_limit, site_precision
from hlip_fed.errors import HlipError


def config_from_run(run_config: dict) -> Config:
    files = [run_config["config"]] if run_config.get("config") else []
    return load_config(files=files, overrides=shlex.split(str(run_config.get("overrides") or "")))


def run_dir(run_config: dict) -> Path:
    return Path(str(run_config.get("run-dir") or "runs/latest")).expanduser().resolve()


def consortium_sites(data_root: str | Path) -> list[Path]:
    sites = Path(data_root) / "sites"
    if not sites.is_dir():
        raise HlipError(f"{data_root}: not a consortium folder (no sites/ inside); run `hlip-fed synth` first")
    found = sorted(p for p in sites.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise HlipError(f"{sites}: holds no site folders")
    return found


@dataclass
class Site:
    name: str
    data_dir: Path
    state_dir: Path
    truth_path: Path | None
    memory_cache_mb: int | None = None  # the site's own bound on scans kept in memory (node config)
    precision: str | None = None  # the site's own train.precision (node config)


def resolve_site(run_config: dict, node_config: dict) -> Site:
    """The site this ClientApp serves: from ``data-path`` (deployment) or the partition id."""
    if node_config.get("data-path"):
        data = Path(str(node_config["data-path"])).expanduser().resolve()
        name = str(node_config.get("site-name") or data.name)
        truth = node_config.get("truth-path")
        state = node_config.get("state-path") or run_dir(run_config) / "sites" / name
        return Site(name, data, Path(str(state)).expanduser().resolve(), Path(str(truth)) if truth else None,
                    site_memory_limit(node_config, name), site_precision(node_config, name))
    if "partition-id" not in node_config:
        raise HlipError("node config has neither data-path (deployment) nor partition-id (simulation)")
    root = run_config.get("data-root")
    if not root:
        raise HlipError("run config has no data-root: the simulation does not know the consortium folder")
    sites = consortium_sites(root)
    pid, n = int(node_config["partition-id"]), int(node_config.get("num-partitions", len(sites)))
    if n != len(sites):
        raise HlipError(f"the simulation runs {n} nodes but {root} has {len(sites)} sites; set num-supernodes={len(sites)}")
    data = sites[pid]
    truth = Path(root) / "truth" / f"{data.name}.jsonl"
    return Site(data.name, data, run_dir(run_config) / "sites" / data.name, truth if truth.exists() else None,
                site_memory_limit(node_config, data.name), site_precision(node_config, data.name))


def read_labels(path: Path | None) -> dict[str, dict[str, int]]:
    """Study id -> {finding: 0/1} from a JSONL truth file (``study_id`` and ``labels`` per line).

    A ``null`` label (a property that does not apply, such as the size of an absent lesion) reads
    as -1, which every metric leaves out."""
    if path is None:
        return {}
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        return {str(r["study_id"]): {k: -1 if v is None else int(v) for k, v in r["labels"].items()} for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HlipError(f"{path}: cannot read labels: {exc}") from None


def read_prompts(data_root: str | Path | None) -> dict[str, tuple[list[str], list[str]]]:
    """Zero-shot prompts ``finding -> (negatives, positives)`` from ``<data-root>/prompts.json``.

    Accepts ``{"prompts": {finding: {"negative": [...], "positive": [...]}}}`` (several phrasings
    per class, ensembled) or ``{finding: [negative, positive]}``.
    """
    if not data_root:
        return {}
    path = Path(data_root) / "prompts.json"
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        raw = raw.get("prompts", raw)
        out = {}
        for finding, v in raw.items():
            neg, pos = (v["negative"], v["positive"]) if isinstance(v, dict) else (v[0], v[1])
            as_list = lambda x: [str(t) for t in x] if isinstance(x, list) else [str(x)]  # noqa: E731
            out[str(finding)] = (as_list(neg), as_list(pos))
        return out
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise HlipError(f"{path}: cannot read prompts: {exc}") from None


def prompts_to_config(prompts: dict[str, tuple[list[str], list[str]]]) -> dict[str, list[str]]:
    """Prompts as flat ConfigRecord entries, so sites need no prompt file of their own."""
    out = {}
    for finding, (neg, pos) in prompts.items():
        out[f"prompt-neg-{finding}"], out[f"prompt-pos-{finding}"] = list(neg), list(pos)
    return out


# The record a training reply adds for the site's evaluation of the global model it received
# (federation.evaluate_with_train), beside "arrays" and "metrics".
EVALUATION = "evaluation"


def prompts_from_config(config: dict) -> dict[str, tuple[list[str], list[str]]]:
    def texts(value) -> list[str]:
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]

    return {
        key[len("prompt-neg-"):]: (texts(config[key]), texts(config["prompt-pos-" + key[len("prompt-neg-"):]]))
        for key in config
        if key.startswith("prompt-neg-")
    }
