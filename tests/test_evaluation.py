"""Evaluation with Lightning's meaning: val_* from validation_step on val_dataloader at evaluation rounds,
test_* from test_step on test_dataloader after the last round (and every test_every rounds); the fallbacks."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _distill_common import cnn, tiny_loop, tiny_public
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed.data import MNIST1DDataModule
from lightning_fed.evaluate import as_test_name, stage_metrics
from lightning_fed.strategies import FedDF, FedMD, ModelTiers


class ConstantDM(L.LightningDataModule):
    """Val labels are all 0, test labels all 1: a model that predicts 0 has val_acc 1 and test_acc 0."""

    def __init__(self, val: bool = True, test: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 40, generator=g)
        self.has_val, self.has_test = val, test
        if not val:
            self.val_dataloader = super().val_dataloader  # Lightning's default: raises MisconfigurationException
        if not test:
            self.test_dataloader = super().test_dataloader

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, torch.arange(64) % 10), batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:20], torch.zeros(20, dtype=torch.long)), batch_size=8)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:30], torch.ones(30, dtype=torch.long)), batch_size=8)


class PredictsZero(L.LightningModule):
    """Always predicts class 0 (lr 0: training leaves it so); logs ``val_seen`` / ``count`` in its steps."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(40, 10)
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.bias.copy_(torch.tensor([5.0] + [0.0] * 9))

    def forward(self, x):
        return self.lin(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        _, y = batch
        self.log("val_label_mean", y.float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class WithTestStep(PredictsZero):
    def test_step(self, batch, batch_idx):
        _, y = batch
        self.log("label_mean_in_test_step", y.float().mean())


def _fit(make_loop, model, dm, **kw):
    return make_loop(rounds=kw.pop("rounds", 2), **kw).fit(model, dm)


def test_val_names_come_from_the_val_loader_and_test_names_from_the_test_loader(make_loop):
    res = _fit(make_loop, WithTestStep(), ConstantDM(), rounds=3)
    for h in res.history:
        assert h["val_acc"] == 1.0 and h["val_label_mean"] == 0.0  # val data: labels 0
    assert "test_acc" not in res.history[0] and "test_acc" not in res.history[1]  # tested after the last round only
    last = res.history[-1]
    assert last["test_acc"] == 0.0 and last["label_mean_in_test_step"] == 1.0  # test data: labels 1, test_step ran
    assert "test_label_mean" not in last  # validation_step did not run on the test data
    assert res.final_metrics["test_acc"] == 0.0 and res.final_metrics["val_acc"] == 1.0
    assert res.final_metrics["test_loss"] > res.final_metrics["val_loss"]


def test_no_test_step_runs_validation_step_on_test_data_under_test_names(make_loop):
    res = _fit(make_loop, PredictsZero(), ConstantDM())
    last = res.history[-1]
    assert last["val_label_mean"] == 0.0 and last["val_acc"] == 1.0
    assert last["test_label_mean"] == 1.0 and last["test_acc"] == 0.0  # validation_step's metric, renamed


def test_no_val_dataloader_no_val_metrics(make_loop, caplog):
    with caplog.at_level("INFO", logger="lightning_fed"):
        res = _fit(make_loop, PredictsZero(), ConstantDM(val=False), rounds=2)
    assert "no val_dataloader" in caplog.text
    assert not any("val" in k for h in res.history for k in h)
    assert res.history[-1]["test_acc"] == 0.0 and res.final_metrics["test_label_mean"] == 1.0


def test_no_test_dataloader_no_test_metrics(make_loop):
    res = _fit(make_loop, PredictsZero(), ConstantDM(test=False))
    assert not any("test" in k for h in res.history for k in h)
    assert res.final_metrics == {k: v for k, v in res.history[-1].items() if k.startswith("val_")}


def test_test_every_adds_test_rounds(make_loop):
    res = _fit(make_loop, PredictsZero(), ConstantDM(), rounds=5, eval_every=2, test_every=2)
    assert [int(h["round"]) for h in res.history if "val_acc" in h] == [2, 4, 5]
    assert [int(h["round"]) for h in res.history if "test_acc" in h] == [2, 4, 5]


def test_test_name_and_stage_metrics():
    assert as_test_name("val_acc") == "test_acc" and as_test_name("my_val_acc") == "my_test_acc"
    assert as_test_name("tier0/val_loss") == "tier0/test_loss" and as_test_name("val/f1") == "test/f1"
    assert as_test_name("acc") == "acc" and as_test_name("interval") == "interval" and as_test_name("value") == "value"
    assert stage_metrics({"val_acc": 0.5, "val_loss": 1.0}, "tier1/") == {"tier1/val_acc": 0.5}
    assert stage_metrics({"test_acc": 0.25}, "server/") == {"server/test_acc": 0.25}
    assert stage_metrics({"acc": 0.25}, "server/") == {}


def test_mnist1d_val_fraction_carves_validation_from_training(tmp_path):
    plain = MNIST1DDataModule(num_samples=500, cache_dir=str(tmp_path))
    plain.setup()
    assert plain.val_dataloader() == []  # no validation split by default; training data unchanged
    dm = MNIST1DDataModule(num_samples=500, cache_dir=str(tmp_path), val_fraction=0.1)
    dm.setup()
    x, _ = plain.train_set.tensors
    xt, _ = dm.train_set.tensors
    xv, _ = dm.val_set.tensors
    assert len(xv) == 40 and len(xt) == 360
    rows = {tuple(r.tolist()) for r in x}
    assert {tuple(r.tolist()) for r in xv} | {tuple(r.tolist()) for r in xt} == rows  # a split of the training set
    assert not {tuple(r.tolist()) for r in xv} & {tuple(r.tolist()) for r in xt}
    assert torch.equal(dm.test_set.tensors[0], plain.test_set.tensors[0])  # the test set is untouched
    again = MNIST1DDataModule(num_samples=500, cache_dir=str(tmp_path), val_fraction=0.1)
    again.setup()
    assert torch.equal(again.val_set.tensors[0], xv)  # seeded
    with pytest.raises(ValueError, match="val_fraction"):
        MNIST1DDataModule(val_fraction=1.0)


def test_strategies_per_tier_names_follow_the_stage(tmp_path):
    torch.manual_seed(0)
    dm = MNIST1DDataModule(batch_size=32, num_samples=500, val_fraction=0.2)
    s = FedDF(public=tiny_public(), tiers=ModelTiers(models=[cnn(6)]), proxy_size=60, distill_steps=2)
    res = tiny_loop(tmp_path / "df", s, rounds=2).fit(cnn(4), dm)
    first, last = res.history
    assert {"tier0/val_acc", "tier1/val_acc", "server/val_acc"} <= set(first)
    assert not any("test" in k for k in first)
    assert {"tier0/test_acc", "tier1/test_acc", "server/test_acc", "tier0/val_acc"} <= set(last)
    assert last["tier0/test_acc"] == pytest.approx(last["test_acc"])
    assert last["tier0/val_acc"] == pytest.approx(last["val_acc"])

    s = FedMD(public=tiny_public(), public_per_round=30, tiers=ModelTiers(models=[cnn(6)]), eval_clients=2)
    res = tiny_loop(tmp_path / "md", s, rounds=2).fit(cnn(4), MNIST1DDataModule(num_samples=500, val_fraction=0.2))
    first, last = res.history
    assert "clients/val_acc" in first and not any("test" in k for k in first)
    assert {"clients/val_acc", "clients/test_acc"} <= set(last)
    assert any(k.startswith("tier") and k.endswith("/test_acc") for k in last)


def test_evaluation_doc_example_runs(tmp_path):
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "evaluation.md").read_text()
    code = re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL)[-1]
    code = code.replace('output_dir="runs/evaluation"', f'output_dir="{tmp_path}"')
    scope: dict = {"print": lambda *args: None}
    exec(compile(code, "docs/evaluation.md", "exec"), scope)  # noqa: S102 - the documented example itself
    result = scope["result"]
    assert [int(h["round"]) for h in result.history if "val_acc" in h] == [1, 2, 3, 4]
    assert [int(h["round"]) for h in result.history if "test_acc" in h] == [2, 4]
    assert len(scope["dm"].val_set) == 80 and len(scope["dm"].train_set) == 720


