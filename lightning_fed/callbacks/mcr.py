"""Mode connectivity repair (Zhao et al., "Bridging Mode Connectivity in Loss Landscapes and Adversarial
Robustness", ICLR 2020) as a server-side FedLoop callback.

Two models are joined by a quadratic Bezier curve in weight space::

    theta(t) = (1 - t)^2 w1 + 2 t (1 - t) theta + t^2 w2,    t in [0, 1]

``w1`` is the global (possibly backdoored) model, ``w2`` a copy of it fine-tuned on the server's clean data. Only the
control point ``theta`` (initialised at ``(w1 + w2) / 2``) is trained, on the clean training part: every batch draws
``t ~ U(0, 1)`` from a seeded generator and the loss is the cross-entropy of the model evaluated at ``theta(t)``
(:func:`torch.func.functional_call`). The deployed model is ``theta(t*)``, where ``t*`` is the point of a grid (0.1,
0.2, ..., 0.9 by default) with the best clean accuracy on the held-out part of the clean data (ties: the first in
the grid). The paper picks ``t`` by hand on the accuracy / attack trade-off; the server cannot measure the attack,
so the best clean accuracy stands in for it.

Only parameters move along the curve; buffers (e.g. batch-norm running statistics) are the global model's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_fed.callbacks._defence import (
    CleanDataDefence,
    accuracy,
    device_of,
    finetune,
    model_copy,
    train_epochs,
)
from lightning_fed.data.public import PublicData
from lightning_fed.seeding import Stream, generator
from lightning_fed.validation import need

Params = dict[str, Tensor]


def bezier(w1: Params, theta: Params, w2: Params, t: float | Tensor) -> Params:
    """The quadratic Bezier curve ``(1 - t)^2 w1 + 2 t (1 - t) theta + t^2 w2`` at ``t``, entry by entry (``t=0``
    gives ``w1``, ``t=1`` gives ``w2``, exactly)."""
    a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t ** 2
    return {k: a * w1[k] + b * theta[k] + c * w2[k] for k in w1}


class MCR(CleanDataDefence):
    """Mode connectivity repair on the server at the end of the rounds in ``at`` (module docstring). FedLoop only:
    under ``lightning.Trainer`` it does nothing.

    Round metrics at a step: ``mcr_acc_before`` (the global model ``w1``), ``mcr_endpoint_acc`` (the fine-tuned
    ``w2``), ``mcr_acc_after`` (the deployed ``theta(t*)``), all clean held-out accuracies, and ``mcr_t`` (``t*``).
    The record also keeps the held-out accuracy at every grid point.

    Example::

        clean = PublicData(num_samples=500, seed=7, labeled=True)
        loop = FedLoop(..., callbacks=[MCR(clean=clean, epochs=20), Backdoor(...)])

    Args:
        clean: the server's clean data, a labelled :class:`~lightning_fed.data.PublicData`.
        at: 0-based rounds at whose end a step runs (an int or a list); ``None``: the run's last round.
        holdout: share of the clean data held out to choose ``t*`` on, in ``(0, 1)``.
        endpoint_epochs: epochs of fine-tuning ``w2`` (>= 0).
        epochs: epochs of training the control point ``theta`` (>= 0).
        grid: the points ``t`` to choose from, each in ``[0, 1]``.
        lr, momentum, batch_size: SGD settings of both trainings.
        seed: seed of the clean split, the batches and the sampled ``t``.
    """

    owner = "MCR"
    stream = Stream.MCR
    prefix = "mcr"

    def __init__(self, clean: PublicData, at: int | list[int] | None = None, holdout: float = 0.2,
                 endpoint_epochs: int = 5, epochs: int = 20, grid: list[float] | None = None, lr: float = 0.01,
                 momentum: float = 0.9, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__(clean, at, holdout, epochs, lr, momentum, batch_size, seed, need_holdout=True)
        need("MCR", endpoint_epochs >= 0, "endpoint_epochs", endpoint_epochs, "an integer >= 0")
        grid = [round(0.1 * i, 10) for i in range(1, 10)] if grid is None else grid
        need("MCR", len(grid) > 0 and all(0 <= t <= 1 for t in grid), "grid", grid,
             "a non-empty list of numbers in [0, 1]")
        self.endpoint_epochs = endpoint_epochs
        self.grid = [float(t) for t in grid]

    def train_curve(self, model: nn.Module, w1: Params, w2: Params, x: Tensor, y: Tensor,
                    gen: torch.Generator) -> Params:
        """The trained control point ``theta`` of the curve from ``w1`` to ``w2`` (``model`` gives the architecture
        and the buffers; its own parameters are not changed)."""
        theta = {k: ((w1[k] + w2[k]) / 2).detach().clone().requires_grad_(True) for k in w1}
        buffers = dict(model.named_buffers())

        def loss_fn(xb: Tensor, yb: Tensor) -> Tensor:
            t = float(torch.rand((), generator=gen))
            out = functional_call(model, {**bezier(w1, theta, w2, t), **buffers}, (xb,))
            return F.cross_entropy(out, yb)

        was = model.training
        model.train()
        try:
            train_epochs(list(theta.values()), loss_fn, x, y, self.epochs, self.lr, self.momentum, self.batch_size,
                         gen, device_of(model))
        finally:
            model.train(was)
        return {k: v.detach() for k, v in theta.items()}

    @staticmethod
    def load_point(model: nn.Module, point: Params) -> None:
        """Copy the curve point ``point`` (by parameter name) into ``model``'s parameters."""
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(point[k])

    def defend(self, trainer: Any, pl_module: nn.Module, server_round: int) -> dict[str, Any]:
        """Fine-tune ``w2``, train the curve's control point, deploy ``theta(t*)``."""
        xt, yt, xh, yh = self.data()
        gen = generator(self.seed, self.stream, server_round)
        before = accuracy(pl_module, xh, yh)
        w1 = {k: p.detach().clone() for k, p in pl_module.named_parameters()}
        end = model_copy(pl_module)
        finetune(end, xt, yt, self.endpoint_epochs, self.lr, self.momentum, self.batch_size, gen)
        w2 = {k: p.detach().clone() for k, p in end.named_parameters()}
        endpoint_acc = accuracy(end, xh, yh)
        del end
        theta = self.train_curve(pl_module, w1, w2, xt, yt, gen)
        accs = []
        for t in self.grid:
            self.load_point(pl_module, bezier(w1, theta, w2, t))
            accs.append(accuracy(pl_module, xh, yh))
        best = max(range(len(self.grid)), key=lambda i: (accs[i], -i))
        self.load_point(pl_module, bezier(w1, theta, w2, self.grid[best]))
        return {"acc_before": before, "endpoint_acc": endpoint_acc, "acc_after": accs[best], "t": self.grid[best],
                "grid_acc": accs}


__all__ = ["MCR", "bezier"]
