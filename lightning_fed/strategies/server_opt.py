"""Server optimizers: how an aggregated update is applied to the global flat weights.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, treat the aggregated client delta as a
pseudo-gradient (with the sign of a descent step) that a server optimizer applies to the global model.
:class:`ServerSGD` is the plain step ``global += lr * update`` (``lr = 1``: FedAvg). Stateful rules are new subclasses
in new files, their state checkpointed by the strategy that owns them: ``server_momentum.py`` (FedAvgM),
``server_adaptive.py`` (FedAdagrad, FedAdam, FedYogi), on top of ``server_torch.py`` (a ``torch.optim`` optimizer
stepping the flat buffer).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_fed.strategies.aggregate import apply_update_
from lightning_fed.validation import CheckedArguments


class ServerOptimizer(CheckedArguments):
    """Base class of server update rules, working in place on flat contiguous float32 buffers.

    The owning strategy calls :meth:`setup` with its global flat buffer whenever that buffer is (re)built: at
    the start of a run and when the model's structure changes (pruning), which drops any state sized to the
    old layout. Then, once per round, :meth:`step` applies the aggregated update.

    Example::

        class ServerMomentum(ServerOptimizer):
            def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
                self.lr, self.momentum, self.buf = lr, momentum, None

            def setup(self, global_flat):
                self.buf = torch.zeros_like(global_flat)

            def step(self, global_flat, update):
                global_flat.add_(self.buf.mul_(self.momentum).add_(update), alpha=self.lr)

            def state_dict(self):
                return {"buf": self.buf.clone()}

            def load_state_dict(self, state):
                self.buf.copy_(state["buf"])

        strategy = FedAvg(server_optimizer=ServerMomentum(momentum=0.9))
    """

    def setup(self, global_flat: Tensor) -> None:
        """(Re)initialise the state for a global buffer shaped like ``global_flat`` (stateless: nothing)."""

    def step(self, global_flat: Tensor, update: Tensor) -> None:
        """Apply ``update`` (the aggregated client delta) to ``global_flat`` in place."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint: tensors, numbers, strings, lists and dicts only (loaded with
        ``weights_only=True``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (called after :meth:`setup`)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ServerSGD(ServerOptimizer):
    """The plain server step ``global += lr * update``; ``lr = 1`` is FedAvg. Stateless.

    Example::

        strategy = FedAvg(server_optimizer=ServerSGD(lr=0.5))  # same as FedAvg(server_lr=0.5)

    Args:
        lr: server learning rate (> 0).
    """

    def __init__(self, lr: float = 1.0) -> None:
        if not lr > 0:
            raise ValueError(f"ServerSGD: lr={lr!r} is not allowed; lr must be a number > 0")
        self.lr = float(lr)

    def step(self, global_flat: Tensor, update: Tensor) -> None:
        """``global_flat += lr * update`` in place."""
        apply_update_(global_flat, update, self.lr)

    def __repr__(self) -> str:
        return f"ServerSGD(lr={self.lr})"


def resolve_server_optimizer(owner: str, server_optimizer: ServerOptimizer | None,
                             server_lr: float = 1.0) -> ServerOptimizer:
    """``server_optimizer``, or ``ServerSGD(lr=server_lr)`` when it is ``None``.

    Raises:
        ValueError: ``server_optimizer`` is not a :class:`ServerOptimizer`, or both it and a ``server_lr``
            other than 1 are given (the learning rate then belongs to the optimizer).
    """
    if server_optimizer is None:
        return ServerSGD(lr=server_lr)
    if isinstance(server_optimizer, ServerOptimizer):
        if server_lr != 1.0:
            raise ValueError(
                f"{owner}: server_lr={server_lr} together with server_optimizer={server_optimizer!r} is not "
                f"allowed; set the learning rate on the server optimizer and leave server_lr at 1.0"
            )
        return server_optimizer
    raise ValueError(
        f"{owner}: server_optimizer={server_optimizer!r} is not allowed; server_optimizer must be an instance "
        f"of lightning_fed.strategies.ServerOptimizer (e.g. ServerSGD(lr=1.0)) or None for the plain step"
    )


__all__ = ["ServerOptimizer", "ServerSGD", "resolve_server_optimizer"]
