"""Clients in parallel on several processes: each rank trains a part of the round's clients, the reply
messages (the codec's bytes) are exchanged, and every rank continues with all of them in the plan's order.

Because every rank receives every message in the order a one-process run produces them, the server side that
each rank replays (decode with its sender store, validate, aggregate) is the same computation as in one
process: the global weights are bit-identical for any number of ranks on CPU. A client's local training
depends only on its task, its stored state and its (seed, round, client) random streams, not on which rank
runs it.

Load balance: clients are assigned longest-processing-time first (Graham 1969) on a cost model, the client's
training examples x local epochs (capped by an instruction's ``max_steps``) x its model's parameter count (tiers
differ in size), so ranks finish together instead of round-robin.
"""

from __future__ import annotations

import heapq
import json
import logging
import struct
import time
from collections.abc import Callable, Sequence

from lightning_fed.codecs.base import DecodeArgs
from lightning_fed.protocol import ClientMessage, ClientTask, Payload
from lightning_fed.ranks import Ranks
from lightning_fed.runner import ClientRunner, ClientWork

log = logging.getLogger("lightning_fed")

_HEADER = struct.Struct("<Q")


def assign_lpt(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank of each task: longest processing time first, each task to the least-loaded rank (ties: the
    earlier task first, the lower rank). Deterministic, so every rank computes the same assignment."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(0.0, r) for r in range(world_size)]
    owner = [0] * len(costs)
    for i in order:
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owner


def pack_messages(messages: Sequence[ClientMessage], busy_s: float) -> bytes:
    """One rank's reply messages as bytes: a JSON header (sender, example count, metrics, failure, sizes,
    timings, local steps) and the messages' bytes unchanged after it. No pickle: a rank only ever reads bytes and JSON."""
    head = {"busy_s": busy_s, "messages": [
        {"client_id": m.client_id, "num_examples": m.num_examples, "metrics": m.metrics, "failure": m.failure,
         "raw_bytes": m.raw_bytes, "encode_s": m.encode_s, "decode_s": m.decode_s, "local_steps": m.local_steps,
         "size": len(m.message)}
        for m in messages]}
    text = json.dumps(head).encode()
    return b"".join([_HEADER.pack(len(text)), text, *(m.message for m in messages)])


def unpack_messages(blob: bytes) -> tuple[list[ClientMessage], float]:
    """The messages and busy seconds :func:`pack_messages` packed."""
    (n,) = _HEADER.unpack_from(blob)
    head = json.loads(blob[_HEADER.size: _HEADER.size + n].decode())
    pos = _HEADER.size + n
    out = []
    for m in head["messages"]:
        size = int(m.pop("size"))
        out.append(ClientMessage(message=blob[pos: pos + size], **m))
        pos += size
    if pos != len(blob):
        raise ValueError(f"packed messages: {len(blob) - pos} trailing bytes")
    return out, float(head["busy_s"])


class RankRunner(ClientRunner):
    """Splits a round's clients among the ranks (:func:`assign_lpt`) and exchanges their reply messages.

    Every rank decodes every distinct downlink message of the round in order (so the receivers' decoder state
    is the same on every rank, as in one process) but trains only its own clients.

    Args:
        ranks: the run's processes.
        cost: a task's cost for the load balance (default: examples x local epochs x parameters).
    """

    def __init__(self, ranks: Ranks, cost: Callable[[ClientTask, ClientWork], float] | None = None) -> None:
        self.ranks = ranks
        self.cost = cost if cost is not None else task_cost
        self.last_busy: list[float] = []
        self.last_owner: list[int] = []

    def run(self, tasks: list[ClientTask], work: ClientWork) -> list[ClientMessage]:
        """Train this rank's clients, exchange messages; every task's message, in the order of ``tasks``."""
        owner = assign_lpt([self.cost(t, work) for t in tasks], self.ranks.world_size)
        self.last_owner = owner
        decoded: dict[int, Payload] = {}
        mine: list[ClientMessage] = []
        t_busy = 0.0
        for task, rank in zip(tasks, owner, strict=True):
            if work.downlink_codec.per_receiver:  # only the owner decodes: the message is for that client alone
                if rank == self.ranks.rank:
                    t = time.perf_counter()
                    mine.append(work(task, None))
                    t_busy += time.perf_counter() - t
                continue
            key = id(task.message)
            decode_s = 0.0
            if key not in decoded:
                t = time.perf_counter()
                decoded[key] = work.downlink_codec.decode(task.message, work.downlink_state,
                                                          DecodeArgs(round=task.round, spec=task.spec))
                decode_s = time.perf_counter() - t
            if rank != self.ranks.rank:
                continue
            t = time.perf_counter()
            msg = work(task, decoded[key])
            t_busy += time.perf_counter() - t
            msg.decode_s = decode_s
            mine.append(msg)
        parts = self.ranks.gather(pack_messages(mine, t_busy))
        by_rank = [unpack_messages(p) for p in parts]
        self.last_busy = [busy for _, busy in by_rank]
        queues = [iter(msgs) for msgs, _ in by_rank]
        out = [next(queues[rank]) for rank in owner]
        for task, msg in zip(tasks, out, strict=True):
            if msg.client_id != task.client_id:
                raise RuntimeError(f"rank exchange out of order: expected client {task.client_id}, got {msg.client_id}")
        return out

    def round_stats(self) -> dict[str, float]:
        """Each rank's busy seconds (its clients' work) and waiting seconds (until the slowest rank was done)."""
        if not self.last_busy:
            return {}
        slowest = max(self.last_busy)
        out: dict[str, float] = {}
        for r, busy in enumerate(self.last_busy):
            out[f"rank{r}_busy_s"] = busy
            out[f"rank{r}_wait_s"] = slowest - busy
        return out


def task_cost(task: ClientTask, work: ClientWork) -> float:
    """Cost model of one client's round: training examples x local epochs x parameters of its model; the examples
    of at most ``max_steps`` optimizer steps when the instruction caps its work (partial work)."""
    epochs = int(task.config.get("local_epochs", work.local_epochs))
    module = work.strategy.client_module(task.client_id, work.view.lightning_module)
    params = sum(p.numel() for p in module.parameters())
    samples = len(work.shards[task.client_id]) * epochs
    cap = task.config.get("max_steps")
    if cap is not None:
        per_step = (work.template.batch_size or 1) * work.view.accumulate_grad_batches
        samples = min(samples, int(cap) * per_step)
    return float(samples * max(params, 1))


__all__ = ["RankRunner", "assign_lpt", "pack_messages", "task_cost", "unpack_messages"]
