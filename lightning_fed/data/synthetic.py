"""Synthetic(alpha, beta): the FedProx paper's generated non-IID benchmark, and its IID variant.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, Section 5.1. Each of ``num_devices``
devices ``k`` holds multinomial logistic-regression data ``y = argmax(softmax(W_k x + b_k))``, ``x`` in R^60, 10
classes, with

- ``W_k ~ N(u_k, 1)``, ``b_k ~ N(u_k, 1)``, ``u_k ~ N(0, alpha)``: ``alpha`` sets how much the devices' models differ;
- ``x ~ N(v_k, Sigma)``, ``Sigma`` diagonal with ``Sigma_jj = j^-1.2``, ``v_k ~ N(B_k, 1)`` per coordinate,
  ``B_k ~ N(0, beta)``: ``beta`` sets how much the devices' inputs differ;
- power-law device sizes: ``floor(LogNormal(4, 2)) + 50`` samples (a heavy tail: a few devices hold most data).

(``N(m, s)`` with ``s`` the standard deviation.) Synthetic-IID: one ``W, b ~ N(0, 1)`` for every device and
``x ~ N(0, Sigma)`` everywhere; only the sizes differ. The paper uses 30 devices, Synthetic(0, 0), (0.5, 0.5) and
(1, 1) and the IID variant.

Everything is generated locally from ``seed`` (NumPy's ``default_rng``), in about a millisecond per thousand
samples; nothing is downloaded or cached. The natural partition is one client per device
(:class:`~lightning_fed.data.Natural`); each device's samples are split into its train and test part.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed.validation import CheckedArguments, need


def make_synthetic(
    alpha: float = 1.0,
    beta: float = 1.0,
    *,
    iid: bool = False,
    num_devices: int = 30,
    dimension: int = 60,
    num_classes: int = 10,
    seed: int = 0,
) -> tuple[list[Tensor], list[Tensor]]:
    """Generate Synthetic(alpha, beta) (or Synthetic-IID): per device, its inputs ``[n_k, dimension]`` (float32)
    and labels ``[n_k]`` (int64).

    Raises:
        ValueError: ``alpha`` or ``beta`` < 0, or a count < 1, naming the key.
    """
    owner = "make_synthetic"
    need(owner, alpha >= 0, "alpha", alpha, ">= 0")
    need(owner, beta >= 0, "beta", beta, ">= 0")
    for key, value in (("num_devices", num_devices), ("dimension", dimension), ("num_classes", num_classes)):
        need(owner, isinstance(value, int) and value >= 1, key, value, "an int >= 1")
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, num_devices).astype(np.int64) + 50
    std = np.arange(1, dimension + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2): Sigma's diagonal, as std
    if iid:
        w_all, b_all = rng.normal(0, 1, (dimension, num_classes)), rng.normal(0, 1, num_classes)
    else:
        u = rng.normal(0, alpha, num_devices)
        big_b = rng.normal(0, beta, num_devices)
    xs, ys = [], []
    for k in range(num_devices):
        if iid:
            w, b, v = w_all, b_all, np.zeros(dimension)
        else:
            w, b = rng.normal(u[k], 1, (dimension, num_classes)), rng.normal(u[k], 1, num_classes)
            v = rng.normal(big_b[k], 1, dimension)
        x = v + std * rng.standard_normal((int(sizes[k]), dimension))
        y = np.argmax(x @ w + b, axis=1)  # softmax is monotone: the argmax of the logits
        xs.append(torch.as_tensor(x, dtype=torch.float32))
        ys.append(torch.as_tensor(y, dtype=torch.long))
    return xs, ys


class DeviceDataset(TensorDataset):
    """A ``TensorDataset`` of ``(x, y)`` that also knows which device each sample came from (``groups``, read by
    the :class:`~lightning_fed.data.Natural` partition)."""

    def __init__(self, x: Tensor, y: Tensor, groups: Tensor) -> None:
        super().__init__(x, y)
        self.groups = groups


class SyntheticDataModule(CheckedArguments, L.LightningDataModule):
    """Synthetic(alpha, beta) of the FedProx paper as a LightningDataModule, with one client per device.

    The training set is every device's train part (with its device id, for ``Natural()``); the test set the union
    of the devices' test parts. Use ``FedLoop(num_clients=num_devices, partition=Natural())``.

    Example::

        dm = SyntheticDataModule(alpha=1.0, beta=1.0)              # Synthetic(1, 1), 30 devices
        loop = FedLoop(num_clients=30, clients_per_round=10, partition=Natural(), strategy=FedProx(mu=1.0))
        loop.fit(LogisticRegression(lr=0.01), dm)

    Args:
        alpha: spread of the devices' models, >= 0.
        beta: spread of the devices' inputs, >= 0.
        iid: Synthetic-IID instead (``alpha`` and ``beta`` unused).
        num_devices: devices (clients), the paper: 30.
        seed: generation seed.
        batch_size: batch size of every loader (the paper: 10).
        test_fraction: share of each device's samples held out for the test set, in ``(0, 1)``.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        iid: bool = False,
        num_devices: int = 30,
        seed: int = 0,
        batch_size: int = 10,
        test_fraction: float = 0.2,
    ) -> None:
        super().__init__()
        owner = "SyntheticDataModule"
        need(owner, alpha >= 0, "alpha", alpha, ">= 0")
        need(owner, beta >= 0, "beta", beta, ">= 0")
        need(owner, num_devices >= 1, "num_devices", num_devices, ">= 1")
        need(owner, batch_size >= 1, "batch_size", batch_size, ">= 1")
        need(owner, 0 < test_fraction < 1, "test_fraction", test_fraction, "in (0, 1)")
        self.alpha, self.beta, self.iid, self.num_devices, self.seed = alpha, beta, iid, num_devices, seed
        self.batch_size, self.test_fraction = batch_size, test_fraction
        self.num_classes = 10
        self.train_set: DeviceDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Generate the data (once) and split each device's samples: the first ``1 - test_fraction`` train (at
        least one sample), the rest test; the generator draws samples i.i.d., so the split needs no shuffle."""
        if self.train_set is not None:
            return
        xs, ys = make_synthetic(
            self.alpha, self.beta, iid=self.iid, num_devices=self.num_devices, seed=self.seed
        )
        train_x, train_y, groups, test_x, test_y = [], [], [], [], []
        for k, (x, y) in enumerate(zip(xs, ys)):
            n_train = min(max(round((1 - self.test_fraction) * len(y)), 1), len(y) - 1)
            train_x.append(x[:n_train])
            train_y.append(y[:n_train])
            groups.append(torch.full((n_train,), k, dtype=torch.long))
            test_x.append(x[n_train:])
            test_y.append(y[n_train:])
        self.train_set = DeviceDataset(torch.cat(train_x), torch.cat(train_y), torch.cat(groups))
        self.test_set = TensorDataset(torch.cat(test_x), torch.cat(test_y))

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (FedLoop gives each client its device's part)."""
        assert self.train_set is not None, "call setup() first"
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        """The union of the devices' test parts."""
        assert self.test_set is not None, "call setup() first"
        return DataLoader(self.test_set, batch_size=max(self.batch_size, 1024))


__all__ = ["DeviceDataset", "SyntheticDataModule", "make_synthetic"]
