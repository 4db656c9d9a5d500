"""FedAdagrad, FedAdam and FedYogi: the adaptive server optimizers of Reddi et al.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar & McMahan, "Adaptive Federated Optimization", ICLR 2021,
Algorithm 2. With ``Δ_t`` the aggregated client delta (the negated pseudo-gradient), all three share::

    m_t = beta1 * m_{t-1} + (1 - beta1) * Δ_t                          (m_{-1} = 0)
    x_{t+1} = x_t + lr * m_t / (sqrt(v_t) + tau)                        (v_{-1} = tau**2)

and differ in the second moment::

    FedAdagrad: v_t = v_{t-1} + Δ_t**2
    FedAdam:    v_t = beta2 * v_{t-1} + (1 - beta2) * Δ_t**2
    FedYogi:    v_t = v_{t-1} - (1 - beta2) * Δ_t**2 * sign(v_{t-1} - Δ_t**2)

This is the paper's update, computed in place on the flat buffer, not ``torch.optim``'s, which differs:
``torch.optim.Adam`` bias-corrects ``m`` and ``v`` and starts ``v`` at 0; ``torch.optim.Adagrad`` has no first
moment; there is no Yogi in ``torch.optim``. ``ServerAdagrad(beta1=0)`` is exactly
``torch.optim.Adagrad(lr, eps=tau, initial_accumulator_value=tau**2)`` stepped with ``-Δ_t``, and
``tests/test_server_optimizers.py`` checks that, and each rule against the formulas above by hand.

Defaults: ``beta1 = 0.9`` and ``beta2 = 0.99`` as in the paper's experiments, ``tau = 1e-3`` (a value of the
paper's tuning grid, Flower's default too). The paper tunes the server learning rate per task on a grid, so
``lr`` (``1e-2`` for Adam and Yogi, ``1e-1`` for Adagrad) is a starting point to tune.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.strategies.server_torch import check_lr, check_tau, check_unit


class AdaptiveServerOptimizer(ServerOptimizer):
    """Shared mechanics of Reddi et al.'s Algorithm 2: first moment, ``v_{-1} = tau**2``, the step; subclasses
    implement :meth:`second_moment_` (``v`` in place, given ``Δ_t**2``). State: ``m``, ``v`` and the step count.

    Example::

        class ServerRMS(AdaptiveServerOptimizer):      # v_t = 0.5 v_{t-1} + 0.5 Δ_t**2
            def second_moment_(self, v, sq, scratch):
                v.mul_(0.5).add_(sq, alpha=0.5)

        strategy = FedAvg(server_optimizer=ServerRMS(lr=1e-2))

    Args:
        lr: server learning rate ``eta`` (> 0).
        beta1: first-moment decay in ``[0, 1)`` (0: no momentum).
        beta2: second-moment decay in ``[0, 1)`` (unused by rules without one).
        tau: adaptivity ``tau`` (> 0): added to ``sqrt(v)`` and the square root of ``v``'s initial value.
    """

    def __init__(self, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        owner = type(self).__name__
        self.lr = check_lr(owner, lr)
        self.beta1 = check_unit(owner, "beta1", beta1)
        self.beta2 = check_unit(owner, "beta2", beta2)
        self.tau = check_tau(owner, tau)
        self.m: Tensor | None = None
        self.v: Tensor | None = None
        self.steps = 0
        self._sq: Tensor | None = None
        self._scratch: Tensor | None = None

    def second_moment_(self, v: Tensor, sq: Tensor, scratch: Tensor) -> None:
        """Update ``v`` in place from ``sq = Δ_t**2`` (``scratch``: a free buffer of the same size)."""
        raise NotImplementedError

    def setup(self, global_flat: Tensor) -> None:
        """``m = 0``, ``v = tau**2`` sized like ``global_flat``."""
        self.m = torch.zeros_like(global_flat)
        self.v = torch.full_like(global_flat, self.tau**2)
        self._sq, self._scratch = torch.empty_like(global_flat), torch.empty_like(global_flat)
        self.steps = 0

    def _ready(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self.m is None or self.v is None or self._sq is None or self._scratch is None:
            raise RuntimeError(f"{type(self).__name__}.setup(global_flat) must be called before use")
        return self.m, self.v, self._sq, self._scratch

    @torch.no_grad()
    def step(self, global_flat: Tensor, update: Tensor) -> None:
        """One step of Algorithm 2, in place (two scratch buffers, no allocation)."""
        m, v, sq, scratch = self._ready()
        m.mul_(self.beta1).add_(update, alpha=1 - self.beta1)
        torch.mul(update, update, out=sq)
        self.second_moment_(v, sq, scratch)
        torch.sqrt(v, out=scratch).add_(self.tau)
        global_flat.addcdiv_(m, scratch, value=self.lr)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """``m``, ``v`` (copies) and the number of steps taken."""
        m, v, _, _ = self._ready()
        return {"m": m.clone(), "v": v.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into the buffers made by :meth:`setup`.

        Raises:
            ValueError: the state is sized for another buffer.
        """
        m, v, _, _ = self._ready()
        if state["m"].shape != m.shape or state["v"].shape != v.shape:
            raise ValueError(f"{type(self).__name__} state has {state['m'].numel()} entries, the global buffer "
                             f"{m.numel()}")
        m.copy_(state["m"])
        v.copy_(state["v"])
        self.steps = int(state["steps"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lr={self.lr}, beta1={self.beta1}, beta2={self.beta2}, tau={self.tau})"


class ServerAdagrad(AdaptiveServerOptimizer):
    """FedAdagrad's server step: ``v_t = v_{t-1} + Δ_t**2`` (``beta2`` is not used).

    Example::

        strategy = FedAvg(server_optimizer=ServerAdagrad(lr=0.1, tau=1e-3))   # FedAdagrad

    Args:
        lr: server learning rate (> 0).
        beta1: first-moment decay in ``[0, 1)``; 0 gives ``torch.optim.Adagrad`` exactly (see the module).
        tau: adaptivity (> 0).
    """

    def __init__(self, lr: float = 1e-1, beta1: float = 0.9, tau: float = 1e-3) -> None:
        super().__init__(lr=lr, beta1=beta1, beta2=0.0, tau=tau)

    def second_moment_(self, v: Tensor, sq: Tensor, scratch: Tensor) -> None:
        """``v += Δ**2``."""
        v.add_(sq)

    def __repr__(self) -> str:
        return f"ServerAdagrad(lr={self.lr}, beta1={self.beta1}, tau={self.tau})"


class ServerAdam(AdaptiveServerOptimizer):
    """FedAdam's server step: ``v_t = beta2 * v_{t-1} + (1 - beta2) * Δ_t**2``, no bias correction.

    Example::

        strategy = FedAvg(server_optimizer=ServerAdam(lr=1e-2, beta1=0.9, beta2=0.99, tau=1e-3))   # FedAdam

    Args:
        lr: server learning rate (> 0).
        beta1: first-moment decay in ``[0, 1)``.
        beta2: second-moment decay in ``[0, 1)``.
        tau: adaptivity (> 0).
    """

    def second_moment_(self, v: Tensor, sq: Tensor, scratch: Tensor) -> None:
        """``v = beta2 * v + (1 - beta2) * Δ**2``."""
        v.mul_(self.beta2).add_(sq, alpha=1 - self.beta2)


class ServerYogi(AdaptiveServerOptimizer):
    """FedYogi's server step: ``v_t = v_{t-1} - (1 - beta2) * Δ_t**2 * sign(v_{t-1} - Δ_t**2)``: ``v`` moves
    towards ``Δ**2`` by an additive amount, so it grows less abruptly than Adam's (Zaheer et al., NeurIPS 2018).

    Example::

        strategy = FedAvg(server_optimizer=ServerYogi(lr=1e-2, beta1=0.9, beta2=0.99, tau=1e-3))   # FedYogi

    Args:
        lr: server learning rate (> 0).
        beta1: first-moment decay in ``[0, 1)``.
        beta2: second-moment decay in ``[0, 1)``.
        tau: adaptivity (> 0).
    """

    def second_moment_(self, v: Tensor, sq: Tensor, scratch: Tensor) -> None:
        """``v -= (1 - beta2) * Δ**2 * sign(v - Δ**2)``."""
        torch.sub(v, sq, out=scratch).sign_()
        v.addcmul_(sq, scratch, value=-(1 - self.beta2))


__all__ = ["AdaptiveServerOptimizer", "ServerAdagrad", "ServerAdam", "ServerYogi"]