def test_qat_report_uses_the_module_test_metrics(tmp_path):
    from lightning_fed import FedLoop
    from lightning_fed.callbacks import QuantizationAware
    from lightning_fed.callbacks.footprint import classification_accuracy
    from lightning_fed.models import MNIST1DCNN

    cb, dm = QuantizationAware(scheme="int8", start=0), MNIST1DDataModule(num_samples=500, val_fraction=0.2)
    FedLoop(num_clients=2, clients_per_round=2, rounds=1, verbose=False, plot=False, loggers=[], checkpoint_every=0,
            output_dir=str(tmp_path), callbacks=[cb]).fit(MNIST1DCNN(channels=4), dm)
    r = cb.report
    assert {"float_acc", "quant_acc", "float_test_loss", "quant_test_loss"} <= set(r)  # test_step's own metrics
    assert not any("val" in k for k in r)  # on the test data, never the validation split
    assert r["quant_acc"] == pytest.approx(classification_accuracy(cb.exported, dm.test_dataloader()), abs=1e-6)


class MetricObjects(L.LightningModule):
    """Logs a torchmetrics Accuracy object (not a tensor) in validation_step and test_step, as Lightning allows."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics.classification import MulticlassAccuracy

        self.net = nn.Linear(40, 10)
        self.val_metric = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_metric = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_metric(self(x), y)
        self.log("val_metric_acc", self.val_metric)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_metric(self(x), y)
        self.log("test_metric_acc", self.test_metric)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_metric_objects_in_self_log_are_computed_over_the_epoch(make_loop):
    torch.manual_seed(0)
    loop = make_loop(num_clients=2, clients_per_round=2, rounds=2, eval_every=1)
    res = loop.fit(MetricObjects(), ConstantDM())
    # the Metric objects' epoch values equal the built-in accuracy over all samples of the same loader
    for h in res.history:
        assert h["val_metric_acc"] == pytest.approx(h["val_acc"], abs=1e-6)
    assert res.final_metrics["test_metric_acc"] == pytest.approx(res.final_metrics["test_acc"], abs=1e-6)
    assert res.final_metrics["test_acc"] != res.history[-1]["val_acc"]  # val labels all 0, test labels all 1


def test_summary_table_reports_the_modules_own_metrics():
    from rich.console import Console

    from lightning_fed.report import summary_table

    history = [{"round": 1, "val_mse": 0.5}, {"round": 2, "val_mse": 0.4, "test_mse": 0.45}]
    console = Console(width=100, record=True)
    console.print(summary_table(history))
    text = console.export_text()
    assert "final test mse" in text and "0.45" in text and "final validation mse" in text and "0.4 " in text
    assert "final test accuracy" in text and "n/a" in text  # a regression model has no accuracy
