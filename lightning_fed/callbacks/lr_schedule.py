"""Learning-rate decay across federated rounds (or epochs under ``lightning.Trainer``)."""

from __future__ import annotations

from typing import Any

from lightning_fed.callbacks.base import FedCallback


class RoundLRDecay(FedCallback):
    """Scale every optimizer's learning rate by ``gamma ** t``, with ``t`` the federated round inside FedLoop
    (each client's fresh optimizer starts from the decayed rate) or the epoch under ``lightning.Trainer``.

    Decaying the client learning rate over rounds damps the round-to-round oscillation of FedAvg on non-IID
    data, so the final global model is close to the best one seen.

    Example::

        FedLoop(..., callbacks=[RoundLRDecay(gamma=0.98)])

    Args:
        gamma: per-round (per-epoch) factor, in (0, 1].
        min_scale: the scale never goes below this fraction of the module's learning rate, in [0, 1].
    """

    _KEY = "round_lr_decay_base"

    def __init__(self, gamma: float = 0.98, min_scale: float = 0.0) -> None:
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"RoundLRDecay: gamma={gamma!r} is not allowed; gamma must be in (0, 1]")
        if not 0.0 <= min_scale <= 1.0:
            raise ValueError(f"RoundLRDecay: min_scale={min_scale!r} is not allowed; min_scale must be in [0, 1]")
        self.gamma = gamma
        self.min_scale = min_scale

    def scale(self, step: int) -> float:
        """The learning-rate factor at round (or epoch) ``step``."""
        return max(self.gamma**step, self.min_scale)

    def _apply(self, trainer: Any, step: int) -> None:
        factor = self.scale(step)
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group.setdefault(self._KEY, group["lr"])
                group["lr"] = group[self._KEY] * factor

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """FedLoop: each client's local training starts at the decayed rate of the current round."""
        if hasattr(trainer, "current_round"):
            self._apply(trainer, trainer.current_round)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """lightning.Trainer: decay per epoch."""
        if not hasattr(trainer, "current_round"):
            self._apply(trainer, trainer.current_epoch)
