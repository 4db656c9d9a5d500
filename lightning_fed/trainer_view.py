"""The object passed as ``trainer`` to callbacks (and seen as ``self.trainer`` by the module) inside FedLoop.

Attributes that exist inside the loop (everything else raises ``AttributeError`` naming the attribute,
except attributes of the underlying ``Fabric``, which are forwarded):

============================  =====================================================================
``current_epoch``             local epoch of the active client (0-based), reset every round
``global_step``               optimizer steps of the active client in this round
``max_epochs``                local epochs of this round
``num_training_batches``      batches per local epoch of the active client
``estimated_stepping_batches`` ``max_epochs * ceil(num_training_batches / accumulate_grad_batches)`` (sizing
                              LR schedules), as ``lightning.Trainer`` computes it
``is_last_batch``             whether the current batch is the last of the local epoch
``max_steps``                 the round's cap on the client's optimizer steps (``Instruction.config["max_steps"]``,
                              e.g. a straggler's partial work), else ``-1``
``accumulate_grad_batches``   ``FedLoop(accumulate_grad_batches=)``
``gradient_clip_val``         ``FedLoop(gradient_clip_val=)``
``gradient_clip_algorithm``   ``FedLoop(gradient_clip_algorithm=)``
``precision``                 the Fabric precision (``"32-true"``, ``"bf16-mixed"``…)
``world_size``, ``global_rank`` the run's processes and this one's rank (each client trains in one process)
``optimizers``                the active client's optimizers (list): those ``configure_optimizers`` returned, wrapped
                              by Fabric only when its strategy changes the step (e.g. a gradient scaler)
``lr_scheduler_configs``      its LR schedulers (list of ``SchedulerConfig``)
``lightning_module``          the working LightningModule
``callbacks``                 all callbacks in the loop
``callback_metrics``          latest values logged with ``self.log`` (dict of tensors)
``logged_metrics``            same as ``callback_metrics``
``logger`` / ``loggers``      the loop's Lightning (Fabric) loggers
``fabric``                    the ``lightning.Fabric`` instance
``training`` / ``validating`` the current stage
``sanity_checking``           always ``False``
``should_stop``               set ``True`` to stop the client's local training early
``is_global_zero``            ``True`` on rank 0, the process that writes outputs
``fed``                       the federated context (:class:`~lightning_fed.context.FedContext`): round,
                              client id and state, the client's data shard, run folder, evaluator…
``current_round``             federated round (0-based), same as ``fed.round``
``num_rounds``                total rounds
``client_id``                 the active client, ``None`` on the server (``fed.client_id``)
``client_state``              dict persisted per client across rounds (``fed.client_state``)
============================  =====================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric import Fabric

from lightning_fed.context import FedContext

_REDUCTIONS: dict[Any, str] = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min",
                               torch.mean: "mean", torch.sum: "sum", torch.max: "max", torch.min: "min"}


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class TrainerView:
    """A small stand-in for ``lightning.Trainer`` that FedLoop hands to callbacks and to the module."""

    def __init__(self, fabric: Fabric, fed: FedContext, loggers: list[Any] | None = None, global_rank: int = 0,
                 world_size: int = 1) -> None:
        self.fabric = fabric
        self.fed = fed
        self._loggers = list(loggers or [])
        self.global_rank = global_rank
        """This process's rank in a multi-process run (0 in one process)."""
        self.world_size = world_size
        """Processes of the run (each trains a part of every round's clients)."""
        self.lightning_module: Any = None
        self.datamodule: Any = None
        """The data module given to ``FedLoop.fit`` (``None`` when it was given dataloaders), as ``trainer.datamodule``."""
        self.progress_bar_callback: Any = None
        """``None``: FedLoop shows the rounds' progress itself (``self.print`` prints plainly, on rank 0)."""
        self.checkpoint_callback: Any = None
        """``None``: FedLoop writes its own checkpoints (``checkpoint_every``)."""
        self.fast_dev_run = False
        self.callbacks: list[Any] = []
        self.current_epoch = 0
        self.global_step = 0
        self.max_epochs = 0
        self.num_training_batches = 0
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_scheduler_configs: list[Any] = []
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.training = False
        self.validating = False
        self.sanity_checking = False
        self.should_stop = False
        self.is_last_batch = False
        self.max_steps = -1
        self.accumulate_grad_batches = 1
        self.gradient_clip_val: float | None = None
        self.gradient_clip_algorithm = "norm"
        self.backward_router: Callable[..., None] | None = None  # set by local training: hooks around backward
        self.fresh_metrics: set[str] = set()  # names logged since local training started
        self._metric_objects: dict[str, Any] = {}  # torchmetrics Metrics logged this epoch, computed at its end
        self._epoch_values: dict[str, float] = {}
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._reduce: dict[str, str] = {}  # a name's reduce_fx in this training epoch, when not "mean" (self.log)

    @property
    def current_round(self) -> int:
        """The federated round (0-based)."""
        return self.fed.round

    @property
    def num_rounds(self) -> int:
        """Rounds of the run."""
        return self.fed.num_rounds

    @property
    def client_id(self) -> int | None:
        """The active client; ``None`` on the server."""
        return self.fed.client_id

    @property
    def client_state(self) -> dict[str, Any]:
        """The active client's persisted state (empty on the server)."""
        return self.fed.client_state

    @property
    def log_dir(self) -> str:
        """The run folder (where the run's outputs and logs are written), as ``trainer.log_dir``."""
        return str(self.fed.run_dir)

    @property
    def default_root_dir(self) -> str:
        """The run folder, as ``trainer.default_root_dir``."""
        return str(self.fed.run_dir)

    @property
    def estimated_stepping_batches(self) -> int:
        """Optimizer steps of this client's local training, as ``lightning.Trainer`` estimates them (at most
        ``max_steps`` when it is set)."""
        steps = -(-self.num_training_batches // self.accumulate_grad_batches) * max(self.max_epochs, 1)
        return steps if self.max_steps == -1 else min(steps, self.max_steps)

    @property
    def precision(self) -> str:
        """The Fabric precision, e.g. ``"32-true"``."""
        return str(self.fabric.strategy.precision.precision)

    @property
    def logged_metrics(self) -> dict[str, torch.Tensor]:
        """Same as ``callback_metrics``."""
        return self.callback_metrics

    @property
    def logger(self) -> Any:
        """The loop's first Lightning logger, or ``None`` (rank 0 alone has loggers)."""
        return self._loggers[0] if self._loggers else None

    @property
    def loggers(self) -> list[Any]:
        """The loop's Lightning loggers (empty on ranks other than 0)."""
        return self._loggers

    @property
    def is_global_zero(self) -> bool:
        """Whether this process is rank 0 (the one that writes the run's outputs)."""
        return self.global_rank == 0

    # -- what LightningModule.log / manual_backward call through ``module._fabric`` -----------------------
    def log_dict(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Receive ``self.log`` values: keep the latest and a running mean per name."""
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                raise ValueError(f"self.log({name!r}, tensor of shape {tuple(value.shape)}) was called, but the value "
                                 "must have a single element (as under lightning.Trainer): log its mean or one entry")
            v = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            self.callback_metrics[name] = v
            self.fresh_metrics.add(name)
            x, reduce = float(v), self._reduce.get(name)
            if reduce is not None and name in self._sums and reduce != "sum":  # max or min
                x = max(x, self._sums[name]) if reduce == "max" else min(x, self._sums[name])
                self._sums[name] = x
            else:
                self._sums[name] = self._sums.get(name, 0.0) + x
            self._counts[name] = self._counts.get(name, 0) + 1

    def reduce_as(self, name: str, reduce_fx: Any) -> None:
        """``self.log(name, ..., reduce_fx=...)`` in training: the client's epoch value of ``name`` is the sum, max
        or min of its batch values instead of their mean (``"mean"``/``"avg"``/``"sum"``/``"max"``/``"min"`` or the
        torch function, as Lightning takes it)."""
        key = _REDUCTIONS.get(reduce_fx) if isinstance(reduce_fx, str) or callable(reduce_fx) else None
        if key is None:
            raise ValueError(f"self.log({name!r}, ..., reduce_fx={reduce_fx!r}): reduce_fx must be 'mean', 'sum', "
                             "'max' or 'min' (or torch.mean, torch.sum, torch.max, torch.min)")
        if key == "mean":
            self._reduce.pop(name, None)
        else:
            self._reduce[name] = key

    def backward(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """``manual_backward`` and the module's default ``backward``: during local training through its hooks
        (``on_before_backward``, the module's ``backward``, ``on_after_backward``), else through Fabric."""
        if self.backward_router is not None:
            self.backward_router(tensor, *args, **kwargs)
        else:
            self.fabric.backward(tensor, *args, **kwargs)

    def clip_gradients(self, module: Any, optimizer: torch.optim.Optimizer, clip_val: float | None = None,
                       max_norm: float | None = None, norm_type: float = 2.0,
                       error_if_nonfinite: bool = False) -> torch.Tensor | None:
        """What ``LightningModule.clip_gradients`` calls: clip the gradients of ``optimizer``'s parameters like
        ``lightning.Trainer``'s precision plugin (by value, or by norm; ``None`` or 0 clips nothing)."""
        if clip_val is not None and max_norm is not None:
            raise ValueError("clip_gradients: pass clip_val (by value) or max_norm (by norm), not both")
        if clip_val is not None:
            if clip_val > 0:
                torch.nn.utils.clip_grad_value_(_params(optimizer), clip_value=clip_val)
            return None
        if not max_norm or max_norm <= 0:
            return None
        return torch.nn.utils.clip_grad_norm_(_params(optimizer), max_norm, norm_type=norm_type,
                                              error_if_nonfinite=error_if_nonfinite)

    def log_metric(self, name: str, metric: Any) -> None:
        """A torchmetrics ``Metric`` passed to ``self.log``: its batch value (what its forward returned) now, as
        Lightning logs it on step; ``compute()`` at the end of the epoch (:meth:`compute_metrics`)."""
        self._metric_objects[name] = metric
        batch_value = getattr(metric, "_forward_cache", None)
        if isinstance(batch_value, torch.Tensor) and batch_value.numel() == 1:
            self.callback_metrics[name] = batch_value.detach().float()
        self.fresh_metrics.add(name)

    def compute_metrics(self) -> None:
        """End of epoch: ``compute()`` every Metric object logged in it, as its logged value and epoch value."""
        for name, metric in self._metric_objects.items():
            value = metric.compute()
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                self.callback_metrics[name] = value.detach().float()
                self._epoch_values[name] = float(value)

    def reset_metrics(self) -> None:
        """After the epoch-end hooks: reset the Metric objects logged in the epoch, as Lightning does."""
        for metric in self._metric_objects.values():
            metric.reset()
        self._metric_objects.clear()

    def reset_means(self) -> None:
        """Start a new averaging window for logged values."""
        self._sums.clear()
        self._counts.clear()
        self._reduce.clear()
        self._epoch_values.clear()

    def means(self) -> dict[str, float]:
        """Mean of each logged value since the last :meth:`reset_means` (its sum, max or min in training when it was
        logged with that ``reduce_fx``; a Metric object's ``compute()``)."""
        return {**{k: self._sums[k] if k in self._reduce else self._sums[k] / self._counts[k] for k in self._sums},
                **self._epoch_values}

    def __getattr__(self, item: str) -> Any:
        # Only reached for names not set above: forward to Fabric (device, world_size, ...).
        fabric = self.__dict__.get("fabric")
        if fabric is not None and not item.startswith("_"):
            try:
                return getattr(fabric, item)
            except AttributeError:
                pass
        raise AttributeError(f"`trainer.{item}` is not available inside FedLoop; see lightning_fed.trainer_view")
