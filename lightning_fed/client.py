"""Local work: one client's training of the user's LightningModule, with Lightning's hooks.

The module's own ``configure_optimizers``, ``training_step`` and ``self.log`` are used. Callback hooks
receive the :class:`~lightning_fed.trainer_view.TrainerView` as ``trainer``. Hooks run in Lightning's
order (callbacks, then the module) for: ``on_train_start``, ``on_train_epoch_start``,
``on_train_batch_start``, ``on_before_zero_grad``, ``on_before_backward``, ``on_after_backward``,
``on_before_optimizer_step``, ``on_train_batch_end``, ``on_train_epoch_end``, ``on_train_end``; the module's
``optimizer_step``, ``optimizer_zero_grad``, ``backward``, ``configure_gradient_clipping`` and
``lr_scheduler_step`` are called as ``lightning.Trainer`` calls them (see docs/lightning.md, checked weight for
weight against the Trainer by tests/test_parity.py). Every training and evaluation batch takes
Lightning's path to the step (:func:`batch_path`).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import MixedPrecision, Precision
from lightning.fabric.strategies import SingleDeviceStrategy
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader
from torchmetrics import Metric, MetricCollection

from lightning_fed.errors import ClientError
from lightning_fed.trainer_view import TrainerView

log = logging.getLogger("lightning_fed")


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
    return [conf["optimizer"]], ([] if sched is None else [_sched_config(sched, conf.get("monitor"))])


def _sched_config(s: Any, monitor: str | None = None) -> LRSchedulerConfig:
    """One scheduler config, as Lightning builds it: ``ReduceLROnPlateau`` needs a ``monitor`` (in the scheduler
    dict or beside ``lr_scheduler``) and is stepped with that logged value."""
    if isinstance(s, LRSchedulerConfig):
        return s
    keys = ("scheduler", "interval", "frequency", "monitor", "name", "strict", "reduce_on_plateau")
    cfg = {k: v for k, v in s.items() if k in keys} if isinstance(s, dict) else {"scheduler": s}
    if monitor is not None:
        cfg.setdefault("monitor", monitor)
    if cfg.get("interval", "epoch") not in ("epoch", "step"):
        raise ClientTrainingError(f"lr_scheduler interval must be 'epoch' or 'step', got {cfg['interval']!r}")
    cfg.setdefault("reduce_on_plateau", isinstance(cfg.get("scheduler"), torch.optim.lr_scheduler.ReduceLROnPlateau))
    if cfg["reduce_on_plateau"] and cfg.get("monitor") is None:
        raise ClientTrainingError("a ReduceLROnPlateau scheduler needs a monitor: return {'optimizer': opt, "
                                  "'lr_scheduler': {'scheduler': sched, 'monitor': 'metric_logged_with_self_log'}}")
    return LRSchedulerConfig(**cfg)


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


def converts_input(precision: Precision) -> bool:
    """Whether ``lightning.Trainer`` converts the batches under this precision (``64-true``, ``bf16-true``,
    ``16-true``…: floating tensors to its dtype). Not under ``32-true`` (the base plugin converts nothing)
    nor under ``16-mixed``/``bf16-mixed``: the Trainer's plugin leaves those inputs to autocast, where
    Fabric's ``MixedPrecision.convert_input`` would cast them to half precision."""
    return type(precision).convert_input not in (Precision.convert_input, MixedPrecision.convert_input)


def overrides(obj: Any, name: str) -> bool:
    """Whether a module or data module replaces its Lightning base class's hook ``name`` (in its class or on the
    instance)."""
    base = L.LightningDataModule if isinstance(obj, L.LightningDataModule) else L.LightningModule
    return getattr(type(obj), name) is not getattr(base, name) or name in obj.__dict__


def batch_path(fabric: Fabric, module: Any, datamodule: Any = None, dataloader_idx: int = 0) -> Callable[[Any], Any]:
    """What turns a batch from the loader into the step's batch, in ``lightning.Trainer``'s order: the precision's
    ``convert_input``, ``on_before_batch_transfer``, ``transfer_batch_to_device(batch, fabric.device,
    dataloader_idx)`` and ``on_after_batch_transfer``, each the data module's where it overrides the hook (as the
    Trainer chooses), else the module's. Resolved once per local training or evaluation: on CPU, Lightning's own
    ``transfer_batch_to_device`` (which moves nothing there) is left out; an override is always called."""

    def owner(name: str) -> Any:
        return datamodule if datamodule is not None and overrides(datamodule, name) else module

    convert = fabric.strategy.precision.convert_input if converts_input(fabric.strategy.precision) else None
    before = owner("on_before_batch_transfer").on_before_batch_transfer
    after = owner("on_after_batch_transfer").on_after_batch_transfer
    device, transfer = fabric.device, owner("transfer_batch_to_device")
    move = transfer.transfer_batch_to_device if (
        device.type != "cpu" or overrides(transfer, "transfer_batch_to_device")) else None

    def to_step(batch: Any) -> Any:
        if convert is not None:
            batch = convert(batch)
        batch = before(batch, dataloader_idx)
        if move is not None:
            batch = move(batch, device, dataloader_idx)
        return after(batch, dataloader_idx)

    return to_step


