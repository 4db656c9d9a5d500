"""FedAvg-FT: FedAvg, with the global model fine-tuned on each client's own data before personalized evaluation.

The simplest personalization baseline (e.g. Wang et al., "Federated Evaluation of On-device Personalization",
arXiv:1910.10252, 2019; Yu, Bagdasaryan & Shmatikov, "Salvaging Federated Learning by Local Adaptation", 2020):
training is FedAvg's, unchanged; a client's personal model is the global model after ``finetune_steps`` SGD steps on
the cross-entropy of ``module(x)`` over its training shard (its data loader's batch size, batches seeded by
``(seed, round, client)``, reshuffled each pass). Nothing is stored per client: the fine-tuned model exists only
while its client is evaluated (:class:`~lightning_fed.personal.PersonalEval`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_fed.strategies.aggregators import Aggregator
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.validation import need


def finetune(module: nn.Module, batches: Callable[[], Iterable[Any]], steps: int, lr: float) -> int:
    """``steps`` plain SGD steps (``lr``) on ``CE(module(x), y)`` over ``batches()``, restarted when a pass ends;
    returns the steps taken (0 for an empty shard). The module is left in its original train/eval mode."""
    params = [p for p in module.parameters() if p.requires_grad]
    if steps == 0 or not params:
        return 0
    device = params[0].device
    optimizer = torch.optim.SGD(params, lr=lr)
    was_training = module.training
    module.train()
    done = 0
    with torch.enable_grad():
        while done < steps:
            before = done
            for batch in batches():
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(module(batch[0].to(device)), batch[1].to(device)).backward()
                optimizer.step()
                done += 1
                if done == steps:
                    break
            if done == before:  # no batch at all
                break
    optimizer.zero_grad(set_to_none=True)
    module.train(was_training)
    return done


class FedAvgFT(FedAvg):
    """FedAvg whose personal models are the global model fine-tuned ``finetune_steps`` steps on the client's data.

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=50, personal_eval=PersonalEval(),
                       strategy=FedAvgFT(finetune_steps=20, finetune_lr=0.01))

    Args:
        finetune_steps: SGD steps of fine-tuning (``k >= 0``; 0: the personal model is the global model).
        finetune_lr: their learning rate (> 0).
        server_lr: FedAvg's server step size.
        aggregator: averages the deltas (``None``: FedAvg's example-weighted mean).
        server_optimizer: applies the averaged delta (``None``: ``ServerSGD(lr=server_lr)``).
    """

    def __init__(
        self,
        *,
        finetune_steps: int = 20,
        finetune_lr: float = 0.01,
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
        need("FedAvgFT", finetune_lr > 0, "finetune_lr", finetune_lr, "> 0")
        super().__init__(server_lr=server_lr, aggregator=aggregator, server_optimizer=server_optimizer)
        self.finetune_steps, self.finetune_lr = finetune_steps, finetune_lr

    def personal_model(
        self,
        client_id: int,
        client_state: dict[str, Any],
        module: nn.Module,
        train_batches: Callable[[], Iterable[Any]],
    ) -> nn.Module:
        """The global model (already in ``module``) fine-tuned on the client's training shard."""
        finetune(module, train_batches, self.finetune_steps, self.finetune_lr)
        return module


__all__ = ["FedAvgFT", "finetune"]
