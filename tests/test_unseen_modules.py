"""LightningModules written the way other people write them run unchanged in FedLoop (and under lightning.Trainer)."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import seeded
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_fed import FedLoop
from lightning_fed.data import Dirichlet, make_mnist1d


class SchedulerNet(L.LightningModule):
    """Dict outputs, log_dict, a step-interval scheduler sized from self.trainer, epoch-end hooks."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(40, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10))
        self.epoch_ends = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log_dict({"loss_a": loss, "step_seen": float(self.global_step)})
        return {"loss": loss}

    def on_train_epoch_end(self):
        self.epoch_ends.append((self.current_epoch, float(self.trainer.callback_metrics["loss_a"])))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("my_val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        steps = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ManualNet(L.LightningModule):
    """Manual optimization with self.optimizers(), manual_backward and self.lr_schedulers()."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.lin = nn.Linear(40, 10)

    def forward(self, x):
        return self.lin(x)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss)

    def on_train_epoch_end(self):
        self.lr_schedulers().step()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


class DictDataset(Dataset):
    """A plain Dataset yielding dict samples (no tensors attribute)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"signal": self.x[i], "label": self.y[i]}


class DictDM(L.LightningDataModule):
    def setup(self, stage=None):
        d = make_mnist1d(1000)
        self.train, self.test = DictDataset(d["x"], d["y"]), DictDataset(d["x_test"], d["y_test"])

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=50, shuffle=True)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=100)


class DictNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(40, 10)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.lin(batch["signal"]), batch["label"])

    def validation_step(self, batch, batch_idx):
        self.log("acc", (self.lin(batch["signal"]).argmax(1) == batch["label"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _loop(tmp_path, **kw):
    base = {"num_clients": 4, "clients_per_round": 2, "rounds": 2, "local_epochs": 2, "output_dir": str(tmp_path), "verbose": False,
                "plot": False, "loggers": [], "checkpoint_every": 0}
    base.update(kw)
    return FedLoop(**base)


def test_scheduler_module(tmp_path, small_dm):
    model = seeded(SchedulerNet)
    res = _loop(tmp_path, partition=Dirichlet(1.0)).fit(model, small_dm)
    # no test_step: the final test runs validation_step on the test data and names its metric my_test_acc
    assert "my_test_acc" in res.final_metrics and "test_acc" in res.final_metrics
    assert "my_val_acc" not in res.final_metrics  # small_dm has no validation split
    assert res.final_metrics["my_test_acc"] >= 0.15  # chance is 0.1; the seeded run reaches 0.18
    assert res.final_metrics["my_test_acc"] == pytest.approx(res.final_metrics["test_acc"])  # same model, same data
    assert res.history[-1]["loss_a"] < model.epoch_ends[0][1] - 0.2  # 2.23 after the first local epoch, then 1.72
    assert [e for e, _ in model.epoch_ends] == [0, 1] * 4  # 2 rounds x 2 clients x 2 local epochs
    assert model._trainer is None and model._fabric is None  # detached after fit


def test_manual_optimization_module(tmp_path, small_dm):
    model = seeded(ManualNet)
    w0 = model.lin.weight.detach().clone()
    res = _loop(tmp_path).fit(model, small_dm)
    assert not torch.equal(w0, model.lin.weight)
    assert res.history[-1]["good"] == 2


def test_dict_batches_and_plain_dataset(tmp_path):
    model, dm = seeded(DictNet), DictDM()
    res = _loop(tmp_path, partition=Dirichlet(1.0, min_samples=5)).fit(model, dm)
    assert "acc" in res.final_metrics and "test_acc" not in res.final_metrics  # only the module's own metric
    x, y = dm.test.x, dm.test.y
    with torch.no_grad():
        expected = (model.lin(x).argmax(1) == y).float().mean().item()
    assert res.final_metrics["acc"] == pytest.approx(expected, abs=1e-6)  # over all 200 test samples
    assert res.final_metrics["acc"] >= 0.15  # chance is 0.1; the seeded run reaches 0.185


@pytest.mark.parametrize("cls", [SchedulerNet, ManualNet])
def test_same_modules_train_under_lightning_trainer(cls, small_dm):
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    model = seeded(cls)
    w0 = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model, small_dm)
    assert trainer.global_step == 800 // 32  # one optimizer step per batch of the 800 training samples
    assert any(not torch.equal(a, p) for a, p in zip(w0, model.parameters()))
