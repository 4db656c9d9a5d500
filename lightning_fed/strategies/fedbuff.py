"""FedBuff: asynchronous federated learning with buffered aggregation.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek & Huba, "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022. A fixed number ``C`` of clients (the concurrency) train at the same time, each on the global model it
was sent; the server folds every arriving update into a buffer and, at every ``K``-th arrival (the buffer size),
updates the global model and starts a new version::

    Delta = sum_i p_i * s(tau_i) * Delta_i          over the K buffered updates
    x    <- x + server_lr * Delta                  (the server optimizer; ServerSGD(lr=server_lr) by default)

with ``tau_i`` the update's staleness (how many versions the global model advanced since the client was sent its
model), ``s`` the staleness weight (the paper's ``1 / sqrt(1 + tau)``) and ``p_i = n_i / sum(n)`` the example
weights of the buffered updates, as in FedAvg. The paper's settings: buffer size ``K = 10`` (its ablations try
2 to 100), concurrency much larger than ``K`` (hundreds to a thousand clients in flight), staleness scaling
``1/sqrt(1 + tau)``, a tuned server learning rate; it reports reaching a target accuracy up to 3.3x faster than
synchronous FL and up to 2.5x faster than FedAsync (Xie et al. 2019, whose polynomial weight ``(1 + tau)^-a`` is
``staleness="polynomial"`` here).

The strategy is the server's arithmetic; which clients run when, and which replies a version folds, is the event
queue of :class:`~lightning_fed.systems.asynchronous.BufferedSchedule` (:meth:`FedBuff.schedule`), ordered by the
simulated finish times of the loop's :class:`~lightning_fed.systems.SimulatedClock`. Updates staler than
``max_staleness`` versions are decoded (the sender's codec state stays in step) and dropped, with the reason logged.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from lightning_fed.protocol import Instruction, Reply
from lightning_fed.strategies.aggregate import example_weights, flat_norm
from lightning_fed.strategies.aggregators import WeightedMean
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.validation import need

log = logging.getLogger("lightning_fed")

OWNER = "FedBuff"
STALENESS = ("sqrt", "constant", "polynomial")
"""Staleness weights: ``"sqrt"`` ``1/sqrt(1+tau)`` (FedBuff), ``"constant"`` 1, ``"polynomial"`` ``(1+tau)^-a``."""


def staleness_weight(kind: str, staleness: int, exponent: float = 0.5) -> float:
    """The weight ``s(tau)`` of an update ``staleness`` versions old.

    Example::

        staleness_weight("sqrt", 3)                 # 0.5
        staleness_weight("polynomial", 1, 1.0)      # 0.5
        staleness_weight("constant", 7)             # 1.0
    """
    if kind == "constant":
        return 1.0
    if kind == "sqrt":
        return 1.0 / math.sqrt(1.0 + staleness)
    if kind == "polynomial":
        return (1.0 + staleness) ** -exponent
    raise ValueError(f"{OWNER}: staleness={kind!r} is not allowed; staleness must be one of {STALENESS}")


class FedBuff(FedAvg):
    """Buffered asynchronous aggregation: ``concurrency`` clients in flight, a new global version every
    ``buffer_size`` arrivals, each update weighted by its staleness.

    Needs ``FedLoop(clock=SimulatedClock(...))``: the arrivals are ordered by simulated finish time. One round of
    the loop is one server version (``buffer_size`` arrivals); ``clients_per_round`` is not used.

    Example::

        loop = FedLoop(num_clients=20, rounds=100, strategy=FedBuff(concurrency=10, buffer_size=3, server_lr=1.0),
                       clock=SimulatedClock(profiles=ClientProfiles(preset="heterogeneous")))

    Args:
        concurrency: clients training at the same time (``C``); at least ``buffer_size`` and at most the loop's
            ``num_clients``.
        buffer_size: arrivals folded into one server update (``K``, the paper's 10), at least 1.
        staleness: the staleness weight, one of :data:`STALENESS` (default ``"sqrt"``, the paper's).
        staleness_exponent: ``a`` of ``"polynomial"``, > 0.
        max_staleness: drop updates more than this many versions old (logged); ``None``: keep every update.
        server_lr: the server step on the weighted update (shorthand for ``server_optimizer=ServerSGD(lr=...)``).
        server_optimizer: applies the update (``None``: ``ServerSGD(lr=server_lr)``); e.g. server momentum.
    """

    def __init__(
        self,
        *,
        concurrency: int = 10,
        buffer_size: int = 10,
        staleness: str = "sqrt",
        staleness_exponent: float = 0.5,
        max_staleness: int | None = None,
        server_lr: float = 1.0,
        server_optimizer: ServerOptimizer | None = None,
    ) -> None:
        need(OWNER, buffer_size >= 1, "buffer_size", buffer_size, "an integer >= 1")
        need(
            OWNER,
            concurrency >= buffer_size,
            "concurrency",
            concurrency,
            f"an integer >= buffer_size={buffer_size} (a version needs buffer_size arrivals from the clients in flight)",
        )
        need(OWNER, staleness in STALENESS, "staleness", staleness, f"one of {STALENESS}")
        need(
            OWNER,
            math.isfinite(staleness_exponent) and staleness_exponent > 0,
            "staleness_exponent",
            staleness_exponent,
            "a number > 0",
        )
        need(
            OWNER,
            max_staleness is None or max_staleness >= 0,
            "max_staleness",
            max_staleness,
            "an integer >= 0, or None",
        )
        super().__init__(server_lr=server_lr, aggregator=WeightedMean(), server_optimizer=server_optimizer)
        self.concurrency = concurrency
        self.buffer_size = buffer_size
        self.staleness = staleness
        self.staleness_exponent = float(staleness_exponent)
        self.max_staleness = max_staleness
        self._sent: dict[int, int] = {}  # the version each client in flight was sent

    def schedule(self) -> Any:
        """The event queue that runs ``concurrency`` clients and hands the loop ``buffer_size`` arrivals per
        version (:class:`~lightning_fed.systems.asynchronous.BufferedSchedule`)."""
        from lightning_fed.systems.asynchronous import BufferedSchedule

        return BufferedSchedule(self.concurrency, self.buffer_size, self.max_staleness)

    def configure_round(self, server_round: int, clients: list[int]) -> list[Instruction]:
        """The current global weights for every client dispatched at version ``server_round`` (noted: the
        staleness of its update is counted from it)."""
        for cid in clients:
            self._sent[cid] = server_round
        return super().configure_round(server_round, clients)

    def staleness_of(self, server_round: int, client_id: int) -> int:
        """Versions the global model advanced since ``client_id`` was sent its model."""
        return server_round - self._sent.get(client_id, server_round)

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """``x += server_lr * sum_i p_i * s(tau_i) * delta_i``; logs the staleness of the folded updates."""
        spec, flat = self._require_setup()
        assert self._acc is not None and self._tmp is not None
        taus = [self.staleness_of(server_round, r.client_id) for r in replies]
        p = example_weights([r.num_examples for r in replies])
        weights = [
            pi * staleness_weight(self.staleness, t, self.staleness_exponent) for pi, t in zip(p, taus)
        ]
        update = self.aggregator.aggregate_payloads(
            self._acc, spec, (r.payload for r in replies), weights, self._tmp
        )
        self.server_optimizer.step(flat, update)
        return {
            "update_norm": flat_norm(update),
            "staleness_mean": sum(taus) / len(taus),
            "staleness_max": float(max(taus)),
            "staleness_weight_sum": sum(weights),
        }

    def state_dict(self) -> dict[str, Any]:
        """FedAvg's state and the version each client in flight was sent."""
        return {**super().state_dict(), "sent": [[c, v] for c, v in sorted(self._sent.items())]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self._sent = {int(c): int(v) for c, v in state["sent"]}


__all__ = ["STALENESS", "FedBuff", "staleness_weight"]
