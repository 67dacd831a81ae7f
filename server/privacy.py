"""Central differential privacy for hlip-fed: Flower's server-side fixed-clipping wrapper, fed
only screened replies, with the privacy spent accounted per round and kept across a resume.

``federation.dp=server_fixed`` builds, in method order,

    HlipStrategy (screening, bounded waiting, round offset, fp32, round record)
      -> ScreenedFixedClipping (Flower's DifferentialPrivacyServerSideFixedClipping)
        -> FedAvg or FedProx, unweighted

Why this order and these changes to how Flower's wrapper is used:

* Flower's wrapper drops the whole round when it sees a single error reply, and in accounted
  mode also when fewer replies arrive than were sampled. Screening therefore runs first, and the
  wrapper is told, per round, that the sites it aggregates are those that passed: one broken
  site costs its own update, not the round. The noise std z*C/m follows the m sites actually
  averaged, so every round is a Gaussian release with multiplier z on the sum of clipped updates.
  The number of sites aggregated is public (the server logs it); what the guarantee hides is
  the content of a site's update, at site level. With a public count that is the replace-one
  setting, accounted at half the noise multiplier (:mod:`hlip_fed.federation.privacy`);
  ``federation.dp_max_epsilon`` refuses the round that would exceed it, and the ServerApp then
  ends the run with the last released model.
* Only per-reply checks (form, finiteness) may drop a reply before the noise. The relative
  update-norm check is switched off in this mode: whether it rejects site A depends on the other
  sites' updates, so adding or removing one site could change the sum by more than one clipped
  update and the accounting would understate the loss. Clipping to ``dp_clipping_norm`` already
  bounds what a scaled update can do. Each site's update norm is still recorded, and how many
  were clipped, to guide the choice of the clipping norm.
* The wrapper's accountant accepts only FedAvg's own aggregation with equal client weights, so the
  average is unweighted (``num-examples`` does not weight it) and FedOpt or robust strategies are
  refused by the config check.
* The noise comes from a generator seeded from the operating system's entropy each round rather
  than numpy's global generator, which a simulation shares with seeded training code and which
  anyone knowing the run's seed could replay and subtract.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, FedProx
from flwr.supercore.differential_privacy import compute_stdv

from hlip_fed.config import FederationConfig
from hlip_fed.errors import HlipError
from hlip_fed.federation import privacy

log = logging.getLogger("hlip_fed.server")

WEIGHT_KEY = "dp-weight"  # the equal weight every screened reply gets for the unweighted average


def _forward(name: str) -> property:
    """A sampling setting of the wrapped strategy, read and written through the wrapper (the
    bounded wait for sites lowers the wrapped strategy's minimums for a round)."""
    return property(lambda self: getattr(self.strategy, name), lambda self, v: setattr(self.strategy, name, v))


class ScreenedFixedClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping wrapper, given screened replies and sized per round."""

    min_available_nodes = _forward("min_available_nodes")
    min_train_nodes = _forward("min_train_nodes")
    min_evaluate_nodes = _forward("min_evaluate_nodes")

    last_noise_std: float | None = None

    def _prepare_accounting(self, server_round: int, messages: Iterable[Message]) -> Iterable[Message]:
        messages = list(messages)
        self._pending_events.clear()  # a round that aggregated nothing left its event unused
        population = self.accountant.config.population_size
        if len(messages) > population:
            raise HlipError(
                f"round {server_round} samples {len(messages)} sites but the privacy accounting covers "
                f"federation.min_nodes={population}; set min_nodes to the consortium's size"
            )
        self.num_sampled_clients = max(len(messages), 1)
        # Flower makes the round's event from self.noise_multiplier; the noise keeps z, the event
        # gets the multiplier that covers replace-one (hlip_fed.federation.privacy).
        noise_multiplier = self.noise_multiplier
        self.noise_multiplier = privacy.accounted_multiplier(noise_multiplier)
        try:
            return super()._prepare_accounting(server_round, messages)
        finally:
            self.noise_multiplier = noise_multiplier

    def _uniform(self, msg: Message) -> Message:
        """A copy of a screened reply with its arrays in the global model's order (Flower clips
        by position, so a reordered reply would be subtracted from the wrong arrays) and an equal
        aggregation weight."""
        (name, arrays), = msg.content.array_records.items()
        (mname, metrics), = msg.content.metric_records.items()
        content = RecordDict({
            name: ArrayRecord({k: arrays[k] for k in self.current_arrays.keys()}),
            mname: MetricRecord({**dict(metrics), WEIGHT_KEY: 1.0}),
        })
        return Message(content=content, metadata=msg.metadata)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = [self._uniform(m) for m in replies]
        self.last_noise_std = None
        if not replies:
            self._pending_events.pop(server_round, None)
            return None, None
        self.num_sampled_clients = len(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            metrics = MetricRecord({k: v for k, v in metrics.items() if k != WEIGHT_KEY})
        return arrays, metrics

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        rng = np.random.default_rng(secrets.randbits(128))
        noisy = {}
        for key, arr in aggregated_arrays.items():
            values = arr.numpy()
            noisy[key] = Array(np.asarray(values + rng.normal(0.0, std, values.shape), dtype=values.dtype))
        self.last_noise_std = std
        log.info("central DP: Gaussian noise of std %.4g added to the average of %d sites", std,
                 self.num_sampled_clients)
        return ArrayRecord(noisy)


class PrivateStrategy:
    """Mixin after :class:`~server.strategy.HlipStrategy`: the privacy record of every round."""

    def aggregate_train(self, server_round: int, replies):
        self.last_noise_std = None
        arrays, metrics = super().aggregate_train(server_round, replies)
        released = arrays is not None and self.last_noise_std is not None
        norms = self.round_record.get("update_norms", {})
        self.round_record["privacy"] = {
            **privacy.spent(self.accountant),
            "noise_multiplier": self.noise_multiplier,
            "accounted_multiplier": privacy.accounted_multiplier(self.noise_multiplier),
            "clipping_norm": self.clipping_norm,
            "noise_std": self.last_noise_std if released else 0.0,
            "sites": self.num_sampled_clients if released else 0,
            "clipped": sum(1 for v in norms.values() if v > self.clipping_norm),
        }
        self.round_record[privacy.LEDGER_KEY] = privacy.ledger(self.accountant)
        p = self.round_record["privacy"]
        log.info("round %d: privacy spent epsilon=%.4g at delta=%g after %d private rounds",
                 server_round + self.offset, p["epsilon"], p["delta"], p["releases"])
        return arrays, metrics


def build_private_strategy(base, fed: FederationConfig, expected: dict, offset: int, common: dict, extra: dict,
                           known_nodes: Iterable[int] = (), ledger: dict | None = None):
    """The strategy of ``federation.dp=server_fixed`` (see the module docstring); ``ledger`` is the
    privacy ledger of the checkpoint a run resumes from."""
    from server.strategy import HlipStrategy

    if base not in (FedAvg, FedProx):
        raise HlipError(f"federation.dp needs strategy fedavg or fedprox, not {fed.strategy!r}")
    accountant = privacy.make_accountant(fed.dp_delta, fed.min_nodes, fed.dp_max_epsilon)
    if ledger:
        privacy.restore(accountant, ledger)
    elif offset:
        raise HlipError(f"resuming after round {offset} without the checkpoint's privacy ledger: "
                        "the privacy spent so far is unknown")
    inner = base(**common, **extra, weighted_by_key=WEIGHT_KEY)
    cls = type(f"HlipDP{base.__name__}", (PrivateStrategy, HlipStrategy, ScreenedFixedClipping), {})
    strategy = cls(inner, fed.dp_noise_multiplier, fed.dp_clipping_norm, fed.min_nodes, accountant=accountant)
    # Relative norm screening depends on the other sites' updates: off here (module docstring).
    strategy.setup(expected, offset, dataclasses.replace(fed, max_update_ratio=0.0), known_nodes)
    return strategy
