"""Lightning's own callbacks under FedLoop: the ones listed to run do run on every client; the others are refused
when the loop is built, with what FedLoop does instead (they failed mid-run on a Trainer attribute)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _tiny_fit import quiet_loop
from lightning.pytorch import callbacks as lc
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed import FedLoop
from lightning_fed.lightning_callbacks import RUN, refusal


class Net(L.LightningModule):
    """A backbone and a head (BackboneFinetuning needs ``backbone``), cross-entropy, SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.backbone(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)


@pytest.mark.parametrize("make, says", [
    (lambda: lc.ModelCheckpoint(monitor="val_loss"), "writes its own checkpoints (checkpoint_every"),
    (lambda: lc.EarlyStopping(monitor="val_loss"), "set self.trainer.should_stop = True"),
    (lambda: lc.LearningRateMonitor(), "self.log('lr'"),
    (lambda: lc.TQDMProgressBar(), "progress of the rounds itself"),
    (lambda: lc.GradientAccumulationScheduler({0: 2}), "FedLoop(accumulate_grad_batches=N)"),
    (lambda: lc.ThroughputMonitor(batch_size_fn=len), "see docs/lightning.md"),
], ids=["ModelCheckpoint", "EarlyStopping", "LearningRateMonitor", "TQDMProgressBar", "GradientAccumulationScheduler",
        "ThroughputMonitor"])
def test_a_lightning_callback_that_cannot_run_is_refused_at_once(make, says):
    cb = make()
    name = type(cb).__name__
    with pytest.raises(ValueError, match=rf"^FedLoop: callbacks: Lightning's {name} does not run inside FedLoop") as e:
        FedLoop(callbacks=[cb])
    assert says in str(e.value)


def test_a_subclass_of_a_refused_callback_is_refused_and_ones_own_callbacks_are_not():
    class Mine(lc.ModelCheckpoint):
        pass

    class Summary(lc.ModelSummary):
        pass

    assert refusal(Mine()).startswith("Mine (a Lightning ModelCheckpoint) does not run inside FedLoop")
    assert "writes its own checkpoints" in refusal(Mine())
    assert refusal(Summary()) is None and refusal(lc.Callback()) is None
    assert refusal(lc.EMAWeightAveraging()).endswith("can keep a running average of the global model")


def test_the_listed_lightning_callbacks_run_on_every_client(tmp_path):
    calls: list[str] = []
    cbs = [lc.ModelSummary(), lc.Timer(), lc.LambdaCallback(on_train_start=lambda t, m: calls.append("start")),
           lc.ModelPruning("l1_unstructured", amount=0.5, parameter_names=["weight"]),
           lc.BackboneFinetuning(unfreeze_backbone_at_epoch=1)]
    assert {type(cb).__name__ for cb in cbs} <= set(RUN)
    train, val = _loaders()
    res = quiet_loop(tmp_path, num_clients=2, clients_per_round=2, rounds=2, local_epochs=2, callbacks=cbs).fit(
        Net(), train, val)
    assert calls == ["start"] * 4  # 2 clients x 2 rounds
    assert len(res.history) == 2 and all("val_loss" in h for h in res.history)
