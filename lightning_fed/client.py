"""Local work: one client's training of the user's LightningModule, with Lightning's hooks.

The module's own ``configure_optimizers``, ``training_step`` and ``self.log`` are used. Callback hooks
receive the :class:`~lightning_fed.trainer_view.TrainerView` as ``trainer``. Hooks run in Lightning's
order (callbacks, then the module) for: ``on_train_start``, ``on_train_epoch_start``,
``on_train_batch_start``, ``on_before_backward``, ``on_after_backward``, ``on_before_optimizer_step``,
``on_before_zero_grad``, ``on_train_batch_end``, ``on_train_epoch_end``, ``on_train_end``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import MixedPrecision, Precision
from lightning.fabric.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_fed.errors import ClientError
from lightning_fed.trainer_view import TrainerView


class ClientTrainingError(ClientError):
    """Local training could not run (bad ``configure_optimizers`` or ``training_step`` output): that client's
    failure."""


def parse_optimizers(conf: Any) -> tuple[list[torch.optim.Optimizer], list[LRSchedulerConfig]]:
    """Normalise every return form of ``configure_optimizers`` into (optimizers, scheduler configs)."""
    if conf is None:
        return [], []
    if isinstance(conf, torch.optim.Optimizer):
        return [conf], []
    if isinstance(conf, dict):
        return _parse_dict(conf)
    if isinstance(conf, Sequence):
        if len(conf) == 2 and isinstance(conf[0], Sequence) and isinstance(conf[1], Sequence):
            opts = list(conf[0])
            scheds = [_sched_config(s) for s in conf[1]]
            return opts, scheds
        opts, scheds = [], []
        for item in conf:
            o, s = parse_optimizers(item)
            opts += o
            scheds += s
        return opts, scheds
    raise ClientTrainingError(f"configure_optimizers returned an unsupported {type(conf).__name__}")


def _parse_dict(conf: dict) -> tuple[list[torch.optim.Optimizer], list[LRSchedulerConfig]]:
    if "optimizer" not in conf:
        raise ClientTrainingError("configure_optimizers returned a dict without an 'optimizer' key")
    sched = conf.get("lr_scheduler")
    return [conf["optimizer"]], ([] if sched is None else [_sched_config(sched)])


def _sched_config(s: Any) -> LRSchedulerConfig:
    if isinstance(s, LRSchedulerConfig):
        return s
    if isinstance(s, dict):
        cfg = {k: v for k, v in s.items() if k in ("scheduler", "interval", "frequency", "monitor", "name", "strict")}
        if cfg.get("interval", "epoch") not in ("epoch", "step"):
            raise ClientTrainingError(f"lr_scheduler interval must be 'epoch' or 'step', got {cfg['interval']!r}")
        return LRSchedulerConfig(**cfg)
    return LRSchedulerConfig(s)


def plain_optimizer_steps(fabric: Fabric) -> bool:
    """Whether Fabric's optimizer wrapper would call ``optimizer.step()`` unchanged: one device, and a precision
    plugin without a gradient scaler (full precision, bf16). Then the optimizers are used unwrapped. (FedLoop
    gives Fabric no callbacks, so the wrapper's callback calls never apply.)"""
    precision = fabric.strategy.precision
    return (
        isinstance(fabric.strategy, SingleDeviceStrategy)
        and type(precision).optimizer_step in (Precision.optimizer_step, MixedPrecision.optimizer_step)
        and getattr(precision, "scaler", None) is None
    )


class LocalTrainer:
    """Runs local epochs of a LightningModule on one client's data, calling Lightning hooks.

    Args:
        fabric: the loop's Fabric (device, precision, backward).
        view: the trainer view shared with callbacks.
        callbacks: Lightning callbacks, called before the module's own hook.
        keep_optimizer_state: carry each client's optimizer state across its rounds (in ``client_state``).
    """

    def __init__(self, fabric: Fabric, view: TrainerView, callbacks: list[Any], keep_optimizer_state: bool = False) -> None:
        self.fabric = fabric
        self.view = view
        self.callbacks = callbacks
        self.keep_optimizer_state = keep_optimizer_state
        self.plain_steps = plain_optimizer_steps(fabric)

    def _hook(self, name: str, *args: Any) -> Any:
        module = self.view.lightning_module
        for cb in self.callbacks:
            getattr(cb, name)(self.view, module, *args)
        return getattr(module, name)(*args)

    def fit(self, loader: DataLoader, epochs: int) -> dict[str, float]:
        """Train for ``epochs`` local epochs; return the mean of each value logged in the last epoch."""
        view, module, fabric = self.view, self.view.lightning_module, self.fabric
        # progress fields first: configure_optimizers often sizes schedulers from trainer.max_epochs & co.
        view.max_epochs, view.current_epoch, view.global_step = epochs, 0, 0
        view.num_training_batches, view.should_stop, view.training = len(loader), False, True
        opts, scheds = parse_optimizers(module.configure_optimizers())
        if module.automatic_optimization and len(opts) > 1:
            raise ClientTrainingError("automatic optimization supports one optimizer; set automatic_optimization=False")
        if self.keep_optimizer_state and "optimizer" in view.client_state:
            for opt, state in zip(opts, view.client_state["optimizer"], strict=True):
                opt.load_state_dict(state)
        # Fabric's wrapper (a new class per optimizer) only matters when its strategy changes the step
        fopts = opts if self.plain_steps else [fabric.setup_optimizers(o) for o in opts]
        module._fabric_optimizers = fopts
        view.optimizers, view.lr_scheduler_configs = fopts, scheds
        if not module.training:  # evaluation switched it off (the mode of submodules a callback set is kept)
            module.train()
        self._hook("on_train_start")
        for epoch in range(epochs):
            view.current_epoch = epoch
            view.reset_means()
            self._hook("on_train_epoch_start")
            for batch_idx, batch in enumerate(loader):
                if self._train_batch(batch, batch_idx, fopts, scheds) is False or view.should_stop:
                    break
            self._hook("on_train_epoch_end")
            for cfg in scheds:
                if cfg.interval == "epoch" and (epoch + 1) % cfg.frequency == 0:
                    cfg.scheduler.step()
            if view.should_stop:
                break
        self._hook("on_train_end")
        view.training = False
        if self.keep_optimizer_state and opts:
            view.client_state["optimizer"] = [o.state_dict() for o in opts]
        module._fabric_optimizers = []
        view.optimizers = []
        return view.means()

    def _train_batch(self, batch: Any, batch_idx: int, opts: list[Any], scheds: list[LRSchedulerConfig]) -> bool:
        view, module, fabric = self.view, self.view.lightning_module, self.fabric
        batch = module.on_before_batch_transfer(batch, 0)
        if fabric.device.type != "cpu":  # CPU batches are already where they belong
            batch = fabric.to_device(batch)
        batch = module.on_after_batch_transfer(batch, 0)
        if self._hook("on_train_batch_start", batch, batch_idx) == -1:
            return False
        with fabric.autocast():
            out = module.training_step(batch, batch_idx)
        if module.automatic_optimization and opts:
            loss = out if isinstance(out, Tensor) else out.get("loss") if isinstance(out, dict) else None
            if loss is not None:
                opt = opts[0]
                self._hook("on_before_backward", loss)
                fabric.backward(loss)
                self._hook("on_after_backward")
                self._hook("on_before_optimizer_step", opt)
                opt.step()
                self._hook("on_before_zero_grad", opt)
                opt.zero_grad(set_to_none=True)
                for cfg in scheds:
                    if cfg.interval == "step" and (view.global_step + 1) % cfg.frequency == 0:
                        cfg.scheduler.step()
        view.global_step += 1
        self._hook("on_train_batch_end", out, batch, batch_idx)
        return True
