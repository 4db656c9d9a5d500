"""Small pieces shared by the compression callbacks: where they run (``lightning.Trainer`` or FedLoop), schedule
parsing, example inputs, optimizer rebuilds and per-client state that goes stale when the model changes."""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_fed.context import fed_context

log = logging.getLogger("lightning_fed")


def torch_pruning() -> ModuleType:
    """The ``torch_pruning`` module, imported on first use (pruning, replaying a pruning history, counting MACs):
    ``import lightning_fed`` loads no optional heavy dependency that the run does not use."""
    return importlib.import_module("torch_pruning")


def in_fedloop(trainer: Any) -> bool:
    """Whether ``trainer`` carries FedLoop's context ``trainer.fed`` (``False`` under ``lightning.Trainer``)."""
    return fed_context(trainer) is not None


def on_server(trainer: Any) -> bool:
    """Inside FedLoop and not in a client's local work."""
    ctx = fed_context(trainer)
    return ctx is not None and ctx.on_server


def parse_schedule(owner: str, key: str, at: int | list[int]) -> list[int]:
    """Normalise an ``at`` argument (one int or a list of ints) into a sorted list of distinct ints >= 0.

    Raises:
        ValueError: empty, negative, non-integer or repeated entries.
    """
    steps = [at] if isinstance(at, int) and not isinstance(at, bool) else list(at)
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps) or len(set(steps)) != len(steps):
        raise ValueError(
            f"{owner}: {key}={at!r} is not allowed; {key} must be an int >= 0 or a non-empty list of distinct ints >= 0 "
            "(0-based epochs under lightning.Trainer, 0-based rounds in FedLoop)"
        )
    return sorted(steps)


def example_from_batch(batch: Any) -> Tensor | None:
    """The input tensor of a batch (``x`` of ``(x, y)`` or the batch itself), first two rows, detached."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(x, Tensor) and x.ndim >= 1 and x.shape[0] >= 1:
        return x[:2].detach().clone()
    return None


def example_from_dataset(data: Any) -> Tensor | None:
    """The inputs (``x`` of ``(x, y)`` records, or the records themselves) of the first two records of a dataset,
    stacked into a batch, detached; ``None`` for an empty dataset or non-tensor inputs."""
    xs = []
    for i in range(min(2, len(data))):
        record = data[i]
        x = record[0] if isinstance(record, (tuple, list)) and record else record
        if not isinstance(x, Tensor):
            return None
        xs.append(x.detach())
    return torch.stack(xs) if xs else None


def example_input(owner: str, trainer: Any, pl_module: nn.Module, shape: list[int] | None, seen: Tensor | None) -> Tensor:
    """An example input for tracing: ``zeros(shape)``, the module's ``example_input_array``, a seen batch, or (in
    FedLoop) the first two records of the active client's shard (``trainer.fed.shard``) or, on the server, the first
    batch of the held-out data (``trainer.fed.eval_data``), in that order.

    Raises:
        ValueError: none of these is available.
    """
    device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
    if shape is not None:
        return torch.zeros(*shape, device=device)
    ex = getattr(pl_module, "example_input_array", None)
    if isinstance(ex, Tensor):
        return ex.to(device)
    if seen is not None:
        return seen.to(device)
    ctx = fed_context(trainer)
    if ctx is not None:
        if ctx.shard is not None and len(ctx.shard):
            seen = example_from_dataset(ctx.shard)
        elif ctx.eval_data is not None:
            seen = example_from_batch(next(iter(ctx.eval_data)))
        if seen is not None:
            return seen.to(device)
    raise ValueError(
        f"{owner}: no example input to trace the model with; set example_input_shape=[batch, ...] or the module's "
        "example_input_array"
    )


def rebuild_optimizers(trainer: Any) -> None:
    """After parameters were replaced (structured pruning), rebuild ``lightning.Trainer``'s optimizers and LR
    schedulers from ``configure_optimizers`` so that they hold the new parameters (their state starts afresh).
    Inside FedLoop nothing is needed: every client builds its optimizer when its local work starts."""
    if in_fedloop(trainer):
        return
    trainer.strategy.setup_optimizers(trainer)


def reset_stale_client_state(trainer: Any, version_key: str, version: int, keys: list[str]) -> list[str]:
    """Drop per-client entries (optimizer state, codec residuals…) made for an older model structure or mask.

    A client that was not sampled in the round the model changed still holds state shaped for the old model;
    this compares the version stored in ``trainer.client_state`` with the current one and removes ``keys`` if
    they differ. Returns the keys removed.
    """
    state = trainer.client_state
    removed = []
    if int(state.get(version_key, 0)) != version:
        removed = [k for k in keys if state.pop(k, None) is not None]
        if removed:
            log.info("client %s: %s changed (version %d): reset %s", trainer.client_id, version_key, version, removed)
    state[version_key] = version
    return removed


@contextmanager
def detached(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily detach every LightningModule inside ``model`` from its trainer (so it can be deep-copied)."""
    saved = []
    for m in model.modules():
        if isinstance(m, L.LightningModule):
            saved.append((m, m._trainer, getattr(m, "_fabric", None), list(getattr(m, "_fabric_optimizers", []))))
            m._trainer, m._fabric, m._fabric_optimizers = None, None, []
    try:
        yield model
    finally:
        for m, trainer, fabric, opts in saved:
            m._trainer, m._fabric, m._fabric_optimizers = trainer, fabric, opts


def cpu_copy(model: nn.Module) -> nn.Module:
    """A detached deep copy of ``model`` on the CPU in eval mode (for measurements and exports)."""
    with detached(model):
        out = copy.deepcopy(model)
    return out.cpu().eval()
