"""A site's admission of each message: its policy checked before anything the server sent is used.

The ClientApps call :func:`admit` first in every handler. It finds the site's policy
(:func:`hlip_fed.security.policy.site_policy`), checks the run config once per run and site and
the message's own config every time, counts the run's evaluations in the site's audit log (the
evaluation exchanges and the training replies that carried one), keeps the Hugging Face hub
offline for a site under a policy, and raises
:class:`~hlip_fed.security.policy.PolicyRefusal` listing what it refuses (the ClientApp answers
the server with the error code alone).
"""

from __future__ import annotations

import os

from hlip_fed.federation.audit import read_audit
from hlip_fed.federation.run import EVALUATION, Site
from hlip_fed.security.policy import (
    SitePolicy,
    check_message_config,
    check_run_config,
    enforce,
    site_policy,
)

_RUN_CHECKS: dict[tuple, list[str]] = {}  # (run, site, run config, policy) -> the run config's refusals


def admit(message_type: str, run_id: int, site: Site, node_config: dict, run_config: dict, message_config: dict,
          secure_aggregation: bool = False) -> SitePolicy | None:
    """Raise :class:`PolicyRefusal` when the site's policy refuses this message; return the policy
    (``None``: a simulated site without one)."""
    policy = site_policy(site.state_dir, node_config.get("policy-path"), deployed=bool(node_config.get("data-path")))
    if policy is None:
        return None
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"  # no download beside patient data
    key = (int(run_id), str(site.state_dir), repr(sorted(run_config.items())), repr(policy))
    if key not in _RUN_CHECKS:  # loading the run's config costs ~0.1 s: once per run, site and policy
        _RUN_CHECKS[key] = check_run_config(run_config, policy)
    refused = list(_RUN_CHECKS[key]) + check_message_config(message_config, policy)
    if policy.require == "secagg" and not secure_aggregation:
        refused.append("the site requires secure aggregation (SecAgg+): only client.secagg may train")
    if message_type == "evaluate" or message_config.get(EVALUATION):  # a training message may ask for one too
        done = sum(1 for e in read_audit(site.state_dir) if e.get("run") == run_id
                   and (e.get("type") == "evaluate" or EVALUATION in e.get("records", {})))
        if done >= policy.max_evaluations:
            refused.append(f"the run has had the {policy.max_evaluations} evaluations the site allows")
    enforce(refused)
    return policy
