"""Screening of site replies before aggregation.

In Flower 1.42 one inconsistent reply (a missing key, an extra ArrayRecord, a metric key the
others lack) raises inside the strategy and ends the whole run. A federation of hospitals must
survive a broken or malicious site, so every reply is checked first and the bad ones are dropped
with a logged reason naming the node; the round aggregates the rest.

Two stages: :func:`screen_replies` checks form (error replies, missing or extra arrays, shapes,
dtypes, non-finite values, metric keys); :func:`screen_update_norms` then checks size, rejecting
an update far larger than the round's typical one (a scaled or boosted model).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord


@dataclass
class Rejection:
    node_id: int
    reason: str


def _check_metrics(metrics: MetricRecord, weight_key: str) -> str | None:
    weight = metrics.get(weight_key)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return f"metric {weight_key!r} is missing or not a positive number"
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            return f"metric {key!r} is not finite"
    return None


def _check_arrays(arrays: ArrayRecord, expected: dict[str, tuple[int, ...]]) -> str | None:
    missing = [k for k in expected if k not in arrays]
    if missing:
        return f"missing {len(missing)} array(s), e.g. {missing[0]!r}"
    extra = [k for k in arrays if k not in expected]
    if extra:
        return f"unexpected array {extra[0]!r}"
    for key, shape in expected.items():
        arr = arrays[key]
        if tuple(arr.shape) != tuple(shape):
            return f"array {key!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}"
        values = arr.numpy()
        if not np.issubdtype(values.dtype, np.floating):
            return f"array {key!r} has dtype {values.dtype}, expected floating point"
        if not np.isfinite(values).all():
            return f"array {key!r} holds non-finite values"
    return None


def _check_reply(msg: Message, expected: dict[str, tuple[int, ...]] | None, weight_key: str) -> str | None:
    if msg.has_error():
        return f"site reported an error: {msg.error.reason}"
    content = msg.content
    n_arrays = 0 if expected is None else 1
    if len(content.array_records) != n_arrays or len(content.metric_records) != 1:
        return (
            f"expected {n_arrays} ArrayRecord and 1 MetricRecord, got {len(content.array_records)} "
            f"and {len(content.metric_records)}"
        )
    if expected is not None:
        reason = _check_arrays(next(iter(content.array_records.values())), expected)
        if reason:
            return reason
    return _check_metrics(next(iter(content.metric_records.values())), weight_key)


def _metric_keys(msg: Message) -> frozenset[str]:
    return frozenset(next(iter(msg.content.metric_records.values())).keys())


def screen_replies(
    replies: list[Message],
    expected: dict[str, tuple[int, ...]] | None,
    weight_key: str = "num-examples",
    node_of: Callable[[Message], int] | None = None,
) -> tuple[list[Message], list[Rejection]]:
    """Split replies into those safe to aggregate and rejections with reasons.

    ``expected`` maps each federated array to its shape (training replies); ``None`` means an
    evaluation reply, which must carry metrics only. Error replies (the ClientApp raised) are
    rejected too. Among well-formed replies the metric keys of the majority define the round's key
    set; a reply with other keys is rejected, since Flower's metric aggregation needs identical keys.
    Accepted replies are returned sorted by node id. ``node_of`` names the site of a reply; the
    default, the sender, is the SuperLink itself for the error replies it makes up for a node that
    went offline, so the strategy passes a lookup by the message replied to.
    """
    node_of = node_of or (lambda m: m.metadata.src_node_id)
    good: list[Message] = []
    rejected: list[Rejection] = []
    for msg in replies:
        reason = _check_reply(msg, expected, weight_key)
        if reason:
            rejected.append(Rejection(node_of(msg), reason))
        else:
            good.append(msg)
    if good:
        majority = Counter(map(_metric_keys, good)).most_common(1)[0][0]
        for msg in [m for m in good if _metric_keys(m) != majority]:
            good.remove(msg)
            diff = sorted(_metric_keys(msg) ^ majority)[:3]
            rejected.append(Rejection(msg.metadata.src_node_id, f"metric keys differ from the other sites: {diff}"))
    # Node order decides the order of floating-point sums: fix it, so that a repeated round
    # (after a resume) aggregates to the same bits whatever order the replies arrived in.
    good.sort(key=lambda m: m.metadata.src_node_id)
    return good, rejected


def update_norm(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    """L2 norm of the update ``arrays - reference`` over all federated arrays (float64 sums)."""
    total = 0.0
    for key, ref in reference.items():
        delta = arrays[key].numpy().astype(np.float64) - ref
        total += float(np.dot(delta.ravel(), delta.ravel()))
    return math.sqrt(total)


def screen_update_norms(
    replies: list[Message], reference: dict[str, np.ndarray], max_ratio: float
) -> tuple[list[Message], list[Rejection], dict[int, float]]:
    """Reject updates whose norm is far above the round's typical update.

    A site can pass :func:`screen_replies` with finite, well-shaped weights that still wreck the
    average (a boosted or scaled update). What is compared is the update Δ = w_site − w_global,
    not the weights: weights of every site have about the same norm whatever they learned. The
    reference is the *lower* median of the round's update norms, so with two sites the larger
    update is compared with the smaller one (a plain median would be half the outlier itself),
    and one site alone is never rejected. A reply is rejected when its norm exceeds
    ``max_ratio`` times that reference; ``max_ratio <= 0`` disables the check. Replies must
    already have passed :func:`screen_replies` (same keys and shapes as ``reference``).

    Returns the kept replies, the rejections and every reply's update norm by node id.
    """
    norms = {m.metadata.src_node_id: update_norm(next(iter(m.content.array_records.values())), reference)
             for m in replies}
    if max_ratio <= 0 or len(replies) < 2:
        return list(replies), [], norms
    values = sorted(norms.values())
    reference_norm = values[(len(values) - 1) // 2]
    limit = max_ratio * reference_norm
    kept, rejected = [], []
    for msg in replies:
        norm = norms[msg.metadata.src_node_id]
        if norm > limit:
            rejected.append(Rejection(
                msg.metadata.src_node_id,
                f"update norm {norm:.4g} is more than {max_ratio:g}x the round's median {reference_norm:.4g}",
            ))
        else:
            kept.append(msg)
    return kept, rejected, norms
