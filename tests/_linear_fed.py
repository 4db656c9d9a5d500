"""A linear model on 13 fixed points and a tiny FedLoop around it, for the tests that check a strategy's rounds
against a hand computation (SCAFFOLD, FedDyn): full-batch SGD, so each local epoch is one step."""

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed import FedLoop
from lightning_fed.data import IID

W0 = [0.5, -1.0]
LR, EPOCHS, CLIENTS, PER_ROUND, ROUNDS = 0.1, 3, 3, 2, 2


class Linear(L.LightningModule):
    """``y = w . x`` with a mean squared error; plain SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([W0]))

    def forward(self, x):
        return self.lin(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class FixedData(L.LightningDataModule):
    """13 fixed points (IID shards of 5, 4 and 4); one batch holds a whole shard, so each local epoch is one
    full-batch step."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(13, 2, generator=g)
        self.y = self.x @ torch.tensor([2.0, 1.0]) + 0.3 * torch.randn(13, generator=g) + 2 * (self.x[:, 0] > 0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)

    def test_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)


def make_loop(tmp_path, strategy, **kw) -> FedLoop:
    """A FedLoop of ``CLIENTS`` IID clients, ``PER_ROUND`` a round, ``ROUNDS`` rounds of ``EPOCHS`` local epochs,
    checkpointing every round, quiet; ``kw`` overrides any of it."""
    args = {"num_clients": CLIENTS, "clients_per_round": PER_ROUND, "rounds": ROUNDS, "local_epochs": EPOCHS,
            "partition": IID(), "strategy": strategy, "output_dir": str(tmp_path), "verbose": False, "plot": False,
            "loggers": [], "checkpoint_every": 1}
    args.update(kw)
    return FedLoop(**args)
