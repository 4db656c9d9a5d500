"""MNIST-1D (Greydanus 2020) as a LightningDataModule, generated locally and cached on disk.

The data is made by ``mnist1d.data.make_dataset`` from a seed: nothing is downloaded, ever. A different
``seed`` gives a fresh sample of the same distribution, which serves as public / proxy data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed.seeding import rng_untouched
from lightning_fed.store import atomic_torch_save
from lightning_fed.validation import CheckedArguments


def default_cache_dir() -> Path:
    """``$LIGHTNING_FED_CACHE`` or ``~/.cache/lightning_fed``."""
    return Path(os.environ.get("LIGHTNING_FED_CACHE", Path.home() / ".cache" / "lightning_fed"))


def make_mnist1d(num_samples: int = 5000, seed: int = 42, cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Generate (or read from the cache) MNIST-1D: ``x``/``y`` (train) and ``x_test``/``y_test``.

    Args:
        num_samples: total samples; 80 % train, 20 % test (the package's split).
        seed: generator seed.
        cache_dir: where generated tensors are cached; ``None`` uses :func:`default_cache_dir`.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    key = {k: v for k, v in vars(args).items() if k != "url"}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"mnist1d-{digest}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - any unreadable cache file (pickle, zip, IO errors) is regenerated, never trusted
            path.unlink(missing_ok=True)
    with rng_untouched():  # the package seeds NumPy's global generator: the training's random state is kept
        raw = make_dataset(args)
    data = {
        "x": torch.as_tensor(raw["x"], dtype=torch.float32),
        "y": torch.as_tensor(raw["y"], dtype=torch.long),
        "x_test": torch.as_tensor(raw["x_test"], dtype=torch.float32),
        "y_test": torch.as_tensor(raw["y_test"], dtype=torch.long),
    }
    cache.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(data, path)
    return data


class MNIST1DDataModule(CheckedArguments, L.LightningDataModule):
    """MNIST-1D train (4,000) / test (1,000) sequences of length 40, 10 classes, generated locally.

    MNIST-1D has no validation split. ``val_fraction > 0`` carves one out of the TRAINING data (a seeded random
    ``round(val_fraction * 4000)`` of it; the clients train on the rest); the test split is never used for it.
    With the default ``val_fraction=0`` the training set is unchanged and there is no ``val_dataloader()``:
    FedLoop then reports no ``val_*`` metrics and tests after the last round (docs/evaluation.md).

    Example::

        dm = MNIST1DDataModule(batch_size=32, val_fraction=0.1)  # 3,600 train / 400 val / 1,000 test
        loop.fit(MNIST1DCNN(), dm)

    Args:
        batch_size: batch size of every loader.
        num_samples: total samples generated (80 % train, 20 % test).
        seed: data-generation seed (use another seed for public / proxy data).
        cache_dir: cache folder for the generated tensors.
        val_fraction: share of the training data held out as the validation split, in ``[0, 1)``; 0 = none.
        val_seed: seed of which training examples are held out.
    """

    def __init__(self, batch_size: int = 32, num_samples: int = 5000, seed: int = 42, cache_dir: str | None = None,
                 val_fraction: float = 0.0, val_seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"MNIST1DDataModule: batch_size must be >= 1, got {batch_size}")
        if num_samples < 10:
            raise ValueError(f"MNIST1DDataModule: num_samples must be >= 10, got {num_samples}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"MNIST1DDataModule: val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction = val_fraction
        self.val_seed = val_seed
        self.val_set: TensorDataset | None = None
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.seed = seed
        self.cache_dir = cache_dir
        self.num_classes = 10
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def prepare_data(self) -> None:
        """Generate and cache the data once."""
        make_mnist1d(self.num_samples, self.seed, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Build the train, validation (``val_fraction > 0``) and test ``TensorDataset``s."""
        if self.train_set is None:
            d = make_mnist1d(self.num_samples, self.seed, self.cache_dir)
            x, y = d["x"], d["y"]
            n_val = round(self.val_fraction * len(y))
            if n_val > 0:
                perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.val_seed))
                val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
                self.val_set = TensorDataset(x[val_idx], y[val_idx])
                x, y = x[train_idx], y[train_idx]
            self.train_set = TensorDataset(x, y)
            self.test_set = TensorDataset(d["x_test"], d["y_test"])

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        assert self.train_set is not None, "call setup() first"
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation split carved from the training data; ``[]`` (no validation, for ``lightning.Trainer``
        and FedLoop alike) when ``val_fraction == 0``."""
        assert self.train_set is not None, "call setup() first"
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 256))

    def test_dataloader(self) -> DataLoader:
        """The held-out test split."""
        assert self.test_set is not None, "call setup() first"
        return DataLoader(self.test_set, batch_size=max(self.batch_size, 256))
