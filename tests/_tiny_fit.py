"""Quiet fits of the tiny hand-computed modules of the client-callback tests (FedProx, FedRS, FedNTD): a plain
``lightning.Trainer`` and a FedLoop with no output but the run folder, the tiny classifier itself, a small seeded
MNIST-1D fit and the docs examples."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed import FedLoop


def quiet_trainer(max_steps: int, callbacks: list[Any]) -> L.Trainer:
    """A CPU ``lightning.Trainer`` of ``max_steps`` steps with ``callbacks``: no logger, checkpoint, bar or summary."""
    return L.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


def quiet_loop(tmp_path: Any, **kwargs: Any) -> FedLoop:
    """A FedLoop writing only its run folder under ``tmp_path`` (no plot, logger or checkpoint); ``kwargs`` set the
    rest (clients, rounds, strategy, ...) and may replace those defaults."""
    quiet = {"verbose": False, "plot": False, "checkpoint_every": 0, "loggers": [], "output_dir": str(tmp_path)}
    return FedLoop(**{**quiet, **kwargs})


class TinyClassifier(L.LightningModule):
    """Bias-free linear logits ``x W^T`` (``W`` starts as ``w0``: classes x features), cross-entropy, plain SGD at
    ``lr``: a module whose steps the client-callback tests derive by hand."""

    def __init__(self, w0: torch.Tensor, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.lin = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(w0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits."""
        return self.lin(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Cross-entropy of the logits."""
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Plain SGD."""
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class FullBatch(L.LightningDataModule):
    """``(x, y)`` as one training batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.x, self.y = x, y

    def train_dataloader(self) -> DataLoader:
        """One batch of every record."""
        return DataLoader(TensorDataset(self.x, self.y), batch_size=len(self.x))


def fit_small(strategy: Any, dm: Any, tmp_path: Any) -> dict[str, torch.Tensor]:
    """Two seeded rounds of a 4-channel MNIST1DCNN on 3 Dirichlet(0.1) clients (2 per round, 1 local epoch) under
    ``strategy``; the final weights."""
    from lightning_fed.data import Dirichlet
    from lightning_fed.models import MNIST1DCNN

    L.seed_everything(0)
    model = MNIST1DCNN(channels=4)
    quiet_loop(
        tmp_path,
        num_clients=3,
        clients_per_round=2,
        rounds=2,
        local_epochs=1,
        partition=Dirichlet(alpha=0.1, min_samples=10),
        strategy=strategy,
        seed=0,
    ).fit(model, dm)
    return {k: v.clone() for k, v in model.state_dict().items()}


def run_strategies_doc_example(marker: str, run_dir: str, tmp_path: Any) -> dict[str, Any]:
    """Run the Python block of docs/strategies.md that contains ``marker``, its ``run_dir`` moved under
    ``tmp_path``; the block's variables."""
    doc = (Path(__file__).parents[1] / "docs" / "strategies.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL) if marker in c)
    scope: dict[str, Any] = {}
    exec(compile(code.replace(f'"{run_dir}"', f'"{tmp_path}"'), "docs/strategies.md", "exec"), scope)  # noqa: S102
    return scope
