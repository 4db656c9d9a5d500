"""FedNTD: not-true distillation from the received global model during local training.

Lee, Kim, Kim, Yun and Kim, "Preservation of the Global Knowledge by Not-True Distillation in Federated Learning",
NeurIPS 2022. Under label skew a client's local training forgets what the global model knew about the classes the
client hardly holds (its predictions on them collapse toward its own classes), and averaging such models is slow.
FedNTD keeps, on every local batch, the global model's distribution over the **not-true** classes: with ``z`` the
working model's logits, ``g`` the logits of the model the client received (frozen), ``y`` the label and ``~y`` the
logits with the true class removed, the local loss becomes::

    loss = task + beta * tau^2 * KL( softmax(g[~y] / tau) || softmax(z[~y] / tau) )    (mean over the batch)

The true class is left to the module's own loss, so the client still learns its data; the other classes keep the
global model's ranking. The server averages as FedAvg (any server optimizer applies). Nothing extra is sent.

Here the term is added by :class:`FedNTDClient`, a Lightning callback that wraps the module's ``training_step``
(:class:`~lightning_fed.callbacks.step_hook.TrainingStepHook`) and reads its logits with a forward hook, so the
user's ``training_step`` is unchanged as long as it computes its logits through ``self(x)``. The frozen copy of the
received model (in eval mode) is taken when local training starts (inside FedLoop: the global model of the round;
under a plain ``lightning.Trainer``: the model as it was before ``fit``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fed.callbacks._compress import detached
from lightning_fed.callbacks.base import FedCallback
from lightning_fed.callbacks.step_hook import ForwardCapture, TrainingStepHook, step_loss, with_loss
from lightning_fed.strategies.aggregators import Aggregator
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.validation import need


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_ntd(owner: str, beta: float, temperature: float) -> tuple[float, float]:
    """``(beta, temperature)`` as floats; ``ValueError`` (naming ``owner``) unless ``beta >= 0`` and
    ``temperature > 0`` are finite numbers."""
    need(owner, _number(beta) and 0 <= beta < float("inf"), "beta", beta, "a finite number >= 0 (0: FedAvg)")
    need(owner, _number(temperature) and 0 < temperature < float("inf"), "temperature", temperature,
         "a finite number > 0")
    return float(beta), float(temperature)


def not_true_kl(student: Tensor, teacher: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """``tau^2 * KL(softmax(teacher[~y] / tau) || softmax(student[~y] / tau))``, averaged over the batch: the
    distributions over the classes other than each row's label ``y`` (``[B, C]`` logits, ``[B]`` class indices).

    Differentiable in ``student``; ``teacher`` is treated as a constant.

    Raises:
        ValueError: the logits are not ``[B, C]`` with ``C >= 3``, or the labels are not ``B`` class indices below
            ``C``.
    """
    if student.dim() != 2 or student.shape != teacher.shape or student.shape[1] < 3:
        raise ValueError(f"FedNTD: the logits must be [B, C] class logits with C >= 3 (two distributions over the "
                         f"C - 1 not-true classes); got the student's {tuple(student.shape)} and the teacher's "
                         f"{tuple(teacher.shape)}")
    batch, classes = student.shape
    if labels.dim() != 1 or labels.shape[0] != batch or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"FedNTD: the labels must be {batch} integer class indices (shape [{batch}]); got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"FedNTD: a label is outside [0, {classes}) for a model with {classes} outputs")
    keep = torch.ones_like(student, dtype=torch.bool)
    keep[torch.arange(batch, device=student.device), labels.to(student.device)] = False
    s = student[keep].view(batch, classes - 1) / temperature
    t = teacher.detach()[keep].view(batch, classes - 1) / temperature
    kl = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True)
    return kl * temperature**2


class FedNTDClient(FedCallback):
    """Client side of FedNTD: each training step's loss gains ``beta * not_true_kl(logits, received(x), y)``,
    the not-true distillation from the model as it was when local training started.

    Installed by :class:`FedNTD`; it also works under a plain ``lightning.Trainer`` (the teacher is then the model
    before ``fit``). Batches are ``(x, y, ...)`` tuples or lists with integer labels at ``label_index``; the
    module's ``training_step`` must compute its logits through ``self(x)``.

    Example::

        trainer = L.Trainer(max_epochs=2, callbacks=[FedNTDClient(beta=1.0)])
        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=30, strategy=FedNTD(beta=1.0))  # installs it

    Args:
        beta: weight of the not-true distillation term (>= 0; 0: no change).
        temperature: softmax temperature ``tau`` of both distributions (> 0).
        input_index: position of the model input in a batch.
        label_index: position of the labels in a batch.
    """

    def __init__(self, beta: float = 1.0, temperature: float = 1.0, input_index: int = 0, label_index: int = 1) -> None:
        self.beta, self.temperature = check_ntd("FedNTDClient", beta, temperature)
        for name, value in (("input_index", input_index), ("label_index", label_index)):
            need("FedNTDClient", value >= 0, name, value, "an integer >= 0 (a position in the batch)")
        self.input_index, self.label_index = input_index, label_index
        self._hook = TrainingStepHook(self._step)
        self._capture = ForwardCapture()
        self._teacher: nn.Module | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Freeze a copy of the received model and wrap ``training_step`` (nothing when ``beta`` is 0)."""
        self._remove()
        if self.beta == 0:
            return
        module: nn.Module = trainer.lightning_module  # the working module (tiers: not necessarily pl_module)
        with detached(module):  # a copy where the module lies, without its trainer
            teacher = copy.deepcopy(module)
        self._teacher = teacher.eval().requires_grad_(False)
        self._capture.install(module)
        self._hook.install(module)

    def _parts(self, batch: Any) -> tuple[Tensor, Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) <= max(self.input_index, self.label_index):
            raise ValueError(f"FedNTD: a batch must be a tuple or list holding the input at {self.input_index} and "
                             f"the labels at {self.label_index}; got {type(batch).__name__}")
        return batch[self.input_index], batch[self.label_index]

    def _step(self, original: Any, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
        self._capture.value = None
        out = original(batch, batch_idx, *args, **kwargs)
        loss = step_loss(out)
        if loss is None or self._teacher is None:
            return out
        logits = self._capture.value
        if not isinstance(logits, Tensor):
            raise RuntimeError("FedNTD: the module's forward was not called (or returned no tensor) in "
                               "training_step; FedNTD reads the logits of self(x)")
        x, y = self._parts(batch)
        with torch.no_grad():
            teacher = self._teacher(x)
        return with_loss(out, loss + self.beta * not_true_kl(logits, teacher, y, self.temperature))

    def _remove(self) -> None:
        self._hook.remove()
        self._capture.remove()
        self._teacher = None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Unwrap ``training_step`` and drop the frozen copy."""
        self._remove()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Unwrap when training fails."""
        self._remove()

    def __repr__(self) -> str:
        return f"FedNTDClient(beta={self.beta}, temperature={self.temperature})"


class FedNTD(FedAvg):
    """FedNTD: FedAvg's server with not-true distillation from the received model on the clients
    (:class:`FedNTDClient`).

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=30, partition=Dirichlet(alpha=0.1),
                       strategy=FedNTD(beta=1.0, temperature=1.0))

    Args:
        beta: weight of the not-true distillation term (>= 0; 0: FedAvg exactly; the paper: 1).
        temperature: the softmax temperature of both distributions (> 0; the paper: 1).
        server_lr: see :class:`~lightning_fed.strategies.FedAvg`.
        aggregator: see :class:`~lightning_fed.strategies.FedAvg`.
        server_optimizer: see :class:`~lightning_fed.strategies.FedAvg`.
    """

    def __init__(
        self,
        *,
        beta: float = 1.0,
        temperature: float = 1.0,
        server_lr: float = 1.0,
        aggregator: Aggregator | None = None,
        server_optimizer: ServerOptimizer | None = None,
    ) -> None:
        self.beta, self.temperature = check_ntd("FedNTD", beta, temperature)
        self.client = FedNTDClient(self.beta, self.temperature)
        super().__init__(server_lr=server_lr, aggregator=aggregator, server_optimizer=server_optimizer)

    def client_callbacks(self) -> list[Any]:
        """The not-true distillation on the clients, then the aggregator's callbacks."""
        return [self.client, *super().client_callbacks()]


__all__ = ["FedNTD", "FedNTDClient", "not_true_kl"]
