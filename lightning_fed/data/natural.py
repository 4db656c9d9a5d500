"""The natural partition: one client per group the data already comes in (a device, a writer, a speaker).

Federated benchmarks such as the FedProx paper's Synthetic(alpha, beta), FEMNIST or Shakespeare are generated or
collected per device: the split is part of the data, not drawn. :class:`Natural` reads a group id per training
sample and gives client ``k`` the samples of group ``k``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_fed.data.partition import Partition, PartitionError


class Natural(Partition):
    """One client per group: client ``k`` gets every training sample whose group id is ``k``.

    The group ids come from ``groups(dataset)`` when given, else from the dataset's ``groups`` attribute
    (:class:`~lightning_fed.data.synthetic.DeviceDataset` has one); they must be ``0 .. num_clients - 1``, each
    used. Nothing is random: ``seed`` is ignored.

    Example::

        loop = FedLoop(num_clients=30, clients_per_round=10, partition=Natural())
        loop.fit(LogisticRegression(), SyntheticDataModule(alpha=1.0, beta=1.0, num_devices=30))

    Args:
        groups: function of the training dataset giving one integer group id per sample; ``None``: its
            ``groups`` attribute.
        min_samples: every client must get at least this many samples.
    """

    needs_labels = False

    def __init__(self, *, groups: Callable[[Any], Any] | None = None, min_samples: int = 1) -> None:
        super().__init__(min_samples=min_samples)
        if groups is not None and not callable(groups):
            raise TypeError(
                f"Natural: groups must be a function dataset -> group ids, got {type(groups).__name__}"
            )
        self.groups = groups

    def split_dataset(self, dataset: Any, labels: Tensor | None, num_clients: int, seed: int) -> list[Tensor]:
        """Indices of each group's samples, group ``k`` to client ``k``.

        Raises:
            PartitionError: no group ids, ids that are not ``0 .. num_clients - 1`` with each used, or a group
                smaller than ``min_samples``.
        """
        raw = self.groups(dataset) if self.groups is not None else getattr(dataset, "groups", None)
        if raw is None:
            raise PartitionError(
                f"Natural: the training dataset ({type(dataset).__name__}) has no 'groups' attribute; "
                "give Natural(groups=lambda ds: ...) one group id per sample"
            )
        ids = torch.as_tensor(raw).reshape(-1)
        if ids.is_floating_point() or len(ids) != len(dataset):
            raise PartitionError(
                f"Natural: group ids must be one integer per sample ({len(dataset)}), got "
                f"{len(ids)} of dtype {ids.dtype}"
            )
        found = torch.unique(ids).tolist()
        if found != list(range(num_clients)):
            raise PartitionError(
                f"Natural: num_clients={num_clients} is not allowed for this data; num_clients must "
                f"be the number of groups, {len(found)} (ids {found[0]}..{found[-1]}, each used)"
            )
        shards = [torch.nonzero(ids == k).reshape(-1) for k in range(num_clients)]
        small = min(len(s) for s in shards)
        if small < self.min_samples:
            raise PartitionError(
                f"Natural: a group has {small} samples, fewer than min_samples={self.min_samples}"
            )
        return shards

    def _split(self, labels: Any, num_clients: int, rng: Any) -> list[Any]:
        raise PartitionError("Natural splits a dataset by its group ids: use split_dataset(dataset, ...)")


__all__ = ["Natural"]
