"""The client runner of a Flower ServerApp: a round's tasks go to the SuperNodes as Flower messages.

:class:`FlowerRunner` is a :class:`~lightning_fed.runner.ClientRunner` like the sequential and multi-process ones:
the loop plans the round, this runner sends each task to the node that holds the client's partition through
Flower's ``Grid`` and waits for the replies, and the loop's server side (decode, validate, aggregate, evaluate,
checkpoint, log) continues with them. A node that does not answer within ``timeout_s`` (stopped, disconnected,
too slow) becomes a failed reply with its reason logged, as a client that raised does in simulation; the round
aggregates the replies that came if there are at least ``min_clients`` of them.

Which node holds which client is asked once, with a ``query.lightning_fed`` message: each node answers with its
``partition-id`` (its node config), so clients are addressed by the recipe's client ids, whatever Flower's node
ids are.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from lightning_fed.flower.wire import ACTION, MalformedFlowerMessage, read_reply, task_record
from lightning_fed.protocol import ClientMessage, ClientTask
from lightning_fed.runner import ClientRunner, ClientWork
from lightning_fed.validation import need

log = logging.getLogger("lightning_fed")

OWNER = "FlowerRunner"


def record_bytes(content: RecordDict) -> int:
    """Bytes of a Flower message's records as Flower counts them (``count_bytes``, what its ``message_size_mod``
    logs): the values and the keys."""
    return sum(record.count_bytes() for record in content.values())


class FlowerRunner(ClientRunner):
    """Runs a round's clients on Flower SuperNodes (or simulated nodes) through a ``Grid``.

    Args:
        grid: the ServerApp's ``Grid``.
        num_clients: the recipe's clients; every node must report a ``partition-id`` below it.
        timeout_s: how long a round waits for replies; the missing ones are failed replies (logged).
        connect_timeout_s: how long to wait at the start for every client's node to connect.
    """

    def __init__(
        self, grid: Any, num_clients: int, timeout_s: float = 600.0, connect_timeout_s: float = 120.0
    ) -> None:
        need(OWNER, timeout_s > 0, "timeout_s", timeout_s, "> 0")
        need(OWNER, connect_timeout_s > 0, "connect_timeout_s", connect_timeout_s, "> 0")
        self.grid = grid
        self.num_clients = num_clients
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.nodes: dict[int, int] = {}  # client id -> Flower node id
        self.last_stats: dict[str, float] = {}

    def connect(self) -> dict[int, int]:
        """Ask every connected node for its partition id until each client has a node; the map client -> node.

        Raises:
            RuntimeError: after ``connect_timeout_s`` some clients have no node, or two nodes claim one client.
        """
        deadline = time.monotonic() + self.connect_timeout_s
        asked: set[int] = set()
        while len(self.nodes) < self.num_clients:
            new = [n for n in self.grid.get_node_ids() if n not in asked]
            if new:
                msgs = [
                    Message(
                        RecordDict({"config": ConfigRecord({})}),
                        dst_node_id=n,
                        message_type=f"query.{ACTION}",
                    )
                    for n in new
                ]
                for reply in self.grid.send_and_receive(msgs, timeout=max(deadline - time.monotonic(), 1.0)):
                    node = reply.metadata.src_node_id
                    if reply.has_error():
                        log.warning("node %d did not say its partition: %s", node, reply.error.reason)
                        continue
                    asked.add(node)
                    cid = int(reply.content["config"]["partition-id"])
                    if not 0 <= cid < self.num_clients:
                        raise RuntimeError(
                            f"node {node} holds partition-id={cid}, but the recipe has "
                            f"num_clients={self.num_clients} (partition ids 0..{self.num_clients - 1})"
                        )
                    if cid in self.nodes and self.nodes[cid] != node:
                        raise RuntimeError(f"nodes {self.nodes[cid]} and {node} both hold partition-id={cid}")
                    self.nodes[cid] = node
            if len(self.nodes) < self.num_clients:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(self.num_clients)) - set(self.nodes))
                    raise RuntimeError(
                        f"after connect_timeout_s={self.connect_timeout_s} no node holds the "
                        f"partitions {missing[:10]}: start one SuperNode per client "
                        f"(--node-config 'partition-id=<id> num-partitions={self.num_clients}')"
                    )
                time.sleep(0.5)
        log.info("Flower: %d clients on nodes %s", len(self.nodes), self.nodes)
        return self.nodes

    def run(self, tasks: list[ClientTask], work: ClientWork) -> list[ClientMessage]:
        """Send each task to its client's node and wait for the replies; every task's reply message (a failed one
        for a node that did not answer in time), in the order of ``tasks``."""
        if len(self.nodes) < self.num_clients:
            self.connect()
        out: dict[int, ClientMessage] = {}
        msgs, owner = [], {}
        bytes_down = 0
        for task in tasks:
            content = task_record(task)
            bytes_down += record_bytes(content)
            node = self.nodes[task.client_id]
            owner[node] = task.client_id
            msgs.append(
                Message(
                    content, dst_node_id=node, message_type=f"train.{ACTION}", group_id=str(task.round + 1)
                )
            )
        bytes_up = 0
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout_s):
            cid = owner.get(reply.metadata.src_node_id)
            if cid is None or cid in out:
                continue  # not a node of this round, or a duplicate: ignored
            if reply.has_error():
                out[cid] = ClientMessage(cid, failure=f"Flower error: {reply.error.reason}")
                continue
            bytes_up += record_bytes(reply.content)
            try:
                out[cid] = read_reply(reply.content, cid)
            except (MalformedFlowerMessage, KeyError, TypeError, ValueError) as err:
                out[cid] = ClientMessage(cid, failure=f"malformed reply: {err}")
        for task in tasks:
            if task.client_id not in out:
                reason = f"no reply from node {self.nodes[task.client_id]} within timeout_s={self.timeout_s}"
                log.warning("round %d: client %d: %s", task.round + 1, task.client_id, reason)
                out[task.client_id] = ClientMessage(task.client_id, failure=reason)
        self.last_stats = {"flower_bytes_down": float(bytes_down), "flower_bytes_up": float(bytes_up)}
        return [out[t.client_id] for t in tasks]

    def round_stats(self) -> dict[str, float]:
        """Bytes of the round's Flower messages as Flower counts them, beside the loop's ``bytes_up``/``bytes_down``
        (the codec's bytes): ``flower_bytes_down`` (sent), ``flower_bytes_up`` (received)."""
        return dict(self.last_stats)


__all__ = ["FlowerRunner", "record_bytes"]
