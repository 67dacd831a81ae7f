"""Flower strategies wrapped for hlip-fed: screened replies, bounded waits, resumable rounds.

``build_strategy`` makes the Flower Message-API strategy named by ``federation.strategy`` (robust
aggregation: ``fedmedian`` or ``fedtrimmedavg``; with ``federation.dp`` Flower's fixed-clipping
wrapper around it, :mod:`server.privacy`) and hands it to :class:`HlipStrategy`, a Flower
strategy that holds it and adds:

* replies sent in ``federation.transport`` fp16/bf16, or as deltas, are decoded to fp32 weights
  first (:func:`~hlip_fed.federation.transport.decode_replies`), so screening and every
  aggregation see fp32 weights (Flower's FedAvg would otherwise average in the wire dtype);
* replies are screened before Flower sees them, first their form
  (:func:`~hlip_fed.federation.screen.screen_replies`), then the size of each site's update
  against the round's global model (:func:`~hlip_fed.federation.screen.screen_update_norms`), so
  one broken or malicious site cannot end the run or drag the average;
* bounded waiting for sites: Flower's sampling waits forever for ``min_available_nodes``; here a
  round waits at most ``federation.node_wait_s``, then goes ahead with the connected sites if
  they reach ``federation.quorum``, or stops the run naming the node ids it misses;
* one exchange a round (``federation.evaluate_with_train``): from the second round on, the training
  messages carry the evaluation config too, each site evaluates the global model it received
  before training on it and sends the metrics as a second record (``evaluation``), which is taken
  off the reply before screening and kept in the round's ``previous_eval``; the evaluation
  exchange runs only after the last round, for the final model;
* aggregated arrays are cast back to fp32 (FedOpt computes in float64);
* a round offset: ``Strategy.start`` always counts from 1, so a resumed run adds the rounds already
  done to every round number the clients, the schedules and FedOpt's bias correction see.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Strategy

from hlip_fed.config import FederationConfig
from hlip_fed.errors import HlipError
from hlip_fed.federation.round_record import RoundRecord
from hlip_fed.federation.run import EVALUATION
from hlip_fed.federation.screen import screen_replies, screen_update_norms
from hlip_fed.federation.transport import decode_replies
from hlip_fed.training.evaluate import aggregate_site_metrics
from server.privacy import ScreenedFixedClipping, build_private_strategy

log = logging.getLogger("hlip_fed.server")

BASES = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
}


def wait_for_nodes(
    grid: Grid,
    needed: int,
    quorum: int,
    wait_s: float,
    known: Iterable[int] = (),
    poll_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """Connected node ids once ``needed`` are connected, or after ``wait_s`` if at least ``quorum``.

    Raises :class:`HlipError` when fewer than ``quorum`` are connected after the wait, naming the
    ``known`` nodes (seen in earlier rounds) that are missing: node ids are all the server knows
    of a site (``hlip-fed site list`` maps them to names).
    """
    deadline = clock() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed or clock() >= deadline:
            break
        sleep(poll_s)
    if len(nodes) >= min(needed, quorum):
        return nodes
    missing = sorted(set(known) - set(nodes))
    raise HlipError(
        f"only {len(nodes)} of {needed} sites connected after {wait_s:g}s (quorum {quorum}); "
        f"connected nodes: {nodes or 'none'}; missing nodes seen in earlier rounds: {missing or 'none known'}"
    )


def split_evaluations(replies: list[Message]) -> tuple[list[Message], list[Message]]:
    """Training replies without the ``evaluation`` record a site added, and those evaluations as
    evaluation replies of their own (same metadata), so each is screened as its kind is."""
    evaluations = []
    for reply in replies:
        if not reply.has_error() and EVALUATION in reply.content:
            record = reply.content[EVALUATION]
            del reply.content[EVALUATION]
            evaluations.append(Message(metadata=copy.copy(reply.metadata), content=RecordDict({"metrics": record})))
    return replies, evaluations


class HlipStrategy(Strategy):
    """The Flower strategy ``inner`` with screened replies, bounded waits, a round offset, fp32
    aggregates and a record of every round (``round_record``)."""

    def __init__(self, inner: Strategy, fed: FederationConfig, expected: dict[str, tuple[int, ...]], offset: int,
                 known_nodes: Iterable[int] = (), max_examples: float | None = None) -> None:
        self.inner, self.fed, self.expected, self.offset = inner, fed, expected, offset
        self.max_examples = max_examples  # what an honest site can train on in a round
        self.round_record = RoundRecord()
        self.known_nodes: set[int] = set(known_nodes)  # every node that took part, for messages
        self._sent: dict[str, int] = {}  # message id -> destination node, for SuperLink errors
        self._global: dict[str, np.ndarray] = {}
        self._momentum: dict[str, np.ndarray] = {}  # FedAvgM's, from a checkpoint
        self._momentum_order: list[str] = []  # the array names of FedAvgM's momentum list, in order

    def summary(self) -> None:
        self.inner.summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None):
        """Flower's round loop; the evaluation config and the round count are kept for one exchange a round."""
        self._evaluate_config = evaluate_config or ConfigRecord()
        self._num_rounds = num_rounds
        return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn)

    def _evaluates_with_train(self, server_round: int) -> bool:
        """Whether this round's training messages carry the evaluation of the model they send: every
        model but the initial one (a resumed run's first model included: its evaluation would have
        come with the round that did not happen)."""
        return self.fed.evaluate_with_train and (server_round > 1 or self.offset > 0)

    @contextmanager
    def _attendance(self, grid: Grid, what: str, server_round: int):
        """Let Flower's sampler see a reachable minimum: the sites connected after a bounded wait."""
        inner = self.inner
        needed = inner.min_available_nodes
        nodes = wait_for_nodes(grid, needed, self.fed.quorum, self.fed.node_wait_s, self.known_nodes)
        self.known_nodes.update(nodes)
        saved = (inner.min_available_nodes, inner.min_train_nodes, inner.min_evaluate_nodes)
        if len(nodes) < needed:
            absent = sorted(self.known_nodes - set(nodes))
            log.warning("round %d: %s with %d of %d sites after waiting %gs; absent nodes: %s",
                        server_round + self.offset, what, len(nodes), needed, self.fed.node_wait_s,
                        absent or "none known")
            if self.round_record.absent is None:
                self.round_record.absent = absent
            inner.min_available_nodes = min(inner.min_available_nodes, len(nodes))
            inner.min_train_nodes = min(inner.min_train_nodes, len(nodes))
            inner.min_evaluate_nodes = min(inner.min_evaluate_nodes, len(nodes))
        try:
            yield
        finally:
            inner.min_available_nodes, inner.min_train_nodes, inner.min_evaluate_nodes = saved

    def _remember(self, messages: Iterable[Message]) -> list[Message]:
        """Keep the messages sent; Flower's grid stamps their ids when it pushes them."""
        messages = list(messages)
        self._outbox = messages
        return messages

    def _node_of(self, reply: Message) -> int:
        """The site a reply is about: the SuperLink answers for an offline node in its own name."""
        if not self._sent and getattr(self, "_outbox", None):
            self._sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._outbox
                          if m.metadata.message_id}
        return self._sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _no_reply(self, replies: list[Message]) -> list[int]:
        replied = {self._node_of(m) for m in replies}
        return sorted({m.metadata.dst_node_id for m in getattr(self, "_outbox", [])} - replied)

    # -- training ------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.round_record, self._sent = RoundRecord(), {}
        self._global = {k: np.asarray(v.numpy(), dtype=np.float64) for k, v in arrays.items()}
        if self._evaluates_with_train(server_round):
            config = ConfigRecord({**self._evaluate_config, **config, EVALUATION: True})
        with self._attendance(grid, "training", server_round):
            return self._remember(self.inner.configure_train(server_round + self.offset, arrays, config, grid))

    def aggregate_train(self, server_round: int, replies):
        arrays, metrics = self._aggregate_train(server_round, replies)
        if isinstance(self.inner, ScreenedFixedClipping):
            record = self.round_record
            record.privacy, record.privacy_ledger = self.inner.round_privacy(
                server_round + self.offset, arrays is not None, record.update_norms or {})
        return arrays, metrics

    def _aggregate_train(self, server_round: int, replies):
        replies, evaluations = split_evaluations(list(replies))
        if self._evaluates_with_train(server_round):
            per_site, merged = self._site_evaluations(server_round, evaluations)
            self.round_record.previous_eval = {"round": server_round + self.offset - 1, "eval": merged,
                                               "eval_sites": per_site}
        # Compressed replies (fp16/bf16, deltas) become fp32 weights before anything judges them.
        replies, undecodable = decode_replies(replies, self._global, self.fed.transport,
                                              self.fed.send_deltas, node_of=self._node_of)
        good, rejected = screen_replies(replies, self.expected, node_of=self._node_of)
        rejected = undecodable + rejected
        norms: dict[int, float] = {}
        if self._global and good:
            good, too_large, norms = screen_update_norms(good, self._global, self.fed.max_update_ratio)
            rejected += too_large
        silent = self._no_reply(replies)
        if silent:
            log.warning("round %d: no training reply from node(s) %s within %gs", server_round + self.offset,
                        silent, self.fed.round_timeout_s)
        for r in rejected:
            log.warning("round %d: rejected the update of node %s: %s", server_round + self.offset, r.node_id, r.reason)
        capped = self._cap_examples(good)
        sites = {m.metadata.src_node_id: dict(next(iter(m.content.metric_records.values()))) for m in good}
        record = self.round_record
        record.train_sites = {str(k): v for k, v in sites.items()}
        record.rejected = [{"node": r.node_id, "reason": r.reason} for r in rejected]
        record.bytes_per_site = {str(k): v.get("bytes-sent", 0.0) for k, v in sites.items()}
        record.update_norms = {str(k): v for k, v in norms.items()}
        record.no_reply, record.capped_examples = silent, capped
        if sites:
            log.info("round %d: %.2f MB received per site", server_round + self.offset,
                     np.mean([v.get("bytes-sent", 0.0) for v in sites.values()]) / 1e6)
        if not good:
            log.warning("round %d: no usable update; the global model stays as it was", server_round + self.offset)
            return None, None
        self._align_server_momentum(good)
        arrays, metrics = self.inner.aggregate_train(server_round + self.offset, good)
        if arrays is not None:
            # fp32 in the federated shapes (FedOpt returns float64 and turns 0-d scalars into 1-d).
            arrays = ArrayRecord(
                {k: Array(np.asarray(v.numpy(), dtype=np.float32).reshape(self.expected[k])) for k, v in arrays.items()}
            )
        self.round_record.train = dict(metrics) if metrics is not None else {}
        return arrays, metrics

    def _align_server_momentum(self, replies: list[Message]) -> None:
        """FedAvgM pairs its current arrays and its momentum list with the averaged arrays by
        position, and the average comes in the replies' array order: put both in that order (the
        momentum restored from a checkpoint included)."""
        inner = self.inner
        if not isinstance(inner, FedAvgM) or inner.current_arrays is None:
            return
        order = list(next(iter(replies[0].content.array_records.values())).keys())
        momentum = (dict(zip(self._momentum_order, inner.momentum_vector, strict=True))
                    if inner.momentum_vector is not None else self._momentum)
        inner.current_arrays = ArrayRecord({k: inner.current_arrays[k] for k in order})
        if momentum:
            inner.momentum_vector = [momentum[k] for k in order]
        self._momentum, self._momentum_order = {}, order

    def _cap_examples(self, replies: list[Message]) -> dict[str, float]:
        """Cap every reply's self-reported ``num-examples`` (its weight in FedAvg) at what the run's
        config lets a site train on in a round: a site claiming more cannot take over the average
        while its update stays inside the norm screen. Returns node -> the claim that was capped."""
        if not self.max_examples:
            return {}
        capped = {}
        for m in replies:
            for record in m.content.metric_records.values():
                claimed = float(record.get("num-examples", 0.0))
                if claimed > self.max_examples:
                    record["num-examples"] = float(self.max_examples)
                    capped[str(self._node_of(m))] = claimed
        for node, claimed in capped.items():
            log.warning("node %s reported %g training examples, more than the %g a round allows; weighted as %g",
                        node, claimed, self.max_examples, self.max_examples)
        return capped

    # -- evaluation ----------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self._evaluating = not (self.fed.evaluate_with_train and server_round < self._num_rounds)
        if not self._evaluating:
            return []  # the next round's training messages carry this model's evaluation
        self._sent = {}
        with self._attendance(grid, "evaluation", server_round):
            return self._remember(self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies) -> MetricRecord | None:
        if not self._evaluating:
            return None
        per_site, merged = self._site_evaluations(server_round, list(replies))
        self.round_record.eval_sites = per_site
        if not per_site:
            return None
        self.round_record.eval = merged
        return MetricRecord(merged)

    def _site_evaluations(self, server_round: int, replies: list[Message]) -> tuple[dict, dict]:
        """Each site's evaluation metrics (node id -> metrics) that pass screening, and their merge."""
        good, rejected = screen_replies(replies, None, node_of=self._node_of)
        for r in rejected:
            log.warning("round %d: rejected the evaluation of node %s: %s", server_round + self.offset, r.node_id, r.reason)
        per_site = {str(m.metadata.src_node_id): dict(next(iter(m.content.metric_records.values()))) for m in good}
        return per_site, aggregate_site_metrics(list(per_site.values()))

    # -- resumable state -----------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """The strategy's own state worth checkpointing: FedOpt's first and second moments, FedAvgM's
        momentum (Flower keeps it as a list in the order of the global arrays: saved by array name)."""
        out = {}
        for name in ("m_t", "v_t"):
            for k, v in (getattr(self.inner, name, None) or {}).items():
                out[f"{name}/{k}"] = np.asarray(v)
        momentum = getattr(self.inner, "momentum_vector", None)
        if momentum is not None:
            out.update({f"momentum/{k}": np.asarray(v) for k, v in zip(self._momentum_order, momentum, strict=True)})
        else:  # restored but not used yet (no usable update since the restart)
            out.update({f"momentum/{k}": v for k, v in self._momentum.items()})
        return out

    def load_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        for name in ("m_t", "v_t"):
            moments = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + "/")}
            if moments:
                setattr(self.inner, name, moments)
        # FedAvgM's momentum goes back into its list when the arrays' order is known (the next round).
        self._momentum = {k.removeprefix("momentum/"): v for k, v in state.items() if k.startswith("momentum/")}


def build_strategy(fed: FederationConfig, expected: dict, offset: int, state: dict[str, np.ndarray] | None = None,
                   known_nodes: Iterable[int] = (), privacy_ledger: dict | None = None,
                   max_examples: float | None = None):
    """The run's strategy; ``privacy_ledger`` (from the resumed checkpoint) continues DP accounting;
    ``max_examples`` caps the ``num-examples`` a reply may claim (local steps x accumulation x batch)."""
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
    elif name == "fedavgm":
        extra.update(server_learning_rate=1.0, server_momentum=fed.server_momentum)
    elif name == "fedtrimmedavg":
        # Trim at least one site from each end at the configured site count.
        extra["beta"] = max(fed.trim_fraction, 1.0 / fed.min_nodes + 1e-9)
        if extra["beta"] >= 0.5:
            raise HlipError(f"fedtrimmedavg needs at least 3 sites (federation.min_nodes={fed.min_nodes})")
    if fed.dp != "off":  # central DP: Flower's fixed-clipping wrapper around an unweighted FedAvg/FedProx
        inner = build_private_strategy(base, fed, offset, common, extra, privacy_ledger)
        # Relative norm screening depends on the other sites' updates: off here (server/privacy.py).
        fed, max_examples = dataclasses.replace(fed, max_update_ratio=0.0), None
    else:
        inner = base(**common, **extra)
    strategy = HlipStrategy(inner, fed, expected, offset, known_nodes, max_examples)
    if state:
        strategy.load_state_arrays(state)
    return strategy
