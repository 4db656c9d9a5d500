"""Neural Attention Distillation (Li et al., "Neural Attention Distillation: Erasing Backdoor Triggers from Deep
Neural Networks", ICLR 2021) as a server-side FedLoop callback.

On the server's small clean dataset: a copy of the global model is fine-tuned (the *teacher*), frozen, and the
global model (the *student*) is then trained with cross-entropy plus ``beta`` times the attention loss between its
and the teacher's outputs of named layers (:func:`~lightning_fed.callbacks.kd_losses.attention_loss`: the
L2-normalised channel-wise ``sum_c |a_c|^p`` maps, mean squared difference; the same loss as ``Distillation``'s
``attention=``). The teacher never changes during distillation: it has no gradients, runs in eval mode under
``torch.no_grad`` and is not given to the optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fed.callbacks._defence import CleanDataDefence, accuracy, finetune, model_copy
from lightning_fed.callbacks.distillation import _Capture
from lightning_fed.callbacks.kd_losses import attention_loss
from lightning_fed.data.public import PublicData
from lightning_fed.seeding import Stream, generator
from lightning_fed.validation import need


class NAD(CleanDataDefence):
    """Neural attention distillation on the server at the end of the rounds in ``at`` (module docstring). FedLoop
    only: under ``lightning.Trainer`` it does nothing.

    Round metrics at a step: ``nad_acc_before``, ``nad_teacher_acc`` and ``nad_acc_after`` (clean held-out accuracy
    of the global model before, of the teacher, of the distilled global model), ``nad_attention_loss`` (the last
    epoch's mean attention loss).

    Example::

        clean = PublicData(num_samples=500, seed=7, labeled=True)
        loop = FedLoop(..., callbacks=[NAD(clean=clean, layers=["conv2", "conv3"]), Backdoor(...)])

    Args:
        clean: the server's clean data, a labelled :class:`~lightning_fed.data.PublicData`.
        layers: submodules whose outputs (``[B, C, *spatial]`` feature maps) are matched by attention.
        at: 0-based rounds at whose end a step runs (an int or a list); ``None``: the run's last round.
        holdout: share of the clean data held out to measure clean accuracy on, in ``[0, 1)``.
        teacher_epochs: epochs of fine-tuning the teacher (>= 0).
        epochs: epochs of distillation (>= 0).
        beta: weight of the attention loss (>= 0). The paper uses 5000 on CIFAR ResNets; on the 25-channel MNIST-1D
            CNN 1000 and 5000 wreck the model (clean accuracy at chance), 100 does not.
        p: exponent of the attention map (> 0).
        lr, momentum, batch_size: SGD settings of both trainings.
        seed: seed of the clean split and of the batches.
    """

    owner = "NAD"
    stream = Stream.NAD
    prefix = "nad"

    def __init__(self, clean: PublicData, layers: list[str], at: int | list[int] | None = None, holdout: float = 0.2,
                 teacher_epochs: int = 5, epochs: int = 5, beta: float = 100.0, p: float = 2.0, lr: float = 0.01,
                 momentum: float = 0.9, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__(clean, at, holdout, epochs, lr, momentum, batch_size, seed)
        need("NAD", isinstance(layers, list | tuple) and len(layers) > 0
             and all(isinstance(n, str) and n for n in layers), "layers", layers,
             "a non-empty list of submodule names (e.g. ['conv3'])")
        need("NAD", teacher_epochs >= 0, "teacher_epochs", teacher_epochs, "an integer >= 0")
        need("NAD", beta >= 0, "beta", beta, ">= 0")
        need("NAD", p > 0, "p", p, "> 0")
        self.layers = list(layers)
        self.teacher_epochs = teacher_epochs
        self.beta = float(beta)
        self.p = float(p)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check that every name in ``layers`` is a submodule."""
        names = {n for n, _ in pl_module.named_modules()}
        missing = [n for n in self.layers if n not in names]
        need("NAD", not missing, "layers", self.layers,
             f"submodules of {type(pl_module).__name__} ({missing} are not; modules: {sorted(n for n in names if n)})")

    def distill(self, student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator) -> float:
        """Train ``student`` in place for ``epochs`` epochs on ``(x, y)`` with cross-entropy plus ``beta`` times the
        attention loss to the frozen ``teacher`` on ``layers``; return the last epoch's mean attention loss. The
        teacher is left exactly as it was."""
        s_cap, t_cap = _Capture(), _Capture()
        for name in self.layers:
            s_cap.add(student, name, name)
            t_cap.add(teacher, name, name)
        t_grad = [p.requires_grad for p in teacher.parameters()]
        t_mode = teacher.training
        teacher.requires_grad_(False)
        teacher.eval()
        seen: list[float] = []

        def loss_fn(model: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
            s_cap.clear()
            t_cap.clear()
            with torch.no_grad():
                teacher(xb)
            ce = F.cross_entropy(model(xb), yb)
            at = sum(attention_loss(s_cap.out[n], t_cap.out[n].detach(), self.p) for n in self.layers)
            seen.append(float(at.detach()))
            return ce + self.beta * at

        try:
            finetune(student, x, y, self.epochs, self.lr, self.momentum, self.batch_size, gen, loss_fn)
        finally:
            s_cap.remove()
            t_cap.remove()
            for q, g in zip(teacher.parameters(), t_grad, strict=True):
                q.requires_grad_(g)
            teacher.train(t_mode)
        per_epoch = max(1, -(-len(x) // self.batch_size))
        last = seen[-per_epoch:]
        return sum(last) / len(last) if last else 0.0

    def defend(self, trainer: Any, pl_module: nn.Module, server_round: int) -> dict[str, Any]:
        """Fine-tune a teacher copy, then distil the global model from it."""
        xt, yt, _, _ = self.data()
        xe, ye = self.eval_part()
        gen = generator(self.seed, self.stream, server_round)
        before = accuracy(pl_module, xe, ye)
        teacher = model_copy(pl_module)
        finetune(teacher, xt, yt, self.teacher_epochs, self.lr, self.momentum, self.batch_size, gen)
        at = self.distill(pl_module, teacher, xt, yt, gen)
        return {"acc_before": before, "teacher_acc": accuracy(teacher, xe, ye), "acc_after": accuracy(pl_module, xe, ye),
                "attention_loss": at}


__all__ = ["NAD"]
