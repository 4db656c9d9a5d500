"""Evaluation of the global model with Lightning's meaning of validation and test (docs/evaluation.md).

``stage="val"`` runs the module's ``validation_step`` (and the validation hooks) on the validation loader;
``stage="test"`` runs its ``test_step`` (and the test hooks) on the test loader. Both add the built-in
classification metrics ``<stage>_acc`` / ``<stage>_loss`` unless the module logs those names itself.
Test data is never reported under a validation name: when a module has no ``test_step``, the test stage runs
its ``validation_step`` and renames every ``val`` word of the logged names to ``test`` (:func:`as_test_name`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_fed.callbacks._compress import has_forward
from lightning_fed.client import accept_metric_objects, batch_path, overrides, restore_log, takes_batch_idx
from lightning_fed.data.loaders import eval_batches
from lightning_fed.trainer_view import TrainerView

STAGES = ("val", "test")
_VAL_WORD = re.compile(r"(^|[/_.\-])val(?=$|[/_.\-])")


def as_test_name(name: str) -> str:
    """The test-stage name of a metric a ``validation_step`` logs: every ``val`` word (delimited by ``_``, ``/``,
    ``.``, ``-`` or the ends) becomes ``test``: ``val_acc`` → ``test_acc``, ``my_val_acc`` → ``my_test_acc``,
    ``tier0/val_loss`` → ``tier0/test_loss``; names without such a word (``acc``, ``interval``) are unchanged."""
    return _VAL_WORD.sub(r"\1test", name)


def stage_metrics(metrics: dict[str, float], prefix: str, names: tuple[str, ...] = ("acc",)) -> dict[str, float]:
    """The built-in metrics of an evaluation result under ``prefix``: ``{prefix}<stage>_<name>`` for each
    ``<stage>_<name>`` present (e.g. ``stage_metrics(evaluate(m), "tier0/")`` → ``{"tier0/val_acc": …}`` at
    validation, ``{"tier0/test_acc": …}`` at test); what the result lacks is left out."""
    return {f"{prefix}{stage}_{name}": metrics[f"{stage}_{name}"]
            for stage in STAGES for name in names if f"{stage}_{name}" in metrics}


class Evaluator:
    """Runs the working model over a loader in eval mode, as Lightning's validation or test loop would.

    ``run(loader, "val")`` calls ``validation_step`` with the ``on_validation_*`` hooks; ``run(loader, "test")``
    calls ``test_step`` with the ``on_test_*`` hooks, or, for a module without ``test_step``, ``validation_step``
    with the validation hooks; at the test stage every logged name is renamed by :func:`as_test_name`, so test data
    never appears under a ``val`` name. Values the step logs are reported as their means over the batches
    weighted by batch size (Lightning's epoch means); values logged by the epoch-end hooks as they are. For classification batches ``(x, y)`` with integer ``y`` and ``[B, C]``
    logits from ``module(x)``, it also reports ``<stage>_acc`` (torchmetrics ``MulticlassAccuracy``, micro) and
    ``<stage>_loss`` (cross-entropy) unless the step logged those names itself.
    A module without ``forward`` (a recurrent cell loop) gets no built-in accuracy, only what its steps log.
    When the step itself calls ``module(x)`` on the batch's input tensor, those logits are reused (a forward hook
    sees the call), so the model runs once per batch; otherwise one extra forward computes them.
    Each batch takes Lightning's path to the step (:func:`~lightning_fed.client.batch_path`: the
    precision's ``convert_input`` and the module's batch-transfer hooks); the step, the batch hooks and the
    built-in metrics all see the transferred batch. A step without a ``batch_idx`` parameter is called with
    the batch alone.
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
    def run(self, loader: DataLoader, stage: str = "val") -> dict[str, float]:
        """Evaluate the view's module on ``loader`` as ``stage`` (``"val"`` or ``"test"``); return its metrics."""
        if stage not in STAGES:
            raise ValueError(f"Evaluator.run: stage must be one of {STAGES}, got {stage!r}")
        view, module, fabric = self.view, self.view.lightning_module, self.fabric
        if stage == "test" and overrides(module, "test_step"):
            step, hooks = "test_step", "test"
        else:
            step = "validation_step" if overrides(module, "validation_step") else None
            hooks = "validation"
        step_idx = step is not None and takes_batch_idx(getattr(module, step))  # else: the batch alone
        to_step = batch_path(fabric, module, view.datamodule)
        was_training = module.training
        module.eval()
        view.validating, view.training = True, False
        view.reset_means()
        acc: MulticlassAccuracy | None = None
        loss_mean: MeanMetric | None = None
        self._hook(f"on_{hooks}_start")
        self._hook(f"on_{hooks}_epoch_start")
        sums: dict[str, float] = {}  # what the step logs, weighted by batch size as Lightning's epoch means are
        weights: dict[str, float] = {}
        seen: list[tuple[Tensor, Any]] = []  # (input, output) of the module's calls during the user's step
        handle = module.register_forward_hook(lambda _m, args, output: seen.append((args[0] if args else None, output)))
        accept_metric_objects(module, view)  # torchmetrics Metric objects in self.log, as under lightning.Trainer
        try:
            for batch_idx, batch in enumerate(eval_batches(loader)):
                batch = to_step(batch)  # the step, hooks and built-in metrics' batch
                self._hook(f"on_{hooks}_batch_start", batch, batch_idx)
                seen.clear()
                with fabric.autocast():
                    args = (batch, batch_idx) if step_idx else (batch,)
                    out = getattr(module, step)(*args) if step else None
                    if _is_classification(batch):
                        x, y = batch
                        # the logits of this very input if the step computed them (no second forward), else a forward
                        logits = next((o for i, o in seen if i is x), None)
                        if logits is None and has_forward(module):  # without forward(): the step's own metrics only
                            logits = module(x)
                        if isinstance(logits, Tensor) and logits.ndim == 2:
                            if acc is None or loss_mean is None:
                                acc, loss_mean = self._metric_pair(logits.shape[1], logits.device)
                            acc.update(logits.float(), y)
                            loss_mean.update(F.cross_entropy(logits.float(), y).cpu(), weight=len(y))
                self._hook(f"on_{hooks}_batch_end", out, batch, batch_idx)
                logged = view.means()
                if logged:
                    n = float(_batch_size(batch))
                    for k, v in logged.items():
                        sums[k] = sums.get(k, 0.0) + v * n
                        weights[k] = weights.get(k, 0.0) + n
                    view.reset_means()
            view.compute_metrics()  # Metric objects logged by the steps: compute() before the epoch-end hooks
            self._hook(f"on_{hooks}_epoch_end")
            self._hook(f"on_{hooks}_end")
            means = {k: sums[k] / weights[k] for k in sums}
            means.update(view.means())  # Metric objects' values and what the epoch-end hooks logged
            view.reset_metrics()
        finally:
            handle.remove()
            restore_log(module)
        metrics = {as_test_name(k) if stage == "test" else k: v for k, v in means.items()}
        if acc is not None and loss_mean is not None:  # the module's own metric of the same name wins
            metrics.setdefault(f"{stage}_acc", float(acc.compute()))
            metrics.setdefault(f"{stage}_loss", float(loss_mean.compute()))
        view.validating = False
        module.train(was_training)
        return metrics


def _batch_size(batch: Any) -> int:
    try:
        return extract_batch_size(batch)
    except Exception:  # noqa: BLE001 - a batch without a tensor to size it: weigh it as one
        return 1


def _is_classification(batch: Any) -> bool:
    return (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and isinstance(batch[1], Tensor)
        and batch[1].ndim == 1
        and not batch[1].is_floating_point()
    )
