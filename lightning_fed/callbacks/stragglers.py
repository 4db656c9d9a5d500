"""Systems heterogeneity as in the FedProx paper: a seeded fraction of each round's clients are stragglers.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, Section 5.1: "for varying heterogeneous
settings, ... we force x % of the selected devices to perform fewer updates" than the ``E`` local epochs: each
straggler runs a number of epochs drawn uniformly from 1 to ``E - 1``. FedAvg drops the stragglers (it waits for
no one past the deadline); FedProx keeps their partial work.

:class:`Stragglers` decides this on the server when a round's instructions are made (``on_round_start``), from
``(seed, round)`` alone, so every process and every resumed run draws the same stragglers: ``mode="drop"``
removes their instructions (they are sent nothing), ``mode="partial"`` caps their local optimizer steps with
``Instruction.config["max_steps"]`` (the client's reply reports the steps it ran, ``Reply.local_steps``, which
:class:`~lightning_fed.strategies.FedNova` normalises by).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.context import fed_context
from lightning_fed.protocol import Instruction
from lightning_fed.seeding import Stream, generator
from lightning_fed.validation import need

MODES = ("partial", "drop")

log = logging.getLogger("lightning_fed")


def straggler_cap(gen: torch.Generator, epochs: int, steps_per_epoch: int) -> int | None:
    """The local steps one straggler may run: ``x * steps_per_epoch`` with ``x`` uniform in ``[1, epochs - 1]``
    (the FedProx paper's draw); with one local epoch, a step count uniform in ``[1, steps_per_epoch - 1]``;
    ``None`` when the full work is a single step (nothing shorter exists)."""
    if epochs >= 2:
        return int(torch.randint(1, epochs, (1,), generator=gen)) * steps_per_epoch
    if steps_per_epoch >= 2:
        return int(torch.randint(1, steps_per_epoch, (1,), generator=gen))
    return None


class Stragglers(FedCallback):
    """Makes ``round(fraction * K)`` of each round's ``K`` instructed clients stragglers (a seeded draw per round):
    dropped, or capped below their full local work.

    Example::

        FedLoop(strategy=FedAvg(), callbacks=[Stragglers(fraction=0.9, mode="drop")])          # the paper's FedAvg
        FedLoop(strategy=FedProx(mu=1.0), callbacks=[Stragglers(fraction=0.9, mode="partial")])  # keeps partial work

    Args:
        fraction: the share of each round's clients that straggle, in ``[0, 1]``.
        mode: ``"partial"``: a straggler runs a random part of its work (``max_steps``, see :func:`straggler_cap`);
            ``"drop"``: it is sent nothing and does not take part in the round.
        seed: seed of the draws (with the round).
    """

    def __init__(self, fraction: float = 0.5, mode: str = "partial", seed: int = 0) -> None:
        need(
            "Stragglers",
            0 <= fraction <= 1,
            "fraction",
            fraction,
            "a number in [0, 1]",
        )
        need("Stragglers", mode in MODES, "mode", mode, f"one of {MODES}")
        self.fraction = float(fraction)
        self.mode = mode
        self.seed = seed
        self.last: list[int] = []  # the latest round's stragglers (client ids)

    def on_round_start(self, trainer: Any, pl_module: Any, instructions: list[Instruction]) -> None:
        """Draw the round's stragglers among the instructions; drop them or cap their ``max_steps``."""
        ctx = fed_context(trainer)
        if ctx is None or not instructions:
            return
        gen = generator(self.seed, Stream.STRAGGLERS, ctx.round)
        k = round(self.fraction * len(instructions))
        picked = sorted(torch.randperm(len(instructions), generator=gen)[:k].tolist())
        self.last = [instructions[i].client_id for i in picked]
        if self.mode == "drop":
            slow = set(picked)
            instructions[:] = [instr for i, instr in enumerate(instructions) if i not in slow]
        else:
            for i in picked:
                instr = instructions[i]
                epochs = int(instr.config.get("local_epochs", ctx.local_epochs))
                cap = straggler_cap(gen, epochs, ctx.steps_per_epoch[instr.client_id])
                if cap is not None:
                    old = instr.config.get("max_steps")
                    instr.config["max_steps"] = cap if old is None else min(old, cap)
        log.debug("round %d: stragglers (%s) %s", ctx.round + 1, self.mode, self.last)

    def on_round_end(self, trainer: Any, pl_module: Any, metrics: dict[str, float]) -> None:
        """Log the number of stragglers of the round (``stragglers``)."""
        metrics["stragglers"] = len(self.last)

    def __repr__(self) -> str:
        return f"Stragglers(fraction={self.fraction}, mode={self.mode!r}, seed={self.seed})"


__all__ = ["MODES", "Stragglers", "straggler_cap"]
