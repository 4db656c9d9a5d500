"""Per-client data loaders over a shard of the user's training set, seeded per (round, client)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset, TensorDataset


class TensorShardLoader:
    """Shuffled mini-batches of a ``TensorDataset`` shard by tensor indexing (no per-sample Python calls).

    Equivalent to ``DataLoader(Subset(ds, idx), batch_size, shuffle=True)`` for tensor datasets, but
    several times faster for small models, where per-sample collation would dominate.
    """

    def __init__(self, tensors: tuple[Tensor, ...], indices: Tensor, batch_size: int, generator: torch.Generator,
                 drop_last: bool = False) -> None:
        self.tensors = tensors
        self.indices = indices
        self.batch_size = batch_size
        self.generator = generator
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[Tensor]]:
        order = self.indices[torch.randperm(len(self.indices), generator=self.generator)]
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield [t[idx] for t in self.tensors]


def subset_indices(data: Dataset, root: Dataset) -> Tensor | None:
    """The indices into ``root`` of ``data`` when ``data`` is ``root`` or a chain of ``Subset`` objects over it,
    else ``None``.

    ``Subset(Subset(root, shard), positions)`` (a client's shard narrowed by a callback) resolves to
    ``shard[positions]``, so such data keeps the fast tensor path of :func:`client_loader`.
    """
    chain: list[Subset] = []
    while data is not root:
        if not isinstance(data, Subset):
            return None
        chain.append(data)
        data = data.dataset
    if not chain:
        return torch.arange(len(root))
    idx = torch.as_tensor(chain[-1].indices, dtype=torch.long)
    for sub in reversed(chain[:-1]):
        idx = idx[torch.as_tensor(sub.indices, dtype=torch.long)]
    return idx


def client_loader(template: DataLoader, data: Tensor | Dataset, generator: torch.Generator) -> Any:
    """A shuffled loader over ``data`` with the batch size, collate function and worker settings of
    ``template`` (the datamodule's ``train_dataloader()``).

    ``data`` is either indices into ``template.dataset`` or a dataset (a client's shard, possibly narrowed by a
    callback's ``on_client_data``); a chain of ``Subset`` objects over ``template.dataset`` is read through
    its indices.
    """
    ds = template.dataset
    batch_size = template.batch_size or 1
    drop_last = bool(getattr(template, "drop_last", False))
    indices = data if isinstance(data, Tensor) else subset_indices(data, ds)
    if indices is not None and isinstance(ds, TensorDataset) and _default_collate(template.collate_fn):
        return TensorShardLoader(ds.tensors, indices, batch_size, generator, drop_last)
    return DataLoader(
        Subset(ds, indices.tolist()) if indices is not None else data,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=template.collate_fn,
        num_workers=template.num_workers,
        drop_last=drop_last,
    )


class TensorSliceLoader:
    """In-order mini-batches of a ``TensorDataset`` by slicing: the batches ``DataLoader(ds, batch_size)`` (no
    shuffling, default collate) yields, without per-sample indexing and collation. Batches are copies, as the
    collated ones are, so a step that changes its batch in place cannot change the dataset."""

    def __init__(self, tensors: tuple[Tensor, ...], batch_size: int, drop_last: bool = False) -> None:
        self.tensors = tensors
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.tensors[0]) if self.tensors else 0
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[Tensor]]:
        for i in range(len(self)):
            yield [t[i * self.batch_size : (i + 1) * self.batch_size].clone() for t in self.tensors]


def eval_batches(loader: Any) -> Any:
    """What to iterate for evaluation: a :class:`TensorSliceLoader` with the same batches when ``loader`` is a
    plain sequential ``DataLoader`` over a ``TensorDataset`` (default collate), else ``loader`` itself."""
    if (isinstance(loader, DataLoader) and isinstance(loader.dataset, TensorDataset) and loader.batch_size
            and isinstance(loader.sampler, SequentialSampler) and _default_collate(loader.collate_fn)):
        return TensorSliceLoader(loader.dataset.tensors, loader.batch_size, bool(loader.drop_last))
    return loader


def _default_collate(fn: Callable | None) -> bool:
    from torch.utils.data._utils.collate import default_collate

    return fn is None or fn is default_collate


def dataset_labels(dataset: Dataset) -> Tensor:
    """Integer class labels of every sample, for label-aware partitions.

    Uses ``tensors[1]`` of a ``TensorDataset``, a ``targets``/``labels`` attribute, or (slowest) reads
    ``dataset[i][1]`` for every sample.
    """
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1].reshape(len(dataset), -1)[:, 0].long()
    for attr in ("targets", "labels", "y"):
        if hasattr(dataset, attr):
            return torch.as_tensor(getattr(dataset, attr)).long().reshape(-1)
    try:
        return torch.as_tensor([_sample_label(dataset[i]) for i in range(len(dataset))])  # type: ignore[arg-type]
    except (TypeError, IndexError, KeyError, ValueError) as err:
        raise ValueError(
            "cannot read class labels from the training dataset; give it a `targets` attribute or return "
            "(x, y) samples, or use the IID partition"
        ) from err


def _sample_label(sample: Any) -> int:
    if isinstance(sample, dict):
        for key in ("label", "labels", "y", "target", "targets"):
            if key in sample:
                return int(sample[key])
        raise KeyError("no label key in sample dict")
    return int(sample[1])
