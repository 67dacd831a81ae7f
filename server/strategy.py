"""Flower strategies wrapped for hlip-fed: screened replies, fp32 arrays, resumable rounds.

``build_strategy`` takes a Flower Message-API strategy named by ``federation.strategy`` and adds
three things through :class:`HlipStrategy`:

* replies are screened (:func:`hlip_fed.federation.screen.screen_replies`) before Flower sees
  them, so one broken site cannot end the run;
* aggregated arrays are cast back to fp32 (FedOpt computes in float64);
* a round offset: ``Strategy.start`` always counts from 1, so a resumed run adds the rounds already
  done to every round number the clients, the schedules and FedOpt's bias correction see.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi

from hlip_fed.config import FederationConfig
from hlip_fed.errors import HlipError
from hlip_fed.evaluate import aggregate_site_metrics
from hlip_fed.federation.screen import screen_replies

log = logging.getLogger("hlip_fed.server")

BASES = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
}


class HlipStrategy:
    """Mixin placed before a Flower strategy class (see :func:`build_strategy`)."""

    def setup(self, expected: dict[str, tuple[int, ...]], offset: int) -> None:
        self.expected, self.offset = expected, offset
        self.round_record: dict = {}

    # -- training ------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.round_record = {}
        return super().configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies):
        good, rejected = screen_replies(list(replies), self.expected)
        for r in rejected:
            log.warning("round %d: rejected the update of node %s: %s", server_round + self.offset, r.node_id, r.reason)
        sites = {m.metadata.src_node_id: dict(next(iter(m.content.metric_records.values()))) for m in good}
        self.round_record.update(
            train_sites={str(k): v for k, v in sites.items()},
            rejected=[{"node": r.node_id, "reason": r.reason} for r in rejected],
            bytes_per_site={str(k): v.get("bytes-sent", 0.0) for k, v in sites.items()},
        )
        if sites:
            log.info("round %d: %.2f MB received per site", server_round + self.offset,
                     np.mean([v.get("bytes-sent", 0.0) for v in sites.values()]) / 1e6)
        if not good:
            log.warning("round %d: no usable update; the global model stays as it was", server_round + self.offset)
            return None, None
        arrays, metrics = super().aggregate_train(server_round + self.offset, good)
        if arrays is not None:
            # fp32 in the federated shapes (FedOpt returns float64 and turns 0-d scalars into 1-d).
            arrays = ArrayRecord(
                {k: Array(np.asarray(v.numpy(), dtype=np.float32).reshape(self.expected[k])) for k, v in arrays.items()}
            )
        self.round_record["train"] = dict(metrics) if metrics is not None else {}
        return arrays, metrics

    # -- evaluation ----------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return super().configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies) -> MetricRecord | None:
        good, rejected = screen_replies(list(replies), None)
        for r in rejected:
            log.warning("round %d: rejected the evaluation of node %s: %s", server_round + self.offset, r.node_id, r.reason)
        per_site = {str(m.metadata.src_node_id): dict(next(iter(m.content.metric_records.values()))) for m in good}
        self.round_record["eval_sites"] = per_site
        if not good:
            return None
        merged = aggregate_site_metrics(list(per_site.values()))
        self.round_record["eval"] = merged
        return MetricRecord(merged)

    # -- resumable state -----------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """The strategy's own state worth checkpointing (FedOpt's first and second moments)."""
        out = {}
        for name in ("m_t", "v_t"):
            for k, v in (getattr(self, name, None) or {}).items():
                out[f"{name}/{k}"] = np.asarray(v)
        return out

    def load_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        for name in ("m_t", "v_t"):
            moments = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + "/")}
            if moments:
                setattr(self, name, moments)


def build_strategy(fed: FederationConfig, expected: dict, offset: int, state: dict[str, np.ndarray] | None = None):
    name = fed.strategy.lower()
    if name not in BASES:
        raise HlipError(f"federation.strategy {fed.strategy!r} is not one of {', '.join(BASES)}")
    base = BASES[name]
    common = dict(
        fraction_train=fed.fraction_train, fraction_evaluate=1.0,
        min_train_nodes=fed.min_nodes, min_evaluate_nodes=fed.min_nodes, min_available_nodes=fed.min_nodes,
    )
    extra: dict = {}
    if name == "fedprox":
        extra["proximal_mu"] = fed.proximal_mu
    elif name in ("fedadam", "fedyogi"):
        extra.update(eta=fed.server_lr, eta_l=1.0, tau=1e-6)
    elif name == "fedtrimmedavg":
        # Trim at least one site from each end at the configured site count.
        extra["beta"] = max(fed.trim_fraction, 1.0 / fed.min_nodes + 1e-9)
        if extra["beta"] >= 0.5:
            raise HlipError(f"fedtrimmedavg needs at least 3 sites (federation.min_nodes={fed.min_nodes})")
    cls = type(f"Hlip{base.__name__}", (HlipStrategy, base), {})
    strategy = cls(**common, **extra)
    strategy.setup(expected, offset)
    if state:
        strategy.load_state_arrays(state)
    return strategy
