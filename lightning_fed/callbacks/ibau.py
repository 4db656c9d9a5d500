"""Adversarial unlearning of a universal perturbation (I-BAU: Zeng et al., "Adversarial Unlearning of Backdoors
via Implicit Hypergradient", ICLR 2022) as a server-side FedLoop callback.

A trigger backdoor is a small input change that moves almost every input to one class: a *universal* adversarial
perturbation the model has learned to obey. I-BAU solves, on the server's small clean dataset, the minimax problem::

    min_theta  max_{||delta||_2 <= eps}  (1/n) sum_i CE(f_theta(x_i + delta), y_i)

alternating, for ``rounds`` rounds, (1) the inner maximisation: ``steps`` steps of projected, normalised gradient
ascent on one perturbation ``delta`` shared by every clean training record (from zero, step ``2.5 eps / steps``,
projected back onto the L2 ball of radius ``eps``), and (2) the outer step: one epoch of SGD on the perturbed
clean records with their true labels, so that the model stops obeying the perturbation it is most sensitive to.

The paper computes the outer gradient through the approximate inner solution with an implicit hypergradient; here
the outer step uses the partial gradient at the found ``delta`` (Danskin's theorem: the gradient of the max where
the inner problem is solved), the plain alternating form of the same minimax. The perturbation's radius is
``eps`` times the mean L2 norm of the clean training records (``eps`` is relative, so one setting fits any input
scale); the defender never needs the trigger.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fed.callbacks._defence import CleanDataDefence, accuracy, device_of, finetune
from lightning_fed.data.public import PublicData
from lightning_fed.seeding import Stream, generator
from lightning_fed.validation import need


def universal_perturbation(
    model: nn.Module, x: Tensor, y: Tensor, radius: float, steps: int, batch_size: int = 512
) -> Tensor:
    """One perturbation ``delta`` (shaped like a record) with ``||delta||_2 <= radius`` that raises the mean
    cross-entropy of ``model`` on ``(x + delta, y)``: ``steps`` steps of normalised gradient ascent from zero, step
    ``2.5 * radius / steps``, each followed by a projection onto the ball. The model runs in eval mode (its mode is
    restored) and its parameters receive no gradient."""
    dev = device_of(model)
    delta = torch.zeros(x.shape[1:], device=dev)
    if radius <= 0 or steps == 0 or len(x) == 0:
        return delta
    step = 2.5 * radius / steps
    was = model.training
    grads = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                delta.requires_grad_(True)
                total = torch.zeros((), device=dev)
                for i in range(0, len(x), batch_size):
                    xb, yb = x[i : i + batch_size].to(dev), y[i : i + batch_size].to(dev)
                    total = total + F.cross_entropy(model(xb + delta), yb, reduction="sum")
                (g,) = torch.autograd.grad(total / len(x), delta)
                with torch.no_grad():
                    delta = delta + step * g / torch.linalg.vector_norm(g).clamp(min=1e-12)
                    delta = delta * min(1.0, radius / max(float(torch.linalg.vector_norm(delta)), 1e-12))
    finally:
        for p, r in zip(model.parameters(), grads, strict=True):
            p.requires_grad_(r)
        model.train(was)
    return delta.detach()


class IBAU(CleanDataDefence):
    """Adversarial unlearning of a universal perturbation on the server at the end of the rounds in ``at`` (module
    docstring). FedLoop only: under ``lightning.Trainer`` it does nothing.

    Round metrics at a step: ``ibau_acc_before`` and ``ibau_acc_after`` (clean held-out accuracy of the global model
    before and after), ``ibau_radius`` (the perturbation's L2 radius), ``ibau_loss_before`` and ``ibau_loss_after``
    (clean training loss under the first and the last round's perturbation, before its outer epoch).

    Example::

        clean = PublicData(num_samples=500, seed=7, labeled=True)
        loop = FedLoop(..., callbacks=[IBAU(clean=clean, eps=0.1, rounds=20), Backdoor(...)])

    Args:
        clean: the server's clean data, a labelled :class:`~lightning_fed.data.PublicData`.
        at: 0-based rounds at whose end a step runs (an int or a list); ``None``: the run's last round.
        holdout: share of the clean data held out to measure clean accuracy on, in ``[0, 1)``.
        eps: the perturbation's L2 radius as a share of the clean training records' mean L2 norm (> 0); on
            MNIST-1D's CNN, 0.3 and more cost 10 points of clean accuracy or more (``benchmarks/backdoor_probe.py``).
        rounds: alternations of inner maximisation and one outer epoch (>= 0).
        steps: gradient-ascent steps of each inner maximisation (>= 1).
        lr, momentum, batch_size: SGD settings of the outer epochs.
        seed: seed of the clean split and of the batches.
    """

    owner = "IBAU"
    stream = Stream.IBAU
    prefix = "ibau"

    def __init__(
        self,
        clean: PublicData,
        at: int | list[int] | None = None,
        holdout: float = 0.2,
        eps: float = 0.1,
        rounds: int = 10,
        steps: int = 10,
        lr: float = 0.01,
        momentum: float = 0.9,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(clean, at, holdout, rounds, lr, momentum, batch_size, seed, epochs_key="rounds")
        need(
            "IBAU", eps > 0, "eps", eps, "> 0"
        )
        need(
            "IBAU",
            steps >= 1,
            "steps",
            steps,
            "an integer >= 1",
        )
        self.eps = float(eps)
        self.rounds = rounds
        self.steps = steps

    def radius(self, x: Tensor) -> float:
        """The perturbation's L2 radius: ``eps`` times the mean L2 norm of the records ``x``."""
        return self.eps * float(torch.linalg.vector_norm(x.flatten(1).double(), dim=1).mean())

    def defend(self, trainer: Any, pl_module: nn.Module, server_round: int) -> dict[str, Any]:
        """Alternate the universal perturbation and one epoch of training under it, ``rounds`` times."""
        xt, yt, _, _ = self.data()
        xe, ye = self.eval_part()
        gen = generator(self.seed, self.stream, server_round)
        before = accuracy(pl_module, xe, ye)
        radius = self.radius(xt)
        losses: list[float] = []
        for _ in range(self.rounds):
            delta = universal_perturbation(pl_module, xt, yt, radius, self.steps)
            losses.append(perturbed_loss(pl_module, xt, yt, delta))
            finetune(
                pl_module,
                xt,
                yt,
                1,
                self.lr,
                self.momentum,
                self.batch_size,
                gen,
                lambda m, xb, yb, d=delta: F.cross_entropy(m(xb + d), yb),
            )
        return {
            "acc_before": before,
            "acc_after": accuracy(pl_module, xe, ye),
            "radius": radius,
            "loss_before": losses[0] if losses else float("nan"),
            "loss_after": losses[-1] if losses else float("nan"),
        }


@torch.no_grad()
def perturbed_loss(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, batch_size: int = 512) -> float:
    """Mean cross-entropy of ``model`` (eval mode; its mode is restored) on ``(x + delta, y)``."""
    was = model.training
    model.eval()
    dev = device_of(model)
    total = 0.0
    try:
        for i in range(0, len(x), batch_size):
            out = model(x[i : i + batch_size].to(dev) + delta)
            total += float(F.cross_entropy(out, y[i : i + batch_size].to(dev), reduction="sum"))
    finally:
        model.train(was)
    return total / max(len(x), 1)


__all__ = ["IBAU", "perturbed_loss", "universal_perturbation"]
