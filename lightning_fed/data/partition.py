"""Splitting a dataset into client shards: IID, Dirichlet label skew, k-label shards, quantity skew.

Every partition is a pure function of the labels, the number of clients and a seed. Shards are returned as
index tensors into the dataset; :func:`summary_rows` gives the per-client table the loop prints.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class PartitionError(ValueError):
    """The partition cannot satisfy its settings for this dataset (e.g. too few samples per client)."""


class Partition:
    """Base class: split sample indices among clients.

    Args:
        min_samples: every client must get at least this many samples.
    """

    def __init__(self, *, min_samples: int = 1) -> None:
        if min_samples < 1:
            raise ValueError(f"{type(self).__name__}: min_samples must be >= 1, got {min_samples}")
        self.min_samples = min_samples

    def split(self, labels: Tensor, num_clients: int, seed: int) -> list[Tensor]:
        """Indices of each client's shard (sorted int64 tensors), reproducible from ``seed``."""
        labels_np = np.asarray(labels.cpu().numpy() if isinstance(labels, Tensor) else labels).astype(np.int64)
        if num_clients < 1:
            raise PartitionError(f"num_clients must be >= 1, got {num_clients}")
        if len(labels_np) < num_clients * self.min_samples:
            raise PartitionError(
                f"{type(self).__name__}: {len(labels_np)} samples cannot give {num_clients} clients "
                f"min_samples={self.min_samples} each; lower num_clients or min_samples"
            )
        rng = np.random.default_rng(seed)
        shards = self._split(labels_np, num_clients, rng)
        sizes = [len(s) for s in shards]
        if min(sizes) < self.min_samples:
            raise PartitionError(
                f"{type(self).__name__}: a client got {min(sizes)} samples, fewer than min_samples={self.min_samples}"
            )
        return [torch.as_tensor(np.sort(s), dtype=torch.long) for s in shards]

    def _split(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        raise NotImplementedError


class IID(Partition):
    """Uniformly random, equal-size shards."""

    def _split(self, labels, num_clients, rng):
        return np.array_split(rng.permutation(len(labels)), num_clients)


class Dirichlet(Partition):
    """Label skew: each class is divided among clients with proportions drawn from Dir(alpha).

    Small ``alpha`` (0.1) gives clients few classes; large ``alpha`` (100) approaches IID. Draws are repeated
    (up to ``max_tries``) until every client has ``min_samples`` samples, as in NIID-Bench.

    Args:
        alpha: concentration, > 0.
        min_samples: minimum samples per client.
        max_tries: redraws before giving up with a :class:`PartitionError`.
    """

    def __init__(self, alpha: float = 0.5, *, min_samples: int = 10, max_tries: int = 1000) -> None:
        super().__init__(min_samples=min_samples)
        if not alpha > 0:
            raise ValueError(f"Dirichlet: alpha must be > 0, got {alpha}")
        if max_tries < 1:
            raise ValueError(f"Dirichlet: max_tries must be >= 1, got {max_tries}")
        self.alpha = alpha
        self.max_tries = max_tries

    def _split(self, labels, num_clients, rng):
        classes = np.unique(labels)
        by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
        for _ in range(self.max_tries):
            parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            for idx in by_class:
                p = rng.dirichlet(np.full(num_clients, self.alpha))
                cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
                for client, chunk in enumerate(np.split(idx, cuts)):
                    parts[client].append(chunk)
            shards = [np.concatenate(p) for p in parts]
            if min(len(s) for s in shards) >= self.min_samples:
                return shards
        raise PartitionError(
            f"Dirichlet(alpha={self.alpha}): no draw in {self.max_tries} tries gave every one of {num_clients} "
            f"clients min_samples={self.min_samples}; raise alpha, lower min_samples or num_clients"
        )


class Shards(Partition):
    """Pathological non-IID split of McMahan et al.: sort by label, cut into shards, k shards per client.

    Args:
        labels_per_client: shards (so at most this many labels) per client, >= 1.
    """

    def __init__(self, labels_per_client: int = 2, *, min_samples: int = 1) -> None:
        super().__init__(min_samples=min_samples)
        if labels_per_client < 1:
            raise ValueError(f"Shards: labels_per_client must be >= 1, got {labels_per_client}")
        self.labels_per_client = labels_per_client

    def _split(self, labels, num_clients, rng):
        order = np.argsort(labels + rng.random(len(labels)) * 0.5, kind="stable")
        pieces = np.array_split(order, num_clients * self.labels_per_client)
        assignment = rng.permutation(len(pieces)).reshape(num_clients, self.labels_per_client)
        return [np.concatenate([pieces[j] for j in row]) for row in assignment]


class QuantitySkew(Partition):
    """IID labels, but shard sizes drawn from Dir(alpha) (small alpha = very unequal sizes).

    Args:
        alpha: concentration of the size proportions, > 0.
        min_samples: minimum samples per client (guaranteed first, the rest is shared out).
    """

    def __init__(self, alpha: float = 0.5, *, min_samples: int = 10) -> None:
        super().__init__(min_samples=min_samples)
        if not alpha > 0:
            raise ValueError(f"QuantitySkew: alpha must be > 0, got {alpha}")
        self.alpha = alpha

    def _split(self, labels, num_clients, rng):
        perm = rng.permutation(len(labels))
        spare = len(labels) - num_clients * self.min_samples
        extra = rng.multinomial(spare, rng.dirichlet(np.full(num_clients, self.alpha)))
        sizes = extra + self.min_samples
        return np.split(perm, np.cumsum(sizes)[:-1])


def summary_rows(shards: list[Tensor], labels: Tensor, num_classes: int) -> list[tuple[int, int, list[int]]]:
    """Per client: (client id, sample count, label histogram)."""
    rows = []
    for cid, idx in enumerate(shards):
        hist = torch.bincount(labels[idx].long(), minlength=num_classes).tolist()
        rows.append((cid, len(idx), hist))
    return rows
