"""Per-client data loaders over a shard of the user's training set, seeded per (round, client)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)

log = logging.getLogger("lightning_fed")


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


class LoadersModule(L.LightningDataModule):
    """The data module of ``FedLoop.fit(model, train_loader, val_loader)``: a training loader (split among the
    clients: its dataset, batch size, ``drop_last``, collate function and workers) and an optional validation
    loader, as ``lightning.Trainer.fit`` takes them; no test loader."""

    def __init__(self, train: DataLoader, val: DataLoader | None = None) -> None:
        super().__init__()
        self.train, self.val = train, val

    def train_dataloader(self) -> DataLoader:
        """The training loader given."""
        return self.train

    def val_dataloader(self) -> DataLoader | list:
        """The validation loader given, or none (an empty list, as for ``lightning.Trainer``)."""
        return self.val if self.val is not None else []


def described_kind(value: Any) -> str:
    """How a message names what was given in place of an object: ``the class MNIST1DCNN`` for a class (an instance
    was meant), else its type's name (``list``)."""
    return f"the class {value.__name__}" if isinstance(value, type) else type(value).__name__


def loaders_module(datamodule: Any, train_dataloaders: Any = None, val_dataloaders: Any = None) -> L.LightningDataModule:
    """What ``FedLoop.fit`` trains on, from its arguments as ``lightning.Trainer.fit`` takes them: a data module, or
    a training ``DataLoader`` (second argument or ``train_dataloaders``) with an optional validation loader
    (:class:`LoadersModule`). Anything else, both forms, or neither is refused by name."""
    if isinstance(datamodule, DataLoader):  # fit(model, train_loader, ...), as Trainer.fit(model, train_loader)
        if train_dataloaders is not None:
            raise ValueError("FedLoop.fit: a training DataLoader was given twice (second argument and "
                             "train_dataloaders=); give it once")
        datamodule, train_dataloaders = None, datamodule
    if datamodule is not None:
        if not isinstance(datamodule, L.LightningDataModule):
            raise ValueError(f"FedLoop.fit: datamodule={described_kind(datamodule)} is not allowed; give a "
                             "LightningDataModule or a training DataLoader (an instance)")
        if train_dataloaders is not None or val_dataloaders is not None:
            raise ValueError("FedLoop.fit: give a datamodule or dataloaders, not both (as lightning.Trainer.fit)")
        return datamodule
    if train_dataloaders is None:
        raise ValueError("FedLoop.fit needs training data: a LightningDataModule, or a training DataLoader "
                         "(fit(model, train_loader, val_loader))")
    for name, loader in (("train_dataloaders", train_dataloaders), ("val_dataloaders", val_dataloaders)):
        if loader is not None and not isinstance(loader, DataLoader):
            raise ValueError(f"FedLoop.fit: {name}={described_kind(loader)} is not allowed; {name} must be a torch "
                             "DataLoader")
    return LoadersModule(train_dataloaders, val_dataloaders)


def training_template(loader: Any, owner: str) -> DataLoader:
    """The training loader whose dataset FedLoop splits among the clients, checked: each client's loader takes its
    batch size, ``drop_last``, collate function and workers (:func:`client_loader`) and draws its own shuffled
    batches. A ``BatchSampler`` given in place of a batch size stands for its batch size and ``drop_last``; a
    sampler of another kind is not used (logged). Refused by name: not a ``DataLoader`` (several loaders), an
    ``IterableDataset`` (a stream cannot be split by index), a batch sampler of another kind."""
    if not isinstance(loader, DataLoader):
        raise ValueError(f"{owner}: the training data must be one torch DataLoader, got {described_kind(loader)} "
                         "(FedLoop splits one training set among the clients)")
    if isinstance(loader.dataset, IterableDataset):
        raise ValueError(f"{owner}: the training DataLoader's dataset is an IterableDataset "
                         f"({type(loader.dataset).__name__}); FedLoop splits the training set among the clients by "
                         "index, so it must be a map-style Dataset (__len__ and __getitem__)")
    if loader.batch_size is None and loader.batch_sampler is not None:
        sampler = loader.batch_sampler
        if type(sampler) is not BatchSampler:
            raise ValueError(f"{owner}: the training DataLoader has a batch_sampler of its own "
                             f"({type(sampler).__name__}); FedLoop draws each client's batches from its shard "
                             "itself (shuffled, batch_size at a time): give the DataLoader a batch_size instead")
        log.info("the training DataLoader's BatchSampler stands for batch_size=%d, drop_last=%s: each client draws "
                 "its own shuffled batches of that size", sampler.batch_size, sampler.drop_last)
        return DataLoader(loader.dataset, batch_size=sampler.batch_size, drop_last=sampler.drop_last,
                          collate_fn=loader.collate_fn, num_workers=loader.num_workers)
    if not isinstance(loader.sampler, RandomSampler | SequentialSampler):
        log.warning("the training DataLoader's sampler (%s) is not used: FedLoop draws each client's batches from its "
                    "shard, shuffled every round", type(loader.sampler).__name__)
    return loader


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


