"""Backdoor attack with a trigger (Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020), and
its attack success rate.

A malicious client writes a fixed trigger pattern into a ``poison_fraction`` of its training records and relabels
them to the ``target`` class, trains on them with its clean records, and may boost its update so that it survives
averaging (*model replacement*: ``update * boost``, the paper's ``gamma = n / eta``), clipped to ``max_norm`` so
that it passes a norm check (the paper's constrain-and-scale against norm bounding).

The trigger (:func:`apply_trigger`): a record of one dimension (an MNIST-1D sequence of 40 values) gets its last
``size`` values replaced by ``value, -value, value, …``; a record of two or more dimensions (an image
``[C, H, W]``) gets a ``size x size`` checkerboard of ``+-value`` in its bottom-right corner, in every channel.
MNIST-1D values are about unit-variance, so the default ``value=3`` stands out. ``start`` moves the trigger (its
first position; for images its top-left corner, the same row and column) and ``pattern="constant"`` writes
``+value`` everywhere instead of alternating signs.

The attack success rate (:func:`attack_success_rate`): the share of the held-out records whose true class is not
the target that the global model classifies as the target once triggered. :class:`Backdoor` logs it at every
evaluation round as ``val_asr`` / ``test_asr`` next to the clean ``val_acc`` / ``test_acc``; the final
``test_asr`` appears in the summary table.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_fed.callbacks.attacks import Attack, float_items, shard_tensors
from lightning_fed.context import fed_context
from lightning_fed.protocol import Reply
from lightning_fed.seeding import Stream, generator
from lightning_fed.validation import need

PATTERNS = ("alternating", "constant")


def trigger_pattern(shape: tuple[int, ...], size: int, value: float, start: int | None = None,
                    pattern: str = "alternating") -> tuple[tuple[slice, ...], Tensor]:
    """Where the trigger goes in one record of ``shape`` and what is written there: ``size`` positions of a 1-D
    record from ``start``, a ``size x size`` square of the last two dimensions from ``(start, start)`` otherwise
    (``start=None``: the end, the bottom-right corner); ``pattern`` ``"alternating"``: alternating signs (a
    checkerboard in 2-D), ``"constant"``: ``+value`` everywhere.

    Raises:
        ValueError: ``pattern`` is not one of :data:`PATTERNS`, ``start`` is negative, or the record cannot hold
            the trigger there.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"trigger pattern {pattern!r} is not one of {', '.join(PATTERNS)}")
    if start is not None and start < 0:
        raise ValueError(f"trigger start {start} is negative: a position >= 0 (or None: the end)")
    sides = shape[-1:] if len(shape) == 1 else shape[-2:]
    if not shape or min(sides) < size or (start is not None and start + size > min(sides)):
        at = "at the end" if start is None else f"from position {start}"
        raise ValueError(f"records of shape {shape} cannot hold a trigger of size {size} {at}")
    span = tuple(slice(n - size if start is None else start, (n - size if start is None else start) + size)
                 for n in sides)
    where: tuple[slice, ...] = (*(slice(None),) * (len(shape) - len(sides)), *span)
    i = torch.arange(size)
    parity = i % 2 if len(shape) == 1 else (i[:, None] + i[None, :]) % 2
    signs = torch.ones(parity.shape) if pattern == "constant" else torch.where(parity == 0, 1.0, -1.0)
    return where, signs * value


def apply_trigger(x: Tensor, size: int = 4, value: float = 3.0, start: int | None = None,
                  pattern: str = "alternating") -> Tensor:
    """A copy of the batch ``x`` (records along dimension 0) with the trigger (:func:`trigger_pattern`) written
    into every record.

    Raises:
        ValueError: a record cannot hold the trigger, or a bad ``start`` / ``pattern``.
    """
    where, values = trigger_pattern(tuple(x.shape[1:]), size, value, start, pattern)
    out = x.clone()
    out[(slice(None), *where)] = values.to(out.dtype)
    return out


@torch.no_grad()
def attack_success_rate(module: nn.Module, loader: DataLoader, target: int, size: int = 4,
                        value: float = 3.0, start: int | None = None, pattern: str = "alternating") -> float:
    """The share of ``loader``'s records of a class other than ``target`` that ``module`` classifies as ``target``
    once the trigger (:func:`apply_trigger`'s ``size``, ``value``, ``start``, ``pattern``) is applied (0.0 when
    there are none). The module is run in eval mode and left as it was."""
    was_training = module.training
    module.eval()
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    hits = total = 0
    try:
        for x, y in loader:
            keep = y != target
            if not bool(keep.any()):
                continue
            xt = apply_trigger(x[keep], size, value, start, pattern).to(device=device, dtype=dtype)
            pred = module(xt).argmax(dim=1).cpu()
            hits += int((pred == target).sum())
            total += int(keep.sum())
    finally:
        module.train(was_training)
    return hits / total if total else 0.0


