"""FedAvg-FT: FedAvg, with the global model fine-tuned on each client's own data before personalized evaluation.

The simplest personalization baseline (e.g. Wang et al., "Federated Evaluation of On-device Personalization",
arXiv:1910.10252, 2019; Yu, Bagdasaryan & Shmatikov, "Salvaging Federated Learning by Local Adaptation", 2020):
training is FedAvg's, unchanged; a client's personal model is the global model after ``finetune_steps`` optimizer
steps on its training shard, trained as local training trains: the module's own ``configure_optimizers`` (a fresh
optimizer), ``training_step`` and hooks, the loop's gradient clipping and accumulation, the data module's batch size
(batches seeded by ``(seed, round, client)``, reshuffled each pass), as ``lightning.Trainer(max_steps=k)`` would.
The loop's callbacks do not run (they act on the federated update), so a per-round learning-rate schedule such as
``RoundLRDecay`` does not apply: the learning rates are the ones ``configure_optimizers`` sets, times ``lr_scale``
(:class:`ScaleLR`; e.g. 0.1 where ``RoundLRDecay(min_scale=0.1)`` ended local training at a tenth). Nothing is stored per
client: the fine-tuned model exists only while its client is evaluated
(:class:`~lightning_fed.personal.PersonalEval`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_fed.strategies.aggregators import Aggregator
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.validation import CheckedArguments, need


class ScaleLR(CheckedArguments, Callback):
    """Multiplies the learning rates ``configure_optimizers`` set by ``scale`` when training starts: every param
    group's ``lr`` and the ``base_lrs`` of every scheduler (so a schedule keeps scaling from the scaled rates).

    Example::

        trainer = L.Trainer(max_steps=20, callbacks=[ScaleLR(0.1)])   # fine-tune at a tenth of the module's rate

    Args:
        scale: the factor, > 0.
    """

    def __init__(self, scale: float) -> None:
        need("ScaleLR", scale > 0, "scale", scale, "> 0")
        self.scale = float(scale)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Scale the optimizers' learning rates and the schedulers' base rates."""
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["lr"] * self.scale
        for cfg in trainer.lr_scheduler_configs:
            if hasattr(cfg.scheduler, "base_lrs"):
                cfg.scheduler.base_lrs = [lr * self.scale for lr in cfg.scheduler.base_lrs]


class FedAvgFT(FedAvg):
    """FedAvg whose personal models are the global model fine-tuned ``finetune_steps`` steps on the client's data.

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=50, personal_eval=PersonalEval(),
                       strategy=FedAvgFT(finetune_steps=20, lr_scale=0.1))

    Args:
        finetune_steps: optimizer steps of fine-tuning (``k >= 0``; 0: the personal model is the global model),
            with the module's ``configure_optimizers`` and ``training_step``.
        lr_scale: multiplies the learning rates ``configure_optimizers`` sets, for fine-tuning only (> 0).
        server_lr: FedAvg's server step size.
        aggregator: averages the deltas (``None``: FedAvg's example-weighted mean).
        server_optimizer: applies the averaged delta (``None``: ``ServerSGD(lr=server_lr)``).
    """

    def __init__(
        self,
        *,
        finetune_steps: int = 20,
        lr_scale: float = 1.0,
        server_lr: float = 1.0,
        aggregator: Aggregator | None = None,
        server_optimizer: ServerOptimizer | None = None,
    ) -> None:
        need(
            "FedAvgFT",
            finetune_steps >= 0,
            "finetune_steps",
            finetune_steps,
            "an integer >= 0",
        )
        need(
            "FedAvgFT",
            lr_scale > 0,
            "lr_scale",
            lr_scale,
            "> 0",
        )
        super().__init__(server_lr=server_lr, aggregator=aggregator, server_optimizer=server_optimizer)
        self.finetune_steps, self.lr_scale = finetune_steps, float(lr_scale)

    def personal_model(
        self,
        client_id: int,
        client_state: dict[str, Any],
        module: nn.Module,
        train: Callable[..., int],
    ) -> nn.Module:
        """The global model (already in ``module``) fine-tuned on the client's training shard."""
        if self.finetune_steps:
            scale = [ScaleLR(self.lr_scale)] if self.lr_scale != 1.0 else []
            train(module, epochs=None, max_steps=self.finetune_steps, callbacks=scale)
        return module


__all__ = ["FedAvgFT", "ScaleLR"]
