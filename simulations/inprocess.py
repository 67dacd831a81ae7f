"""A Flower Grid that runs the ClientApp in this process: the same ServerApp and ClientApp code
as ``flwr run``, without the runtime's processes.

Experiments that run many federations (the comparison harness, seeds, leave-one-site-out) and tests
that need exact reproducibility use it: sites run one after another, node ids are fixed, and there
is no start-up cost. It sets Flower's task identity as the runtime does, builds messages with
explicit metadata and dispatches each to ``client.app.app`` with a per-node Context (partition ids
as in simulation). A ``tamper`` hook may rewrite a node's reply, and ``fail_at_round`` raises to
simulate a server crash.
"""

import itertools

from flwr.app import Context, Message, Metadata, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from server.app import main as server_main


class ServerCrash(RuntimeError):
    """Raised by ``fail_at_round``: the server died before the round's messages went out."""


class InProcessGrid(Grid):
    def __init__(self, run_config, num_nodes=3, run_id=1, tamper=None, fail_at_round=None):
        self.run_config, self.run_id = dict(run_config), run_id
        self.nodes = {1000 + i: i for i in range(num_nodes)}
        self.tamper, self.fail_at_round = tamper, fail_at_round
        self.ids = itertools.count(1)
        self.sent = []  # (node, round, reply content) of every train reply
        self.replies = {}  # message id -> reply not yet pulled
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1

    def set_run(self, run):
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        """Run each message's ClientApp now; the replies wait for :meth:`pull_messages`."""
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            server_round = int(msg.content["config"]["server-round"])
            if self.fail_at_round is not None and server_round >= self.fail_at_round:
                raise ServerCrash(f"simulated server crash in round {server_round}")
            incoming = Message(metadata=Metadata(
                run_id=self.run_id, message_id=f"m{next(self.ids)}", src_node_id=0, dst_node_id=node,
                reply_to_message_id="", group_id=str(server_round), created_at=msg.metadata.created_at,
                ttl=msg.metadata.ttl, message_type=msg.metadata.message_type,
            ), content=msg.content)
            context = Context(
                run_id=self.run_id, node_id=node,
                node_config={"partition-id": self.nodes[node], "num-partitions": len(self.nodes)},
                state=RecordDict(), run_config=self.run_config,
            )
            reply = client_app(incoming, context)
            if self.tamper is not None:
                reply = self.tamper(node, msg.metadata.message_type, reply) or reply
            if msg.metadata.message_type == "train" and not reply.has_error():
                self.sent.append((node, server_round, reply.content))
            self.replies[incoming.metadata.message_id] = reply
            ids.append(incoming.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def run_federation(run_config: dict, num_nodes: int, run_id: int = 1, **grid_kwargs) -> InProcessGrid:
    """Run the ServerApp over an :class:`InProcessGrid` of ``num_nodes`` sites; returns the grid."""
    grid = InProcessGrid(run_config, num_nodes=num_nodes, run_id=run_id, **grid_kwargs)
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    server_main(grid, context)
    return grid
