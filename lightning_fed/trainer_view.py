"""The object passed as ``trainer`` to callbacks (and seen as ``self.trainer`` by the module) inside FedLoop.

Attributes that exist inside the loop (everything else raises ``AttributeError`` naming the attribute,
except attributes of the underlying ``Fabric``, which are forwarded):

============================  =====================================================================
``current_epoch``             local epoch of the active client (0-based), reset every round
``global_step``               optimizer steps of the active client in this round
``max_epochs``                local epochs of this round
``num_training_batches``      batches per local epoch of the active client
``estimated_stepping_batches`` ``max_epochs * num_training_batches`` (sizing LR schedules)
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
``is_global_zero``            ``True`` on the process that aggregates
``current_round``             federated round (0-based)
``num_rounds``                total rounds
``client_id``                 the active client, ``None`` on the server
``client_state``              dict persisted per client across rounds (store your per-client state here)
``fed``                       the :class:`~lightning_fed.context.FedContext`: round, client id, client state,
                              the client's shard, run folder, held-out data, evaluator… (callbacks read the
                              federated state only from here, through :func:`~lightning_fed.context.fed_context`)
============================  =====================================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric import Fabric

if TYPE_CHECKING:
    from lightning_fed.loop import FedLoop


class TrainerView:
    """A small stand-in for ``lightning.Trainer`` that FedLoop hands to callbacks and to the module."""

    def __init__(self, fabric: Fabric, loop: FedLoop) -> None:
        self.fabric = fabric
        self.fed_loop = loop
        self.fed_strategy = loop.strategy
        self.lightning_module: Any = None
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
        self.current_round = 0
        self.num_rounds = loop.rounds
        self.client_id: int | None = None
        self.client_state: dict[str, Any] = {}
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    @property
    def estimated_stepping_batches(self) -> int:
        """Optimizer steps of this client's local training (``max_epochs * num_training_batches``)."""
        return self.max_epochs * self.num_training_batches

    @property
    def logged_metrics(self) -> dict[str, torch.Tensor]:
        """Same as ``callback_metrics``."""
        return self.callback_metrics

    @property
    def logger(self) -> Any:
        """The first Fabric logger, or ``None``."""
        return self.fabric.logger if self.fabric.loggers else None

    @property
    def loggers(self) -> list[Any]:
        """All Fabric loggers."""
        return self.fabric.loggers

    @property
    def is_global_zero(self) -> bool:
        """Whether this process is rank 0."""
        return self.fabric.is_global_zero

    # -- what LightningModule.log / manual_backward call through ``module._fabric`` -----------------------
    def log_dict(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Receive ``self.log`` values: keep the latest and a running mean per name."""
        for name, value in metrics.items():
            v = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            self.callback_metrics[name] = v
            self._sums[name] = self._sums.get(name, 0.0) + float(v)
            self._counts[name] = self._counts.get(name, 0) + 1

    def backward(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """``manual_backward`` support: route through Fabric (precision-aware)."""
        self.fabric.backward(tensor, *args, **kwargs)

    def reset_means(self) -> None:
        """Start a new averaging window for logged values."""
        self._sums.clear()
        self._counts.clear()

    def means(self) -> dict[str, float]:
        """Mean of each logged value since the last :meth:`reset_means`."""
        return {k: self._sums[k] / self._counts[k] for k in self._sums}

    def __getattr__(self, item: str) -> Any:
        # Only reached for names not set above: forward to Fabric (device, world_size, ...).
        fabric = self.__dict__.get("fabric")
        if fabric is not None and not item.startswith("_"):
            try:
                return getattr(fabric, item)
            except AttributeError:
                pass
        raise AttributeError(f"`trainer.{item}` is not available inside FedLoop; see lightning_fed.trainer_view")
