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

With ``leave_one_out=True`` (multi-Krum reference only) each update is compared with the mean of the *other*
selected updates: an update inside the multi-Krum mean is a ``1 / (n - f)`` part of it, and when the round's updates
are nearly orthogonal (small non-IID clients) that share alone gives it a cosine of about ``1 / sqrt(n - f)`` to
the mean: every update Krum selects, a flipped one included, then passes the direction test.

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
    name: str,
    reference: str,
    byzantine: int,
    min_cosine: float,
    max_norm_ratio: float,
    leave_one_out: bool = False,
) -> None:
    """Raise a clear ``ValueError`` (``name`` first) unless the filter's settings are valid: ``reference`` one of
    :data:`REFERENCES`, ``byzantine`` an integer >= 0, ``min_cosine`` in ``[-1, 1)``, ``max_norm_ratio`` a finite
    number > 1, ``leave_one_out`` a bool and only with the multi-Krum reference."""
    need(name, reference in REFERENCES, "reference", reference, f"one of {REFERENCES}")
    need(name, isinstance(leave_one_out, bool), "leave_one_out", leave_one_out, "True or False")
    need(
        name,
        not leave_one_out or reference == "krum",
        "leave_one_out",
        leave_one_out,
        "False with reference='median' (a leave-one-out reference is the multi-Krum mean's)",
    )
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


def krum_members(x: Tensor, byzantine: int) -> Tensor:
    """Boolean mask of the ``n - byzantine`` rows of ``x`` with the lowest Krum scores (ties: the lower position)."""
    keep = krum_scores(x, byzantine).argsort(stable=True)[: x.shape[0] - byzantine]
    members = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    members[keep] = True
    return members


def reference_(out: Tensor, x: Tensor, reference: str, byzantine: int) -> Tensor:
    """The robust reference of the rows of ``x`` into ``out``: their coordinate-wise median (``"median"``), or the
    unweighted mean of the ``n - byzantine`` rows with the lowest Krum scores (``"krum"``)."""
    if reference == "median":
        return median_(out, x)
    keep = krum_members(x, byzantine).nonzero().flatten()
    return torch.mean(x[keep], dim=0, out=out)


def leave_one_out_cosines(x: Tensor, members: Tensor) -> Tensor:
    """Each row's cosine (float64) to the mean of the ``members`` rows other than itself: a member is compared with
    the mean of the other members, a non-member with the mean of all members. A zero row or a zero mean gives 0.
    From dot products only: ``x @ s`` with ``s`` the members' sum, the row norms and ``|s|``."""
    xd = x.double()
    s = xd[members].sum(dim=0)
    k = float(members.sum())
    own = members.double()  # 1 where the row is in the sum it is compared with
    dots = xd @ s
    sq = (xd * xd).sum(dim=1)
    count = k - own
    # the other members' sum: s - own * x_i; its dot with x_i and its squared norm, divided by the count
    other_dot = dots - own * sq
    other_sq = (float(s @ s) - 2 * own * dots + own * sq).clamp(min=0)
    mean_norm = other_sq.sqrt() / count.clamp(min=1)
    mean_dot = other_dot / count.clamp(min=1)
    return torch.where(count > 0, mean_dot / (sq.sqrt() * mean_norm).clamp(min=1e-300), torch.zeros_like(dots))


def filter_mask(
    x: Tensor, ref: Tensor, min_cosine: float, max_norm_ratio: float, members: Tensor | None = None
) -> tuple[Tensor, Tensor, float]:
    """``(keep, cosines, norm_bound)``: which rows of ``x`` pass (cosine to ``ref`` above ``min_cosine`` and L2 norm
    at most ``norm_bound = max_norm_ratio * median row norm``), each row's cosine to ``ref`` (float64; a zero row
    or a zero reference gives cosine 0, and a zero reference skips the direction test). With ``members`` (``ref``
    is then their mean) the cosines are :func:`leave_one_out_cosines`."""
    xd, rd = x.double(), ref.double()
    norms = torch.linalg.vector_norm(xd, dim=1)
    rnorm = float(torch.linalg.vector_norm(rd))
    if members is None:
        cos = (xd @ rd) / (norms * rnorm).clamp(min=1e-300)
    else:
        cos = leave_one_out_cosines(x, members)
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
        leave_one_out: compare each update with the multi-Krum mean of the other selected updates (module
            docstring; ``reference="krum"`` only).
    """

    def __init__(
        self,
        reference: str = "median",
        byzantine: int = 1,
        min_cosine: float = 0.0,
        max_norm_ratio: float = 3.0,
        leave_one_out: bool = False,
    ) -> None:
        super().__init__()
        check_filter_settings("ReferenceFilter", reference, byzantine, min_cosine, max_norm_ratio, leave_one_out)
        self.leave_one_out = leave_one_out
        self.reference = reference
        self.byzantine = byzantine
        self.min_cosine = float(min_cosine)
        self.max_norm_ratio = float(max_norm_ratio)

    def required(self, count: int) -> int:
        """1 with the median reference; Krum's ``2 * byzantine + 3`` with the Krum reference."""
        return 2 * self.byzantine + 3 if self.reference == "krum" else 1

    def combine(self, out: Tensor, x: Tensor, w: Tensor, report: AggregationReport) -> None:
        """Reference, filter, weighted mean of the kept rows."""
        ref, members = filter_reference(x, self.reference, self.byzantine, self.leave_one_out)
        keep, cos, bound = filter_mask(x, ref, self.min_cosine, self.max_norm_ratio, members)
        report.scores = cos.tolist()
        report.bound = bound
        report.dropped = (~keep).nonzero().flatten().tolist()
        if not bool(keep.any()):
            raise AggregationRefused(f"{self!r}: none of the {x.shape[0]} updates passes the filter")
        _weighted_mean_(out, x, w, keep.nonzero().flatten())

    def __repr__(self) -> str:
        return (
            f"ReferenceFilter(reference={self.reference!r}, byzantine={self.byzantine}, "
            f"min_cosine={self.min_cosine}, max_norm_ratio={self.max_norm_ratio}, leave_one_out={self.leave_one_out})"
        )


def filter_reference(x: Tensor, reference: str, byzantine: int, leave_one_out: bool) -> tuple[Tensor, Tensor | None]:
    """``(reference, members)`` for :func:`filter_mask`: the round's reference of the rows of ``x``
    (:func:`reference_`) and, with ``leave_one_out`` (multi-Krum only), the mask of the rows in its mean."""
    if not leave_one_out:
        return reference_(torch.empty_like(x[0]), x, reference, byzantine), None
    members = krum_members(x, byzantine)
    return x[members].mean(dim=0), members


__all__ = [
    "ReferenceFilter",
    "filter_mask",
    "filter_reference",
    "krum_members",
    "leave_one_out_cosines",
    "reference_",
]
