"""The server's grid wrapper: replies are collected as they arrive, within the round's timeout."""

from types import SimpleNamespace

from server.grid import PromptGrid


class SlowSites:
    """A stand-in for Flower's grid: message ``i`` is answered on the ``i + 1``-th pull."""

    def __init__(self, never: set[str] = frozenset()):
        self.pulls, self.never, self.run = 0, never, "run-1"

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        ready = [i for i in ids if i not in self.never and int(i[1:]) < self.pulls]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]

    def get_node_ids(self):
        return [1, 2, 3]


def messages(n, kind="train"):
    return [SimpleNamespace(metadata=SimpleNamespace(message_type=kind)) for _ in range(n)]


def test_collects_every_reply_and_stops_pulling_when_all_are_in():
    inner = SlowSites()
    grid = PromptGrid(inner, interval=0.001)
    replies = grid.send_and_receive(messages(3), timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert inner.pulls == 3  # one pull per arrival, none after the last
    assert list(grid.get_node_ids()) == [1, 2, 3] and grid.run == "run-1"


def test_each_exchange_is_timed_for_the_round_record():
    grid = PromptGrid(SlowSites(), interval=0.01)
    grid.send_and_receive(messages(3), timeout=60)  # answered on the 1st, 2nd and 3rd pull
    grid.send_and_receive(messages(2, "evaluate"), timeout=60)
    train, evaluate = grid.take_exchanges()
    assert (train["type"], train["messages"], evaluate["type"], evaluate["messages"]) == ("train", 3, "evaluate", 2)
    assert len(train["replies_s"]) == 3 and train["replies_s"] == sorted(train["replies_s"])
    assert train["replies_s"][-1] >= 0.02 and evaluate["pushed"] >= train["pushed"]  # two waits before the last
    assert grid.take_exchanges() == []


def test_a_silent_site_costs_the_timeout_not_the_run():
    inner = SlowSites(never={"m1"})
    replies = PromptGrid(inner, interval=0.001).send_and_receive(messages(2), timeout=0.05)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