class Backdoor(Attack):
    """Backdoor with a trigger on a seeded fraction of malicious clients, optionally with model replacement
    (module docstring); logs the attack success rate at evaluation rounds (``val_asr``, ``test_asr``).

    Example::

        loop = FedLoop(..., callbacks=[Backdoor(fraction=0.1, target=0, poison_fraction=0.5, boost=5.0,
                                                max_norm=2.0)])

    Args:
        fraction: share of malicious clients, in ``[0, 1]``.
        mode: ``"fixed"`` or ``"round"`` (see :class:`~lightning_fed.callbacks.Attack`).
        seed: seed of the choice of clients and of the poisoned records.
        start_round: first attacked round (0-based).
        target: the class triggered records are relabelled to (>= 0).
        poison_fraction: share of a malicious client's records that get the trigger, in ``(0, 1]``.
        trigger_size: the trigger's length (1-D records) or side (images) (>= 1).
        trigger_value: the trigger's amplitude (> 0).
        trigger_start: the trigger's first position (images: its top-left corner's row and column) (>= 0);
            ``None``: at the end (the bottom-right corner).
        trigger_pattern: ``"alternating"`` (``+-value``, a checkerboard on images) or ``"constant"`` (``+value``).
        boost: model replacement: the malicious update is multiplied by this (>= 1; 1: no boost).
        max_norm: the boosted update is scaled down to this L2 norm when longer (> 0); ``None``: no constraint.
        measure: log the attack success rate at evaluation rounds.
    """

    def __init__(self, fraction: float = 0.1, mode: str = "fixed", seed: int = 0, start_round: int = 0,
                 target: int = 0, poison_fraction: float = 0.5, trigger_size: int = 4, trigger_value: float = 3.0,
                 boost: float = 1.0, max_norm: float | None = None, measure: bool = True,
                 trigger_start: int | None = None, trigger_pattern: str = "alternating") -> None:
        super().__init__(fraction, mode, seed, start_round)
        need("Backdoor", target >= 0, "target", target, "a class index >= 0")
        need("Backdoor", 0 < poison_fraction <= 1, "poison_fraction", poison_fraction, "in (0, 1]")
        need("Backdoor", trigger_size >= 1, "trigger_size", trigger_size, "an integer >= 1")
        need("Backdoor", trigger_value > 0, "trigger_value", trigger_value, "> 0")
        need("Backdoor", trigger_start is None or trigger_start >= 0,
             "trigger_start", trigger_start, "an integer >= 0 or None (at the end)")
        need("Backdoor", trigger_pattern in PATTERNS, "trigger_pattern", trigger_pattern, f"one of {PATTERNS}")
        need("Backdoor", boost >= 1, "boost", boost, ">= 1 (1: no boost)")
        need("Backdoor", max_norm is None or max_norm > 0, "max_norm", max_norm, "> 0 or None (no constraint)")
        self.target = target
        self.poison_fraction = float(poison_fraction)
        self.trigger_size = trigger_size
        self.trigger_value = float(trigger_value)
        self.trigger_start = trigger_start
        self.trigger_pattern = trigger_pattern
        self.boost = float(boost)
        self.max_norm = max_norm
        self.measure = measure

    def poison(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Copies of ``(x, y)`` with the trigger and the target label on a seeded ``poison_fraction`` of records."""
        n = len(y)
        chosen = torch.randperm(n, generator=gen)[:max(1, int(self.poison_fraction * n + 0.5))]
        x, y = x.clone(), y.clone()
        x[chosen] = apply_trigger(x[chosen], self.trigger_size, self.trigger_value, self.trigger_start,
                                  self.trigger_pattern)
        y[chosen] = self.target
        return x, y

    def on_client_data(self, trainer: Any, pl_module: Any, shard: Dataset) -> Dataset:
        """Malicious clients: their records with a poisoned share (seeded by (seed, round, client))."""
        fed = self.malicious_context(trainer)
        if fed is None:
            return shard
        x, y = shard_tensors(shard)
        assert fed.client_id is not None
        return TensorDataset(*self.poison(x, y, generator(self.seed, Stream.BACKDOOR_POISON, fed.round,
                                                          fed.client_id)))

    def on_client_end(self, trainer: Any, pl_module: Any, reply: Reply) -> None:
        """Malicious clients: model replacement (``update * boost``), then the norm constraint."""
        if self.malicious_context(trainer) is None or (self.boost == 1 and self.max_norm is None):
            return
        items = float_items(reply)
        for _, v in items:
            v.mul_(self.boost)
        if self.max_norm is not None:
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v.float()) for _, v in items])))
            if norm > self.max_norm:
                for _, v in items:
                    v.mul_(self.max_norm / norm)

    def on_round_end(self, trainer: Any, pl_module: Any, metrics: dict[str, float]) -> None:
        """Server: the ``malicious`` count; at evaluation rounds ``<stage>_asr`` on the triggered held-out data."""
        super().on_round_end(trainer, pl_module, metrics)
        fed = fed_context(trainer)
        if fed is None or not self.measure:
            return
        for stage in fed.eval_stages():
            loader = fed.val_data if stage == "val" else fed.test_data
            if loader is not None:
                metrics[f"{stage}_asr"] = attack_success_rate(pl_module, loader, self.target, self.trigger_size,
                                                              self.trigger_value, self.trigger_start,
                                                              self.trigger_pattern)


__all__ = ["PATTERNS", "Backdoor", "apply_trigger", "attack_success_rate", "trigger_pattern"]
