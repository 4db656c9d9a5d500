"""EightBitOptimizer under lightning.Trainer and FedLoop."""

from __future__ import annotations

import lightning as L
import pytest

from lightning_fed import FedLoop
from lightning_fed.callbacks import EightBitOptimizer
from lightning_fed.data import MNIST1DDataModule
from lightning_fed.models import MNIST1DCNN

bnb = pytest.importorskip("bitsandbytes")


def dm() -> MNIST1DDataModule:
    return MNIST1DDataModule(batch_size=32, num_samples=400)


@pytest.mark.parametrize(("kw", "match"), [
    ({"optimizer": "lion8bit"}, r"optimizer='lion8bit' .* one of \('adam8bit', 'adamw8bit'\)"),
    ({"lr": 0.0}, r"lr=0\.0"),
    ({"min_8bit_size": 0}, r"min_8bit_size=0"),
])
def test_misconfiguration_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        EightBitOptimizer(**kw)


def test_trainer_uses_adamw8bit_and_reports_state_bytes():
    L.seed_everything(0)
    model, cb = MNIST1DCNN(), EightBitOptimizer(optimizer="adamw8bit", lr=5e-3, min_8bit_size=256)
    t = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_train_batches=3, limit_val_batches=1, callbacks=[cb])
    t.fit(model, dm())
    assert isinstance(t.optimizers[0], bnb.optim.AdamW8bit) and t.optimizers[0].param_groups[0]["lr"] == 5e-3
    assert 0 < cb.last_report["optim_state_bytes"] < cb.last_report["optim_state_bytes_fp32"]
    assert "configure_optimizers" not in model.__dict__  # the wrapper is removed at teardown


def test_fedloop_clients_train_with_adam8bit(tmp_path):
    L.seed_everything(0)
    loop = FedLoop(num_clients=2, clients_per_round=2, rounds=1, local_epochs=1, seed=0,
                   callbacks=[EightBitOptimizer(lr=5e-3, min_8bit_size=256)],
                   output_dir=str(tmp_path), verbose=False, plot=False, loggers=[])
    h = loop.fit(MNIST1DCNN(), dm()).history[0]
    assert h["good"] == 2 and h["failed"] == 0
    assert 0 < h["optim_state_bytes"] < h["optim_state_bytes_fp32"]
