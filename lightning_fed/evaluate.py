"""Evaluation of the global model on the held-out split: torchmetrics accuracy and loss, plus whatever the
module's own ``validation_step`` (or ``test_step``) logs with ``self.log``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_fed.data.loaders import eval_batches
from lightning_fed.trainer_view import TrainerView


def _overridden(module: L.LightningModule, name: str) -> bool:
    return getattr(type(module), name, None) is not getattr(L.LightningModule, name)


class Evaluator:
    """Runs the working model over a loader in eval mode with validation hooks.

    For classification batches ``(x, y)`` with integer ``y`` and ``[B, C]`` logits from ``module(x)``, it
    reports ``test_acc`` (torchmetrics ``MulticlassAccuracy``, micro) and ``test_loss`` (cross-entropy);
    values logged by the module's ``validation_step``/``test_step`` are reported as their batch means.
    When the step itself calls ``module(x)`` on the batch's input tensor, those logits are reused (a forward hook
    sees the call), so the model runs once per batch; otherwise one extra forward computes them.
    """

    def __init__(self, fabric: Fabric, view: TrainerView, callbacks: list[Any]) -> None:
        self.fabric = fabric
        self.view = view
        self.callbacks = callbacks
        self._metrics: dict[tuple[int, str], tuple[MulticlassAccuracy, MeanMetric]] = {}  # reused, reset per run

    def _metric_pair(self, num_classes: int, device: torch.device) -> tuple[MulticlassAccuracy, MeanMetric]:
        key = (num_classes, str(device))
        if key not in self._metrics:
            self._metrics[key] = (MulticlassAccuracy(num_classes=num_classes, average="micro").to(device), MeanMetric())
        acc, loss = self._metrics[key]
        acc.reset()
        loss.reset()
        return acc, loss

    def _hook(self, name: str, *args: Any) -> None:
        module = self.view.lightning_module
        for cb in self.callbacks:
            getattr(cb, name)(self.view, module, *args)
        getattr(module, name)(*args)

    @torch.no_grad()
    def run(self, loader: DataLoader) -> dict[str, float]:
        """Evaluate and return a dict of metrics."""
        view, module, fabric = self.view, self.view.lightning_module, self.fabric
        step = "validation_step" if _overridden(module, "validation_step") else (
            "test_step" if _overridden(module, "test_step") else None
        )
        was_training = module.training
        module.eval()
        view.validating, view.training = True, False
        view.reset_means()
        acc: MulticlassAccuracy | None = None
        loss_mean: MeanMetric | None = None
        self._hook("on_validation_start")
        self._hook("on_validation_epoch_start")
        seen: list[tuple[Tensor, Any]] = []  # (input, output) of the module's calls during the user's step
        handle = module.register_forward_hook(lambda _m, args, output: seen.append((args[0] if args else None, output)))
        try:
            for batch_idx, batch in enumerate(eval_batches(loader)):
                if fabric.device.type != "cpu":  # CPU batches are already where they belong
                    batch = fabric.to_device(batch)
                self._hook("on_validation_batch_start", batch, batch_idx)
                seen.clear()
                with fabric.autocast():
                    out = getattr(module, step)(batch, batch_idx) if step else None
                    if _is_classification(batch):
                        x, y = batch
                        # the logits of this very input if the step computed them (no second forward), else a forward
                        logits = next((o for i, o in seen if i is x), None)
                        if logits is None:
                            logits = module(x)
                        if isinstance(logits, Tensor) and logits.ndim == 2:
                            if acc is None or loss_mean is None:
                                acc, loss_mean = self._metric_pair(logits.shape[1], logits.device)
                            acc.update(logits.float(), y)
                            loss_mean.update(F.cross_entropy(logits.float(), y).cpu(), weight=len(y))
                self._hook("on_validation_batch_end", out, batch, batch_idx)
        finally:
            handle.remove()
        self._hook("on_validation_epoch_end")
        self._hook("on_validation_end")
        metrics = dict(view.means())
        if acc is not None and loss_mean is not None:
            metrics["test_acc"] = float(acc.compute())
            metrics["test_loss"] = float(loss_mean.compute())
        view.validating = False
        module.train(was_training)
        return metrics


def _is_classification(batch: Any) -> bool:
    return (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and isinstance(batch[1], Tensor)
        and batch[1].ndim == 1
        and not batch[1].is_floating_point()
    )
