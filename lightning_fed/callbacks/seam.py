"""Selective amnesia (SEAM: Zhu et al., "Selective Amnesia: On Efficient, High-Fidelity and Blind Suppression of
Backdoor Effects in Trojaned Machine Learning Models", IEEE S&P 2023) as a server-side FedLoop callback.

Two phases on the server's clean records, neither of which needs the trigger:

1. **forget**: SGD at a high learning rate ``forget_lr`` on the clean training records with **random** labels (one
   label per record, drawn uniformly from the classes the clean data holds, seeded), for at most ``forget_epochs`` epochs, stopping after the first epoch
   at whose end the clean held-out accuracy is at most ``forget_acc`` (near chance). This catastrophic forgetting
   wipes out the task and, with it, the trigger's shortcut to the target class.
2. **recover**: SGD at ``lr`` on the same clean records with their **true** labels for ``epochs`` epochs. In the
   paper the primary task comes back quickly from what the network's features still hold, and the backdoor has
   nothing that recalls it, since no record carries the trigger.

The paper forgets on a small subset of the data and recovers on a held-out clean set; here both use the server's
clean training part (the held-out part only measures). On MNIST-1D with 400 clean records the recovery does not
bring the task back (47-55 % clean accuracy left after forgetting to near chance; benchmarks/RESULTS.md, "SEAM").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_fed.callbacks._defence import CleanDataDefence, accuracy, finetune
from lightning_fed.data.public import PublicData
from lightning_fed.seeding import Stream, generator
from lightning_fed.validation import need


class SEAM(CleanDataDefence):
    """Selective amnesia on the server at the end of the rounds in ``at`` (module docstring): forget with random
    labels, recover with true labels. FedLoop only: under ``lightning.Trainer`` it does nothing.

    Round metrics at a step: ``seam_acc_before``, ``seam_acc_forgot`` and ``seam_acc_after`` (clean held-out
    accuracy of the global model before, after forgetting and after recovering), ``seam_forget_epochs`` (the
    forgetting epochs run).

    Example::

        clean = PublicData(num_samples=500, seed=7, labeled=True)
        loop = FedLoop(..., callbacks=[SEAM(clean=clean, forget_lr=0.1, lr=0.05), Backdoor(...)])

    Args:
        clean: the server's clean data, a labelled :class:`~lightning_fed.data.PublicData`.
        at: 0-based rounds at whose end a step runs (an int or a list); ``None``: the run's last round.
        holdout: share of the clean data held out to measure clean accuracy on (and to stop forgetting), in
            ``(0, 1)``.
        forget_epochs: the most epochs of forgetting (>= 1).
        forget_lr: SGD learning rate of forgetting (> 0).
        forget_acc: forgetting stops once the held-out accuracy is at most this, in ``[0, 1]`` (1: after the first
            epoch).
        epochs: epochs of recovery (>= 1).
        lr, momentum, batch_size: SGD settings (``lr`` of the recovery; ``momentum`` and ``batch_size`` of both).
        seed: seed of the clean split, the random labels and the batches.
    """

    owner = "SEAM"
    stream = Stream.SEAM
    prefix = "seam"

    def __init__(
        self,
        clean: PublicData,
        at: int | list[int] | None = None,
        holdout: float = 0.2,
        forget_epochs: int = 5,
        forget_lr: float = 0.1,
        forget_acc: float = 0.2,
        epochs: int = 30,
        lr: float = 0.05,
        momentum: float = 0.9,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(clean, at, holdout, epochs, lr, momentum, batch_size, seed, need_holdout=True)
        need(self.owner, epochs >= 1, "epochs", epochs, "an integer >= 1")
        need(
            self.owner,
            forget_epochs >= 1,
            "forget_epochs",
            forget_epochs,
            "an integer >= 1",
        )
        need(
            self.owner,
            forget_lr > 0,
            "forget_lr",
            forget_lr,
            "> 0",
        )
        need(
            self.owner,
            0 <= forget_acc <= 1,
            "forget_acc",
            forget_acc,
            "in [0, 1]",
        )
        self.forget_epochs = forget_epochs
        self.forget_lr = float(forget_lr)
        self.forget_acc = float(forget_acc)

    def defend(self, trainer: Any, pl_module: nn.Module, server_round: int) -> dict[str, Any]:
        """Forget ``pl_module``'s task with random labels, then recover it with the true ones (in place)."""
        xt, yt, _, _ = self.data()
        xe, ye = self.eval_part()
        gen = generator(self.seed, self.stream, server_round)
        before = accuracy(pl_module, xe, ye)
        classes = int(max(int(yt.max()), int(ye.max()))) + 1
        noisy = torch.randint(0, classes, yt.shape, generator=gen, dtype=yt.dtype)
        forgot, run = before, 0
        while run < self.forget_epochs:
            finetune(pl_module, xt, noisy, 1, self.forget_lr, self.momentum, self.batch_size, gen)
            run += 1
            forgot = accuracy(pl_module, xe, ye)
            if forgot <= self.forget_acc:
                break
        finetune(pl_module, xt, yt, self.epochs, self.lr, self.momentum, self.batch_size, gen)
        return {
            "acc_before": before,
            "acc_forgot": forgot,
            "acc_after": accuracy(pl_module, xe, ye),
            "forget_epochs": run,
        }


__all__ = ["SEAM"]
