"""FLAME: Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX Security 2022.

Three steps on the round's updates:

1. **filter**: the pairwise cosine distances ``1 - cos(u_i, u_j)`` of the updates are clustered with HDBSCAN
   (``min_cluster_size = n // 2 + 1``, so at most one cluster can hold a majority); updates outside the
   largest cluster are dropped. The paper clusters the local models; with one global model per round the
   updates differ from the models by the same offset and carry the same directions, more visibly. HDBSCAN with
   one cluster allowed labels only the points that stay in it longest, so an honest update at the edge of the
   cluster may be dropped too (as in the paper's implementation, which uses the same settings).
2. **clip**: every kept update longer than ``S``, the median L2 norm of the kept updates, is scaled to ``S``.
3. **noise**: the weighted mean of the clipped updates gets Gaussian noise of standard deviation
   ``noise_level * S`` per coordinate (the paper's ``lambda``: 0.001 for image classification), seeded as
   described in :mod:`.robust`.

HDBSCAN comes from scikit-learn (``sklearn.cluster.HDBSCAN``, scikit-learn >= 1.3), imported on first use.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from lightning_fed.errors import AggregationRefused
from lightning_fed.seeding import Stream
from lightning_fed.strategies.robust import (
    AggregationReport,
    RobustAggregator,
    _weighted_mean_,
    add_noise_,
    clip_to_norm_,
    noise_generator,
)
from lightning_fed.validation import need


def cosine_distances(x: Tensor) -> Tensor:
    """``[n, n]`` float64 matrix of ``1 - cos(x_i, x_j)`` between the rows of ``x`` (a zero row is at distance 1
    from every other row)."""
    xd = x.double()
    unit = xd / torch.linalg.vector_norm(xd, dim=1, keepdim=True).clamp(min=1e-30)
    d = (1.0 - unit @ unit.T).clamp_(min=0.0)
    return d.fill_diagonal_(0.0)


def majority_cluster(distances: Tensor) -> tuple[list[int], list[int]]:
    """HDBSCAN on a precomputed distance matrix with ``min_cluster_size = n // 2 + 1``: the positions in the
    largest cluster and each position's label (-1: noise)."""
    from sklearn.cluster import HDBSCAN

    n = distances.shape[0]
    with warnings.catch_warnings():  # scikit-learn 1.8+ announces a new default of ``copy``; the input is ours
        warnings.simplefilter("ignore", FutureWarning)
        labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed",
                         allow_single_cluster=True).fit_predict(distances.numpy().copy()).tolist()
    found = [lab for lab in set(labels) if lab >= 0]
    if not found:
        return [], labels
    best = max(found, key=lambda lab: (labels.count(lab), -lab))
    return [i for i, lab in enumerate(labels) if lab == best], labels


class FLAME(RobustAggregator):
    """FLAME's filter, clip and noise (module docstring). Needs at least 3 replies; a round whose updates form no
    majority cluster is refused (:class:`~lightning_fed.errors.AggregationRefused`). :attr:`last` holds the
    dropped positions, the clipped ones, the cluster labels (``scores``) and the norm bound.

    Example::

        strategy = FedAvg(aggregator=FLAME(noise_level=0.001, seed=0))

    Args:
        noise_level: ``lambda``: the noise's standard deviation is ``noise_level`` times the clipping bound (>= 0).
        seed: seed of the noise.
    """

    min_count = 3

    def __init__(self, noise_level: float = 0.001, seed: int = 0) -> None:
        super().__init__()
        need("FLAME", noise_level >= 0, "noise_level", noise_level, ">= 0")
        self.noise_level = float(noise_level)
        self.seed = seed

    def combine(self, out: Tensor, x: Tensor, w: Tensor, report: AggregationReport) -> None:
        """Filter by cosine clustering, clip to the kept updates' median norm, average, add noise."""
        gen = noise_generator(self.seed, Stream.FLAME_NOISE, x)
        keep, labels = majority_cluster(cosine_distances(x))
        report.scores = [float(lab) for lab in labels]
        if not keep:
            raise AggregationRefused(f"{self!r}: the {x.shape[0]} updates form no majority cluster")
        kept = set(keep)
        report.dropped = [i for i in range(x.shape[0]) if i not in kept]
        idx = torch.tensor(keep)
        xk = x[idx]
        bound = float(torch.linalg.vector_norm(xk, dim=1).median())
        report.bound = bound
        report.clipped = [keep[i] for i in clip_to_norm_(xk, bound)]
        _weighted_mean_(out, xk, w[idx])
        add_noise_(out, self.noise_level * bound, gen)

    def __repr__(self) -> str:
        return f"FLAME(noise_level={self.noise_level}, seed={self.seed})"


__all__ = ["FLAME", "cosine_distances", "majority_cluster"]
