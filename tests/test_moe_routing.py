"""MoERouting under lightning.Trainer and FedLoop: conversion at setup, auxiliary loss, logging, annealing."""

import math

import lightning as L
import pytest
import torch
from conftest import seeded
from lightning.pytorch.callbacks import Callback

from lightning_fed import FedAvg
from lightning_fed.callbacks import MoERouting
from lightning_fed.models import MNIST1DFFN, MNIST1DMLP
from lightning_fed.moe import MoELayer


def _trainer(callbacks, epochs: int = 1, **kw) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     num_sanity_val_steps=0, **kw)


def test_wrapped_step_adds_weighted_aux_losses():
    torch.manual_seed(0)
    model = MNIST1DFFN()
    cb = MoERouting(convert=["ffn"], num_experts=4, balance_weight=0.3, z_weight=0.2, log_stats=False)
    cb.setup(None, model, "fit")
    batch = (torch.randn(16, 40), torch.randint(0, 10, (16,)))
    plain = type(model).training_step(model, batch, 0)
    stats = model.ffn.stats[-1]
    loss = model.training_step(batch, 0)
    assert math.isclose(loss.item(), plain.item() + 0.3 * float(stats.balance_loss) + 0.2 * float(stats.z_loss),
                        rel_tol=1e-5)
    model.zero_grad()
    loss.backward()
    assert float(model.ffn.router.weight.grad.abs().sum()) > 0
    cb.teardown(None, model, "fit")
    assert "training_step" not in model.__dict__
    assert torch.equal(model.training_step(batch, 0), type(model).training_step(model, batch, 0))


def test_dict_output_gets_aux_added():
    class DictStep(MNIST1DFFN):
        def training_step(self, batch, batch_idx):
            return {"loss": super().training_step(batch, batch_idx), "extra": 1}

    torch.manual_seed(0)
    model = DictStep()
    MoERouting(convert=["ffn"], num_experts=2, balance_weight=1.0, log_stats=False).setup(None, model, "fit")
    batch = (torch.randn(8, 40), torch.randint(0, 10, (8,)))
    out = model.training_step(batch, 0)
    assert set(out) == {"loss", "extra"}
    assert float(out["loss"]) > float(type(model).training_step(model, batch, 0)["loss"])


class Probe(Callback):
    """Records, per epoch, the MoE settings and whether gradients reached the router."""

    def __init__(self):
        self.settings, self.router_grads = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        m = pl_module.ffn
        self.settings.append((m.k, m.capacity_factor))

    def on_after_backward(self, trainer, pl_module):
        self.router_grads.append(float(pl_module.ffn.router.weight.grad.abs().sum()))


