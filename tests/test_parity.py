"""Lightning parity: one client, one round, one local epoch under FedLoop trains a LightningModule to the same
weights as ``lightning.Trainer(max_epochs=1)`` on the same batches, with the module's own training hooks.

The client's batches are its IID shard of the training set shuffled by the (seed, round 0, client 0, loader)
generator; the Trainer is given exactly those batches (a DataLoader over the precomputed list, ``batch_size=None``),
and each test checks that FedLoop saw the same batches. The models have no dropout, so the global RNG plays no part.
"""

from __future__ import annotations

import copy
import logging

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed import FedLoop
from lightning_fed.data import IID
from lightning_fed.errors import RoundsFailed
from lightning_fed.runner import LOADER_STREAM
from lightning_fed.seeding import derive_seed

SEED = 3
N, BATCH = 104, 16  # 7 batches, the last one of 8 examples


class TensorDM(L.LightningDataModule):
    """A TensorDataset split; the training loader shuffles (FedLoop re-shuffles each client's shard anyway)."""

    def __init__(self, n: int = N, batch_size: int = BATCH, drop_last: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 12, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.batch_size, self.drop_last = batch_size, drop_last

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True,
                          drop_last=self.drop_last)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:32], self.y[:32]), batch_size=self.batch_size)


def client_batches(dm: TensorDM) -> list[list[torch.Tensor]]:
    """The batches client 0 trains on in round 0 of a one-client FedLoop run with seed ``SEED``."""
    shard = IID().split(dm.y, 1, SEED)[0]
    g = torch.Generator().manual_seed(derive_seed(SEED, 0, 0, LOADER_STREAM))
    order = shard[torch.randperm(len(shard), generator=g)]
    n = -(-len(order) // dm.batch_size)
    return [[dm.x[order[i * dm.batch_size:(i + 1) * dm.batch_size]], dm.y[order[i * dm.batch_size:(i + 1) * dm.batch_size]]]
            for i in range(n)]


class Capture(Callback):
    """Keeps the weights at the end of local training and every training batch's inputs."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.inputs: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inputs.append(batch[0].clone())

    def on_train_end(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def run_both(model: L.LightningModule, fed_kw: dict | None = None, trainer_kw: dict | None = None, tmp_path=None):
    """Train a copy of ``model`` under FedLoop (one client, one round) and another under lightning.Trainer on the
    same batches; return both captures."""
    dm = TensorDM()
    fed_cap, trn_cap = Capture(), Capture()
    loop = FedLoop(num_clients=1, clients_per_round=1, rounds=1, local_epochs=1, partition=IID(), seed=SEED,
                   output_dir=str(tmp_path / "runs"), verbose=False, plot=False, loggers=[], checkpoint_every=0,
                   callbacks=[fed_cap], **(fed_kw or {}))
    result = loop.fit(copy.deepcopy(model), dm)
    assert result.history[0]["good"] == 1, result.history
    trainer_kw = {"accelerator": "cpu", **(trainer_kw or {})}
    trainer = L.Trainer(max_epochs=1, devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[trn_cap], **trainer_kw)
    trainer.fit(copy.deepcopy(model), DataLoader(client_batches(dm), batch_size=None))
    assert len(fed_cap.inputs) == len(trn_cap.inputs) == 7
    for a, b in zip(fed_cap.inputs, trn_cap.inputs, strict=True):  # the comparison is on the same batches
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return fed_cap, trn_cap


def assert_same_weights(fed: Capture, trn: Capture) -> None:
    assert fed.weights.keys() == trn.weights.keys()
    for k in fed.weights:
        torch.testing.assert_close(fed.weights[k], trn.weights[k], rtol=0, atol=0, msg=f"{k} differs")


class Base(L.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class Warmup(Base):
    """Lightning's documented learning-rate warm-up: an ``optimizer_step`` override."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure):
        optimizer.step(closure=optimizer_closure)
        if self.trainer.global_step < 5:
            lr_scale = min(1.0, float(self.trainer.global_step + 1) / 5.0)
            for pg in optimizer.param_groups:
                pg["lr"] = lr_scale * self.lr


def seeded(cls, *args, **kw):
    torch.manual_seed(0)
    return cls(*args, **kw)


def test_warmup_optimizer_step(tmp_path):
    assert_same_weights(*run_both(seeded(Warmup, lr=0.05), tmp_path=tmp_path))


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_and_accumulation(tmp_path, algorithm):
    kw = {"gradient_clip_val": 0.05, "gradient_clip_algorithm": algorithm, "accumulate_grad_batches": 2}
    assert_same_weights(*run_both(seeded(Base), fed_kw=kw, trainer_kw=kw, tmp_path=tmp_path))


class CustomHooks(Base):
    """Overrides of backward, optimizer_zero_grad and configure_gradient_clipping, a step-interval scheduler."""

    def backward(self, loss, *args, **kwargs):
        (loss * 2).backward()

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=False)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=0.01 * (1 + self.trainer.global_step),
                            gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 2}}


