"""Public / proxy data shared by the server and every client (distillation-based algorithms).

Knowledge-distillation algorithms exchange predictions on a set of inputs that every party holds: FedMD's
public subset, FedDF's unlabeled proxy set, decentralized distillation's reference set. For MNIST-1D the
natural choice is a fresh sample of the same distribution made with another generator seed, so nothing
overlaps with the private training data and nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_fed.validation import CheckedArguments

ArrayLike = Any
"""A numpy array or nested lists of numbers (what ``numpy.asarray`` reads)."""


def _as_tensor(value: Any, name: str) -> Tensor:
    """``value`` as a tensor (numpy arrays and nested lists of numbers read by numpy), or a ``ValueError`` naming
    it."""
    if isinstance(value, Tensor):
        return value
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"PublicData.from_tensors: {name} must be a tensor or an array of numbers ({err})") from None
    if array.dtype.kind not in "biuf":
        raise ValueError(f"PublicData.from_tensors: {name} must be a tensor or an array of numbers, got "
                         f"{type(value).__name__} of {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


class PublicData(CheckedArguments):
    """A shared set of inputs (and optionally labels) known to the server and to all clients.

    By default it is MNIST-1D generated with ``seed`` (use a seed other than the private data's, 42 by
    default); :meth:`from_tensors` wraps any tensors instead. Strategies index it with the sample indices
    they send (``x[indices]``), so the inputs themselves never cross the wire.

    Example::

        public = PublicData(num_samples=1000, seed=7)          # unlabeled MNIST-1D proxy set
        strategy = FedDF(public=public, proxy_size=500)
        x = public.x[torch.arange(10)]                          # [10, 40]

    Args:
        num_samples: how many public samples to keep.
        seed: generator seed of the MNIST-1D sample (must differ from the private data's seed).
        labeled: keep the labels (``y``); distillation algorithms use the inputs only.
        cache_dir: cache folder of the generated tensors (``None``: the default MNIST-1D cache).
    """

    def __init__(self, num_samples: int = 1000, seed: int = 7, labeled: bool = False,
                 cache_dir: str | None = None) -> None:
        if num_samples < 1:
            raise ValueError(f"PublicData: num_samples={num_samples} is not allowed; num_samples must be >= 1")
        self.num_samples = num_samples
        self.seed = seed
        self.labeled = labeled
        self.cache_dir = cache_dir
        self._x: Tensor | None = None
        self._y: Tensor | None = None

    @classmethod
    def from_tensors(cls, x: Tensor | ArrayLike, y: Tensor | ArrayLike | None = None) -> PublicData:
        """Wrap given inputs ``x`` (first dimension = samples; a tensor, a numpy array or nested lists, stored as
        float32) and optional integer class labels ``y`` (one per sample)."""
        x = _as_tensor(x, "x")
        if x.ndim < 1 or len(x) < 1:
            raise ValueError(f"PublicData.from_tensors: x must have at least one sample, got shape {tuple(x.shape)}")
        if y is not None:
            y = _as_tensor(y, "y")
            if y.ndim != 1 or len(y) != len(x):
                raise ValueError(f"PublicData.from_tensors: y must hold one label per sample ({len(x)}), got shape "
                                 f"{tuple(y.shape)}")
            if y.dtype == torch.bool or y.is_complex() or (y.is_floating_point() and not torch.equal(y, y.round())):
                raise ValueError(f"PublicData.from_tensors: y must hold integer class labels, got {y.dtype} values")
        out = cls(num_samples=len(x), labeled=y is not None)
        out._x = x.detach().float().contiguous()
        out._y = None if y is None else y.detach().long().contiguous()
        return out

    def _load(self) -> None:
        from lightning_fed.data.mnist1d import make_mnist1d

        # Generate enough samples: the package splits 80 % train / 20 % test; both parts are public here.
        total = max(10, -(-self.num_samples * 5 // 4) + 1)
        d = make_mnist1d(total, self.seed, self.cache_dir)
        x = torch.cat([d["x"], d["x_test"]])[: self.num_samples]
        y = torch.cat([d["y"], d["y_test"]])[: self.num_samples]
        self._x = x.float().contiguous()
        self._y = y.long().contiguous() if self.labeled else None

    @property
    def x(self) -> Tensor:
        """The public inputs, ``[num_samples, ...]``."""
        if self._x is None:
            self._load()
        assert self._x is not None
        return self._x

    @property
    def y(self) -> Tensor | None:
        """The public labels, or ``None`` for unlabeled public data."""
        if self._x is None:
            self._load()
        return self._y

    def __len__(self) -> int:
        return len(self.x)

    def sample_indices(self, size: int, generator: torch.Generator) -> Tensor:
        """``size`` distinct sample indices (all, sorted, when ``size >= len(self)``), as int64."""
        n = len(self)
        if size >= n:
            return torch.arange(n)
        return torch.randperm(n, generator=generator)[:size].sort().values


__all__ = ["PublicData"]
