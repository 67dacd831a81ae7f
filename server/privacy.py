"""Central differential privacy for hlip-fed: Flower's server-side fixed-clipping wrapper, fed
only screened replies, with the privacy spent accounted per round and kept across a resume.

``federation.dp=server_fixed`` builds, each holding the next,

    HlipStrategy (screening, bounded waiting, round offset, fp32, round record; server.strategy)
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

    def round_privacy(self, server_round: int, released: bool, update_norms: dict[str, float]) -> tuple[dict, dict]:
        """The round record's privacy entry after a round (``released``: a model went out), and
        the accountant's ledger so far."""
        released = released and self.last_noise_std is not None
        record = {
            **privacy.spent(self.accountant),
            "noise_multiplier": self.noise_multiplier,
            "accounted_multiplier": privacy.accounted_multiplier(self.noise_multiplier),
            "clipping_norm": self.clipping_norm,
            "noise_std": self.last_noise_std if released else 0.0,
            "sites": self.num_sampled_clients if released else 0,
            "clipped": sum(1 for v in update_norms.values() if v > self.clipping_norm),
        }
        log.info("round %d: privacy spent epsilon=%.4g at delta=%g after %d private rounds",
                 server_round, record["epsilon"], record["delta"], record["releases"])
        return record, privacy.ledger(self.accountant)

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


def build_private_strategy(base, fed: FederationConfig, offset: int, common: dict, extra: dict,
                           ledger: dict | None = None) -> ScreenedFixedClipping:
    """Flower's fixed-clipping wrapper of ``federation.dp=server_fixed`` around an unweighted
    ``base`` (FedAvg or FedProx); ``ledger`` is the privacy ledger of the checkpoint a run
    resumes from."""
    if base not in (FedAvg, FedProx):
        raise HlipError(f"federation.dp needs strategy fedavg or fedprox, not {fed.strategy!r}")
    accountant = privacy.make_accountant(fed.dp_delta, fed.min_nodes, fed.dp_max_epsilon)
    if ledger:
        privacy.restore(accountant, ledger)
    elif offset:
        raise HlipError(f"resuming after round {offset} without the checkpoint's privacy ledger: "
                        "the privacy spent so far is unknown")
    inner = base(**common, **extra, weighted_by_key=WEIGHT_KEY)
    return ScreenedFixedClipping(inner, fed.dp_noise_multiplier, fed.dp_clipping_norm, fed.min_nodes,
                                 accountant=accountant)
