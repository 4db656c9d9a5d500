"""Shared fixtures: a small MNIST-1D datamodule and a quiet FedLoop factory."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_fed import FedLoop, MNIST1DDataModule


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("LIGHTNING_FED_CACHE", str(tmp_path_factory.mktemp("lf-cache")))
    torch.set_num_threads(1)


@pytest.fixture
def small_dm() -> MNIST1DDataModule:
    """1,000 MNIST-1D samples (800 train / 200 test), batch 32."""
    return MNIST1DDataModule(batch_size=32, num_samples=1000)


@pytest.fixture
def make_loop(tmp_path):
    """FedLoop factory with quiet, fast defaults writing under tmp_path."""

    def factory(**kw) -> FedLoop:
        defaults = {
            "num_clients": 4,
            "clients_per_round": 2,
            "rounds": 2,
            "local_epochs": 1,
            "output_dir": str(tmp_path / "runs"),
            "verbose": False,
            "plot": False,
            "loggers": [],
            "checkpoint_every": 0,
        }
        defaults.update(kw)
        return FedLoop(**defaults)

    return factory


def seeded(cls, *args, seed: int = 0, **kw) -> L.LightningModule:
    """Build a module after seeding, so its initial weights are reproducible."""
    L.seed_everything(seed, verbose=False)
    return cls(*args, **kw)


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
