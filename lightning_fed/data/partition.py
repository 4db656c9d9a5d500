"""Splitting a dataset into client shards: IID, Dirichlet label skew, k-label shards, quantity skew.

Every partition is a pure function of the labels (or, for the label-free :class:`IID` and :class:`QuantitySkew`,
of the number of samples), the number of clients and a seed. Shards are returned as index tensors into the
dataset; :func:`summary_rows` gives the per-client table the loop prints.

Label-based partitions (:class:`Dirichlet`, :class:`Shards`) take the class labels from the partition's
``labels=`` function when given, else from the dataset (see :func:`~lightning_fed.data.loaders.dataset_labels`:
``TensorDataset.tensors[1]``, a ``targets``/``labels`` attribute, or ``(x, y)`` samples), and refuse with a
:class:`PartitionError` when there are no integer class labels: they never split on a feature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_fed.data.loaders import LabelsNotFound, class_labels, dataset_labels
from lightning_fed.validation import CheckedArguments


class PartitionError(ValueError):
    """The partition cannot satisfy its settings for this dataset (e.g. too few samples per client)."""


class Partition(CheckedArguments):
    """Base class: split sample indices among clients.

    Subclasses implement ``_split(labels, num_clients, rng)``, which receives the int64 class label array, or,
    for a partition with ``needs_labels = False``, the number of samples.

    Args:
        min_samples: every client must get at least this many samples.
        labels: where the class labels come from, instead of the dataset: a function of the training dataset
            returning one non-negative integer per sample (a tensor, array or sequence), e.g.
            ``lambda ds: [s["digit"] for s in ds]``. Label-free partitions use it only for the partition table.
    """

    needs_labels: bool = True
    """Whether the split depends on class labels (``False``: only on the number of samples)."""

    labels: Callable[[Any], Any] | None = None
    # The class default stands for "no labels function": only a function given to the constructor becomes an
    # instance attribute, so the run identity (checkpoints, resume) of a partition without one is unchanged.

    def __init__(self, *, min_samples: int = 1, labels: Callable[[Any], Any] | None = None) -> None:
        if min_samples < 1:
            raise ValueError(f"{type(self).__name__}: min_samples must be >= 1, got {min_samples}")
        if labels is not None:
            if not callable(labels):
                raise TypeError(f"{type(self).__name__}: labels must be a function dataset -> labels, got "
                                f"{type(labels).__name__}")
            self.labels = labels
        self.min_samples = min_samples

    def dataset_labels(self, dataset: Any) -> Tensor | None:
        """The class labels of ``dataset`` (1-D int64) from ``labels=`` or the dataset itself.

        Returns ``None`` for a label-free partition when the dataset has no integer class labels (its shards
        are then summarised without label histograms).

        Raises:
            PartitionError: a label-based partition and no integer class labels (the message says what was
                found and the alternatives), or a ``labels=`` function whose result is not one non-negative
                integer per sample.
        """
        name = type(self).__name__
        try:
            if self.labels is not None:
                return class_labels(self.labels(dataset), len(dataset), f"the result of {name}(labels=...)")
            return dataset_labels(dataset)
        except LabelsNotFound as err:
            if self.labels is None and not self.needs_labels:
                return None
            raise PartitionError(
                f"{name} splits by class label, but found no integer class label per sample of the training "
                f"dataset ({type(dataset).__name__}): {err}. Give {name} a labels= function (dataset -> one "
                f"integer class per sample, e.g. {name}(..., labels=lambda ds: [s['label'] for s in ds])), or use "
                f"a partition that needs no labels: IID() or QuantitySkew(alpha)"
            ) from err

    def split(self, labels: Tensor | np.ndarray | Sequence[int] | int, num_clients: int, seed: int) -> list[Tensor]:
        """Indices of each client's shard (sorted int64 tensors), reproducible from ``seed``.

        Args:
            labels: the class label of every sample (one integer per sample); for a label-free partition
                (``needs_labels`` False: IID, QuantitySkew) the number of samples, or anything with a length.
            num_clients: number of shards.
            seed: seed of the split.

        Raises:
            PartitionError: the labels are not one integer per sample, or the settings cannot be met.
        """
        name = type(self).__name__
        if self.needs_labels:
            if isinstance(labels, (int, np.integer)):
                raise PartitionError(f"{name} splits by class label: give split() the labels, not a sample count")
            labels_np = np.asarray(labels.detach().cpu().numpy() if isinstance(labels, Tensor) else labels)
            if labels_np.dtype.kind not in "iub" or labels_np.ndim not in (1, 2) or \
                    (labels_np.ndim == 2 and labels_np.shape[1] != 1):
                raise PartitionError(
                    f"{name} splits by class label, but got labels of dtype {labels_np.dtype} and shape "
                    f"{labels_np.shape}, not one integer per sample; use IID() or QuantitySkew(alpha) for data "
                    f"without class labels"
                )
            data: np.ndarray | int = labels_np.reshape(-1).astype(np.int64)
            n = len(labels_np)
        else:
            n = int(labels) if isinstance(labels, (int, np.integer)) else len(labels)
            data = n
        if num_clients < 1:
            raise PartitionError(f"num_clients must be >= 1, got {num_clients}")
        if n < num_clients * self.min_samples:
            raise PartitionError(
                f"{name}: {n} samples cannot give {num_clients} clients "
                f"min_samples={self.min_samples} each; lower num_clients or min_samples"
            )
        rng = np.random.default_rng(seed)
        shards = self._split(data, num_clients, rng)
        sizes = [len(s) for s in shards]
        if min(sizes) < self.min_samples:
            raise PartitionError(
                f"{name}: a client got {min(sizes)} samples, fewer than min_samples={self.min_samples}"
            )
        return [torch.as_tensor(np.sort(s), dtype=torch.long) for s in shards]

    def split_dataset(self, dataset: Any, labels: Tensor | None, num_clients: int, seed: int) -> list[Tensor]:
        """The shards of ``dataset`` (what FedLoop calls): :meth:`split` of its ``labels`` (from
        :meth:`dataset_labels`), or of its length when they are ``None``. A partition that reads more of the dataset
        than its labels (:class:`~lightning_fed.data.Natural`: a group id per sample) overrides it."""
        return self.split(labels if labels is not None else len(dataset), num_clients, seed)

    def _split(self, labels: Any, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        raise NotImplementedError


class IID(Partition):
    """Uniformly random, equal-size shards. Needs no labels: works on any dataset with a length.

    Args:
        min_samples: minimum samples per client.
        labels: optional labels function (see :class:`Partition`), used only for the partition table.
    """

    needs_labels = False

    def __init__(self, *, min_samples: int = 1, labels: Callable[[Any], Any] | None = None) -> None:
        super().__init__(min_samples=min_samples, labels=labels)

    def _split(self, n, num_clients, rng):
        return np.array_split(rng.permutation(n), num_clients)


class Dirichlet(Partition):
    """Label skew: each class is divided among clients with proportions drawn from Dir(alpha).

    Small ``alpha`` (0.1) gives clients few classes; large ``alpha`` (100) approaches IID. Draws are repeated
    (up to ``max_tries``) until every client has ``min_samples`` samples, as in NIID-Bench.

    Args:
        alpha: concentration, > 0.
        min_samples: minimum samples per client.
        max_tries: redraws before giving up with a :class:`PartitionError`.
        labels: function of the dataset giving its class labels (see :class:`Partition`); default: read them
            from the dataset.
    """

    def __init__(self, alpha: float = 0.5, *, min_samples: int = 10, max_tries: int = 1000,
                 labels: Callable[[Any], Any] | None = None) -> None:
        super().__init__(min_samples=min_samples, labels=labels)
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
        min_samples: minimum samples per client.
        labels: function of the dataset giving its class labels (see :class:`Partition`); default: read them
            from the dataset.
    """

    def __init__(self, labels_per_client: int = 2, *, min_samples: int = 1,
                 labels: Callable[[Any], Any] | None = None) -> None:
        super().__init__(min_samples=min_samples, labels=labels)
        if labels_per_client < 1:
            raise ValueError(f"Shards: labels_per_client must be >= 1, got {labels_per_client}")
        self.labels_per_client = labels_per_client

    def _split(self, labels, num_clients, rng):
        order = np.argsort(labels + rng.random(len(labels)) * 0.5, kind="stable")
        pieces = np.array_split(order, num_clients * self.labels_per_client)
        assignment = rng.permutation(len(pieces)).reshape(num_clients, self.labels_per_client)
        return [np.concatenate([pieces[j] for j in row]) for row in assignment]


