"""A hospital's site policy: what the server may ask of the site, checked at the site.

Everything that steers a site's training arrives from the server: the run config (``config``, a
preset or a file; ``overrides``, dotted settings) and each message's config (the proximal term,
the evaluation prompts). The policy says which of it the site accepts; the ClientApp refuses a run
or a message that breaks it before any of it is used, and answers with an error code only.

A policy is YAML (every key optional, unknown keys refused; ``bounds``, when given, replaces the
default bounds as a whole)::

    presets: [demo, benchmark, learning]   # `config` may only name these bundled presets
    allow: ["federation.*", "train.*", "model.*", "data.augment", "data.train_scans", "data.max_scans"]
    deny: ["model.text.name", "model.text.pretrained", "model.text.overrides", "train.device", ...]
    bounds:                                # on the resulting config, preset included
      train.batch_size: {min: 4}
      federation.local_steps: {min: 5}
      model.text.lock: {choices: [true]}
      federation.groups: {subset: [vision, text_proj, logit]}
      federation.proximal_mu: {min: 0.0, max: 1.0}
      model.loss.name: {choices: [clip, siglip]}   # not masked: its head decodes voxels
    max_evaluations: 200                   # evaluation messages per run
    max_prompts: 64                        # prompt phrasings per evaluation message
    max_prompt_chars: 200
    require: none                          # none, dp (central DP on) or secagg (SecAgg+ only)

The default (:data:`DEFAULT_POLICY`, used by a deployed site without a policy file) is what the
bundled presets need and nothing more: the cache folder, the device and the text model stay the
site's choice, updates average at least 4 studies x 5 steps, the text tower stays locked, and no
masked image modelling run (whose head, a decoder from tokens to voxels trained on the site's
scans, would travel with the tower) is accepted unless the site's bounds allow it. Nothing
the server sends may contain OmegaConf interpolation (``${``): it would read the site's
environment and files. A simulation applies a policy only when its site has one.
"""

from __future__ import annotations

import fnmatch
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hlip_fed.config import ConfigError, load_config
from hlip_fed.errors import HlipError

POLICY_FILE = "policy.yaml"
REQUIREMENTS = ("none", "dp", "secagg")


class PolicyRefusal(HlipError):
    """The server asked for something the site's policy does not allow; the message lists what
    (for the site's log: the server only learns the error code)."""


@dataclass
class SitePolicy:
    presets: list[str] = field(default_factory=lambda: ["demo", "benchmark", "learning"])
    allow: list[str] = field(default_factory=lambda: [
        "federation.*", "train.*", "model.*", "data.augment", "data.train_scans", "data.max_scans"])
    deny: list[str] = field(default_factory=lambda: [
        "model.text.name", "model.text.pretrained", "model.text.overrides", "train.device", "train.threads",
        "train.text_cache", "federation.round_timeout_s", "federation.poll_interval_s"])
    bounds: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "train.batch_size": {"min": 4},
        "federation.local_steps": {"min": 5},
        "model.text.lock": {"choices": [True]},
        "federation.groups": {"subset": ["vision", "text_proj", "logit"]},
        "federation.proximal_mu": {"min": 0.0, "max": 1.0},
        "federation.transport": {"choices": ["fp32", "fp16", "bf16"]},
        "model.loss.name": {"choices": ["clip", "siglip"]},
    })
    max_evaluations: int = 200
    max_prompts: int = 64
    max_prompt_chars: int = 200
    require: str = "none"


DEFAULT_POLICY = SitePolicy()


def load_policy(path: str | Path) -> SitePolicy:
    """A policy file, checked: unknown keys and wrong types are refused with the file's name."""
    path = Path(path)
    try:
        raw = OmegaConf.load(path) or OmegaConf.create({})
        node = OmegaConf.merge(OmegaConf.structured(SitePolicy), raw)
        if "bounds" in raw:  # the file's bounds replace the default ones (a merge would keep them)
            node.bounds = raw.bounds
        policy: SitePolicy = OmegaConf.to_object(node)  # type: ignore[assignment]
    except (OSError, OmegaConfBaseException, ValueError) as exc:
        raise HlipError(f"{path}: not a usable site policy: {str(exc).splitlines()[0]}") from None
    if policy.require not in REQUIREMENTS:
        raise HlipError(f"{path}: require must be one of {', '.join(REQUIREMENTS)}, not {policy.require!r}")
    for key, bound in policy.bounds.items():
        unknown = set(bound) - {"min", "max", "choices", "subset"}
        if unknown:
            raise HlipError(f"{path}: bounds of {key}: unknown {sorted(unknown)[0]!r} (min, max, choices, subset)")
    return policy


