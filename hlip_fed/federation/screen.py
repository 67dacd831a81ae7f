"""Screening of site replies before aggregation.

In Flower 1.42 one inconsistent reply (a missing key, an extra ArrayRecord, a metric key the
others lack) raises inside the strategy and ends the whole run. A federation of hospitals must
survive a broken or malicious site, so every reply is checked first and the bad ones are dropped
with a logged reason naming the node; the round aggregates the rest.
"""

from __future__ import annotations

import math
from collections import Counter
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
) -> tuple[list[Message], list[Rejection]]:
    """Split replies into those safe to aggregate and rejections with reasons.

    ``expected`` maps each federated array to its shape (training replies); ``None`` means an
    evaluation reply, which must carry metrics only. Error replies (the ClientApp raised) are
    rejected too. Among well-formed replies the metric keys of the majority define the round's key
    set; a reply with other keys is rejected, since Flower's metric aggregation needs identical keys.
    Accepted replies are returned sorted by node id.
    """
    good: list[Message] = []
    rejected: list[Rejection] = []
    for msg in replies:
        reason = _check_reply(msg, expected, weight_key)
        if reason:
            rejected.append(Rejection(msg.metadata.src_node_id, reason))
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