def test_custom_backward_zero_grad_clipping_scheduler(tmp_path):
    assert_same_weights(*run_both(seeded(CustomHooks), tmp_path=tmp_path))


class TwoPart(L.LightningModule):
    """A GAN-like pair trained with two optimizers in manual optimization, each with a scheduler."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Linear(12, 12)
        self.disc = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.disc(self.gen(x))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        with self.toggled_optimizer(opt_d):
            real, fake = self.disc(x), self.disc(self.gen(x).detach())
            d_loss = F.softplus(-real).mean() + F.softplus(fake).mean()
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()
        with self.toggled_optimizer(opt_g):
            g_loss = F.softplus(-self.disc(self.gen(x))).mean()
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            self.clip_gradients(opt_g, gradient_clip_val=0.1, gradient_clip_algorithm="norm")
            opt_g.step()
        sched_g.step()
        sched_d.step()
        self.log_dict({"d_loss": d_loss, "g_loss": g_loss})

    def configure_optimizers(self):
        opt_g = torch.optim.Adam(self.gen.parameters(), lr=1e-2)
        opt_d = torch.optim.SGD(self.disc.parameters(), lr=0.1)
        return [opt_g, opt_d], [torch.optim.lr_scheduler.StepLR(opt_g, 2, 0.5),
                                torch.optim.lr_scheduler.StepLR(opt_d, 3, 0.5)]


def test_two_optimizers_manual(tmp_path):
    assert_same_weights(*run_both(seeded(TwoPart), tmp_path=tmp_path))


class Plateau(Base):
    """ReduceLROnPlateau on a metric logged in training_step, stepped every second step."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.5)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=0.5)
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "monitor": "train_loss", "interval": "step", "frequency": 2}}


def test_reduce_lr_on_plateau_monitor(tmp_path):
    fed, trn = run_both(seeded(Plateau), tmp_path=tmp_path)
    assert_same_weights(fed, trn)