def site_policy(state_dir: Path, policy_path: str | None, deployed: bool) -> SitePolicy | None:
    """The policy a site works under: ``policy_path`` (``site start --policy``), else the state
    folder's ``policy.yaml``, else the default for a deployed site and none in a simulation."""
    if policy_path:
        return load_policy(policy_path)
    if (Path(state_dir) / POLICY_FILE).is_file():
        return load_policy(Path(state_dir) / POLICY_FILE)
    return DEFAULT_POLICY if deployed else None


def _select(cfg: Any, key: str) -> Any:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _out_of_bounds(key: str, value: Any, bound: dict[str, Any]) -> str | None:
    if "min" in bound and value < bound["min"]:
        return f"{key}={value} is below the site's minimum {bound['min']}"
    if "max" in bound and value > bound["max"]:
        return f"{key}={value} is above the site's maximum {bound['max']}"
    if "choices" in bound and value not in bound["choices"]:
        return f"{key}={value!r} is not one of the site's {bound['choices']}"
    if "subset" in bound and not set(value) <= set(bound["subset"]):
        return f"{key}={list(value)} goes beyond the site's {bound['subset']}"
    return None


def check_run_config(run_config: dict, policy: SitePolicy) -> list[str]:
    """What the site's policy refuses in a run config (empty: the run may go ahead)."""
    refused = [f"run-config {k} holds interpolation (${{...}})" for k, v in run_config.items() if "${" in str(v)]
    preset = str(run_config.get("config") or "")
    if preset and preset not in policy.presets:
        refused.append(f"config {preset!r} is not one of the site's presets {policy.presets}")
    try:
        overrides = shlex.split(str(run_config.get("overrides") or ""))
    except ValueError as exc:
        return refused + [f"overrides cannot be read: {exc}"]
    for item in overrides:
        key = item.partition("=")[0]
        if any(fnmatch.fnmatchcase(key, p) for p in policy.deny) or not any(fnmatch.fnmatchcase(key, p)
                                                                           for p in policy.allow):
            refused.append(f"override {key} is not one the site allows")
    if refused:
        return refused  # nothing is loaded from a config the site has already refused
    try:
        cfg = load_config(files=[preset] if preset else [], overrides=overrides)
    except ConfigError as exc:
        return [f"the run config does not load: {exc}"]
    for key, bound in policy.bounds.items():
        try:
            problem = _out_of_bounds(key, _select(cfg, key), bound)
        except AttributeError:
            problem = f"bounds name {key}, which the config does not have"
        if problem:
            refused.append(problem)
    if policy.require == "dp" and cfg.federation.dp == "off":
        refused.append("the site requires central differential privacy (federation.dp)")
    return refused


def check_message_config(config: dict, policy: SitePolicy) -> list[str]:
    """What the site's policy refuses in one message's config (proximal term, prompts)."""
    refused = []
    texts = [str(t) for v in config.values() for t in (v if isinstance(v, list) else [v])]
    if any("${" in t for t in texts):
        refused.append("the message config holds interpolation (${...})")
    if "proximal-mu" in config and "federation.proximal_mu" in policy.bounds:
        problem = _out_of_bounds("proximal-mu", float(config["proximal-mu"]), policy.bounds["federation.proximal_mu"])
        if problem:
            refused.append(problem)
    prompts = [str(t) for k, v in config.items() if k.startswith("prompt-")
               for t in (v if isinstance(v, list) else [v])]
    if len(prompts) > policy.max_prompts:
        refused.append(f"{len(prompts)} prompts, the site allows {policy.max_prompts}")
    if any(len(p) > policy.max_prompt_chars for p in prompts):
        refused.append(f"a prompt longer than the site's {policy.max_prompt_chars} characters")
    return refused


def enforce(refused: list[str]) -> None:
    if refused:
        raise PolicyRefusal("refused by the site's policy: " + "; ".join(refused))


def policy_yaml(policy: SitePolicy) -> str:
    """The policy as the YAML a site would keep (``hlip-fed site policy show``)."""
    return OmegaConf.to_yaml(OmegaConf.create(asdict(policy)))
