"""What FedLoop tells callbacks: the federated context, ``trainer.fed`` inside the loop.

Callbacks (the user's and those a strategy installs) read the federated state through this one documented
object, never through the loop's attributes. Under ``lightning.Trainer`` there is no ``trainer.fed``:
:func:`fed_context` returns ``None`` there.

Server side (``client_id is None``): ``round``, ``num_rounds``, ``num_clients``, ``run_dir``,
:meth:`FedContext.is_eval_round`, :meth:`FedContext.eval_stages`, :meth:`FedContext.evaluate`, ``val_data``,
``test_data``, ``eval_data``, :meth:`FedContext.model_changed`,
:meth:`FedContext.stored_clients` / :meth:`FedContext.stored_client_state` (simulation only: evaluating
the clients' own models, e.g. personalised tiers).

Client side (during one client's work): also ``client_id``, ``client_state`` (persisted per client across its
rounds) and ``shard`` (the client's training data as a ``Dataset``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


def _no_evaluator(module: nn.Module, stage: str = "val") -> dict[str, float]:
    raise RuntimeError("FedContext.evaluate is only available inside FedLoop.fit")


def _no_trainer(*args: Any, **kwargs: Any) -> int:
    raise RuntimeError("FedContext.train is only available inside FedLoop.fit")


def _no_store() -> list[int]:
    return []


@dataclass
class FedContext:
    """The federated state a callback may use (``trainer.fed`` inside FedLoop).

    Attributes:
        num_clients: clients in the federation.
        num_rounds: rounds of the run.
        eval_every: the global model is validated every this many rounds (and after the last).
        run_dir: the run's output folder (exports, plots).
        round: the current server round (0-based).
        client_id: the client whose local work is running; ``None`` on the server.
        client_state: that client's persisted state (empty dict on the server); store per-client state here.
        shard: that client's training data (``None`` on the server).
        eval_data: a held-out loader for example inputs: ``val_data``, else ``test_data`` (``None`` if neither).
        test_every: the global model is also tested every this many rounds; 0: only after the last round.
        val_data: the validation loader (``val_dataloader()``; ``None`` when the data module has none).
        test_data: the test loader (``test_dataloader()``; ``None`` when the data module has none).
        console: the loop's rich console (quiet when the loop is not verbose).
        local_epochs: the loop's local epochs per round (an instruction's ``local_epochs`` overrides it).
        steps_per_epoch: each client's optimizer steps in one full local epoch of its shard (batches per epoch over
            ``accumulate_grad_batches``, rounded up), by client id: what a server-side callback may cap with an
            instruction's ``max_steps`` (partial work).
    """

    num_clients: int
    num_rounds: int
    eval_every: int
    run_dir: Path
    round: int = 0
    client_id: int | None = None
    client_state: dict[str, Any] = field(default_factory=dict)
    shard: Dataset | None = None
    eval_data: DataLoader | None = None
    test_every: int = 0
    val_data: DataLoader | None = None
    test_data: DataLoader | None = None
    console: Console = field(default_factory=lambda: Console(stderr=True, quiet=True))
    local_epochs: int = 1
    steps_per_epoch: list[int] = field(default_factory=list)
    _evaluate: Callable[..., dict[str, float]] = field(default=_no_evaluator, repr=False)
    _train: Callable[..., int] = field(default=_no_trainer, repr=False)
    _stored_clients: Callable[[], list[int]] = field(default=_no_store, repr=False)
    _stored_state: Callable[[int], dict[str, Any]] = field(default=lambda cid: {}, repr=False)
    _model_changed: bool = field(default=False, repr=False)

    @property
    def on_server(self) -> bool:
        """Whether the server (not a client's local work) is running."""
        return self.client_id is None

    def is_eval_round(self, server_round: int | None = None) -> bool:
        """Whether the global model is evaluated after ``server_round`` (default: the current round)."""
        r = self.round if server_round is None else server_round
        return (r + 1) % self.eval_every == 0 or r + 1 == self.num_rounds

    def is_test_round(self, server_round: int | None = None) -> bool:
        """Whether the global model is tested after ``server_round`` (default: the current round): the last round,
        and every ``test_every`` rounds when it is set."""
        r = self.round if server_round is None else server_round
        return r + 1 == self.num_rounds or (self.test_every > 0 and (r + 1) % self.test_every == 0)

    def eval_stages(self, server_round: int | None = None) -> list[str]:
        """The evaluations after ``server_round`` (default: the current round), in order: ``"val"`` at evaluation
        rounds when there is validation data, ``"test"`` at test rounds when there is test data."""
        stages = []
        if self.val_data is not None and self.is_eval_round(server_round):
            stages.append("val")
        if self.test_data is not None and self.is_test_round(server_round):
            stages.append("test")
        return stages

    def evaluate(self, module: nn.Module, stage: str = "val") -> dict[str, float]:
        """Server: evaluate any module (a tier's model, a client's own model) with the loop's evaluator:
        ``stage="val"``: ``validation_step`` on ``val_data`` (``val_acc``…); ``"test"``: ``test_step`` on
        ``test_data`` (``test_acc``…); ``{}`` when that loader is missing."""
        return self._evaluate(module, stage)

    def train(
        self,
        module: nn.Module,
        data: Dataset | Tensor,
        generator: torch.Generator,
        *,
        epochs: int | None = 1,
        max_steps: int | None = None,
        callbacks: Sequence[Any] = (),
    ) -> int:
        """Train ``module`` (a model that is not the client's federated update: a personal model) on ``data`` (a
        ``Dataset``, e.g. ``shard``, or indices into the training set) as local training does: its own
        ``configure_optimizers``, ``training_step`` and hooks, the loop's gradient clipping and accumulation, batches
        as the data module's training loader makes them, shuffled by ``generator``; with ``callbacks`` only (not the
        loop's) and a fresh optimizer. ``epochs`` local epochs, at most ``max_steps`` optimizer steps
        (``epochs=None``: as many epochs as ``max_steps`` need). The trainer view is left as it was; returns the
        optimizer steps taken."""
        return self._train(module, data, generator, epochs, max_steps, callbacks)

    def stored_clients(self) -> list[int]:
        """Server, simulation only: the clients that have persisted state."""
        return self._stored_clients()

    def stored_client_state(self, client_id: int) -> dict[str, Any]:
        """Server, simulation only: a copy of ``client_id``'s persisted state (empty if none), to evaluate the
        clients' own models. A real deployment has no such access."""
        return self._stored_state(client_id)

    def model_changed(self) -> None:
        """Server: a callback changed the working model's structure (pruning) or zeroed weights outside
        training (sparsity): the strategy re-reads its global state from the model at the end of the round."""
        self._model_changed = True

    def take_model_changed(self) -> bool:
        """For the loop: whether :meth:`model_changed` was called since the last call (and reset the flag)."""
        changed, self._model_changed = self._model_changed, False
        return changed


def fed_context(trainer: Any) -> FedContext | None:
    """``trainer.fed`` inside FedLoop; ``None`` under ``lightning.Trainer`` (or any trainer without one)."""
    ctx = getattr(trainer, "fed", None)
    return ctx if isinstance(ctx, FedContext) else None


__all__ = ["FedContext", "fed_context"]