def index_batches(data: Dataset, idx: Tensor, batch_size: int,
                  collate: Callable[[list[Any]], Any] | None = None) -> Iterator[tuple[Any, Any]]:
    """The ``(x, y)`` batches of ``data`` at the indices ``idx``, in order, ``batch_size`` at a time: tensors sliced
    directly from a ``TensorDataset``, other datasets' samples put together by ``collate`` (default: torch's
    ``default_collate``); the first two fields of each batch."""
    from torch.utils.data import default_collate

    for i in range(0, len(idx), batch_size):
        part = idx[i : i + batch_size]
        if isinstance(data, TensorDataset):
            yield data.tensors[0][part], data.tensors[1][part]
        else:
            x, y = (collate or default_collate)([data[j] for j in part.tolist()])[:2]
            yield x, y


def _default_collate(fn: Callable | None) -> bool:
    from torch.utils.data._utils.collate import default_collate

    return fn is None or fn is default_collate


LABEL_KEYS = ("label", "labels", "target", "targets", "y")
"""Keys of dict samples read as the class label by :func:`dataset_labels`, first match wins."""


class LabelsNotFound(ValueError):
    """No integer class label per sample can be read from a dataset; the message says what was found."""


def dataset_labels(dataset: Dataset) -> Tensor:
    """The integer class label of every sample of ``dataset`` (a 1-D int64 tensor), for label-based partitions.

    Labels are read from the first of these sources that the dataset has:

    1. ``tensors[1]`` of a ``TensorDataset`` (with at least two tensors);
    2. a ``targets`` or ``labels`` attribute (tensor, array or sequence), as torchvision datasets have;
    3. the samples themselves, one by one (slowest): ``(x, y, ...)`` tuples or lists take ``y``; dict samples
       take the first of the keys :data:`LABEL_KEYS`.

    The source found must hold one integer (or bool) per sample, none negative: floats (regression targets),
    several values per sample (multi-label, one-hot, a feature vector) or negative values are refused rather
    than read as classes. A ``Subset`` takes its parent dataset's labels at its indices.

    Raises:
        LabelsNotFound: no source, or the source found does not hold integer class labels; the message says
            what was found.
    """
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise LabelsNotFound(f"the dataset ({type(dataset).__name__}) has no len()") from err
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return class_labels(dataset.tensors[1], n, "TensorDataset.tensors[1]")
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None and not callable(values):
            return class_labels(values, n, f"the `{attr}` attribute")
    return torch.as_tensor([_sample_label(dataset, i) for i in range(n)], dtype=torch.long).reshape(n)


def class_labels(values: Any, n: int, where: str) -> Tensor:
    """``values`` as a 1-D int64 tensor of ``n`` class labels, or :class:`LabelsNotFound` naming ``where`` and
    what it holds when they are not one non-negative integer per sample. Shape ``(n, 1)`` counts as one value
    per sample."""
    try:
        t = values if isinstance(values, Tensor) else torch.as_tensor(np.asarray(values))
    except (TypeError, ValueError, RuntimeError) as err:
        raise LabelsNotFound(f"{where} is a {type(values).__name__} that is not a numeric array") from err
    if t.is_floating_point() or t.is_complex():
        raise LabelsNotFound(f"{where} holds {_describe(t)}, not integer class labels")
    if t.ndim == 0 or t.shape[0] != n or t.numel() != n:
        raise LabelsNotFound(f"{where} holds {_describe(t)}, not one value per sample of the {n}")
    t = t.detach().cpu().reshape(n).long()
    if n and int(t.min()) < 0:
        raise LabelsNotFound(f"{where} holds negative values (min {int(t.min())}), not class indices")
    return t


def _sample_label(dataset: Dataset, i: int) -> int:
    try:
        sample = dataset[i]
    except (TypeError, IndexError, KeyError, NotImplementedError) as err:
        raise LabelsNotFound(f"samples of {type(dataset).__name__} cannot be read by index ({err!r})") from err
    if isinstance(sample, dict):
        key = next((k for k in LABEL_KEYS if k in sample), None)
        if key is None:
            raise LabelsNotFound(f"sample {i} is a dict with keys {sorted(map(str, sample))}, none of {list(LABEL_KEYS)}")
        value, where = sample[key], f"sample {i}[{key!r}]"
    elif isinstance(sample, (tuple, list)) and len(sample) >= 2:
        value, where = sample[1], f"sample {i}[1]"
    else:
        raise LabelsNotFound(f"sample {i} is {_describe(sample)}, not an (x, y) pair")
    if isinstance(value, (bool, int, np.integer)):
        label = int(value)
    elif isinstance(value, (Tensor, np.ndarray)) and _integral(value) and value.reshape(-1).shape[0] == 1:
        label = int(value.item())
    else:
        raise LabelsNotFound(f"{where} is {_describe(value)}, not an integer class label")
    if label < 0:
        raise LabelsNotFound(f"{where} is {label}, a negative value, not a class index")
    return label


def _integral(x: Tensor | np.ndarray) -> bool:
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "iub"
    return not (x.is_floating_point() or x.is_complex())


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of dtype {str(x.dtype).removeprefix('torch.')} and shape {tuple(x.shape)}"
    if isinstance(x, np.ndarray):
        return f"an array of dtype {x.dtype} and shape {x.shape}"
    if isinstance(x, (bool, int, float, np.number)):
        return f"the {type(x).__name__} {x!r}"
    return f"a {type(x).__name__}"
