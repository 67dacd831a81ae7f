"""Privacy accounting of a federated run with central (server-side) differential privacy.

What is protected is a *site*: the guarantee bounds how much the released global models change
when one hospital's whole contribution is replaced by another's. Each round releases the average
of the ``m`` sites' updates clipped to norm ``C`` plus Gaussian noise of std ``z*C/m``; ``m`` is
public (the server logs it), so neighbouring runs have the same ``m`` and differ in one site's
update: the sum's sensitivity is ``2C`` (replace-one), not ``C`` (add-or-remove-one). Flower's
accountant knows add-or-remove-one only; a Gaussian release with noise ``z*C`` at sensitivity
``2C`` has exactly the Rényi divergence of one with noise ``(z/2)*C`` at sensitivity ``C``, so
every round is accounted as add-or-remove-one at :func:`accounted_multiplier` ``z/2``, which
covers the replace-one case. Rounds compose under Rényi DP with Flower's accountant
(``flwr.supercore.privacy_accounting``, which wraps Google's ``dp-accounting``, the ``flwr[dp]``
extra). No amplification by sampling is credited: Flower's fixed-clipping accounting allows only
``no-amplification`` (its site sampling is not Poisson), and a consortium trains with all its
sites every round anyway.

The accountant's ledger (the composed events) is small and JSON-serialisable; it travels in every
round's record, so the checkpoint holds it and a resumed run continues the accounting from the
last completed round. Only this module talks to the accountant, so the server strategy and the
tests share one definition of the ledger. No Flower runtime is imported here.
"""

from __future__ import annotations

from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)

from hlip_fed.errors import HlipError

LEDGER_KEY = "privacy_ledger"  # round-record / checkpoint-state key of the accountant's ledger


def accounted_multiplier(noise_multiplier: float) -> float:
    """The add-or-remove-one noise multiplier a round is accounted at: half the configured one,
    which bounds the replace-one release of an average over a public number of sites."""
    return float(noise_multiplier) / 2.0


def make_accountant(delta: float, population: int, max_epsilon: float | None = None):
    """Flower's RDP accountant for site-level DP at ``delta`` over ``population`` sites; with
    ``max_epsilon`` a round that would exceed it is refused before it is released."""
    try:
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant  # optional: flwr[dp]

        return RdpAccountant(PrivacyConfig(
            target_delta=float(delta), population_size=int(population),
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=None if max_epsilon is None else float(max_epsilon),
        ))
    except ImportError:
        raise HlipError('federation.dp needs the privacy accountant: pip install "flwr[dp]"') from None
    except ValueError as exc:
        raise HlipError(f"federation.dp: {exc}") from None


def ledger(accountant) -> dict:
    """The accountant's state without its fixed list of RDP orders, with runs of identical
    events merged into counts: one entry for a whole run at a fixed site count, not one per round."""
    state = accountant.state_dict()
    merged: list[dict] = []
    for item in state["compositions"]:
        if merged and merged[-1]["event"] == item["event"]:
            merged[-1]["count"] += item["count"]
        else:
            merged.append({"event": dict(item["event"]), "count": int(item["count"])})
    return {"schema_version": state["schema_version"], "backend": state["backend"],
            "config": state["config"], "compositions": merged}


def restore(accountant, saved: dict) -> None:
    """Load a :func:`ledger` into ``accountant``; raise :class:`HlipError` when it was kept under
    another privacy configuration (another delta or site population), since continuing would
    report an epsilon that means something else."""
    state = accountant.state_dict()
    state.update({k: saved[k] for k in ("schema_version", "backend", "config", "compositions") if k in saved})
    try:
        accountant.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as exc:
        raise HlipError(f"the checkpoint's privacy ledger cannot be continued: {exc}") from None


def spent(accountant) -> dict[str, float]:
    """Cumulative (epsilon, delta) and the number of private releases so far."""
    releases = accountant.num_releases
    if releases == 0:
        return {"epsilon": 0.0, "delta": accountant.config.target_delta, "releases": 0}
    s = accountant.get_privacy_spent()
    return {"epsilon": float(s.epsilon), "delta": float(s.delta), "releases": int(s.num_releases)}


def epsilon_after(rounds: int, noise_multiplier: float, delta: float, sites: int) -> float:
    """The epsilon a run of ``rounds`` private rounds will have spent: for choosing ``z`` ahead."""
    acc = make_accountant(delta, sites)
    if rounds > 0:
        acc.compose(GaussianPrivacyEvent(accounted_multiplier(noise_multiplier), sites, sites), count=rounds)
    return spent(acc)["epsilon"]