def takes_batch_idx(step: Callable[..., Any]) -> bool:
    """Whether Lightning passes ``batch_idx`` to this ``training_step``, ``validation_step`` or
    ``test_step``: it names a ``batch_idx`` parameter, takes ``*args`` or has two parameters
    (``is_param_in_hook_signature(step, "batch_idx", min_args=2)``); otherwise it gets the batch alone."""
    return is_param_in_hook_signature(step, "batch_idx", min_args=2)


def check_manual_optimization(module: Any, gradient_clip_val: float | None,
                              accumulate_grad_batches: int) -> None:
    """Refuse, as ``lightning.Trainer`` does, the FedLoop settings manual optimization would silently
    ignore: ``gradient_clip_val > 0`` and ``accumulate_grad_batches != 1`` with
    ``automatic_optimization = False``.

    Raises:
        MisconfigurationException: naming the FedLoop setting to remove. Not a ``ClientError``: the run
            stops (a configuration error, not one client's failure).
    """
    if module.automatic_optimization:
        return
    if gradient_clip_val is not None and gradient_clip_val > 0:
        raise MisconfigurationException(
            "Automatic gradient clipping is not supported for manual optimization. Remove "
            f"`FedLoop(gradient_clip_val={gradient_clip_val})` or switch to automatic optimization "
            "(in manual optimization, clip in training_step with self.clip_gradients)")
    if accumulate_grad_batches != 1:
        raise MisconfigurationException(
            "Automatic gradient accumulation is not supported for manual optimization. Remove "
            f"`FedLoop(accumulate_grad_batches={accumulate_grad_batches})` or switch to automatic "
            "optimization (in manual optimization, step the optimizer every N batches in training_step)")


_STEP_CLASSES: dict[type, type] = {}  # one wrapper class per optimizer class, made once


