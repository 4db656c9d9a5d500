"""Backdoor attack with a trigger (Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020), and
its attack success rate.

A malicious client writes a fixed trigger pattern into a ``poison_fraction`` of its training records and relabels
them to the ``target`` class, trains on them with its clean records, and may boost its update so that it survives
averaging (*model replacement*: ``update * boost``, the paper's ``gamma = n / eta``), clipped to ``max_norm`` so
that it passes a norm check (the paper's constrain-and-scale against norm bounding).

The trigger (:func:`apply_trigger`): a record of one dimension (an MNIST-1D sequence of 40 values) gets its last
``size`` values replaced by ``value, -value, value, …``; a record of two or more dimensions (an image
``[C, H, W]``) gets a ``size x size`` checkerboard of ``+-value`` in its bottom-right corner, in every channel.
MNIST-1D values are about unit-variance, so the default ``value=3`` stands out.

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


def trigger_pattern(shape: tuple[int, ...], size: int, value: float) -> tuple[tuple[slice, ...], Tensor]:
    """Where the trigger goes in one record of ``shape`` and what is written there: the last ``size`` positions of
    a 1-D record, the bottom-right ``size x size`` corner of the last two dimensions otherwise; alternating signs
    (a checkerboard in 2-D)."""
    if len(shape) == 1:
        where: tuple[slice, ...] = (slice(shape[0] - size, shape[0]),)
        pattern = torch.tensor([value if i % 2 == 0 else -value for i in range(size)])
    else:
        where = (*(slice(None),) * (len(shape) - 2), slice(shape[-2] - size, shape[-2]),
                 slice(shape[-1] - size, shape[-1]))
        i = torch.arange(size)
        pattern = torch.where((i[:, None] + i[None, :]) % 2 == 0, value, -value)
    return where, pattern


def apply_trigger(x: Tensor, size: int = 4, value: float = 3.0) -> Tensor:
    """A copy of the batch ``x`` (records along dimension 0) with the trigger written into every record.

    Raises:
        ValueError: a record is smaller than the trigger.
    """
    shape = tuple(x.shape[1:])
    if not shape or min(shape[-2:]) < size:
        raise ValueError(f"records of shape {shape} cannot hold a trigger of size {size}")
    where, pattern = trigger_pattern(shape, size, value)
    out = x.clone()
    out[(slice(None), *where)] = pattern.to(out.dtype)
    return out


@torch.no_grad()
def attack_success_rate(module: nn.Module, loader: DataLoader, target: int, size: int = 4,
                        value: float = 3.0) -> float:
    """The share of ``loader``'s records of a class other than ``target`` that ``module`` classifies as ``target``
    once the trigger is applied (0.0 when there are none). The module is run in eval mode and left as it was."""
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
            xt = apply_trigger(x[keep], size, value).to(device=device, dtype=dtype)
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
        boost: model replacement: the malicious update is multiplied by this (>= 1; 1: no boost).
        max_norm: the boosted update is scaled down to this L2 norm when longer (> 0); ``None``: no constraint.
        measure: log the attack success rate at evaluation rounds.
    """

    def __init__(self, fraction: float = 0.1, mode: str = "fixed", seed: int = 0, start_round: int = 0,
                 target: int = 0, poison_fraction: float = 0.5, trigger_size: int = 4, trigger_value: float = 3.0,
                 boost: float = 1.0, max_norm: float | None = None, measure: bool = True) -> None:
        super().__init__(fraction, mode, seed, start_round)
        need("Backdoor", isinstance(target, int) and target >= 0, "target", target, "a class index >= 0")
        need("Backdoor", isinstance(poison_fraction, int | float) and 0 < poison_fraction <= 1, "poison_fraction",
             poison_fraction, "in (0, 1]")
        need("Backdoor", isinstance(trigger_size, int) and trigger_size >= 1, "trigger_size", trigger_size,
             "an integer >= 1")
        need("Backdoor", isinstance(trigger_value, int | float) and trigger_value > 0, "trigger_value", trigger_value,
             "> 0")
        need("Backdoor", isinstance(boost, int | float) and boost >= 1, "boost", boost, ">= 1 (1: no boost)")
        need("Backdoor", max_norm is None or (isinstance(max_norm, int | float) and max_norm > 0), "max_norm",
             max_norm, "> 0 or None (no constraint)")
        self.target = target
        self.poison_fraction = float(poison_fraction)
        self.trigger_size = trigger_size
        self.trigger_value = float(trigger_value)
        self.boost = float(boost)
        self.max_norm = max_norm
        self.measure = measure

    def poison(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Copies of ``(x, y)`` with the trigger and the target label on a seeded ``poison_fraction`` of records."""
        n = len(y)
        chosen = torch.randperm(n, generator=gen)[:max(1, int(self.poison_fraction * n + 0.5))]
        x, y = x.clone(), y.clone()
        x[chosen] = apply_trigger(x[chosen], self.trigger_size, self.trigger_value)
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
                                                              self.trigger_value)


__all__ = ["Backdoor", "apply_trigger", "attack_success_rate", "trigger_pattern"]
