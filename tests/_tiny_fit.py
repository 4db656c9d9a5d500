"""Quiet fits of the tiny hand-computed modules of the client-callback tests (FedProx, FedRS): a plain
``lightning.Trainer`` and a FedLoop with no output but the run folder."""

from __future__ import annotations

from typing import Any

import lightning as L

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
    rest (clients, rounds, strategy, ...)."""
    return FedLoop(
        verbose=False, plot=False, checkpoint_every=0, loggers=[], output_dir=str(tmp_path), **kwargs
    )
