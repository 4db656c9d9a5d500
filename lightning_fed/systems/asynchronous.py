"""Asynchronous rounds on the simulated clock: an event queue of the clients in flight, ordered by finish time.

A round of the loop is one server version. At its start the slots freed by the previous version's arrivals are
refilled: new clients, drawn (seeded by ``(seed, version)``) from those not in flight, are sent the current global
model and, since a client's reply depends only on the model it started from, trained at once (through the loop's
client runner: with several processes the version's dispatches train in parallel). Each reply is kept as the bytes
the client sent, with its simulated finish time (dispatch time + downlink + compute + uplink, the
:class:`~lightning_fed.systems.SimulatedClock`'s cost model) and the version it started from. The server then pops
arrivals in time order (ties broken by client id) until ``buffer_size`` usable updates have arrived; those replies
are decoded, validated and aggregated exactly as a synchronous round's. A client's failure or a profile dropout
(noticed when its download would have ended) frees its slot without counting; an update more than
``max_staleness`` versions old is decoded (its sender's codec state stays in step) and dropped, with the reason
logged.

A freed slot is refilled when the version ends, from the new global model, so every dispatch of a version starts
from one model. The queue holds plain bytes and numbers: it is checkpointed with the run, and a resumed run
continues the same stream of events.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lightning_fed.protocol import ClientMessage, Instruction
from lightning_fed.seeding import derive_seed
from lightning_fed.systems.clock import ClientTime, SimulatedClock, transfer_seconds
from lightning_fed.validation import need

log = logging.getLogger("lightning_fed")

OWNER = "FedLoop"
DISPATCH_STREAM = 0x6662  # (seed, "fb", version) draws the clients dispatched at a version


@dataclass
class Exchange:
    """What one version's events hand the server.

    Attributes:
        clients: the clients whose replies (or failures) arrived, in arrival order.
        instructions: what each of them was sent (its config; the server checks the reply against it).
        messages: their messages, in arrival order.
        discard: replies to decode and leave out (client id -> logged reason): too stale.
        sim: the version's clock metrics.
        down: downlink counters of the version's dispatches (``bytes_down``, ``raw_bytes_down``, ``encode_s``).
    """

    clients: list[int]
    instructions: list[Instruction]
    messages: list[ClientMessage]
    discard: dict[int, str]
    sim: dict[str, float]
    down: dict[str, float]


@dataclass
class _InFlight:
    """A dispatched client: its reply (already computed) and when it arrives."""

    arrive_s: float
    client_id: int
    version: int
    message: ClientMessage
    config: dict[str, Any]
    time: ClientTime

    def key(self) -> tuple[float, int]:
        return (self.arrive_s, self.client_id)

    def __lt__(self, other: _InFlight) -> bool:
        return self.key() < other.key()

    def state(self) -> dict[str, Any]:
        m = self.message
        return {
            "arrive_s": self.arrive_s,
            "client_id": self.client_id,
            "version": self.version,
            "config": self.config,
            "time": asdict(self.time),
            "message": torch.frombuffer(bytearray(m.message), dtype=torch.uint8)
            if m.message
            else torch.zeros(0, dtype=torch.uint8),
            "num_examples": m.num_examples,
            "metrics": dict(m.metrics),
            "failure": m.failure,
            "raw_bytes": m.raw_bytes,
            "local_steps": m.local_steps,
        }  # the measured encode/decode seconds stay out: wall time differs between processes and runs

    @staticmethod
    def from_state(s: dict[str, Any]) -> _InFlight:
        msg = ClientMessage(
            int(s["client_id"]),
            s["message"].numpy().tobytes(),
            int(s["num_examples"]),
            dict(s["metrics"]),
            s["failure"],
            int(s["raw_bytes"]),
            local_steps=int(s["local_steps"]),
        )
        return _InFlight(
            float(s["arrive_s"]),
            int(s["client_id"]),
            int(s["version"]),
            msg,
            dict(s["config"]),
            ClientTime(**s["time"]),
        )


Dispatch = Callable[[int, list[int]], tuple[Any, list[ClientMessage], list[ClientMessage]]]
"""The loop's dispatch: (version, clients) -> (the plan, the replies of those who trained, the failures of those
who did not, e.g. dropouts)."""


class BufferedSchedule:
    """The event queue of buffered asynchronous aggregation (:class:`~lightning_fed.strategies.FedBuff` makes it).

    Per version the history gets ``sim_round_s`` (simulated seconds since the previous version), ``sim_time_s``,
    ``sim_staleness_mean`` / ``sim_staleness_max`` (of the updates folded), ``sim_stale`` (updates dropped as too
    stale), ``sim_dropouts``, ``sim_dispatched`` and ``sim_in_flight``; every arrival is a row of ``clock.csv``
    (``round`` the version that received it, ``start_s`` its dispatch time, ``staleness``).

    Args:
        concurrency: clients in flight.
        buffer_size: usable arrivals per version.
        max_staleness: drop updates more than this many versions old; ``None``: none.
    """

    def __init__(self, concurrency: int, buffer_size: int, max_staleness: int | None = None) -> None:
        self.concurrency = concurrency
        self.buffer_size = buffer_size
        self.max_staleness = max_staleness
        self.clock: SimulatedClock | None = None
        self.num_clients = 0
        self.seed = 0
        self.queue: list[_InFlight] = []

    def check(self, num_clients: int, clock: SimulatedClock | None) -> None:
        """Refuse a loop this schedule cannot run (FedLoop calls it at construction)."""
        need(
            OWNER,
            clock is not None,
            "clock",
            clock,
            "a SimulatedClock: asynchronous aggregation orders the replies by simulated finish time",
        )
        assert clock is not None
        need(
            OWNER,
            clock.deadline is None,
            "clock",
            f"SimulatedClock(deadline={clock.deadline})",
            "a SimulatedClock without a deadline under asynchronous aggregation (no round waits for a deadline)",
        )
        need(
            OWNER,
            clock.keep_first is None,
            "clock",
            f"SimulatedClock(keep_first={clock.keep_first})",
            "a SimulatedClock without keep_first under asynchronous aggregation (buffer_size plays its part)",
        )
        need(
            OWNER,
            self.concurrency <= num_clients,
            "num_clients",
            num_clients,
            f">= the strategy's concurrency={self.concurrency} (clients in flight at once)",
        )

    def bind(self, clock: SimulatedClock, num_clients: int, seed: int) -> None:
        """Start a run: nothing in flight, at the clock's time 0."""
        self.clock, self.num_clients, self.seed, self.queue = clock, num_clients, seed, []

    def sample(self, version: int, count: int) -> list[int]:
        """``count`` clients not in flight, drawn without replacement (seeded by ``(seed, version)``), sorted."""
        busy = {e.client_id for e in self.queue}
        idle = [c for c in range(self.num_clients) if c not in busy]
        g = torch.Generator().manual_seed(derive_seed(self.seed, DISPATCH_STREAM, version))
        return sorted(idle[i] for i in torch.randperm(len(idle), generator=g)[:count].tolist())

    def exchange(self, version: int, dispatch: Dispatch) -> Exchange:
        """One version: refill the free slots from the current model, then pop arrivals until ``buffer_size``
        usable updates have come (or nothing is left in flight)."""
        clock = self.clock
        assert clock is not None, "bind() first"
        start = clock.time_s
        clients = self.sample(version, self.concurrency - len(self.queue))
        plan, messages, absent = dispatch(version, clients)
        times = clock.take_dispatched()
        for msg in sorted(messages + absent, key=lambda m: m.client_id):
            t = times[msg.client_id]
            t.start_s = start
            if t.status != "dropout":
                if msg.failure is not None:
                    t.status = "failed"
                t.bytes_up = len(msg.message)
                t.up_s = transfer_seconds(t.bytes_up, clock.table[msg.client_id].up_bps)
                t.finish_s = t.down_s + t.compute_s + t.up_s
            else:  # noticed when its download would have ended
                t.finish_s = t.down_s
            config = next((dict(tk.config) for tk in plan.tasks if tk.client_id == msg.client_id), {})
            heapq.heappush(self.queue, _InFlight(start + t.finish_s, msg.client_id, version, msg, config, t))
        arrived: list[_InFlight] = []
        discard: dict[int, str] = {}
        folded: list[int] = []
        while len(folded) < self.buffer_size and self.queue:
            e = heapq.heappop(self.queue)
            arrived.append(e)
            e.time.round, e.time.staleness = version, version - e.version
            if e.message.failure is not None:
                continue
            if self.max_staleness is not None and e.time.staleness > self.max_staleness:
                e.time.status = "stale"
                discard[e.client_id] = (
                    f"client {e.client_id}'s update is {e.time.staleness} versions old, more "
                    f"than max_staleness={self.max_staleness}"
                )
                continue
            folded.append(e.time.staleness)
        end = arrived[-1].arrive_s if arrived else start
        clock.time_s = end
        clock.rows.extend(e.time for e in arrived)
        sim = {
            "sim_round_s": end - start,
            "sim_time_s": end,
            "sim_staleness_mean": sum(folded) / len(folded) if folded else 0.0,
            "sim_staleness_max": float(max(folded, default=0)),
            "sim_stale": len(discard),
            "sim_dropouts": sum(e.time.status == "dropout" for e in arrived),
            "sim_dispatched": len(clients),
            "sim_in_flight": len(self.queue),
        }
        return Exchange(
            clients=[e.client_id for e in arrived],
            instructions=[Instruction(e.client_id, {}, e.config) for e in arrived],
            messages=[e.message for e in arrived],
            discard=discard,
            sim=sim,
            down=dict(plan.stats),
        )

    def state_dict(self) -> dict[str, Any]:
        """The clients in flight: their reply bytes, arrival times, start versions and clock rows."""
        return {"queue": [e.state() for e in sorted(self.queue)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.queue = [_InFlight.from_state(s) for s in state["queue"]]
        heapq.heapify(self.queue)


__all__ = ["BufferedSchedule", "Exchange"]
