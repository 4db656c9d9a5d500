"""FedProx: a proximal term that keeps local training near the global model, and partial work from stragglers.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated Optimization in Heterogeneous Networks", MLSys 2020.
Client ``k`` minimises, starting from the global weights ``w^t``::

    h_k(w) = F_k(w) + mu / 2 * ||w - w^t||^2        so every gradient gets  + mu * (w - w^t)

and may stop early (an "inexact" solution): a straggler's partial work is aggregated instead of dropped. The
server keeps FedAvg's example-weighted mean of the returned models. ``mu = 0`` is FedAvg that keeps partial
work (the paper's "FedProx (mu=0)").

Paper settings (Section 5 and its appendix): 10 devices sampled per round, ``E = 20`` local epochs, batch 10, plain
SGD; ``mu`` chosen from {0.001, 0.01, 0.1, 1}, best ``mu = 1`` on Synthetic, MNIST and FEMNIST, ``0.001`` on
Shakespeare, ``0.01`` on Sent140; learning rate 0.01 on Synthetic (multinomial logistic regression, 200 rounds).
Systems heterogeneity: a fraction (0 %, 50 %, 90 %) of each round's devices are stragglers that run a number of
epochs drawn uniformly below ``E`` (:class:`~lightning_fed.callbacks.Stragglers`).

The term is added to the gradient in ``on_before_optimizer_step`` (:class:`FedProxClient`, a Lightning callback),
once per optimizer step: the gradient of ``h_k`` whatever the optimizer, gradient accumulation or clipping that
follows, and the module's ``training_step`` is unchanged. ``w^t`` is what the model holds when local training
starts (``on_train_start``): the received global weights inside FedLoop, the initial weights under a plain
``lightning.Trainer``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.protocol import Instruction
from lightning_fed.strategies.aggregators import Aggregator
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.validation import need


def check_max_steps(owner: str, max_steps: int | None) -> None:
    """Raise ``ValueError`` (naming ``owner``) unless ``max_steps`` is ``None`` or an int >= 1."""
    need(
        owner,
        max_steps is None
        or (isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps >= 1),
        "max_steps",
        max_steps,
        "an int >= 1 or None (no cap)",
    )


def capped(instructions: list[Instruction], max_steps: int | None) -> list[Instruction]:
    """Put ``max_steps`` into every instruction's config (a cap already there and lower is kept)."""
    if max_steps is not None:
        for instr in instructions:
            cap = instr.config.get("max_steps")
            instr.config["max_steps"] = max_steps if cap is None else min(cap, max_steps)
    return instructions


class FedProxClient(FedCallback):
    """Client side of FedProx: adds ``mu * (w - w_start)`` to every trainable parameter's gradient before each
    optimizer step, ``w_start`` being the weights local training started from.

    A Lightning callback: it works under a plain ``lightning.Trainer`` as inside FedLoop (installed there by
    :class:`FedProx`, or given in ``callbacks=`` with any strategy).

    Example::

        trainer = L.Trainer(max_epochs=2, callbacks=[FedProxClient(mu=0.1)])   # stays near the initial weights
        loop = FedLoop(strategy=FedProx(mu=1.0))                              # installs FedProxClient(mu=1.0)

    Args:
        mu: the proximal coefficient, >= 0 (0: no term).
    """

    def __init__(self, mu: float = 0.01) -> None:
        need(
            "FedProxClient",
            mu >= 0,
            "mu",
            mu,
            "a number >= 0",
        )
        self.mu = float(mu)
        self._anchor: dict[int, Tensor] = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Remember the starting weights ``w_start`` of every trainable parameter."""
        self._anchor = {}
        if self.mu == 0:
            return
        module = trainer.lightning_module  # the working module (tiers: not necessarily pl_module)
        self._anchor = {id(p): p.detach().clone() for p in module.parameters() if p.requires_grad}

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer
    ) -> None:
        """``g <- g + mu * (w - w_start)`` for every parameter this optimizer steps (a parameter without a gradient
        gets the term alone)."""
        if not self._anchor:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                start = self._anchor.get(id(p))
                if start is None:
                    continue
                if p.grad is None:
                    p.grad = (p.detach() - start).mul_(self.mu)
                else:
                    p.grad.add_(p.detach() - start, alpha=self.mu)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Drop the starting weights (no reference to the model after local training)."""
        self._anchor = {}

    def __repr__(self) -> str:
        return f"FedProxClient(mu={self.mu})"


class FedProx(FedAvg):
    """FedProx: FedAvg's example-weighted mean with the proximal term on the clients (:class:`FedProxClient`).

    Example::

        loop = FedLoop(num_clients=30, clients_per_round=10, rounds=200, local_epochs=20, strategy=FedProx(mu=1.0),
                       callbacks=[Stragglers(fraction=0.9, mode="partial")])

    Args:
        mu: the proximal coefficient, >= 0 (the paper: 1 on Synthetic and MNIST; 0 keeps FedAvg's local problem).
        max_steps: a cap on every client's local optimizer steps per round (``Instruction.config["max_steps"]``);
            ``None``: whole local epochs.
        server_lr: see :class:`~lightning_fed.strategies.FedAvg` (the paper: 1).
        aggregator: see :class:`~lightning_fed.strategies.FedAvg`.
        server_optimizer: see :class:`~lightning_fed.strategies.FedAvg`.
    """

    def __init__(
        self,
        *,
        mu: float = 0.01,
        max_steps: int | None = None,
        server_lr: float = 1.0,
        aggregator: Aggregator | None = None,
        server_optimizer: ServerOptimizer | None = None,
    ) -> None:
        check_max_steps("FedProx", max_steps)
        self.client = FedProxClient(mu)
        self.mu = self.client.mu
        self.max_steps = max_steps
        super().__init__(server_lr=server_lr, aggregator=aggregator, server_optimizer=server_optimizer)

    def client_callbacks(self) -> list[Any]:
        """The proximal term on the clients."""
        return [self.client]

    def configure_round(self, server_round: int, clients: list[int]) -> list[Instruction]:
        """FedAvg's shared global weights; ``max_steps`` in every config when set."""
        return capped(super().configure_round(server_round, clients), self.max_steps)


__all__ = ["FedProx", "FedProxClient", "capped", "check_max_steps"]
