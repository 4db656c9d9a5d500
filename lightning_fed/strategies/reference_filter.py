"""A filter against a robust reference: keep every update that points the way of the round's robust aggregate and
is not far longer than the round's typical update, then take the plain weighted mean of the kept ones.

Robust rules that replace the mean (the median, the trimmed mean) or that drop a fixed number of replies every
round (multi-Krum drops ``f`` whatever arrives) pay for their robustness with honest updates. This rule drops only
what it has a reason to drop:

1. **reference**: the round's coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning: Towards
   Optimal Statistical Rates", ICML 2018), or the multi-Krum mean (Blanchard et al., NeurIPS 2017), of the
   updates. It stands in for FLTrust's server update (Cao et al., "FLTrust: Byzantine-robust Federated Learning via
   Trust Bootstrapping", NDSS 2021) without needing root data whose label mix differs from the clients'.
2. **direction**: an update whose cosine to the reference is ``<= min_cosine`` (0 by default: it does not point
   the reference's way) is dropped, as FLTrust's ReLU(cosine) gives it weight 0.
3. **length**: an update whose L2 norm exceeds ``max_norm_ratio`` times the median norm of the round's updates
   is dropped: a norm *filter* (the check of Sun et al., "Can You Really Backdoor Federated Learning?", 2019,
   as a rejection, not a clipping; kept updates are not rescaled).
4. the example-weighted mean (the strategy's trust weights, renormalised) of the updates kept.

A round where no update passes is refused (:class:`~lightning_fed.errors.AggregationRefused`). Stateless: nothing
to checkpoint. On flat buffers: one ``[n, d]`` stack, a median (or a Gram matrix) and a matrix-vector product.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_fed.errors import AggregationRefused
from lightning_fed.strategies.robust import (
    AggregationReport,
    RobustAggregator,
    _weighted_mean_,
    krum_scores,
    median_,
)
from lightning_fed.validation import need

REFERENCES = ("median", "krum")


def check_filter_settings(
    name: str, reference: str, byzantine: int, min_cosine: float, max_norm_ratio: float
) -> None:
    """Raise a clear ``ValueError`` (``name`` first) unless the filter's settings are valid: ``reference`` one of
    :data:`REFERENCES`, ``byzantine`` an integer >= 0, ``min_cosine`` in ``[-1, 1)``, ``max_norm_ratio`` a finite
    number > 1."""
    need(name, reference in REFERENCES, "reference", reference, f"one of {REFERENCES}")
    need(
        name,
        isinstance(byzantine, int) and not isinstance(byzantine, bool) and byzantine >= 0,
        "byzantine",
        byzantine,
        "an integer >= 0",
    )
    need(
        name,
        isinstance(min_cosine, int | float) and not isinstance(min_cosine, bool) and -1 <= min_cosine < 1,
        "min_cosine",
        min_cosine,
        "in [-1, 1)",
    )
    check_max_norm_ratio(name, max_norm_ratio)


def check_max_norm_ratio(name: str, max_norm_ratio: float) -> None:
    """Raise a clear ``ValueError`` (``name`` first) unless ``max_norm_ratio`` is a finite number > 1."""
    need(
        name,
        isinstance(max_norm_ratio, int | float)
        and not isinstance(max_norm_ratio, bool)
        and math.isfinite(max_norm_ratio)
        and max_norm_ratio > 1,
        "max_norm_ratio",
        max_norm_ratio,
        "a finite number > 1",
    )


def reference_(out: Tensor, x: Tensor, reference: str, byzantine: int) -> Tensor:
    """The robust reference of the rows of ``x`` into ``out``: their coordinate-wise median (``"median"``), or the
    unweighted mean of the ``n - byzantine`` rows with the lowest Krum scores (``"krum"``)."""
    if reference == "median":
        return median_(out, x)
    keep = krum_scores(x, byzantine).argsort(stable=True)[: x.shape[0] - byzantine]
    return torch.mean(x[keep.sort().values], dim=0, out=out)


def filter_mask(
    x: Tensor, ref: Tensor, min_cosine: float, max_norm_ratio: float
) -> tuple[Tensor, Tensor, float]:
    """``(keep, cosines, norm_bound)``: which rows of ``x`` pass (cosine to ``ref`` above ``min_cosine`` and L2 norm
    at most ``norm_bound = max_norm_ratio * median row norm``), each row's cosine to ``ref`` (float64; a zero row
    or a zero reference gives cosine 0, and a zero reference skips the direction test)."""
    xd, rd = x.double(), ref.double()
    norms = torch.linalg.vector_norm(xd, dim=1)
    rnorm = float(torch.linalg.vector_norm(rd))
    cos = (xd @ rd) / (norms * rnorm).clamp(min=1e-300)
    bound = max_norm_ratio * float(norms.median())
    keep = norms <= bound
    if rnorm > 0:
        keep &= cos > min_cosine
    return keep, cos, bound


class ReferenceFilter(RobustAggregator):
    """Drop the updates that disagree in direction with the round's robust reference or are far longer than the
    round's median update, then the weighted mean of the rest (module docstring). :attr:`last` holds the dropped
    positions, each update's cosine to the reference (``scores``) and the norm bound.

    Example::

        strategy = FedAvg(aggregator=ReferenceFilter())                            # median reference
        strategy = FedAvg(aggregator=ReferenceFilter(reference="krum", byzantine=3))

    Args:
        reference: ``"median"`` (coordinate-wise median) or ``"krum"`` (multi-Krum mean with ``byzantine``).
        byzantine: Krum's ``f`` for ``reference="krum"`` (>= 0; the round needs ``2 f + 3`` replies).
        min_cosine: an update is kept only if its cosine to the reference is above this, in ``[-1, 1)``.
        max_norm_ratio: an update is kept only if its norm is at most this times the round's median norm (> 1).
    """

    def __init__(
        self,
        reference: str = "median",
        byzantine: int = 1,
        min_cosine: float = 0.0,
        max_norm_ratio: float = 3.0,
    ) -> None:
        super().__init__()
        check_filter_settings("ReferenceFilter", reference, byzantine, min_cosine, max_norm_ratio)
        self.reference = reference
        self.byzantine = byzantine
        self.min_cosine = float(min_cosine)
        self.max_norm_ratio = float(max_norm_ratio)

    def required(self, count: int) -> int:
        """1 with the median reference; Krum's ``2 * byzantine + 3`` with the Krum reference."""
        return 2 * self.byzantine + 3 if self.reference == "krum" else 1

    def combine(self, out: Tensor, x: Tensor, w: Tensor, report: AggregationReport) -> None:
        """Reference, filter, weighted mean of the kept rows."""
        ref = reference_(torch.empty_like(out), x, self.reference, self.byzantine)
        keep, cos, bound = filter_mask(x, ref, self.min_cosine, self.max_norm_ratio)
        report.scores = cos.tolist()
        report.bound = bound
        report.dropped = (~keep).nonzero().flatten().tolist()
        if not bool(keep.any()):
            raise AggregationRefused(f"{self!r}: none of the {x.shape[0]} updates passes the filter")
        _weighted_mean_(out, x, w, keep.nonzero().flatten())

    def __repr__(self) -> str:
        return (
            f"ReferenceFilter(reference={self.reference!r}, byzantine={self.byzantine}, "
            f"min_cosine={self.min_cosine}, max_norm_ratio={self.max_norm_ratio})"
        )


__all__ = ["ReferenceFilter", "check_max_norm_ratio", "filter_mask", "reference_"]
