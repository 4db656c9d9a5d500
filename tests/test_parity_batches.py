"""Lightning parity of a batch's path to the step, under FedLoop (one client, one round, one local epoch)
and ``lightning.Trainer(max_epochs=1)`` on the same batches (``test_parity``'s set-up): the precision's
``convert_input``, then ``on_before_batch_transfer``, ``transfer_batch_to_device`` and
``on_after_batch_transfer``, in training and evaluation; steps without ``batch_idx``; manual optimization
refusing the settings only automatic optimization honours.
"""

from __future__ import annotations

import copy
import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from test_parity import SEED, Base, Capture, TensorDM, assert_same_weights, client_batches, run_both, seeded
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed import FedLoop
from lightning_fed.data import IID
from lightning_fed.evaluate import as_test_name


class WithVal(TensorDM):
    """TensorDM with a validation loader (its last 32 records)."""

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[-32:], self.y[-32:]), batch_size=self.batch_size)


def quiet_fed(tmp_path, **kw) -> FedLoop:
    """One client, one round, one local epoch, seeded as ``test_parity.client_batches`` expects; no output."""
    return FedLoop(num_clients=1, clients_per_round=1, rounds=1, local_epochs=1, partition=IID(), seed=SEED,
                   output_dir=str(tmp_path / "runs"), verbose=False, plot=False, loggers=[],
                   checkpoint_every=0, **kw)


def quiet_trainer(**kw) -> L.Trainer:
    return L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


def fed_and_trainer(model: L.LightningModule, dm: TensorDM, tmp_path, **kw):
    """Train a copy of ``model`` under FedLoop (which then validates and tests its global model) and another
    under lightning.Trainer on the same batches, checking both reach the same weights; then
    ``trainer.validate``/``trainer.test`` FedLoop's final global weights (the server's aggregation rounds
    them) on the same loaders.

    Returns:
        (FedLoop's module, its round-1 history, the Trainer's module, the Trainer's validate + test metrics)
    """
    fed, trn = copy.deepcopy(model), copy.deepcopy(model)
    fed_cap, trn_cap = Capture(), Capture()
    result = quiet_fed(tmp_path, callbacks=[fed_cap], **kw).fit(fed, dm)
    assert result.history[0]["good"] == 1, result.history
    trainer = quiet_trainer(callbacks=[trn_cap], **kw)
    trainer.fit(trn, DataLoader(client_batches(dm), batch_size=None))
    assert_same_weights(fed_cap, trn_cap)
    trn.load_state_dict(fed.state_dict())
    metrics: dict[str, float] = {}
    if isinstance(dm, WithVal):
        metrics.update(trainer.validate(trn, dm.val_dataloader(), verbose=False)[0])
    if type(trn).test_step is L.LightningModule.test_step:  # FedLoop tests with validation_step, renamed
        tested = trainer.validate(trn, dm.test_dataloader(), verbose=False)[0]
        metrics.update({as_test_name(k): v for k, v in tested.items()})
    else:
        metrics.update(trainer.test(trn, dm.test_dataloader(), verbose=False)[0])
    return fed, result.history[0], trn, metrics


# ------------------------------------------------------------------------------------------------ precision


