"""Learning-rate decay across federated rounds (or epochs under ``lightning.Trainer``)."""

from __future__ import annotations

import math
from typing import Any

from lightning_fed.callbacks.base import FedCallback

SCHEDULES = ("exponential", "cosine")


class RoundLRDecay(FedCallback):
    """Scale every optimizer's learning rate by a factor of ``t``, the federated round inside FedLoop (each
    client's fresh optimizer starts from the decayed rate) or the epoch under ``lightning.Trainer``:
    ``gamma ** t`` (``"exponential"``) or ``min_scale + (1 - min_scale) * (1 + cos(pi * t / total)) / 2``
    (``"cosine"``, with ``total`` the run's rounds or the Trainer's ``max_epochs``).

    Decaying the client learning rate over rounds damps the round-to-round oscillation of FedAvg on non-IID
    data, so the final global model is close to the best one seen.

    Example::

        FedLoop(..., callbacks=[RoundLRDecay(gamma=0.98)])
        FedLoop(..., callbacks=[RoundLRDecay(schedule="cosine", min_scale=0.1)])

    Args:
        gamma: per-round (per-epoch) factor of the exponential schedule, in (0, 1].
        min_scale: the scale never goes below this fraction of the module's learning rate, in [0, 1].
        schedule: ``"exponential"`` or ``"cosine"``.
        total: rounds (epochs) the cosine schedule spans; ``None`` = the run's total.
    """

    _KEY = "round_lr_decay_base"

    def __init__(self, gamma: float = 0.98, min_scale: float = 0.0, schedule: str = "exponential",
                 total: int | None = None) -> None:
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"RoundLRDecay: gamma={gamma!r} is not allowed; gamma must be in (0, 1]")
        if not 0.0 <= min_scale <= 1.0:
            raise ValueError(f"RoundLRDecay: min_scale={min_scale!r} is not allowed; min_scale must be in [0, 1]")
        if schedule not in SCHEDULES:
            raise ValueError(f"RoundLRDecay: schedule={schedule!r} is not allowed; schedule must be one of {SCHEDULES}")
        if total is not None and total < 1:
            raise ValueError(f"RoundLRDecay: total={total!r} is not allowed; total must be None or >= 1")
        self.gamma = gamma
        self.min_scale = min_scale
        self.schedule = schedule
        self.total = total

    def scale(self, step: int, total: int | None = None) -> float:
        """The learning-rate factor at round (or epoch) ``step`` of ``total`` (``self.total`` if set)."""
        if self.schedule == "exponential":
            return max(self.gamma**step, self.min_scale)
        span = self.total or total
        if not span:
            raise ValueError("RoundLRDecay(schedule='cosine'): the total number of rounds (epochs) is unknown; pass total=")
        frac = min(step / span, 1.0)
        return self.min_scale + (1.0 - self.min_scale) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def _apply(self, trainer: Any, step: int, total: int | None) -> None:
        factor = self.scale(step, total)
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group.setdefault(self._KEY, group["lr"])
                group["lr"] = group[self._KEY] * factor

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """FedLoop: each client's local training starts at the decayed rate of the current round."""
        if hasattr(trainer, "current_round"):
            self._apply(trainer, trainer.current_round, getattr(trainer, "num_rounds", None))

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """lightning.Trainer: decay per epoch."""
        if not hasattr(trainer, "current_round"):
            self._apply(trainer, trainer.current_epoch, getattr(trainer, "max_epochs", None))