class QuantitySkew(Partition):
    """IID labels, but shard sizes drawn from Dir(alpha) (small alpha = very unequal sizes). Needs no labels:
    works on any dataset with a length.

    Args:
        alpha: concentration of the size proportions, > 0.
        min_samples: minimum samples per client (guaranteed first, the rest is shared out).
        labels: optional labels function (see :class:`Partition`), used only for the partition table.
    """

    needs_labels = False

    def __init__(self, alpha: float = 0.5, *, min_samples: int = 10,
                 labels: Callable[[Any], Any] | None = None) -> None:
        super().__init__(min_samples=min_samples, labels=labels)
        if not alpha > 0:
            raise ValueError(f"QuantitySkew: alpha must be > 0, got {alpha}")
        self.alpha = alpha

    def _split(self, n, num_clients, rng):
        perm = rng.permutation(n)
        spare = n - num_clients * self.min_samples
        extra = rng.multinomial(spare, rng.dirichlet(np.full(num_clients, self.alpha)))
        sizes = extra + self.min_samples
        return np.split(perm, np.cumsum(sizes)[:-1])


def summary_rows(shards: list[Tensor], labels: Tensor | None,
                 num_classes: int | None = None) -> list[tuple[int, int, list[int] | None]]:
    """Per client: (client id, sample count, label histogram), the histogram ``None`` when ``labels`` is
    ``None`` (labels unknown). ``num_classes`` defaults to the largest label + 1."""
    if labels is not None and num_classes is None:
        num_classes = int(labels.max()) + 1 if len(labels) else 1
    rows: list[tuple[int, int, list[int] | None]] = []
    for cid, idx in enumerate(shards):
        hist = None if labels is None else torch.bincount(labels[idx].long(), minlength=num_classes).tolist()
        rows.append((cid, len(idx), hist))
    return rows
