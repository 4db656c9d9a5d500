"""Robust learning rate: Ozdayi, Kantarcioglu and Gel, "Defending against Backdoors in Federated Learning with
Robust Learning Rate", AAAI 2021.

A backdoor moves coordinates that the honest clients do not agree on. Per coordinate, the server counts the signs of
the round's updates; where fewer than ``theta`` of them agree (``|sum_i sign(u_i)| < theta``), the server's learning
rate for that coordinate is negated (``mode="negate"``, the paper's rule: the step moves *against* the disputed
direction) or set to zero (``mode="zero"``); elsewhere it stays 1. The update is the weighted mean of the replies
multiplied coordinate-wise by that learning rate; the server optimizer then applies it as usual.

``theta`` follows from the malicious share the operator assumes, not from a sweep: with ``theta=None`` it is
``floor(malicious * n) + 1`` for ``n`` replies, one more than the expected attackers of the round (the paper's
guidance: more than the number of attackers, at most the honest ones). Signs are counted unweighted: one reply,
one vote, whatever the example count it claims. Everything is vectorised over the ``[n, d]`` stack.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_fed.strategies.robust import AggregationReport, RobustAggregator, _weighted_mean_
from lightning_fed.validation import need

MODES = ("negate", "zero")


def sign_agreement(x: Tensor) -> Tensor:
    """``|sum_i sign(x_i)|`` per coordinate of the rows of ``x`` (``[n, d]`` -> ``[d]``, integer valued; a zero entry
    votes for neither sign)."""
    return torch.sign(x).sum(dim=0).abs_()


def robust_lr_(out: Tensor, mean: Tensor, agreement: Tensor, theta: float, disputed: float) -> Tensor:
    """``out = mean * lr`` with ``lr = 1`` where ``agreement >= theta`` and ``disputed`` (-1 or 0) elsewhere; returns
    ``out``. ``out`` may be ``mean`` itself."""
    lr = torch.where(agreement >= theta, 1.0, disputed).to(mean.dtype)
    return torch.mul(mean, lr, out=out)


class RobustLR(RobustAggregator):
    """Robust learning rate (module docstring): the weighted mean of the updates, with the server's learning rate
    negated (or zeroed) on every coordinate whose sign fewer than ``theta`` replies agree on.

    :attr:`last` records the share of coordinates whose learning rate was flipped (``scores``: one value), and
    :meth:`report` adds it to the round's metrics as ``agg_disputed``. Nothing is dropped or clipped.

    Example::

        strategy = FedAvg(aggregator=RobustLR(malicious=0.2))      # theta = floor(0.2 n) + 1, negated
        strategy = FedAvg(aggregator=RobustLR(theta=4, mode="zero"))

    Args:
        theta: the agreement threshold, an integer >= 1; a round with fewer replies than ``theta`` is refused.
            ``None``: ``floor(malicious * n) + 1`` for the round's ``n`` replies.
        malicious: the share of malicious replies the operator assumes, in ``[0, 0.5)`` (used when ``theta`` is
            ``None``).
        mode: ``"negate"`` (the paper's rule) or ``"zero"``: the learning rate of a disputed coordinate.
    """

    def __init__(self, theta: int | None = None, malicious: float = 0.2, mode: str = "negate") -> None:
        super().__init__()
        need(
            "RobustLR",
            theta is None or theta >= 1,
            "theta",
            theta,
            "an integer >= 1 or None (floor(malicious * n) + 1)",
        )
        need(
            "RobustLR",
            0 <= malicious < 0.5,
            "malicious",
            malicious,
            "in [0, 0.5)",
        )
        need("RobustLR", mode in MODES, "mode", mode, f"one of {MODES}")
        self.theta = theta
        self.malicious = float(malicious)
        self.mode = mode

    def threshold(self, count: int) -> int:
        """``theta``, or ``floor(malicious * count) + 1``."""
        if self.theta is not None:
            return self.theta
        return math.floor(self.malicious * count + 1e-9) + 1

    def required(self, count: int) -> int:
        """``theta`` replies at least (with ``theta=None`` any round has enough)."""
        return max(self.min_count, self.threshold(count))

    def combine(self, out: Tensor, x: Tensor, w: Tensor, report: AggregationReport) -> None:
        """Weighted mean, then the coordinate-wise learning rate from the signs' agreement."""
        theta = self.threshold(x.shape[0])
        agreement = sign_agreement(x)
        _weighted_mean_(out, x, w)
        robust_lr_(out, out, agreement, theta, -1.0 if self.mode == "negate" else 0.0)
        report.scores = [float((agreement < theta).double().mean())]
        report.bound = float(theta)

    def report(self) -> dict[str, float]:
        """The base metrics plus ``agg_disputed``: the share of coordinates whose learning rate was flipped."""
        metrics = super().report()
        if self.last is not None and self.last.scores:
            metrics["agg_disputed"] = self.last.scores[0]
        return metrics

    def __repr__(self) -> str:
        return f"RobustLR(theta={self.theta}, malicious={self.malicious}, mode={self.mode!r})"


__all__ = ["RobustLR", "robust_lr_", "sign_agreement"]
