"""The record of one federated round: one line of ``metrics.jsonl`` and the state of its checkpoint.

The strategy writes what the sites sent and what it did with it, the ServerApp adds the held-out
evaluation and the round's timing, the coordinator stamps the round number and saves it; the round
table, the curves, TensorBoard and the model card read it. A field left ``None`` is not written, so
a record holds what its round produced and nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class RoundRecord:
    round: int | None = None
    # Training: the aggregated metrics, each site's (node id -> metrics), what the strategy did.
    train: dict[str, float] | None = None
    train_sites: dict[str, dict[str, float]] | None = None
    rejected: list[dict] | None = None  # {"node", "reason"} of every update left out
    bytes_per_site: dict[str, float] | None = None
    update_norms: dict[str, float] | None = None  # node -> |w_site - w_global|
    no_reply: list[int] | None = None
    capped_examples: dict[str, float] | None = None  # node -> the num-examples it claimed
    absent: list[int] | None = None  # known nodes not connected after the wait for sites
    # Evaluation: the sites' own test splits (merged and per node), the server's held-out set.
    eval: dict[str, float] | None = None
    eval_sites: dict[str, dict[str, float]] | None = None
    # With federation.evaluate_with_train, the sites' evaluation of the previous round's model arrives
    # with this round's training replies: {"round", "eval", "eval_sites"} (read_rounds moves it there).
    previous_eval: dict | None = None
    heldout: dict[str, float] | None = None
    timing: dict | None = None  # exchanges with the sites and the held-out evaluation
    # Central differential privacy: the round's release and the accountant's ledger so far.
    privacy: dict | None = None
    privacy_ledger: dict | None = None
    # Secure aggregation: the server saw only the sum of ``sites_in_sum`` updates.
    aggregation: str | None = None
    sites_in_sum: int | None = None

    def to_json(self) -> dict:
        """The fields that are set, as plain JSON values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_json(cls, data: dict) -> "RoundRecord":
        """A record read back (a checkpoint's state holds other keys too: they are left out)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def section(self, name: str) -> dict:
        """A metrics section (``train``, ``eval``, ``heldout``) as a dict, empty when not set."""
        return getattr(self, name) or {}
