"""FedAvg-FT: FedAvg, with the global model fine-tuned on each client's own data before personalized evaluation.

The simplest personalization baseline (e.g. Wang et al., "Federated Evaluation of On-device Personalization",
arXiv:1910.10252, 2019; Yu, Bagdasaryan & Shmatikov, "Salvaging Federated Learning by Local Adaptation", 2020):
training is FedAvg's, unchanged; a client's personal model is the global model after ``finetune_steps`` optimizer
steps on its training shard, trained as local training trains: the module's own ``configure_optimizers`` (a fresh
optimizer), ``training_step`` and hooks, the loop's gradient clipping and accumulation, the data module's batch size
(batches seeded by ``(seed, round, client)``, reshuffled each pass), as ``lightning.Trainer(max_steps=k)`` would.
The loop's callbacks do not run (they act on the federated update), so a per-round learning-rate schedule such as
``RoundLRDecay`` does not apply: the learning rate is the one ``configure_optimizers`` sets. Nothing is stored per
client: the fine-tuned model exists only while its client is evaluated
(:class:`~lightning_fed.personal.PersonalEval`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_fed.strategies.aggregators import Aggregator
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.validation import need


class FedAvgFT(FedAvg):
    """FedAvg whose personal models are the global model fine-tuned ``finetune_steps`` steps on the client's data.

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=50, personal_eval=PersonalEval(),
                       strategy=FedAvgFT(finetune_steps=20))

    Args:
        finetune_steps: optimizer steps of fine-tuning (``k >= 0``; 0: the personal model is the global model),
            with the module's ``configure_optimizers`` and ``training_step``.
        server_lr: FedAvg's server step size.
        aggregator: averages the deltas (``None``: FedAvg's example-weighted mean).
        server_optimizer: applies the averaged delta (``None``: ``ServerSGD(lr=server_lr)``).
    """

    def __init__(
        self,
        *,
        finetune_steps: int = 20,
        server_lr: float = 1.0,
        aggregator: Aggregator | None = None,
        server_optimizer: ServerOptimizer | None = None,
    ) -> None:
        need(
            "FedAvgFT",
            isinstance(finetune_steps, int) and not isinstance(finetune_steps, bool) and finetune_steps >= 0,
            "finetune_steps",
            finetune_steps,
            "an integer >= 0",
        )
        super().__init__(server_lr=server_lr, aggregator=aggregator, server_optimizer=server_optimizer)
        self.finetune_steps = finetune_steps

    def personal_model(
        self,
        client_id: int,
        client_state: dict[str, Any],
        module: nn.Module,
        train: Callable[..., int],
    ) -> nn.Module:
        """The global model (already in ``module``) fine-tuned on the client's training shard."""
        if self.finetune_steps:
            train(module, epochs=None, max_steps=self.finetune_steps)
        return module


__all__ = ["FedAvgFT"]