class Dtypes(Base):
    """Notes the input dtype each batch hook and step sees; its test step logs its loss."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.seen.append(("on_before_batch_transfer", batch[0].dtype))
        return batch

    def training_step(self, batch, batch_idx):
        self.seen.append(("training_step", batch[0].dtype))
        return super().training_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(("test_step", x.dtype))
        self.log("test_loss", F.cross_entropy(self(x), y))


@pytest.mark.parametrize(("precision", "dtype"), [("64-true", torch.float64), ("bf16-true", torch.bfloat16),
                                                  ("16-true", torch.float16), ("bf16-mixed", torch.float32)])
def test_precision_converts_batches_as_the_trainer(tmp_path, precision, dtype):
    """``*-true`` precisions convert every training and test batch before ``on_before_batch_transfer`` (the
    module's weights are in that dtype: unconverted inputs fail); mixed precision leaves them to autocast (the
    Trainer's plugin converts nothing), as under lightning.Trainer: same dtypes, weights and test loss."""
    fed, history, trn, metrics = fed_and_trainer(seeded(Dtypes), TensorDM(), tmp_path, precision=precision)
    assert fed.seen == trn.seen
    assert {d for _, d in fed.seen} == {dtype}
    assert [name for name, _ in fed.seen].count("test_step") == 2
    assert history["test_loss"] == pytest.approx(metrics["test_loss"], rel=1e-6)


# ----------------------------------------------------------------------------------------- batch transfer


class Transfers(Base):
    """Batch hooks that each change the input (so their order shows in the result) and note their calls;
    the evaluation steps log the loss and accuracy of the batch they get, under names the built-in metrics
    do not use."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.calls.append(("before", dataloader_idx))
        return [batch[0] * 2.0, batch[1]]

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        self.calls.append(("transfer", device.type, dataloader_idx))
        return [-batch[0], batch[1]]

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.calls.append(("after", dataloader_idx))
        return [batch[0] + 0.5, batch[1]]

    def _eval(self, batch, stage):
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_ref_loss", F.cross_entropy(logits, y))
        self.log(f"{stage}_ref_acc", (logits.argmax(1) == y).float().mean())

    def validation_step(self, batch, batch_idx):
        self._eval(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval(batch, "test")


def test_batch_transfer_hooks_in_training_as_the_trainer(tmp_path):
    """An overridden ``transfer_batch_to_device`` runs between the other two batch hooks on every training
    batch (on CPU too): the same inputs reach the hooks and the step, the same weights result."""
    assert_same_weights(*run_both(seeded(Transfers), tmp_path=tmp_path))


def test_batch_transfer_hooks_in_evaluation_as_the_trainer(tmp_path):
    """Validation and test batches take the same path; the built-in ``<stage>_acc``/``<stage>_loss`` are
    measured on the transferred batch (the one the step got): equal to what the step logs and to
    lightning.Trainer's."""
    fed, history, trn, metrics = fed_and_trainer(seeded(Transfers), WithVal(), tmp_path)
    assert fed.calls == trn.calls
    assert fed.calls[:3] == [("before", 0), ("transfer", "cpu", 0), ("after", 0)]
    assert len(fed.calls) == 3 * (7 + 2 + 2)  # 7 training, 2 validation and 2 test batches
    for stage in ("val", "test"):
        assert history[f"{stage}_ref_loss"] == pytest.approx(metrics[f"{stage}_ref_loss"], rel=1e-6)
        assert history[f"{stage}_ref_acc"] == pytest.approx(metrics[f"{stage}_ref_acc"], abs=1e-7)
        assert history[f"{stage}_loss"] == pytest.approx(history[f"{stage}_ref_loss"], rel=1e-6)
        assert history[f"{stage}_acc"] == pytest.approx(history[f"{stage}_ref_acc"], abs=1e-7)


# ----------------------------------------------------------------------------------- batch_idx-less steps


class NoBatchIdx(Base):
    """Steps that take the batch alone, as Lightning 2.x allows."""

    def training_step(self, batch):
        return super().training_step(batch, 0)

    def validation_step(self, batch):
        x, y = batch
        self.log("val_ce", F.cross_entropy(self(x), y))

    def test_step(self, batch):
        x, y = batch
        self.log("test_ce", F.cross_entropy(self(x), y))


class OnlyValidation(NoBatchIdx):
    """No ``test_step``: the test stage runs ``validation_step`` (its names renamed to ``test``)."""

    test_step = L.LightningModule.test_step


@pytest.mark.parametrize("cls", [NoBatchIdx, OnlyValidation])
def test_steps_without_batch_idx_as_the_trainer(tmp_path, cls):
    """``training_step(self, batch)``, ``validation_step(self, batch)`` and ``test_step(self, batch)`` are
    called without ``batch_idx``: same weights and logged values as under lightning.Trainer."""
    history, metrics = fed_and_trainer(seeded(cls), WithVal(), tmp_path)[1::2]
    assert history["val_ce"] == pytest.approx(metrics["val_ce"], rel=1e-6)
    assert history["test_ce"] == pytest.approx(metrics["test_ce"], rel=1e-6)


# ------------------------------------------------------------------------------------ manual optimization


class Manual(Base):
    """One optimizer stepped by hand; counts the calls that show local training began."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.started = 0

    def configure_optimizers(self):
        self.started += 1
        return super().configure_optimizers()

    def training_step(self, batch, batch_idx):
        self.started += 1
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


@pytest.mark.parametrize(("kw", "what"), [({"accumulate_grad_batches": 2}, "gradient accumulation"),
                                          ({"gradient_clip_val": 1.0}, "gradient clipping")])
def test_manual_optimization_refuses_automatic_settings(tmp_path, kw, what):
    """As lightning.Trainer: a MisconfigurationException naming the setting, raised when fit starts, before the
    run folder is written; it stops the run (neither a dropped client nor a failed round retried)."""
    setting = ", ".join(f"{k}={v}" for k, v in kw.items())
    first = f"Automatic {what} is not supported for manual optimization. Remove "
    with pytest.raises(MisconfigurationException, match=re.escape(f"{first}`Trainer({setting})`")):
        quiet_trainer(**kw).fit(Manual(), DataLoader(client_batches(TensorDM()), batch_size=None))
    model = Manual()
    loop = FedLoop(num_clients=2, clients_per_round=2, rounds=3, seed=SEED, output_dir=str(tmp_path / "runs"),
                   verbose=False, plot=False, loggers=[], checkpoint_every=0, **kw)
    with pytest.raises(MisconfigurationException, match=re.escape(f"{first}`FedLoop({setting})`")):
        loop.fit(model, TensorDM())
    assert model.started == 0
    assert not (tmp_path / "runs").exists()  # refused at start-up, before the run folder


def test_manual_optimization_without_those_settings_trains_as_the_trainer(tmp_path):
    """``gradient_clip_val=0`` clips nothing and is accepted, as by lightning.Trainer."""
    kw = {"gradient_clip_val": 0.0}
    assert_same_weights(*run_both(seeded(Manual), fed_kw=kw, trainer_kw=kw, tmp_path=tmp_path))


def test_the_data_modules_batch_hooks_are_used_where_it_overrides_them(tmp_path):
    """As the Trainer chooses: the data module's ``on_after_batch_transfer`` (it overrides it) for every training
    batch, in place of the module's; the module's ``on_before_batch_transfer`` (the data module
    does not override that one)."""
    calls = []

    class Scales(WithVal):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            calls.append("dm after")
            return [batch[0] * 2, batch[1]]

    class Model(Base):
        def on_before_batch_transfer(self, batch, dataloader_idx):
            calls.append("module before")
            return batch

        def on_after_batch_transfer(self, batch, dataloader_idx):
            calls.append("module after")
            return batch

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    for run in ("fed", "trainer"):
        calls.clear()
        if run == "fed":
            quiet_fed(tmp_path).fit(seeded(Model), Scales())
        else:
            quiet_trainer().fit(seeded(Model), datamodule=Scales())
        batches = 7 + 2 + (2 if run == "fed" else 0)  # training, validation, and FedLoop's final test
        assert "module after" not in calls and calls.count("dm after") == calls.count("module before") == batches, run


def test_several_optimizers_with_automatic_optimization_stop_the_run(tmp_path):
    """As the Trainer refuses it, at the first client (it dropped every client of every round until the run
    gave up)."""

    class TwoOptimizers(Base):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]

    message = "Training with multiple optimizers is only supported with manual optimization"
    with pytest.raises(RuntimeError, match=message):
        quiet_trainer().fit(TwoOptimizers(), DataLoader(client_batches(TensorDM()), batch_size=None))
    with pytest.raises(MisconfigurationException, match=message):
        quiet_fed(tmp_path).fit(TwoOptimizers(), TensorDM())
