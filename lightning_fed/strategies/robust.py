"""Robust aggregation rules: coordinate-wise median and trimmed mean (Yin et al., "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018), multi-Krum (Blanchard et al., "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017), norm bounding and weak differential privacy
(Sun et al., "Can You Really Backdoor Federated Learning?", 2019). FLAME is in :mod:`.flame`.

Every rule here needs all the round's vectors at once (``streaming = False``): it stacks them into one
``[n, d]`` matrix and works with torch ops over it (sorts, a Gram matrix, norms), never a Python loop over
coordinates. Each call records what it did in :attr:`RobustAggregator.last` (seconds, and the *positions* in the
round's reply list that it dropped or scaled down), logs it at DEBUG level, and reports it as metrics through
:meth:`Aggregator.report` (FedAvg adds them to the round's metrics and logs, at INFO level, the seconds and the
client ids dropped and clipped).

Weights: the averaging rules (multi-Krum, norm bounding, weak DP, FLAME) use the strategy's trust weights,
renormalised over the vectors they keep; the median and the trimmed mean are unweighted (their robustness comes
from ignoring how much each client claims).

Randomness (weak DP and FLAME noise): an aggregator holds no state across rounds, so its noise cannot come from
a running generator that a checkpoint would have to save. It comes from a generator seeded by the aggregator's
``seed`` and a fingerprint of the call's inputs (the count, and each vector's sum and sum of squares in float64):
the same round, replayed after a resume, gets the same noise; two different rounds get different noise.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_fed.errors import AggregationRefused
from lightning_fed.seeding import Stream, derive_seed
from lightning_fed.strategies.aggregators import Aggregator
from lightning_fed.validation import need

log = logging.getLogger("lightning_fed")


@dataclass
class AggregationReport:
    """What one call of a robust aggregator did.

    Example::

        krum = Krum(byzantine=1)
        krum(out, flats, weights)
        krum.last.dropped, krum.last.scores, krum.last.seconds  # positions in ``flats``

    Attributes:
        count: vectors received.
        seconds: wall-clock seconds of the call.
        dropped: positions (in the call's vector list) left out of the aggregate.
        clipped: positions scaled down to a norm bound (kept, with a smaller influence).
        scores: per-position scores where the rule has them (Krum's scores; FLAME's cluster labels).
        bound: the norm bound applied, where there is one.
    """

    count: int = 0
    seconds: float = 0.0
    dropped: list[int] = field(default_factory=list)
    clipped: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    bound: float | None = None


class RobustAggregator(Aggregator):
    """Base of the robust rules: stacks the vectors, times the rule and records an :class:`AggregationReport`.

    Subclasses implement :meth:`combine`. :attr:`last` is the report of the latest call (``None`` before the
    first); it is a record for logs and detection metrics, not state (nothing of it is checkpointed or reused).

    Example::

        agg = CoordinateMedian()
        strategy = FedAvg(aggregator=agg)
        ...  # after a round: agg.last.dropped, agg.last.seconds
    """

    streaming = False
    min_count = 1
    """Fewer vectors than this: :class:`~lightning_fed.errors.AggregationRefused`."""

    def __init__(self) -> None:
        self.last: AggregationReport | None = None

    def required(self, count: int) -> int:
        """The fewest vectors this rule can aggregate (may depend on its settings)."""
        return self.min_count

    def __call__(self, out: Tensor, flats: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
        """Stack ``flats``, refuse too few of them, apply :meth:`combine`, record and log the report."""
        t0 = time.perf_counter()
        vectors = list(flats)
        need_n = self.required(len(vectors))
        if len(vectors) < need_n:
            reason = f"{self!r} needs at least {need_n} replies, got {len(vectors)}"
            log.warning("aggregation refused: %s", reason)
            raise AggregationRefused(reason)
        x = torch.stack([v.to(out.dtype) for v in vectors])
        w = torch.tensor(list(weights), dtype=torch.float64)
        report = AggregationReport(count=len(vectors))
        self.combine(out, x, w, report)
        report.seconds = time.perf_counter() - t0
        self.last = report
        log.debug("%r: %d replies, dropped %s, clipped %s, %.4f s", self, report.count, report.dropped,
                  report.clipped, report.seconds)
        return out

    def combine(self, out: Tensor, x: Tensor, w: Tensor, report: AggregationReport) -> None:
        """Write the aggregate of the rows of ``x`` (``[n, d]``, weights ``w`` summing to 1) into ``out``;
        note what was dropped or clipped in ``report``."""
        raise NotImplementedError

    def report(self) -> dict[str, float]:
        """The latest call as round metrics: ``agg_dropped``, ``agg_clipped``, ``agg_s``."""
        if self.last is None:
            return {}
        return {"agg_dropped": float(len(self.last.dropped)), "agg_clipped": float(len(self.last.clipped)),
                "agg_s": self.last.seconds}


def _weighted_mean_(out: Tensor, x: Tensor, w: Tensor, keep: Tensor | None = None) -> Tensor:
    """``out = sum_i w_i x_i / sum_i w_i`` over the rows in ``keep`` (all rows by default); equal weights when the
    kept weights sum to zero."""
    if keep is not None:
        x, w = x[keep], w[keep]
    total = float(w.sum())
    w = w / total if total > 0 else torch.full_like(w, 1.0 / len(w))
    return torch.mv(x.T, w.to(x.dtype), out=out)


def median_(out: Tensor, x: Tensor) -> Tensor:
    """Coordinate-wise median of the rows of ``x`` into ``out``; for an even count, the mean of the two middle
    values (``torch.median`` would return the lower one)."""
    n = x.shape[0]
    if n % 2:
        return out.copy_(x.median(dim=0).values)
    s = x.sort(dim=0).values
    return torch.add(s[n // 2 - 1], s[n // 2], out=out).mul_(0.5)


def trimmed_mean_(out: Tensor, x: Tensor, k: int) -> Tensor:
    """Coordinate-wise mean of the rows of ``x`` after removing the ``k`` smallest and ``k`` largest values of
    every coordinate, into ``out``."""
    n = x.shape[0]
    if k == 0:
        return torch.mean(x, dim=0, out=out)
    s = x.sort(dim=0).values
    return torch.mean(s[k:n - k], dim=0, out=out)


def pairwise_sq_distances(x: Tensor) -> Tensor:
    """``[n, n]`` squared Euclidean distances between the rows of ``x`` (through the Gram matrix, in float64)."""
    g = (x @ x.T).double()
    sq = g.diagonal()
    return (sq[:, None] + sq[None, :] - 2 * g).clamp_(min=0).fill_diagonal_(0)


def krum_scores(x: Tensor, byzantine: int) -> Tensor:
    """Krum's score of every row: the sum of its squared distances to its ``n - byzantine - 2`` nearest other
    rows (Blanchard et al. 2017)."""
    n = x.shape[0]
    d = pairwise_sq_distances(x)
    d.fill_diagonal_(float("inf"))  # a row is not its own neighbour
    k = n - byzantine - 2
    return d.topk(k, dim=1, largest=False).values.sum(dim=1)


def clip_to_norm_(x: Tensor, bound: float) -> list[int]:
    """Scale every row of ``x`` whose L2 norm exceeds ``bound`` down to ``bound``, in place; return their
    positions."""
    norms = torch.linalg.vector_norm(x, dim=1)
    over = norms > bound
    scale = torch.where(over, bound / norms.clamp(min=1e-30), torch.ones_like(norms))
    x.mul_(scale[:, None])
    return over.nonzero().flatten().tolist()


def noise_generator(seed: int, stream: Stream, x: Tensor) -> torch.Generator:
    """A generator keyed by ``seed``, ``stream`` and a fingerprint of ``x`` (row count, each row's sum and sum of
    squares in float64): the same inputs give the same noise, with no state kept between calls."""
    xd = x.double()
    stats = torch.cat([xd.sum(dim=1), (xd * xd).sum(dim=1)]).tolist()
    bits = [struct.unpack("<q", struct.pack("<d", v))[0] for v in stats]
    return torch.Generator().manual_seed(derive_seed(seed, int(stream), x.shape[0], x.shape[1], *bits))


def add_noise_(out: Tensor, std: float, gen: torch.Generator) -> Tensor:
    """``out += N(0, std^2)`` per coordinate, drawn from ``gen``."""
    if std > 0:
        out.add_(torch.randn(out.shape, generator=gen, dtype=out.dtype), alpha=std)
    return out


class CoordinateMedian(RobustAggregator):
    """Coordinate-wise median of the updates (unweighted); an even count takes the mean of the two middle values.

    Example::

        strategy = FedAvg(aggregator=CoordinateMedian())
    """

    def combine(self, out: Tensor, x: Tensor, w: Tensor, report: AggregationReport) -> None:
        """``out = median(x, dim=0)``."""
        median_(out, x)


class TrimmedMean(RobustAggregator):
    """Coordinate-wise trimmed mean (unweighted): per coordinate, drop the ``floor(trim * n)`` smallest and largest
    values and average the rest.

    Example::

        strategy = FedAvg(aggregator=TrimmedMean(trim=0.2))  # of 10 replies, 2 dropped at each end

    Args:
        trim: fraction trimmed at each end, in ``[0, 0.5)``.
    """

    def __init__(self, trim: float = 0.1) -> None:
        super().__init__()
        need("TrimmedMean", 0 <= trim < 0.5, "trim", trim, "in [0, 0.5)")
        self.trim = float(trim)

    def combine(self, out: Tensor, x: Tensor, w: Tensor, report: AggregationReport) -> None:
        """Trimmed mean with ``k = floor(trim * n)``."""
        trimmed_mean_(out, x, int(self.trim * x.shape[0]))

    def __repr__(self) -> str:
        return f"TrimmedMean(trim={self.trim})"


class Krum(RobustAggregator):
    """Multi-Krum: score each update by the squared distances to its ``n - byzantine - 2`` nearest others, keep the
    ``select`` lowest scores and average them with their renormalised weights. ``select=1`` is Krum.

    Needs ``n > 2 * byzantine + 2`` replies; fewer refuse the round
    (:class:`~lightning_fed.errors.AggregationRefused`). :attr:`last` holds the scores and the dropped positions.

    Example::

        strategy = FedAvg(aggregator=Krum(byzantine=2))            # multi-Krum, keeps n - 2
        strategy = FedAvg(aggregator=Krum(byzantine=2, select=1))  # Krum

    Args:
        byzantine: ``f``, the number of malicious replies tolerated (>= 0).
        select: how many of the best-scored updates are averaged (>= 1); ``None``: ``n - byzantine``.
    """

    def __init__(self, byzantine: int = 1, select: int | None = None) -> None:
        super().__init__()
        need("Krum", byzantine >= 0, "byzantine", byzantine, "an integer >= 0")
        need("Krum", select is None or select >= 1, "select", select, "an integer >= 1 or None (n - byzantine)")
        self.byzantine = byzantine
        self.select = select

    def required(self, count: int) -> int:
        """``2 * byzantine + 3`` (Krum's ``n > 2f + 2``), and at least ``select``."""
        return max(2 * self.byzantine + 3, self.select or 1)

    def combine(self, out: Tensor, x: Tensor, w: Tensor, report: AggregationReport) -> None:
        """Average the ``select`` rows with the lowest Krum scores."""
        n = x.shape[0]
        scores = krum_scores(x, self.byzantine)
        m = self.select if self.select is not None else n - self.byzantine
        keep = scores.argsort(stable=True)[:m].sort().values
        report.scores = scores.tolist()
        kept = set(keep.tolist())
        report.dropped = [i for i in range(n) if i not in kept]
        _weighted_mean_(out, x, w, keep)

    def __repr__(self) -> str:
        return f"Krum(byzantine={self.byzantine}, select={self.select})"


class NormBound(RobustAggregator):
    """Norm bounding: every update longer than ``max_norm`` is scaled down to it, then the weighted mean.
    ``max_norm=None`` bounds by the median norm of the round's updates.

    Example::

        strategy = FedAvg(aggregator=NormBound(max_norm=2.0))
        strategy = FedAvg(aggregator=NormBound())  # the round's median norm

    Args:
        max_norm: the L2 bound (> 0), or ``None`` for the round's median norm.
    """

    def __init__(self, max_norm: float | None = None) -> None:
        super().__init__()
        need(type(self).__name__, max_norm is None or max_norm > 0, "max_norm", max_norm,
             "> 0 or None (the round's median norm)")
        self.max_norm = max_norm

    def bound(self, x: Tensor) -> float:
        """``max_norm``, or the median of the rows' norms (the lower median for an even count)."""
        if self.max_norm is not None:
            return float(self.max_norm)
        return float(torch.linalg.vector_norm(x, dim=1).median())

    def combine(self, out: Tensor, x: Tensor, w: Tensor, report: AggregationReport) -> None:
        """Clip the rows to :meth:`bound` in place (``x`` is the aggregator's own stack), then average."""
        report.bound = self.bound(x)
        report.clipped = clip_to_norm_(x, report.bound)
        _weighted_mean_(out, x, w)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_norm={self.max_norm})"


class WeakDP(NormBound):
    """Weak differential privacy (Sun et al. 2019): norm bounding, then Gaussian noise of standard deviation
    ``noise_std`` added to every coordinate of the aggregate. The noise is seeded by ``seed`` and the round's inputs
    (module docstring), so a resumed run draws the same noise.

    Example::

        strategy = FedAvg(aggregator=WeakDP(max_norm=2.0, noise_std=0.001, seed=0))

    Args:
        max_norm: the L2 bound (> 0), or ``None`` for the round's median norm.
        noise_std: standard deviation of the noise on the aggregate (>= 0).
        seed: seed of the noise.
    """

    def __init__(self, max_norm: float | None = 1.0, noise_std: float = 0.001, seed: int = 0) -> None:
        super().__init__(max_norm)
        need("WeakDP", noise_std >= 0, "noise_std", noise_std, ">= 0")
        self.noise_std = float(noise_std)
        self.seed = seed

    def combine(self, out: Tensor, x: Tensor, w: Tensor, report: AggregationReport) -> None:
        """Norm bounding, then ``out += N(0, noise_std^2)`` (the generator keyed by the unclipped inputs)."""
        gen = noise_generator(self.seed, Stream.WEAK_DP, x)
        super().combine(out, x, w, report)
        add_noise_(out, self.noise_std, gen)

    def __repr__(self) -> str:
        return f"WeakDP(max_norm={self.max_norm}, noise_std={self.noise_std}, seed={self.seed})"


__all__ = [
    "AggregationReport", "CoordinateMedian", "Krum", "NormBound", "RobustAggregator", "TrimmedMean", "WeakDP",
    "add_noise_", "clip_to_norm_", "krum_scores", "median_", "noise_generator", "pairwise_sq_distances",
    "trimmed_mean_",
]
