"""FedAvgM: server momentum on the averaged client delta.

Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification",
2019 (FedAvgM); Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (the FedOpt framing). With ``Δ_t`` the
aggregated client delta::

    v_t = momentum * v_{t-1} + Δ_t          (v_{-1} = 0)
    x_{t+1} = x_t + lr * v_t

which is ``torch.optim.SGD(lr, momentum, dampening=0)`` stepped with the pseudo-gradient ``-Δ_t`` (torch's first
step sets its buffer to the gradient itself, as ``v_{-1} = 0`` does here): :class:`ServerMomentum` runs torch's
own SGD on the global flat buffer. Defaults follow Hsu et al.: ``lr = 1``, ``momentum = 0.9``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_fed.strategies.server_torch import TorchServerOptimizer, check_lr, check_unit


class ServerMomentum(TorchServerOptimizer):
    """FedAvgM's server step: heavy-ball momentum on the pseudo-gradient (torch's ``SGD``).

    Example::

        strategy = FedAvg(server_optimizer=ServerMomentum(lr=1.0, momentum=0.9))   # FedAvgM

    Args:
        lr: server learning rate (> 0; 1.0 with ``momentum=0`` is FedAvg).
        momentum: momentum factor in ``[0, 1)``.
    """

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.lr = check_lr("ServerMomentum", lr)
        self.momentum = check_unit("ServerMomentum", "momentum", momentum)

    def make(self, params: list[Tensor]) -> torch.optim.Optimizer:
        """``torch.optim.SGD(params, lr, momentum)`` (no dampening, no Nesterov, no weight decay)."""
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)

    def __repr__(self) -> str:
        return f"ServerMomentum(lr={self.lr}, momentum={self.momentum})"


__all__ = ["ServerMomentum"]
