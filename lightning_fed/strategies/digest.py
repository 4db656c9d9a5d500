"""The client-side "digest" step of model-distillation algorithms (FedMD, decentralized distillation).

Before a client revisits its private data, it trains its own model for a few epochs to match targets on
shared public inputs: the consensus logits of all parties (FedMD, L1 on logits) or its neighbours' mean soft
labels (decentralized distillation, KL at temperature ``T``). The step uses a fresh Adam optimizer at
``lr`` (or, with ``lr=None``, the module's own first optimizer), so it runs the same under
``lightning.Trainer`` and in FedLoop and leaves no momentum behind for the private epochs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.callbacks.kd_losses import kd_loss
from lightning_fed.seeding import Stream, generator

log = logging.getLogger("lightning_fed")

DIGEST_LOSSES = ("l1", "kl")


class ConsensusDigest(FedCallback):
    """Train toward targets on public inputs at the start of local training (then local epochs follow).

    Example::

        digest = ConsensusDigest(loss="l1", epochs=1, batch_size=64)
        digest.set_target(public_x, consensus_logits)      # FedMD sets it from the round's payload
        L.Trainer(callbacks=[digest], max_epochs=1).fit(model, dm)   # digest, then revisit private data

    Args:
        loss: ``"l1"`` (mean absolute error between the model's logits and target logits, FedMD) or ``"kl"``
            (``T^2 * KL(target || model)`` with target probabilities, decentralized distillation).
        epochs: passes over the target set.
        batch_size: digest batch size.
        temperature: softmax temperature of the ``"kl"`` loss.
        seed: seed of the digest batches' order.
        lr: learning rate of the digest's own Adam optimizer; ``None`` uses the module's first optimizer.
    """

    def __init__(self, loss: str = "l1", epochs: int = 1, batch_size: int = 64, temperature: float = 1.0,
                 seed: int = 0, lr: float | None = 1e-3) -> None:
        if loss not in DIGEST_LOSSES:
            raise ValueError(f"ConsensusDigest: loss={loss!r} is not allowed; loss must be one of {DIGEST_LOSSES}")
        if epochs < 0:
            raise ValueError(f"ConsensusDigest: epochs={epochs} is not allowed; epochs must be >= 0")
        if batch_size < 1:
            raise ValueError(f"ConsensusDigest: batch_size={batch_size} is not allowed; batch_size must be >= 1")
        if not temperature > 0:
            raise ValueError(f"ConsensusDigest: temperature={temperature} is not allowed; it must be > 0")
        if lr is not None and not lr > 0:
            raise ValueError(f"ConsensusDigest: lr={lr} is not allowed; lr must be > 0 or None")
        self.loss = loss
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.temperature = temperature
        self.seed = seed
        self._x: Tensor | None = None
        self._target: Tensor | None = None
        self.last_loss: float | None = None

    def set_target(self, x: Tensor | None, target: Tensor | None) -> None:
        """Inputs and targets of the next digest (logits for ``"l1"``, probabilities for ``"kl"``);
        ``None`` clears them (no digest)."""
        if (x is None) != (target is None):
            raise ValueError("ConsensusDigest.set_target: give both x and target, or neither")
        if x is not None and target is not None and len(x) != len(target):
            raise ValueError(f"ConsensusDigest.set_target: {len(x)} inputs for {len(target)} targets")
        self._x, self._target = x, target

    def _digest_loss(self, out: Tensor, target: Tensor) -> Tensor:
        if self.loss == "l1":
            return F.l1_loss(out.float(), target)
        # target = softmax(z / T); log(target) * T are logits whose softmax at temperature T is the target
        return kd_loss(out, torch.log(target.clamp_min(1e-8)) * self.temperature, self.temperature)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Digest: ``epochs`` passes over the targets (own Adam at ``lr``, or the module's first optimizer)."""
        self.last_loss = None
        if self._x is None or self._target is None or self.epochs == 0:
            return
        if self.lr is None and not trainer.optimizers:
            return
        opt = trainer.optimizers[0] if self.lr is None else torch.optim.Adam(
            [p for p in pl_module.parameters() if p.requires_grad], lr=self.lr)
        device = pl_module.device
        x, target = self._x.to(device), self._target.to(device).float()
        g = generator(self.seed, Stream.DIGEST, int(getattr(trainer, "current_round", 0) or 0))
        was_training = pl_module.training
        pl_module.train()
        total, count = 0.0, 0
        for _ in range(self.epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), self.batch_size):
                idx = order[i : i + self.batch_size].to(device)
                loss = self._digest_loss(pl_module(x[idx]), target[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
        opt.zero_grad(set_to_none=True)
        pl_module.train(was_training)
        self.last_loss = total / max(count, 1)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Forget the targets (a new round brings new ones)."""
        self._x, self._target = None, None


__all__ = ["ConsensusDigest"]
