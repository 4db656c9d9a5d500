"""Server optimizers that run a real ``torch.optim`` optimizer on the global flat buffer.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021: the server treats ``-update`` (the negated mean client
delta) as a pseudo-gradient and takes one optimizer step with it. Where torch's optimizer computes exactly the
paper's update (SGD with momentum for FedAvgM, Adagrad with ``initial_accumulator_value = tau**2`` and
``eps = tau``), the server runs torch's own implementation on the flat buffer, so its state is torch's
``state_dict``. :class:`TorchServerOptimizer` is the shared mechanics; the rules live in
``server_momentum.py`` and ``server_adaptive.py``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.validation import need


def check_lr(owner: str, lr: float) -> float:
    """``lr`` as a float; ``ValueError`` naming ``lr`` unless it is a number > 0."""
    need(owner, _is_number(lr) and lr > 0, "lr", lr, "a number > 0")
    return float(lr)


def check_unit(owner: str, key: str, value: float) -> float:
    """``value`` as a float; ``ValueError`` naming ``key`` unless it lies in ``[0, 1)``."""
    need(owner, _is_number(value) and 0 <= value < 1, key, value, "a number in [0, 1)")
    return float(value)


def check_tau(owner: str, tau: float) -> float:
    """``tau`` as a float; ``ValueError`` naming ``tau`` unless it is a finite number > 0."""
    need(owner, _is_number(tau) and 0 < tau < float("inf"), "tau", tau, "a finite number > 0")
    return float(tau)


def _is_number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float)


class TorchServerOptimizer(ServerOptimizer):
    """A ``torch.optim`` optimizer stepping the global flat buffer with the pseudo-gradient ``-update``.

    Subclasses implement :meth:`make` (the optimizer for a one-tensor parameter list). The pseudo-gradient is
    written into one reused buffer, attached as the flat buffer's ``.grad`` for the step and detached after it.

    Example::

        class ServerRMSprop(TorchServerOptimizer):
            def make(self, params):
                return torch.optim.RMSprop(params, lr=1e-3)

        strategy = FedAvg(server_optimizer=ServerRMSprop())
    """

    def __init__(self) -> None:
        self.opt: torch.optim.Optimizer | None = None
        self._grad: Tensor | None = None

    def make(self, params: list[Tensor]) -> torch.optim.Optimizer:
        """The torch optimizer over ``params`` (one flat tensor)."""
        raise NotImplementedError

    def setup(self, global_flat: Tensor) -> None:
        """A fresh optimizer (empty state) over ``global_flat``."""
        self.opt = self.make([global_flat])
        self._grad = torch.empty_like(global_flat)

    def _ready(self) -> tuple[torch.optim.Optimizer, Tensor]:
        if self.opt is None or self._grad is None:
            raise RuntimeError(f"{type(self).__name__}.setup(global_flat) must be called before use")
        return self.opt, self._grad

    @torch.no_grad()
    def step(self, global_flat: Tensor, update: Tensor) -> None:
        """One optimizer step with ``global_flat.grad = -update``, in place."""
        opt, grad = self._ready()
        param = opt.param_groups[0]["params"][0]
        if param is not global_flat:
            raise RuntimeError(f"{type(self).__name__} was set up for another buffer; call setup(global_flat) again")
        torch.neg(update, out=grad)
        global_flat.grad = grad
        try:
            opt.step()
        finally:
            global_flat.grad = None

    def state_dict(self) -> dict[str, Any]:
        """A copy of the torch optimizer's ``state_dict`` (its state tensors and hyper-parameters)."""
        opt, _ = self._ready()
        return copy.deepcopy(opt.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a copy: the optimizer never shares tensors with the checkpoint)."""
        opt, _ = self._ready()
        opt.load_state_dict(copy.deepcopy(state))


__all__ = ["TorchServerOptimizer", "check_lr", "check_tau", "check_unit"]
