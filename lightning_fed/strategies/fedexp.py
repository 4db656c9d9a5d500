"""FedExP: FedAvg with an adaptive server step size (extrapolation).

Jhunjhunwala, Wang & Joshi, "FedExP: Speeding Up Federated Averaging via Extrapolation", ICLR 2023, Algorithm 1.
With ``Δ_i`` the weight deltas of the round's ``M`` replies and ``Δ = (1/M) sum_i Δ_i`` their mean, the server
steps::

    η_g = max(1, sum_i ||Δ_i||² / (2 M (||Δ||² + eps)))
    x <- x + η_g * Δ

FedAvg is ``η_g = 1``. When the clients' deltas disagree (high heterogeneity) ``||Δ||²`` is small against their
mean squared norm and the step grows, as extrapolation speeds up projections onto convex sets (the paper's POCS
view); it never shrinks below FedAvg's. ``eps`` keeps the step bounded when ``Δ`` is close to 0.

The mean is a plug point restricted to the two linear means: the example-weighted :class:`WeightedMean` (the
default, as FedAvg's) or the paper's plain :class:`UniformMean`; the step size takes the same weights,
``sum_i p_i ||Δ_i||² / (2 (||Δ||² + eps))``, which is the formula above when ``p_i = 1/M``.

The iterates of FedExP oscillate; the paper evaluates the average of the last two, ``(x_t + x_{t-1}) / 2``.
``average_last=True`` does the same here: the model the loop evaluates and returns is that average, while the
clients keep training from ``x_t`` (the checkpoint keeps both iterates). After a structural change of the model on the server
(pruning) the strategy restarts from the model as the loop holds it, with no previous iterate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_fed.protocol import Reply
from lightning_fed.strategies.aggregate import apply_update_, example_weights, flat_norm
from lightning_fed.strategies.aggregators import Aggregator, UniformMean, WeightedMean
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.weights import load_into


def fedexp_step(sq_norms: list[float], weights: list[float], mean_sq_norm: float, eps: float) -> float:
    """FedExP's server step size ``max(1, sum_i p_i ||Δ_i||² / (2 (||Δ||² + eps)))`` from the replies' squared
    delta norms ``sq_norms``, their weights ``p_i`` (summing to 1) and the squared norm of their weighted mean."""
    spread = sum(w * s for w, s in zip(weights, sq_norms, strict=True))
    return max(1.0, spread / (2.0 * (mean_sq_norm + eps)))


class FedExP(FedAvg):
    """FedAvg whose server step size adapts each round to how much the clients' deltas disagree (FedExP).

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=30, strategy=FedExP(eps=1e-3))

    Args:
        eps: the small constant ``eps > 0`` in the step size's denominator (default 1e-3).
        aggregator: the mean of the deltas: :class:`~lightning_fed.strategies.WeightedMean` (``None``, the
            default: example-weighted, as FedAvg) or :class:`~lightning_fed.strategies.UniformMean` (the paper's
            plain mean); the step size uses the same weights.
        average_last: evaluate (and return) the average of the last two global iterates, as the paper reports.
    """

    def __init__(
        self, *, eps: float = 1e-3, aggregator: Aggregator | None = None, average_last: bool = False
    ) -> None:
        if not eps > 0:
            raise ValueError(f"FedExP: eps={eps!r} is not allowed; eps must be a number > 0")
        if aggregator is not None and type(aggregator) not in (WeightedMean, UniformMean):
            raise ValueError(
                f"FedExP: aggregator={aggregator!r} is not allowed; FedExP's step size is defined for "
                "a mean: WeightedMean() (the default) or UniformMean()"
            )
        super().__init__(aggregator=aggregator)
        self.eps = float(eps)
        self.average_last = average_last
        self.last_step = 1.0
        self._prev: Tensor | None = None  # x_{t-1} (average_last), None before the first step

    def setup_state(self, state: dict[str, Tensor]) -> None:
        """FedAvg's buffers; no previous iterate yet."""
        super().setup_state(state)
        self._prev = None

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """The mean delta ``Δ`` (the aggregator), the step size from the replies' squared norms, then
        ``x += η_g Δ``; the metrics report ``server_step`` (``η_g``)."""
        spec, flat = self._require_setup()
        assert self._acc is not None and self._tmp is not None
        if type(self.aggregator) is UniformMean:
            weights = [1.0 / len(replies)] * len(replies)
        else:
            weights = example_weights([r.num_examples for r in replies])
        update = self.aggregator.aggregate_payloads(
            self._acc, spec, (r.payload for r in replies), weights, self._tmp
        )
        sq = []
        for r in replies:  # one reply at a time through the scratch buffer (a view when it is flat already)
            d = spec.as_flat(r.payload, self._tmp)
            sq.append(float(torch.dot(d, d)))
        mean_norm = flat_norm(update)
        self.last_step = fedexp_step(sq, weights, mean_norm**2, self.eps)
        if self.average_last:
            if self._prev is None:
                self._prev = flat.clone()
            else:
                self._prev.copy_(flat)
        apply_update_(flat, update, self.last_step)
        return {"update_norm": mean_norm, "server_step": self.last_step, **self.aggregator.report()}

    def load_global(self, model: nn.Module) -> None:
        """The global weights, or with ``average_last`` the average of the last two iterates, into ``model``."""
        if not self.average_last or self._prev is None:
            super().load_global(model)
            return
        spec, flat = self._require_setup()
        assert self._tmp is not None
        torch.add(self._prev, flat, out=self._tmp).mul_(0.5)
        load_into(model, spec.unflatten(self._tmp))

    def state_dict(self) -> dict[str, Any]:
        """FedAvg's state, the last step size and the previous iterate (``average_last``)."""
        state = {**super().state_dict(), "last_step": self.last_step}
        if self._prev is not None:
            state["prev_flat"] = self._prev.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.last_step = float(state["last_step"])
        prev = state.get("prev_flat")
        self._prev = None if prev is None else prev.clone()


__all__ = ["FedExP", "fedexp_step"]