class HookOrder(Callback):
    """The training hooks as called, with the module's own overridable steps."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattribute__(self, name):
        if name.startswith(("on_train_batch", "on_before_", "on_after_backward")):
            calls = object.__getattribute__(self, "calls")
            return lambda *a, **k: calls.append(name)
        return object.__getattribute__(self, name)


class Recording(Base):
    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def training_step(self, batch, batch_idx):
        self.calls.append(f"training_step last={self.trainer.is_last_batch}")
        return super().training_step(batch, batch_idx)

    def optimizer_step(self, *args, **kwargs):
        self.calls.append(f"optimizer_step global_step={self.trainer.global_step}")
        super().optimizer_step(*args, **kwargs)

    def optimizer_zero_grad(self, *args):
        self.calls.append("optimizer_zero_grad")
        super().optimizer_zero_grad(*args)

    def backward(self, loss, *args, **kwargs):
        self.calls.append("backward")
        super().backward(loss, *args, **kwargs)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.calls.append(f"configure_gradient_clipping {gradient_clip_val} {gradient_clip_algorithm}")

    def lr_scheduler_step(self, scheduler, metric):
        self.calls.append("lr_scheduler_step")
        super().lr_scheduler_step(scheduler, metric)

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1), "interval": "step"}]


def test_hook_order_and_is_last_batch(tmp_path):
    calls: dict[str, list[str]] = {}
    for name in ("fed", "trainer"):
        order = HookOrder()
        model = Recording(order.calls)
        dm = TensorDM()
        if name == "fed":
            FedLoop(num_clients=1, clients_per_round=1, rounds=1, seed=SEED, output_dir=str(tmp_path / "runs"),
                    verbose=False, plot=False, loggers=[], checkpoint_every=0, callbacks=[order],
                    accumulate_grad_batches=3, gradient_clip_val=0.5).fit(model, dm)
        else:
            L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[order], accumulate_grad_batches=3,
                      gradient_clip_val=0.5, gradient_clip_algorithm="norm").fit(model, DataLoader(client_batches(dm), batch_size=None))
        calls[name] = order.calls
    assert calls["fed"] == calls["trainer"]
    assert calls["fed"].count("training_step last=True") == 1
    assert calls["fed"].count("optimizer_step global_step=2") == 1  # steps after batches 3, 6 and the last (7)


def test_estimated_stepping_batches_and_attributes(tmp_path):
    seen = {}

    class Reads(Base):
        def configure_optimizers(self):
            t = self.trainer
            seen.update(steps=t.estimated_stepping_batches, acc=t.accumulate_grad_batches, clip=t.gradient_clip_val,
                        algo=t.gradient_clip_algorithm, max_steps=t.max_steps, world=t.world_size,
                        precision=t.precision, batches=t.num_training_batches)
            return super().configure_optimizers()

    FedLoop(num_clients=1, clients_per_round=1, rounds=1, seed=SEED, output_dir=str(tmp_path / "runs"), verbose=False,
            plot=False, loggers=[], checkpoint_every=0, accumulate_grad_batches=2, gradient_clip_val=1.0,
            gradient_clip_algorithm="value").fit(Reads(), TensorDM())
    assert seen == {"steps": 4, "acc": 2, "clip": 1.0, "algo": "value", "max_steps": -1, "world": 1,
                    "precision": "32-true", "batches": 7}


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("kw", "match"), [
    ({"gradient_clip_val": -1.0}, "gradient_clip_val=-1.0"),
    ({"gradient_clip_algorithm": "l1"}, "gradient_clip_algorithm='l1'"),
    ({"accumulate_grad_batches": 0}, "accumulate_grad_batches=0"),
])
def test_bad_settings_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        FedLoop(**kw)


class ConfigureModel(Base):
    def configure_model(self):
        self.extra = nn.Linear(3, 3)


def test_configure_model_refused_before_anything_is_written(tmp_path):
    loop = FedLoop(num_clients=1, clients_per_round=1, rounds=1, output_dir=str(tmp_path / "runs"), verbose=False,
                   plot=False, loggers=[])
    with pytest.raises(ValueError, match=r"FedLoop does not call ConfigureModel\.configure_model.*__init__"):
        loop.fit(ConfigureModel(), TensorDM())
    assert not (tmp_path / "runs").exists()


class UnloggedMonitor(Base):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
        return {"optimizer": opt, "lr_scheduler": sched, "monitor": "val_loss"}


def test_plateau_on_unlogged_metric_names_it(tmp_path):
    loop = FedLoop(num_clients=1, clients_per_round=1, rounds=1, output_dir=str(tmp_path / "runs"), verbose=False,
                   plot=False, loggers=[], checkpoint_every=0)
    with pytest.raises(RoundsFailed, match=r"ReduceLROnPlateau monitors 'val_loss', which was not logged.*train_loss"):
        loop.fit(UnloggedMonitor(), TensorDM())


class PlateauWithoutMonitor(Base):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.ReduceLROnPlateau(opt)]


def test_plateau_without_monitor(tmp_path):
    loop = FedLoop(num_clients=1, clients_per_round=1, rounds=1, output_dir=str(tmp_path / "runs"), verbose=False,
                   plot=False, loggers=[], checkpoint_every=0)
    with pytest.raises(RoundsFailed, match="ReduceLROnPlateau scheduler needs a monitor"):
        loop.fit(PlateauWithoutMonitor(), TensorDM())


class BatchNormNet(Base):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))


def test_one_sample_batch_with_batchnorm_warns_once(tmp_path, caplog):
    # 2 clients of 17 examples with batch 16: each ends in a one-sample batch
    loop = FedLoop(num_clients=2, clients_per_round=1, rounds=2, output_dir=str(tmp_path / "runs"), verbose=False,
                   plot=False, loggers=[], checkpoint_every=0, max_failed_rounds=5)
    with caplog.at_level(logging.WARNING, logger="lightning_fed"), pytest.raises(RoundsFailed):
        loop.fit(BatchNormNet(), TensorDM(n=34))
    warned = [r.getMessage() for r in caplog.records if "one-sample batch" in r.getMessage()]
    assert len(warned) == 1 and "2 of 2 clients" in warned[0] and "drop_last=True" in warned[0]
    caplog.clear()
    loop = FedLoop(num_clients=2, clients_per_round=1, rounds=1, output_dir=str(tmp_path / "runs2"), verbose=False,
                   plot=False, loggers=[], checkpoint_every=0)
    with caplog.at_level(logging.WARNING, logger="lightning_fed"):
        loop.fit(BatchNormNet(), TensorDM(n=34, drop_last=True))
    assert not [r for r in caplog.records if "one-sample batch" in r.getMessage()]


def test_16_mixed_trains(tmp_path):
    """Fabric's 16-mixed (a gradient scaler on CUDA; CPU falls back as Fabric decides) keeps working."""
    loop = FedLoop(num_clients=1, clients_per_round=1, rounds=1, output_dir=str(tmp_path / "runs"), verbose=False,
                   plot=False, loggers=[], checkpoint_every=0, precision="16-mixed",
                   accelerator="cuda" if torch.cuda.is_available() else "cpu", gradient_clip_val=0.5)
    result = loop.fit(seeded(Warmup, lr=0.05), TensorDM())
    assert result.history[0]["good"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Fabric's gradient scaler (16-mixed) needs CUDA")
def test_16_mixed_gradient_scaler_parity(tmp_path):
    """Under 16-mixed on CUDA the step goes through the gradient scaler (unscale before clipping, skipped steps
    on overflow), as in lightning.Trainer."""
    kw = {"precision": "16-mixed", "gradient_clip_val": 0.05}
    fed, trn = run_both(seeded(Warmup, lr=0.05), fed_kw={**kw, "accelerator": "cuda"},
                        trainer_kw={**kw, "accelerator": "gpu"}, tmp_path=tmp_path)
    assert_same_weights(fed, trn)


@pytest.mark.parametrize("init_scale", [2.0**8, 2.0**19])  # 2**19 overflows fp16 at first: the scaler skips steps
def test_gradient_scaler_parity_cpu(init_scale):
    """The scaler path of local training (Fabric's 16-mixed precision with a GradScaler, here a CPU one) matches
    lightning.Trainer's MixedPrecision plugin with the same scaler: unscale, clip, scaler step and update."""
    from pathlib import Path

    from lightning.fabric import Fabric
    from lightning.fabric.plugins.precision import MixedPrecision as FabricMixed
    from lightning.pytorch.plugins import MixedPrecision

    from lightning_fed.client import LocalTrainer
    from lightning_fed.context import FedContext
    from lightning_fed.trainer_view import TrainerView

    batches = client_batches(TensorDM())
    model = seeded(Warmup, lr=0.05)
    fabric = Fabric(accelerator="cpu", devices=1,
                    plugins=[FabricMixed("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))])
    fed = copy.deepcopy(model)
    view = TrainerView(fabric, FedContext(num_clients=1, num_rounds=1, eval_every=1, run_dir=Path(".")))
    view.lightning_module, fed.trainer, fed.fabric = fed, view, view
    local = LocalTrainer(fabric, view, [], gradient_clip_val=0.05)
    assert not local.plain_steps and local.scaler is not None
    local.fit(batches, 1)
    cap = Capture()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))
    L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=0.05, callbacks=[cap],
              plugins=[plugin]).fit(copy.deepcopy(model), DataLoader(batches, batch_size=None))
    assert local.scaler.get_scale() == plugin.scaler.get_scale() == (init_scale if init_scale < 2**10 else 2.0**17)
    for k, v in fed.state_dict().items():
        torch.testing.assert_close(v, cap.weights[k], rtol=0, atol=0)
    assert not torch.equal(fed.state_dict()["net.0.weight"], model.state_dict()["net.0.weight"])


class WithMetrics(Base):
    """torchmetrics Metric objects (and a MetricCollection) passed to self.log / self.log_dict."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics import MetricCollection
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        self.train_acc = MulticlassAccuracy(num_classes=3)
        self.extra = MetricCollection({"f1": MulticlassF1Score(num_classes=3)}, prefix="train_")
        self.at_epoch_end: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.train_acc(logits, y)
        self.extra(logits, y)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        self.log_dict(self.extra, on_step=False, on_epoch=True)
        return F.cross_entropy(logits, y)

    def on_train_epoch_end(self):
        self.at_epoch_end.append(float(self.trainer.callback_metrics["train_acc"]))


def test_metric_objects_in_self_log(tmp_path):
    model = seeded(WithMetrics)
    fed = copy.deepcopy(model)
    result = FedLoop(num_clients=1, clients_per_round=1, rounds=1, seed=SEED, output_dir=str(tmp_path / "runs"),
                     verbose=False, plot=False, loggers=[], checkpoint_every=0).fit(fed, TensorDM())
    assert result.history[0]["good"] == 1, result.history
    trn = copy.deepcopy(model)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(trn, DataLoader(client_batches(TensorDM()), batch_size=None))
    assert fed.at_epoch_end == trn.at_epoch_end
    assert result.history[0]["train_acc"] == pytest.approx(float(trainer.callback_metrics["train_acc"]), abs=1e-7)
    assert result.history[0]["train_f1"] == pytest.approx(float(trainer.callback_metrics["train_f1"]), abs=1e-7)
    assert "log" not in fed.__dict__ and "log_dict" not in fed.__dict__  # the module is left as it was


def test_docs_example_runs(tmp_path):
    """docs/lightning.md's example runs (shortened)."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "lightning.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)[0]
    code = code.replace("rounds=3", "rounds=1").replace("num_clients=10, clients_per_round=5", "num_clients=4, clients_per_round=2")
    code = code.replace('output_dir="runs/lightning"', f'output_dir="{tmp_path}", verbose=False, plot=False, loggers=[]')
    code = code.replace("MNIST1DDataModule(batch_size=32)", "MNIST1DDataModule(batch_size=32, num_samples=1000)")
    assert code.count(str(tmp_path)) == 1 and "num_samples=1000" in code
    scope: dict = {}
    exec(compile(code, "docs/lightning.md", "exec"), scope)  # noqa: S102 - the documented example itself
    assert scope["loop"].history[0]["good"] == 2


def test_module_prepare_data_called_once(tmp_path):
    calls = []

    class Prepares(Base):
        def prepare_data(self):
            calls.append("module")

    FedLoop(num_clients=2, clients_per_round=1, rounds=2, seed=SEED, output_dir=str(tmp_path / "runs"), verbose=False,
            plot=False, loggers=[], checkpoint_every=0).fit(Prepares(), TensorDM())
    assert calls == ["module"]


class BuiltInSetup(L.LightningModule):
    """Builds its layers in ``setup`` from ``self.trainer.datamodule`` (a common Lightning pattern) and records the
    module's setup and teardown calls."""

    def __init__(self, calls: list) -> None:
        super().__init__()
        self.calls = calls

    def setup(self, stage):
        self.calls.append(("setup", stage))
        dm = self.trainer.datamodule
        self.net = nn.Linear(dm.x.shape[1], int(dm.y.max()) + 1)

    def teardown(self, stage):
        self.calls.append(("teardown", stage))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_module_setup_and_teardown_are_called_as_by_the_trainer(tmp_path):
    """``setup("fit")`` once before training, with ``trainer.datamodule`` there, and ``teardown("fit")`` at the end
    (they were never called: a layer built in setup was missing on every client)."""
    fed, trainer = [], []
    res = FedLoop(num_clients=2, clients_per_round=2, rounds=2, seed=SEED, output_dir=str(tmp_path / "runs"),
                  verbose=False, plot=False, loggers=[], checkpoint_every=0).fit(BuiltInSetup(fed), TensorDM())
    assert [h["good"] for h in res.history] == [2, 2]
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(BuiltInSetup(trainer), datamodule=TensorDM())
    assert fed == trainer == [("setup", "fit"), ("teardown", "fit")]


def test_trainer_datamodule_is_none_with_dataloaders(tmp_path):
    seen = []

    class Reads(Base):
        def on_train_start(self):
            seen.append(self.trainer.datamodule)

    dm = TensorDM()
    FedLoop(num_clients=1, clients_per_round=1, rounds=1, seed=SEED, output_dir=str(tmp_path / "runs"), verbose=False,
            plot=False, loggers=[], checkpoint_every=0).fit(Reads(), dm.train_dataloader())
    FedLoop(num_clients=1, clients_per_round=1, rounds=1, seed=SEED, output_dir=str(tmp_path / "runs"), verbose=False,
            plot=False, loggers=[], checkpoint_every=0).fit(Reads(), dm)
    assert seen == [None, dm]


def test_logging_a_tensor_of_several_values_says_so(tmp_path):
    """``self.log("loss", per_sample_losses)`` stops the run naming the value and its shape, as the Trainer refuses
    it (it failed with torch's "only one element tensors can be converted to Python scalars")."""

    class LogsVector(Base):
        def training_step(self, batch, batch_idx):
            x, y = batch
            losses = F.cross_entropy(self.net(x), y, reduction="none")
            self.log("losses", losses)
            return losses.mean()

    with pytest.raises(ValueError, match=r"self.log\('losses', tensor of shape \(16,\)\) was called, but the value "
                                           "must have a single element"):
        FedLoop(num_clients=1, clients_per_round=1, rounds=1, seed=SEED, output_dir=str(tmp_path / "runs"),
                verbose=False, plot=False, loggers=[], checkpoint_every=0).fit(LogsVector(), TensorDM())


class LogsReduced(Base):
    """Logs a batch count summed over the epoch, the largest and smallest batch loss, and a value with
    ``logger=False`` that a plateau scheduler monitors."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("seen", float(len(x)), on_step=False, on_epoch=True, reduce_fx="sum")
        self.log_dict({"worst": loss, "best": loss.detach()}, on_step=False, on_epoch=True, reduce_fx="max")
        self.log("lowest", loss, on_step=False, on_epoch=True, reduce_fx=torch.min)
        self.log("quiet", 2.0, logger=False)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
                                                   "monitor": "quiet"}}


def test_reduce_fx_and_logger_false_as_the_trainer(tmp_path):
    """A client's epoch value of a name logged with ``reduce_fx`` is its sum, max or min over the batches, as the
    Trainer's ``callback_metrics`` has it (it was the mean), and ``logger=False`` values are kept (they were dropped:
    a plateau scheduler monitoring one failed the client)."""
    res = FedLoop(num_clients=1, clients_per_round=1, rounds=1, seed=SEED, output_dir=str(tmp_path / "runs"),
                  verbose=False, plot=False, loggers=[], checkpoint_every=0).fit(seeded(LogsReduced), TensorDM())
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(seeded(LogsReduced), DataLoader(client_batches(TensorDM()), batch_size=None))
    got, want = res.history[0], {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert got["seen"] == want["seen"] == N
    for name in ("worst", "lowest", "quiet"):
        assert got[name] == pytest.approx(want[name], abs=1e-6), name
    assert got["best"] == got["worst"] and got["lowest"] < got["worst"]


def test_the_csv_logger_takes_hyperparameters(tmp_path):
    """``self.logger.log_hyperparams(...)`` works with FedLoop's CSV logger, as with the Trainer's (Fabric's CSV
    logger raised NotImplementedError, which failed every client)."""

    class LogsHparams(Base):
        def on_train_start(self):
            self.logger.log_hyperparams({"lr": self.lr})

    res = FedLoop(num_clients=1, clients_per_round=1, rounds=1, seed=SEED, output_dir=str(tmp_path / "runs"),
                  verbose=False, plot=False, loggers=["csv"], checkpoint_every=0).fit(LogsHparams(), TensorDM())
    assert res.history[0]["good"] == 1
    assert "lr: 0.1" in next(res.run_dir.glob("logs/**/hparams.yaml")).read_text()
    assert "train_loss" in next(res.run_dir.glob("logs/**/metrics.csv")).read_text()


def test_self_print_and_the_trainers_folders(tmp_path, capsys):
    """``self.print`` (it read ``trainer.progress_bar_callback``, which the view lacked) and ``trainer.log_dir`` /
    ``default_root_dir`` (the run folder)."""
    seen = []

    class Prints(Base):
        def on_train_start(self):
            self.print("client starts")
            seen.append((self.trainer.log_dir, self.trainer.default_root_dir))

    res = FedLoop(num_clients=1, clients_per_round=1, rounds=1, seed=SEED, output_dir=str(tmp_path / "runs"),
                  verbose=False, plot=False, loggers=[], checkpoint_every=0).fit(Prints(), TensorDM())
    assert res.history[0]["good"] == 1 and "client starts" in capsys.readouterr().out
    assert seen == [(str(res.run_dir), str(res.run_dir))]