class StepOptimizer:
    """The optimizer the module's hooks receive (``optimizer_step``'s ``optimizer``, ``self.optimizers()``), as
    Lightning's ``LightningOptimizer``: ``step(closure)`` runs the closure (``training_step`` and backward), then
    ``on_before_optimizer_step``, gradient clipping (automatic optimization) and the precision plugin's step (the
    gradient scaler under ``16-mixed``). It passes ``isinstance`` checks for the wrapped optimizer's class; every
    other attribute (``param_groups``, ``state``…) is the wrapped optimizer's own.

    Create with :meth:`wrap`.
    """

    _optimizer: torch.optim.Optimizer
    _fabric_optimizer: Any
    _trainer: LocalTrainer

    @staticmethod
    def wrap(optimizer: torch.optim.Optimizer, fabric_optimizer: Any, trainer: LocalTrainer) -> StepOptimizer:
        """Wrap ``optimizer``; ``fabric_optimizer`` is it, or Fabric's wrapper when the precision changes the step."""
        cls = _STEP_CLASSES.get(type(optimizer))
        if cls is None:
            try:
                cls = type("FedLoop" + type(optimizer).__name__, (StepOptimizer, type(optimizer)), {})
            except TypeError:  # a class that cannot be subclassed this way: no isinstance checks, same behaviour
                cls = StepOptimizer
            _STEP_CLASSES[type(optimizer)] = cls
        obj = object.__new__(cls)
        obj.__dict__.update(_optimizer=optimizer, _fabric_optimizer=fabric_optimizer, _trainer=trainer)
        return obj

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._optimizer

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """Lightning's optimizer step: closure, ``on_before_optimizer_step``, clipping, the precision's step."""
        return self._trainer.optimizer_step(self, closure, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``."""
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state."""
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the wrapped optimizer."""
        self._optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add to the wrapped optimizer."""
        self._optimizer.add_param_group(param_group)

    def __getattr__(self, item: str) -> Any:
        opt = self.__dict__.get("_optimizer")
        if opt is None:
            raise AttributeError(item)
        return getattr(opt, item)

    def __repr__(self) -> str:
        return f"StepOptimizer({self._optimizer!r})"


def _closure_loss(out: Any) -> Tensor | None:
    """The loss of a ``training_step`` output under automatic optimization (Lightning's rules)."""
    if out is None or isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise ClientTrainingError("training_step returned a dict without a 'loss' key (automatic optimization)")
        return out["loss"]
    raise ClientTrainingError(f"training_step must return a Tensor, a dict with 'loss' or None, got {type(out).__name__}")


def check_module(module: Any, template: DataLoader, shard_sizes: Sequence[int]) -> None:
    """Start-up checks of a LightningModule before a FedLoop run: refuse what local training cannot honour
    (``ValueError`` naming FedLoop and the alternative) and warn, once, about clients whose every round would fail.

    Args:
        module: the user's LightningModule.
        template: the data module's training loader (batch size, ``drop_last``).
        shard_sizes: examples per client.
    """
    if type(module).configure_model is not L.LightningModule.configure_model:
        raise ValueError(f"FedLoop does not call {type(module).__name__}.configure_model (Trainer's hook for sharded "
                         "or delayed initialisation): each client trains the whole model on one device; build the "
                         "layers in __init__")
    bs = template.batch_size or 1
    if getattr(template, "drop_last", False) or not any(isinstance(m, _BatchNorm) for m in module.modules()):
        return
    ones = sum(1 for n in shard_sizes if n and (bs == 1 or n % bs == 1))
    if ones:
        log.warning("%d of %d clients end a local epoch with a one-sample batch (batch_size=%d) and the model has "
                    "BatchNorm layers, which raise on a single value per channel in training (as under "
                    "lightning.Trainer): those clients fail every round. Pass drop_last=True to the DataLoader of "
                    "the data module's train_dataloader (or change batch_size)", ones, len(shard_sizes), bs)


def accept_metric_objects(module: Any, view: TrainerView) -> None:
    """The module's ``self.log``/``self.log_dict`` during local training and evaluation as under
    ``lightning.Trainer``, where LightningModule's Fabric path differs: torchmetrics ``Metric`` objects are taken,
    a value logged with ``logger=False`` still reaches ``trainer.callback_metrics`` (the Fabric path dropped it),
    and a training value's ``reduce_fx`` (sum, max, min) makes its epoch value. Instance attributes shadowing the
    two methods, removed by :func:`restore_log`; other values go to Lightning's own methods."""
    log_fn, log_dict_fn = module.log, module.log_dict

    def options(names: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if view.training and "reduce_fx" in kwargs:
            for name in names:
                view.reduce_as(name, kwargs["reduce_fx"])
        # FedLoop's view keeps every value; Lightning's loggers never see a client's steps (the loop logs rounds)
        return {**kwargs, "logger": True} if kwargs.get("logger") is False else kwargs

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(value, Metric):
            view.log_metric(name, value)
        else:
            log_fn(name, value, *args, **options([name], kwargs))

    def log_dict(dictionary: Any, *args: Any, **kwargs: Any) -> None:
        items = dictionary.items(keep_base=False) if isinstance(dictionary, MetricCollection) else dictionary.items()
        rest = {}
        for name, value in items:
            if isinstance(value, Metric):
                view.log_metric(name, value)
            else:
                rest[name] = value
        if rest:
            log_dict_fn(rest, *args, **options(rest, kwargs))

    module.__dict__["log"], module.__dict__["log_dict"] = log, log_dict


def restore_log(module: Any) -> None:
    """Undo :func:`accept_metric_objects`: the module's own ``log``/``log_dict`` again."""
    module.__dict__.pop("log", None)
    module.__dict__.pop("log_dict", None)


class LocalTrainer:
    """Runs local epochs of a LightningModule on one client's data, calling Lightning hooks in Lightning's order.

    Automatic optimization follows ``lightning.Trainer`` (``loops/optimization/automatic.py``): the module's
    ``optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)`` is called with a closure that runs
    ``training_step``, ``on_before_zero_grad`` and ``optimizer_zero_grad`` (first batch of an accumulation window),
    and ``backward`` (``on_before_backward``, the module's ``backward``, ``on_after_backward``); ``optimizer.step``
    then calls ``on_before_optimizer_step`` and ``configure_gradient_clipping`` before stepping. Schedulers step
    through ``lr_scheduler_step`` at their ``interval``/``frequency``, ``ReduceLROnPlateau`` with its monitored
    logged value. Manual optimization gets every optimizer from ``self.optimizers()``; its ``manual_backward`` runs
    the backward hooks, and ``global_step`` counts its optimizer steps.

    Args:
        fabric: the loop's Fabric (device, precision, backward).
        view: the trainer view shared with callbacks.
        callbacks: Lightning callbacks, called before the module's own hook.
        keep_optimizer_state: carry each client's optimizer state across its rounds (in ``client_state``).
        gradient_clip_val: ``Trainer(gradient_clip_val=)``, passed to ``configure_gradient_clipping``.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        accumulate_grad_batches: ``Trainer(accumulate_grad_batches=)``: step every this many batches (and on the
            last batch of an epoch); the loss is divided by it.
    """

    def __init__(self, fabric: Fabric, view: TrainerView, callbacks: list[Any], keep_optimizer_state: bool = False,
                 gradient_clip_val: float | None = None, gradient_clip_algorithm: str = "norm",
                 accumulate_grad_batches: int = 1) -> None:
        self.fabric = fabric
        self.view = view
        self.callbacks = callbacks
        self.keep_optimizer_state = keep_optimizer_state
        self.plain_steps = plain_optimizer_steps(fabric)
        self.scaler = getattr(fabric.strategy.precision, "scaler", None)
        view.gradient_clip_val = gradient_clip_val
        view.gradient_clip_algorithm = GradClipAlgorithmType(gradient_clip_algorithm)  # a str, as the Trainer's
        view.accumulate_grad_batches = accumulate_grad_batches
        self._in_backward = False
        self._scheds: list[LRSchedulerConfig] = []
        self._step_idx = True  # training_step takes batch_idx (decided per module in fit)
        self._to_step: Callable[[Any], Any] = lambda batch: batch  # the batch path (resolved per module in fit)

    def _hook(self, name: str, *args: Any) -> Any:
        module = self.view.lightning_module
        for cb in self.callbacks:
            getattr(cb, name)(self.view, module, *args)
        return getattr(module, name)(*args)

    def fit(self, loader: DataLoader, epochs: int, max_steps: int | None = None) -> dict[str, float]:
        """Train for ``epochs`` local epochs, or until ``max_steps`` optimizer steps (as ``lightning.Trainer(
        max_steps=)``: the epoch in progress ends there, with its end hooks; ``None`` = no cap); return the mean of
        each value logged in the last epoch. FedLoop passes an instruction's ``config["max_steps"]`` (partial work
        of a straggler, or an algorithm's own cap)."""
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ClientTrainingError(f"max_steps={max_steps!r} is not allowed; max_steps must be an int >= 1 or None")
        view, module, fabric = self.view, self.view.lightning_module, self.fabric
        check_manual_optimization(module, view.gradient_clip_val, view.accumulate_grad_batches)
        self._step_idx = takes_batch_idx(module.training_step)
        self._to_step = batch_path(fabric, module, view.datamodule)
        # progress fields first: configure_optimizers often sizes schedulers from trainer.max_epochs & co.
        view.max_epochs, view.current_epoch, view.global_step = epochs, 0, 0
        view.max_steps = -1 if max_steps is None else max_steps
        view.num_training_batches, view.should_stop, view.training = len(loader), False, True
        view.is_last_batch = False
        view.fresh_metrics.clear()
        opts, scheds = parse_optimizers(module.configure_optimizers())
        if module.automatic_optimization and len(opts) > 1:
            raise MisconfigurationException(  # the module's set-up, the same on every client: the run stops
                "Training with multiple optimizers is only supported with manual optimization (as under "
                "lightning.Trainer). Set `self.automatic_optimization = False`, then access your optimizers in "
                "`training_step` with `opt1, opt2, ... = self.optimizers()`.")
        if self.keep_optimizer_state and "optimizer" in view.client_state:
            for opt, state in zip(opts, view.client_state["optimizer"], strict=True):
                opt.load_state_dict(state)
        # Fabric's wrapper (a new class per optimizer) only matters when its strategy changes the step
        fopts = opts if self.plain_steps else [fabric.setup_optimizers(o) for o in opts]
        steppers = [StepOptimizer.wrap(o, f, self) for o, f in zip(opts, fopts, strict=True)]
        module._fabric_optimizers = steppers
        view.optimizers, view.lr_scheduler_configs = fopts, scheds
        self._scheds = scheds if module.automatic_optimization else []  # Lightning steps them only when automatic
        view.backward_router = self.backward
        accept_metric_objects(module, view)
        if not module.training:  # evaluation switched it off (the mode of submodules a callback set is kept)
            module.train()
        try:
            self._hook("on_train_start")
            for epoch in range(epochs):
                view.current_epoch = epoch
                view.reset_means()
                self._hook("on_train_epoch_start")
                for batch_idx, batch in enumerate(loader):
                    view.is_last_batch = batch_idx + 1 == view.num_training_batches
                    if self._train_batch(batch, batch_idx, steppers) is False or view.should_stop:
                        break
                    if max_steps is not None and view.global_step >= max_steps:
                        break
                view.compute_metrics()
                self._hook("on_train_epoch_end")
                view.reset_metrics()
                self._step_schedulers("epoch", epoch + 1, plateau=True)
                if view.should_stop or (max_steps is not None and view.global_step >= max_steps):
                    break
            self._hook("on_train_end")
        finally:
            view.backward_router = None
            restore_log(module)
            view.reset_metrics()
            module._fabric_optimizers = []
            view.optimizers = []
        view.training = False
        view.max_steps = -1
        for opt in opts:  # Lightning zeroes before backward; the last step's gradients are not kept
            opt.zero_grad(set_to_none=True)
        if self.keep_optimizer_state and opts:
            view.client_state["optimizer"] = [o.state_dict() for o in opts]
        return view.means()

    def _train_batch(self, batch: Any, batch_idx: int, opts: list[StepOptimizer]) -> bool:
        view, module, fabric = self.view, self.view.lightning_module, self.fabric
        batch = self._to_step(batch)
        if self._hook("on_train_batch_start", batch, batch_idx) == -1:
            return False
        if module.automatic_optimization and opts:
            out = self._automatic(batch, batch_idx, opts[0])
        else:
            args = (batch, batch_idx) if self._step_idx else (batch,)
            with fabric.autocast():
                out = module.training_step(*args)
            if not opts:
                view.global_step += 1
        self._hook("on_train_batch_end", out, batch, batch_idx)
        return True

    def _automatic(self, batch: Any, batch_idx: int, opt: StepOptimizer) -> Any:
        """One batch of automatic optimization; returns what Lightning passes to ``on_train_batch_end``."""
        view, module = self.view, self.view.lightning_module
        acc, epoch, raw = view.accumulate_grad_batches, view.current_epoch, opt.optimizer
        result: dict[str, Any] = {}
        step_args = (batch, batch_idx) if self._step_idx else (batch,)

        @torch.enable_grad()
        def closure() -> Tensor | None:
            with self.fabric.autocast():
                out = module.training_step(*step_args)
            loss = _closure_loss(out)
            if loss is not None:
                result.update(out if isinstance(out, Mapping) else {})
                if acc > 1:
                    loss = loss / acc
                result["loss"] = loss.detach()
            if batch_idx % acc == 0:
                self._hook("on_before_zero_grad", raw)
                module.optimizer_zero_grad(epoch, batch_idx, raw)
            if loss is None:
                return None
            self.backward(loss)
            return result["loss"]

        if (batch_idx + 1) % acc and not view.is_last_batch:  # accumulating: no step (Lightning steps on the last batch)
            closure()
            return result
        module.optimizer_step(epoch, batch_idx, opt, closure)
        view.global_step += 1
        self._step_schedulers("step", batch_idx + 1, plateau=False)
        if view.is_last_batch:
            self._step_schedulers("epoch", epoch + 1, plateau=False)
        self._step_schedulers("step", batch_idx + 1, plateau=True)
        return result

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Backward as Lightning's strategy runs it: ``on_before_backward``, the module's ``backward`` hook (whose
        default calls Fabric's precision-aware backward), ``on_after_backward``. ``manual_backward`` lands here too."""
        if self._in_backward:  # the module's backward hook calling back through the view
            self.fabric.backward(loss, *args, **kwargs)
            return
        self._in_backward = True
        try:
            self._hook("on_before_backward", loss)
            self.view.lightning_module.backward(loss, *args, **kwargs)
            self._hook("on_after_backward")
        finally:
            self._in_backward = False

    def optimizer_step(self, opt: StepOptimizer, closure: Callable[[], Any] | None, **kwargs: Any) -> Any:
        """What ``StepOptimizer.step`` runs (Lightning's precision plugin ``optimizer_step``)."""
        view, module = self.view, self.view.lightning_module
        raw, automatic = opt.optimizer, module.automatic_optimization

        def wrapped() -> Any:
            out = closure() if closure is not None else None
            if self.scaler is not None:
                self.scaler.unscale_(raw)  # hooks and clipping see true gradients
            self._hook("on_before_optimizer_step", raw)
            # the default hook clips nothing without a value: skipped then, as it changes nothing
            if automatic and (view.gradient_clip_val is not None or self._custom_clipping(module)):
                module.configure_gradient_clipping(raw, gradient_clip_val=view.gradient_clip_val,
                                                   gradient_clip_algorithm=view.gradient_clip_algorithm)
            return out

        if opt._fabric_optimizer is raw:  # the optimizer calls the closure itself (LBFGS may call it again)
            out = raw.step(closure=wrapped, **kwargs)
        else:  # the scaler cannot step with a closure: run it first, as Lightning's MixedPrecision does
            out = wrapped()
            if not (automatic and out is None):
                opt._fabric_optimizer.step(**kwargs)
        if not automatic:
            view.global_step += 1
        return out

    @staticmethod
    def _custom_clipping(module: Any) -> bool:
        return type(module).configure_gradient_clipping is not L.LightningModule.configure_gradient_clipping

    def _step_schedulers(self, interval: str, idx: int, plateau: bool) -> None:
        """Lightning's ``_update_learning_rates``: the schedulers of ``interval`` whose frequency divides ``idx``."""
        view, module = self.view, self.view.lightning_module
        for cfg in self._scheds:
            if cfg.interval != interval or cfg.reduce_on_plateau != plateau or idx % cfg.frequency:
                continue
            metric = None
            if cfg.reduce_on_plateau:
                metric = view.callback_metrics.get(cfg.monitor) if cfg.monitor in view.fresh_metrics else None
                if metric is None:
                    if cfg.strict:
                        raise ClientTrainingError(
                            f"ReduceLROnPlateau monitors {cfg.monitor!r}, which was not logged with self.log in this "
                            f"client's local training before the scheduler's {interval} step (FedLoop runs no "
                            f"validation inside local training); logged: {sorted(view.fresh_metrics)}")
                    warnings.warn(f"ReduceLROnPlateau monitors {cfg.monitor!r}, which was not logged; strict=False: "
                                  "skipping its step", RuntimeWarning, stacklevel=2)
                    continue
            module.lr_scheduler_step(cfg.scheduler, metric)


def train_aside(local: LocalTrainer, module: Any, loader: Any, epochs: int | None = None,
                max_steps: int | None = None, callbacks: Sequence[Any] = ()) -> int:
    """Train ``module`` with its own Lightning hooks outside the client's federated update (a personal model):
    ``LocalTrainer.fit`` with ``local``'s Fabric, trainer view, gradient clipping and accumulation, but only
    ``callbacks`` (not the loop's), a fresh optimizer from ``configure_optimizers`` (never the client's kept one),
    and the trainer view's fields, ``lightning_module`` included, as they were afterwards; the module's train/eval
    mode is restored. ``epochs=None``: as many epochs as ``max_steps`` optimizer steps need. Returns the optimizer
    steps taken (0 for a loader without batches)."""
    if len(loader) == 0 or (epochs is None and not max_steps):
        return 0
    view = local.view
    if epochs is None:
        assert max_steps is not None
        per_epoch = -(-len(loader) // max(int(view.accumulate_grad_batches), 1))
        epochs = -(-max_steps // per_epoch)
    saved = {k: (v, copy.copy(v) if isinstance(v, (dict, set, list)) else None) for k, v in view.__dict__.items()}
    was_training = module.training
    aside = LocalTrainer(local.fabric, view, list(callbacks), keep_optimizer_state=False,
                         gradient_clip_val=view.gradient_clip_val,
                         gradient_clip_algorithm=str(view.gradient_clip_algorithm.value),
                         accumulate_grad_batches=view.accumulate_grad_batches)
    view.lightning_module = module
    try:
        aside.fit(loader, epochs, max_steps)
        return int(view.global_step)
    finally:
        for k in [k for k in view.__dict__ if k not in saved]:
            del view.__dict__[k]
        for k, (obj, contents) in saved.items():  # the same objects (others may hold them), their contents again
            if isinstance(obj, list):
                obj[:] = contents
            elif isinstance(obj, (dict, set)):
                obj.clear()
                obj.update(contents)
            view.__dict__[k] = obj
        module.train(was_training)
