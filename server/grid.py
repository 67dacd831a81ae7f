"""A Grid that hands the strategy each phase's replies as soon as the last one arrives.

In deployment the ServerApp's Grid (Flower's HTTP grid to the SuperLink) sleeps 3 s between pulls
while it waits for replies, so every train and every evaluate phase ends on the next 3-second
tick after the last site has answered: up to 6 s of idle aggregation server per round. The
simulation runtime's in-memory grid pulls every 0.1 s. :class:`PromptGrid` wraps either and pulls
every ``federation.poll_interval_s`` (default 0.1 s, the simulation's pace, so simulation is
unchanged); everything else is the wrapped grid's.

It also keeps the timeline of each exchange (when the messages went out, when each reply came
back): set beside the sites' own handler times it shows what a round spends in the runtime.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class PromptGrid(Grid):
    def __init__(self, grid: Grid, interval: float):
        self._grid = grid
        self.interval = float(interval)
        self.exchanges: list[dict] = []  # one per send_and_receive, until take_exchanges()

    def take_exchanges(self) -> list[dict]:
        """The exchanges since the last call: type, message count, push time (Unix seconds) and
        each reply's arrival in seconds after the push."""
        out, self.exchanges = self.exchanges, []
        return out

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then collect replies until all are in or ``timeout`` seconds pass (no
        messages: no exchange)."""
        messages = list(messages)
        if not messages:
            return []
        pushed, t0 = time.time(), time.monotonic()
        waiting = set(self.push_messages(messages))
        end = None if timeout is None else t0 + timeout
        replies: list[Message] = []
        arrivals: list[float] = []
        while waiting:
            got = list(self.pull_messages(waiting))
            replies += got
            arrivals += [round(time.monotonic() - t0, 4)] * len(got)
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.interval if end is None else max(0.0, min(self.interval, end - time.monotonic())))
        kind = messages[0].metadata.message_type if messages else ""
        self.exchanges.append({"type": kind, "messages": len(messages), "pushed": pushed, "replies_s": arrivals})
        return replies