def test_under_lightning_trainer_converts_trains_logs_and_anneals(small_dm):
    model = seeded(MNIST1DFFN, lr=0.01, optimizer="adam")
    cb = MoERouting(convert=["ffn"], num_experts=4, k=2, capacity_factor=2.0, capacity_final=1.0, k_final=1,
                    anneal_periods=2)
    probe = Probe()
    router0 = None

    class Snap(Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal router0
            router0 = pl_module.ffn.router.weight.detach().clone()
            ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            assert id(pl_module.ffn.experts[3][0].weight) in ids  # experts are in the optimizer

    _trainer([cb, probe, Snap()], epochs=3, limit_train_batches=5).fit(model, small_dm)
    assert isinstance(model.ffn, MoELayer) and "training_step" not in model.__dict__
    assert probe.settings == [(2, 2.0), (2, 1.5), (1, 1.0)]  # linear anneal over 2 epochs, k rounded
    assert min(probe.router_grads) > 0
    assert not torch.equal(model.ffn.router.weight.detach(), router0)
    e0, e1 = model.ffn.experts[0][0].weight, model.ffn.experts[1][0].weight
    assert not torch.equal(e0, e1)  # upcycled copies diverge once they see different samples
    metrics = _trainer([cb]).test(model, small_dm, verbose=False)[0]
    assert "test_acc" in metrics


def test_logged_stats_under_trainer(small_dm):
    model = seeded(MNIST1DMLP, lr=0.01, optimizer="adam")
    trainer = _trainer([MoERouting(convert=["net.2"], num_experts=3)], limit_train_batches=3)
    trainer.fit(model, small_dm)
    m = trainer.callback_metrics
    for key in ("moe/balance_loss", "moe/z_loss", "moe/entropy", "moe/dropped", "moe/net.2/load_2"):
        assert key in m, key
    assert float(m["moe/entropy"]) <= math.log(3) + 1e-6
    loads = sum(float(m[f"moe/net.2/load_{e}"]) for e in range(3))
    assert math.isclose(loads, 1.0, rel_tol=1e-5)
    # the last step routed 32 tokens, k=1, capacity ceil(1.25 * 32 / 3) = 14 per expert: tokens are dropped
    # only by an expert filled to capacity, and the logged shares are whole token counts of the kept ones
    dropped, cap = float(m["moe/dropped"]), math.ceil(1.25 * 32 / 3)
    kept = round((1 - dropped) * 32)
    assert 0 < dropped < 1 and dropped == pytest.approx(1 - kept / 32, abs=1e-6)
    counts = [float(m[f"moe/net.2/load_{e}"]) * kept for e in range(3)]
    assert all(abs(c - round(c)) < 1e-4 for c in counts) and max(round(c) for c in counts) == cap


def test_under_fedloop_anneals_by_round_and_logs(make_loop, small_dm):
    model = seeded(MNIST1DFFN)
    cb = MoERouting(convert=["ffn"], num_experts=4, capacity_factor=2.0, capacity_final=1.0, anneal_periods=2)

    class RoundProbe(Callback):
        def __init__(self):
            self.caps = []

        def on_train_start(self, trainer, pl_module):
            self.caps.append((trainer.current_round, pl_module.ffn.capacity_factor))

    probe = RoundProbe()
    res = make_loop(rounds=3, clients_per_round=1, strategy=FedAvg(), callbacks=[cb, probe]).fit(model, small_dm)
    assert [c for _, c in probe.caps] == [2.0, 1.5, 1.0]
    assert "moe/balance_loss" in res.history[-1] and res.history[-1]["good"] == 1
    assert "training_step" not in model.__dict__


def test_existing_moe_layers_without_conversion(make_loop, small_dm):
    from lightning_fed.moe import convert_to_moe

    model = seeded(MNIST1DFFN)
    convert_to_moe(model, ["ffn"], num_experts=2)
    router0 = model.ffn.router.weight.detach().clone()
    res = make_loop(rounds=1, callbacks=[MoERouting()]).fit(model, small_dm)
    h = res.history[-1]
    assert "moe/z_loss" in h
    assert h["moe/ffn/load_0"] + h["moe/ffn/load_1"] == pytest.approx(1.0, abs=1e-5)  # the found layer is routed
    assert not torch.equal(model.ffn.router.weight.detach(), router0)  # and its router trained


def test_config_errors():
    with pytest.raises(ValueError, match="num_experts=1"):
        MoERouting(num_experts=1)
    with pytest.raises(ValueError, match="k=5"):
        MoERouting(num_experts=4, k=5)
    with pytest.raises(ValueError, match="capacity_factor=0"):
        MoERouting(capacity_factor=0)
    with pytest.raises(ValueError, match="balance_weight=-1"):
        MoERouting(balance_weight=-1)
    with pytest.raises(ValueError, match="z_weight=-0.1"):
        MoERouting(z_weight=-0.1)
    with pytest.raises(ValueError, match="anneal_periods=0"):
        MoERouting(anneal_periods=0)
    with pytest.raises(ValueError, match="k_final=9"):
        MoERouting(convert=["ffn"], num_experts=4, k_final=9)
    with pytest.raises(ValueError, match="convert"):
        MoERouting(convert=["ffn", "ffn"])
    with pytest.raises(ValueError, match="has no MoE layers"):
        MoERouting().setup(None, MNIST1DFFN(), "fit")
    with pytest.raises(ValueError, match="'nope' is not a submodule"):
        MoERouting(convert=["nope"]).setup(None, MNIST1DFFN(), "fit")
