"""Footprint: parameters, MACs, bytes and latency, under lightning.Trainer and FedLoop."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_fed import FedLoop
from lightning_fed.callbacks import Footprint, QuantizationAware, StructuredPruning, measure_footprint
from lightning_fed.data import MNIST1DDataModule
from lightning_fed.models import MNIST1DCNN


def dm() -> MNIST1DDataModule:
    return MNIST1DDataModule(batch_size=32, num_samples=400)


def test_misconfiguration_raises():
    with pytest.raises(ValueError, match=r"repeats=0 is not allowed"):
        Footprint(repeats=0)
    with pytest.raises(ValueError, match=r"example_input_shape=\[0, 40\]"):
        Footprint(example_input_shape=[0, 40])


def test_measure_footprint_of_the_paper_cnn():
    fp = measure_footprint(MNIST1DCNN(), torch.zeros(1, 40), repeats=3)
    # conv1 25*5*19 + conv2 25*25*3*10 + conv3 25*25*3*5 + biases + head 125*10 = 32,610 MACs
    assert fp["params"] == 5210 and fp["macs"] == 32610
    # float32 weights plus safetensors' JSON header (8 tensors, under 100 bytes each)
    assert 5210 * 4 < fp["bytes"] < 5210 * 4 + 8 * 100 and fp["latency_ms"] > 0


def test_trainer_before_after(tmp_path):
    L.seed_everything(0)
    fp = Footprint(repeats=3)
    L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_train_batches=3, limit_val_batches=1, default_root_dir=str(tmp_path),
              callbacks=[StructuredPruning(ratio=0.5, at=[0]), fp]).fit(MNIST1DCNN(), dm())
    assert fp.results["before"]["macs"] == 32610
    assert fp.results["before"]["macs"] / fp.results["after"]["macs"] > 3  # channels halved: ~quadratic
    assert fp.results["after"]["bytes"] < fp.results["before"]["bytes"]


def test_fedloop_reports_export(tmp_path):
    L.seed_everything(0)
    fp = Footprint(repeats=3)
    loop = FedLoop(num_clients=2, clients_per_round=2, rounds=2, local_epochs=1, seed=0,
                   callbacks=[QuantizationAware(start=1), fp], output_dir=str(tmp_path), verbose=False, plot=False,
                   loggers=[])
    loop.fit(MNIST1DCNN(), dm())
    r = fp.results
    assert set(r) == {"before", "after", "exported"}
    assert r["after"]["macs"] == r["before"]["macs"] == 32610
    assert r["exported"]["bytes"] < r["after"]["bytes"] / 3
