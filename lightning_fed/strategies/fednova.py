"""FedNova: normalised averaging for clients that ran different numbers of local steps.

Wang, Liu, Liang, Joshi & Poor, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", NeurIPS 2020. Averaging the raw deltas of clients that ran ``tau_i`` local steps weights each
client's objective by ``p_i * tau_i``: the fixed point is a different objective whenever the ``tau_i`` differ
(stragglers, partial work, unequal shards under whole local epochs). FedNova divides each delta by the norm of the
client's gradient-accumulation vector ``a_i`` and rescales by an effective step count::

    d_i = (y_i - x) / ||a_i||_1                       the client's normalised (averaged) update
    tau_eff = sum_i p_i * ||a_i||_1
    x <- x + tau_eff * sum_i p_i * d_i                 (then the server optimizer, ServerSGD(lr=1) by default)

with ``p_i = n_i / sum(n)`` over the round's replies (example weights, as FedAvg). ``||a_i||_1`` depends on the
local solver (the paper's Section 4 and Appendix):

- plain SGD: ``||a_i||_1 = tau_i``;
- SGD with momentum ``rho`` (PyTorch's ``momentum``, no dampening): ``||a_i||_1 = (tau_i - rho * (1 - rho^tau_i) /
  (1 - rho)) / (1 - rho)``, the sum of how much each gradient moved the weights after ``tau_i`` steps.

``tau_i`` is the number of optimizer steps the client reports (``Reply.local_steps``; the server rejects a count
above the instruction's ``max_steps``). Set ``momentum`` to the clients' optimizer momentum: the server cannot see
it. A reply with ``local_steps == 0`` changed nothing and is left out of the average. With every ``tau_i`` equal,
FedNova is FedAvg. The paper's experiments: non-IID CIFAR-10 with 16 clients, local epochs drawn per round
uniformly from 2 to 5, SGD lr 0.02 with and without momentum 0.9.
"""

from __future__ import annotations

import logging

from lightning_fed.protocol import Instruction, Reply
from lightning_fed.strategies.aggregate import example_weights, flat_norm
from lightning_fed.strategies.aggregators import WeightedMean
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.fedprox import capped, check_max_steps
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.validation import need

log = logging.getLogger("lightning_fed")


def accumulation_norm(steps: int, momentum: float = 0.0) -> float:
    """``||a_i||_1`` of FedNova for a client that ran ``steps`` optimizer steps of SGD with ``momentum``.

    Example::

        accumulation_norm(4)          # 4.0
        accumulation_norm(2, 0.5)     # 2.5: the first gradient moved the weights 1.5 times, the second once
    """
    if momentum == 0:
        return float(steps)
    return (steps - momentum * (1 - momentum**steps) / (1 - momentum)) / (1 - momentum)


def fednova_weights(
    num_examples: list[int], steps: list[int], momentum: float = 0.0
) -> tuple[list[float], float]:
    """The weight of each reply's raw delta in FedNova's update, ``p_i * tau_eff / ||a_i||_1``, and ``tau_eff``.
    Replies with 0 steps get weight 0 and no share of ``p``.

    Raises:
        ValueError: no reply ran a step.
    """
    live = [i for i, s in enumerate(steps) if s > 0]
    if not live:
        raise ValueError("FedNova: no reply ran a local step")
    p = example_weights([num_examples[i] for i in live])
    norms = [accumulation_norm(steps[i], momentum) for i in live]
    tau_eff = sum(pi * a for pi, a in zip(p, norms))
    weights = [0.0] * len(steps)
    for i, pi, a in zip(live, p, norms):
        weights[i] = pi * tau_eff / a
    return weights, tau_eff


class FedNova(FedAvg):
    """FedNova: each client's delta normalised by its local steps, then scaled by the effective step count.

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=100, local_epochs=5,
                       strategy=FedNova(momentum=0.9), callbacks=[Stragglers(fraction=0.5, mode="partial")])
        loop.fit(MNIST1DCNN(optimizer="sgd", momentum=0.9), MNIST1DDataModule())

    Args:
        momentum: the clients' SGD momentum ``rho`` in ``[0, 1)`` (0: plain SGD); it must match the module's
            optimizer.
        max_steps: a cap on every client's local optimizer steps per round (``Instruction.config["max_steps"]``);
            ``None``: whole local epochs.
        server_lr: the server step on the normalised update (the paper: 1); shorthand for
            ``server_optimizer=ServerSGD(lr=server_lr)``.
        server_optimizer: applies the normalised update (``None``: ``ServerSGD(lr=server_lr)``).
    """

    def __init__(
        self,
        *,
        momentum: float = 0.0,
        max_steps: int | None = None,
        server_lr: float = 1.0,
        server_optimizer: ServerOptimizer | None = None,
    ) -> None:
        need(
            "FedNova",
            0 <= momentum < 1,
            "momentum",
            momentum,
            "a number in [0, 1) (the clients' SGD momentum)",
        )
        check_max_steps("FedNova", max_steps)
        self.momentum = float(momentum)
        self.max_steps = max_steps
        super().__init__(server_lr=server_lr, aggregator=WeightedMean(), server_optimizer=server_optimizer)

    def configure_round(self, server_round: int, clients: list[int]) -> list[Instruction]:
        """FedAvg's shared global weights; ``max_steps`` in every config when set."""
        return capped(super().configure_round(server_round, clients), self.max_steps)

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """``x += server_lr * tau_eff * sum_i p_i * delta_i / ||a_i||_1``; logs ``tau_eff``. A round whose replies
        all ran 0 steps changes nothing."""
        spec, flat = self._require_setup()
        assert self._acc is not None and self._tmp is not None
        steps = [r.local_steps for r in replies]
        if not any(s > 0 for s in steps):
            log.warning(
                "round %d: FedNova: no reply ran a local step; the global model is unchanged",
                server_round + 1,
            )
            return {"tau_eff": 0.0}
        weights, tau_eff = fednova_weights([r.num_examples for r in replies], steps, self.momentum)
        live = [(r, w) for r, w in zip(replies, weights) if w > 0]
        update = self.aggregator.aggregate_payloads(
            self._acc, spec, (r.payload for r, _ in live), [w for _, w in live], self._tmp
        )
        self.server_optimizer.step(flat, update)
        return {"update_norm": flat_norm(update), "tau_eff": tau_eff}


__all__ = ["FedNova", "accumulation_norm", "fednova_weights"]
