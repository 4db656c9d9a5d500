"""Fine-pruning (Liu et al., "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks", RAID
2018) as a server-side FedLoop callback.

A backdoor tends to live in channels that clean inputs leave dormant. On the server's small clean dataset the
defence records the mean activation of every output channel of one named layer (a forward hook; after a ReLU by
default, since models often apply the activation functionally after the layer), removes the ``ratio`` least active
channels for real with torch-pruning (the layer and everything coupled to it, e.g. the next layer's inputs, shrink),
then fine-tunes the pruned model on the clean data.

It is a :class:`~lightning_fed.callbacks.StructuredPruning` whose importance is the mean clean activation: the
pruning history is broadcast to clients in every instruction (``pruning_history``), replayed by clients whose model
lacks it, and replayed on resume before the checkpoint's weights are loaded, exactly as for structured pruning.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fed.callbacks._compress import torch_pruning
from lightning_fed.callbacks._defence import (
    accuracy,
    check_clean_settings,
    finetune,
    layer_outputs,
    split_clean,
)
from lightning_fed.callbacks.pruning import StructuredPruning, _width
from lightning_fed.context import fed_context
from lightning_fed.data.public import PublicData
from lightning_fed.seeding import Stream, derive_seed, generator
from lightning_fed.validation import need

log = logging.getLogger("lightning_fed")


@torch.no_grad()
def mean_activation(model: nn.Module, layer: str, x: Tensor, relu: bool = True, batch_size: int = 512) -> Tensor:
    """The mean output of each output channel of ``model``'s submodule ``layer`` over the records ``x`` (and over
    every position of a channel: the mean over all dimensions but dimension 1), after a ReLU when ``relu``; the model
    runs in eval mode (its mode is restored). Returns a float64 CPU tensor ``[channels]``."""
    sums: list[Tensor] = []
    counts: list[int] = []
    for out in layer_outputs(model, layer, x, batch_size):
        a = out.double()
        if relu:
            a = a.clamp_min(0)
        dims = [d for d in range(a.ndim) if d != 1]
        sums.append(a.sum(dim=dims).cpu())
        counts.append(a.numel() // a.shape[1])
    return torch.stack(sums).sum(0) / sum(counts)


class ActivationImportance:
    """A torch-pruning importance: the score of a channel of ``layer``'s output group is its mean clean activation
    (``scores``, indexed by the channel's current position); other groups get no score (``None``: not pruned)."""

    def __init__(self, layer: nn.Module, scores: Tensor) -> None:
        self.layer = layer
        self.scores = scores

    def __call__(self, group: Any) -> Tensor | None:
        tp = torch_pruning()
        for dep, idxs in group:
            if dep.layer is self.layer and dep.pruning_fn in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
                return self.scores[torch.as_tensor(list(idxs), dtype=torch.long)].float()
        return None


class FinePruning(StructuredPruning):
    """Fine-pruning on the server at the end of the rounds in ``at`` (module docstring). FedLoop only: under
    ``lightning.Trainer`` it does nothing.

    Each step prunes its share of ``ratio`` (the target is reached in equal steps over ``at``, as in
    :class:`StructuredPruning`: after the last step ``round(C0 * (1 - ratio))`` of the layer's ``C0`` channels are
    left) and fine-tunes for ``epochs`` epochs of SGD on the clean training part. Clean accuracy is measured on the
    held-out part before, after pruning and after fine-tuning.

    Round metrics at a step: ``fp_acc_before``, ``fp_acc_pruned``, ``fp_acc_after`` (clean held-out accuracy),
    ``fp_pruned_channels`` (this step), ``fp_channels`` (left), ``pruned_params``. The pruned channel indices are in
    ``records`` (checkpointed) and in the log.

    Example::

        clean = PublicData(num_samples=500, seed=7, labeled=True)
        loop = FedLoop(..., callbacks=[FinePruning(clean=clean, layer="conv3", ratio=0.5), Backdoor(...)])

    Args:
        clean: the server's clean data, a labelled :class:`~lightning_fed.data.PublicData`.
        layer: the module whose output channels are ranked and pruned (a convolution or linear layer; typically the
            last convolution).
        ratio: share of the layer's original channels removed in the end, in ``(0, 1)``.
        at: 0-based rounds at whose end a step runs (an int or a list); ``None``: the run's last round.
        holdout: share of the clean data held out to measure clean accuracy on, in ``[0, 1)`` (0: measure on the
            training part).
        epochs: fine-tuning epochs after each pruning step (>= 0).
        lr, momentum, batch_size: fine-tuning SGD settings.
        relu: rank channels by the mean of ``relu(output)`` (``False``: of the raw output).
        seed: seed of the clean split and of the fine-tuning batches.
        example_input_shape: shape of the tracing input; ``None``: two clean records.
        reset_client_state: per-client state entries reset when a client first trains after a step.
    """

    def __init__(self, clean: PublicData, layer: str, ratio: float = 0.5, at: int | list[int] | None = None,
                 holdout: float = 0.2, epochs: int = 5, lr: float = 0.01, momentum: float = 0.9, batch_size: int = 32,
                 relu: bool = True, seed: int = 0, example_input_shape: list[int] | None = None,
                 reset_client_state: list[str] | None = None) -> None:
        schedule = check_clean_settings("FinePruning", clean, at, holdout, epochs, lr, momentum, batch_size, seed)
        need("FinePruning", bool(layer), "layer", layer, "the name of a Conv/Linear submodule (e.g. 'conv3')")
        need("FinePruning", 0 < ratio < 1, "ratio", ratio, "in (0, 1)")
        super().__init__(ratio=ratio, at=schedule if schedule is not None else 0, example_input_shape=example_input_shape,
                         reset_client_state=reset_client_state)
        self._at_end = schedule is None
        self.clean = clean
        self.layer = layer
        self.holdout = float(holdout)
        self.epochs = epochs
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.batch_size = batch_size
        self.relu = relu
        self.seed = seed
        self.done: list[int] = []
        self.records: list[dict[str, Any]] = []
        self._scores: Tensor | None = None
        self._split: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def _check_layer(self, model: nn.Module) -> nn.Module:
        modules = dict(model.named_modules())
        need("FinePruning", self.layer in modules and _width(modules.get(self.layer, nn.Identity())) is not None,
             "layer", self.layer, f"a Conv/Linear submodule of {type(model).__name__}: one of "
             f"{[n for n, m in modules.items() if _width(m) is not None]}")
        return modules[self.layer]

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check that ``layer`` is a prunable submodule, then :meth:`StructuredPruning.setup`."""
        self._check_layer(pl_module)
        super().setup(trainer, pl_module, stage)

    def _criterion(self, name: str) -> Any:
        assert self._scores is not None
        return ActivationImportance(self._prune_target, self._scores)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Nothing under ``lightning.Trainer`` (fine-pruning is a FedLoop server step)."""

    def data(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x_train, y_train, x_held, y_held)`` of the clean data (split once, seeded)."""
        if self._split is None:
            self._split = split_clean("FinePruning", self.clean, self.holdout, self.seed, Stream.FINE_PRUNING)
        return self._split

    def on_round_end(self, trainer: Any, pl_module: Any, metrics: dict[str, float]) -> None:
        """Server: at the scheduled rounds, prune the least active channels of ``layer`` and fine-tune."""
        fed = fed_context(trainer)
        if fed is None or not fed.on_server:
            return
        r = fed.round
        if self._at_end:
            self.at = [fed.num_rounds - 1]
        if r not in self.at or r in self.done or self.at.index(r) != self.steps_done:
            return
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(self.seed, Stream.FINE_PRUNING, r, 1))
            record = self._step(trainer, pl_module, r, metrics)
        self.done.append(r)
        self.records.append(record)
        for k in ("acc_before", "acc_pruned", "acc_after", "pruned_channels", "channels"):
            metrics[f"fp_{k}"] = float(record[k])
        log.info("FinePruning after round %d: %s: pruned %d channels %s (%d left); clean accuracy %.4f -> %.4f "
                 "(pruned) -> %.4f (fine-tuned)", r + 1, self.layer, record["pruned_channels"], record["pruned"],
                 record["channels"], record["acc_before"], record["acc_pruned"], record["acc_after"])
        fed.model_changed()

    def defend(self, trainer: Any, pl_module: nn.Module, server_round: int) -> dict[str, Any]:
        """One fine-pruning step on ``pl_module`` now, outside the schedule (as :meth:`CleanDataDefence.defend` for
        NAD and MCR): prune, fine-tune, return the step's record. ``trainer`` may be ``None`` (e.g. to repair a
        copy of a trained model); the schedule's bookkeeping (``done``, ``records``) is left alone."""
        return self._step(trainer, pl_module, server_round, {})

    def _step(self, trainer: Any, model: nn.Module, r: int, metrics: dict[str, float]) -> dict[str, Any]:
        target = self._check_layer(model)
        xt, yt, xh, yh = self.data()
        xe, ye = (xh, yh) if len(xh) else (xt, yt)
        if self._seen is None and self.example_input_shape is None:
            self._seen = xt[:2].clone()
        acc_before = accuracy(model, xe, ye)
        self._scores = mean_activation(model, self.layer, xt, self.relu)
        self._prune_target = target
        self.ignored_layers = [n for n, m in model.named_modules() if _width(m) is not None and n != self.layer]
        width = _width(target)
        start = len(self.history)
        metrics["pruned_params"] = float(self.prune(trainer, model))
        self._scores = None
        pruned = sorted(i for n, out, idx in self.history[start:] if n == self.layer and out for i in idx)
        acc_pruned = accuracy(model, xe, ye)
        finetune(model, xt, yt, self.epochs, self.lr, self.momentum, self.batch_size,
                 generator(self.seed, Stream.FINE_PRUNING, r))
        return {"round": r, "layer": self.layer, "pruned": pruned, "pruned_channels": len(pruned),
                "channels": int(_width(model.get_submodule(self.layer)) or 0), "channels_before": int(width or 0),
                "acc_before": acc_before, "acc_pruned": acc_pruned, "acc_after": accuracy(model, xe, ye)}

    def state_dict(self) -> dict[str, Any]:
        """:meth:`StructuredPruning.state_dict` with the rounds done and their records."""
        return {**super().state_dict(), "done": list(self.done), "records": [dict(r) for r in self.records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay the pruning history (:meth:`StructuredPruning.load_state_dict`); restore the rounds done."""
        super().load_state_dict(state)
        self.done = [int(r) for r in state.get("done", [])]
        self.records = [dict(r) for r in state.get("records", [])]


__all__ = ["ActivationImportance", "FinePruning", "mean_activation"]
