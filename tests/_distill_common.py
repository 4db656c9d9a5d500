"""Shared helpers of the distillation tests (tiny, seeded settings)."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch

from lightning_fed import FedCallback, FedLoop
from lightning_fed.data import Dirichlet, MNIST1DDataModule, PublicData
from lightning_fed.models import MNIST1DCNN


def tiny_dm() -> MNIST1DDataModule:
    """400 train / 100 test MNIST-1D samples."""
    return MNIST1DDataModule(batch_size=32, num_samples=500)


def tiny_public(n: int = 120) -> PublicData:
    """A small public set (seed 7)."""
    return PublicData(num_samples=n, seed=7)


def tiny_loop(tmp_path, strategy, rounds: int = 2, callbacks=None, num_clients: int = 4, per_round: int = 2,
              **kw) -> FedLoop:
    """A FedLoop for tests: quiet, no checkpoints unless asked."""
    kw.setdefault("checkpoint_every", 0)
    return FedLoop(num_clients=num_clients, clients_per_round=per_round, rounds=rounds, strategy=strategy,
                   callbacks=callbacks or [], partition=Dirichlet(alpha=0.5, min_samples=10),
                   output_dir=str(tmp_path), verbose=False, plot=False, loggers=[], **kw)


def cnn(channels: int = 4) -> MNIST1DCNN:
    """A tiny CNN."""
    return MNIST1DCNN(channels=channels)


def trainer(epochs: int = 1, batches: int | None = 5) -> L.Trainer:
    """A quiet CPU Lightning Trainer."""
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_train_batches=batches,
                     limit_val_batches=0)


class Corrupt(FedCallback):
    """Replaces one payload entry of every reply (a hostile or buggy client)."""

    def __init__(self, key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.key, self.fn = key, fn

    def on_client_end(self, trainer, pl_module, reply):
        reply.payload[self.key] = self.fn(reply.payload[self.key])


class Spy(FedCallback):
    """Records every reply payload's shapes and dtypes, and every instruction payload's keys."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, dict[str, tuple[tuple[int, ...], torch.dtype]]]] = []
        self.instructions: list[tuple[int, set[str]]] = []

    def on_client_start(self, trainer, pl_module, instruction):
        self.instructions.append((instruction.client_id, set(instruction.payload)))

    def on_client_end(self, trainer, pl_module, reply):
        self.replies.append((reply.client_id, {k: (tuple(v.shape), v.dtype) for k, v in reply.payload.items()}))


def fit_rejected(loop: FedLoop, model, dm) -> list[dict]:
    """Fit a loop whose every reply is rejected: the run must stop with ``RoundsFailed`` naming the rejections.
    Returns the history of the rounds it ran."""
    import pytest

    from lightning_fed.errors import RoundsFailed

    with pytest.raises(RoundsFailed, match=r"reply of client \d+ rejected"):
        loop.fit(model, dm)
    return loop.history
