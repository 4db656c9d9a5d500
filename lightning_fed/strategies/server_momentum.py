"""FedAvgM: server momentum on the averaged client delta.

Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification",
2019 (FedAvgM); Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (the FedOpt framing). With ``Δ_t`` the
aggregated client delta::

    v_t = momentum * v_{t-1} + Δ_t          (v_{-1} = 0)
    x_{t+1} = x_t + lr * v_t

which is ``torch.optim.SGD(lr, momentum, dampening=0)`` stepped with the pseudo-gradient ``-Δ_t`` (torch's first
step sets its buffer to the gradient itself, as ``v_{-1} = 0`` does here): :class:`ServerMomentum` runs torch's
own SGD on the global flat buffer. Defaults follow Hsu et al.: ``lr = 1``, ``momentum = 0.9``.

With ``nesterov=True`` the step is torch's Nesterov form, ``x_{t+1} = x_t + lr * (Δ_t + momentum * v_t)``. With
``lr = 1`` the model it broadcasts is then FedACG's lookahead point (Kim, Kim and Han, "Communication-Efficient
Federated Learning with Accelerated Client Gradient", CVPR 2024): the server sends ``θ + λ m`` and keeps
``m = λ m + Δ``, ``θ = θ + m`` with ``λ = momentum``. Writing ``x`` for the point sent, ``x_{t+1} = x_t + (1 + λ) Δ_t
+ λ² m_{t-1}``, which is torch's Nesterov step. FedACG's clients add a proximal pull to the point they received:
that is :class:`~lightning_fed.strategies.FedProx` with this server optimizer (``recipes/mnist1d/fedacg.yaml``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_fed.strategies.server_torch import TorchServerOptimizer, check_lr, check_unit
from lightning_fed.validation import need


class ServerMomentum(TorchServerOptimizer):
    """FedAvgM's server step: heavy-ball momentum on the pseudo-gradient (torch's ``SGD``).

    Example::

        strategy = FedAvg(server_optimizer=ServerMomentum(lr=1.0, momentum=0.9))   # FedAvgM

    Args:
        lr: server learning rate (> 0; 1.0 with ``momentum=0`` is FedAvg).
        momentum: momentum factor in ``[0, 1)``.
        nesterov: torch's Nesterov momentum (module docstring); needs ``momentum > 0``.
    """

    def __init__(self, lr: float = 1.0, momentum: float = 0.9, nesterov: bool = False) -> None:
        super().__init__()
        self.lr = check_lr("ServerMomentum", lr)
        self.momentum = check_unit("ServerMomentum", "momentum", momentum)
        need(
            "ServerMomentum",
            not nesterov or self.momentum > 0,
            "nesterov",
            nesterov,
            "False when momentum is 0 (Nesterov needs momentum > 0)",
        )
        self.nesterov = nesterov

    def make(self, params: list[Tensor]) -> torch.optim.Optimizer:
        """``torch.optim.SGD(params, lr, momentum, nesterov)`` (no dampening, no weight decay)."""
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)

    def __repr__(self) -> str:
        tail = ", nesterov=True" if self.nesterov else ""
        return f"ServerMomentum(lr={self.lr}, momentum={self.momentum}{tail})"


__all__ = ["ServerMomentum"]
