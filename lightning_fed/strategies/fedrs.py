"""FedRS: restricted softmax for label-skewed clients.

Li & Zhan, "FedRS: Federated Learning with Restricted Softmax for Label Distribution Non-IID Data", KDD 2021. A
client that has no records of some classes pushes those classes' outputs down at every step of local training
(their softmax probabilities only ever receive negative gradient), so the classifier rows of missing classes
drift; averaged, the global classifier is biased toward each round's present classes. FedRS restricts the softmax
during local training: with ``C_k`` the classes client ``k`` holds, the logits become::

    o_c' = o_c            for c in C_k
    o_c' = alpha * o_c    for c not in C_k              (alpha in [0, 1]; the paper: 0.5)

before the module's own loss; the server averages as FedAvg. ``alpha = 1`` is FedAvg; ``alpha = 0`` sends every
missing class's logit to zero.

The paper scales the classifier's weight vectors of the missing classes (a bias-free last layer), which is the
logit scaling above; with a bias the bias is scaled too. Here the scaling is a forward hook on the output of the
module's ``forward`` (:class:`FedRSClient`, a Lightning callback), active in train mode only, so the module's
``training_step`` is unchanged as long as it computes its logits through ``self(x)`` (a ``training_step`` that calls
a submodule directly bypasses the hook); evaluation (``eval()`` mode) sees the plain logits. ``C_k`` is read from
the client's own training labels (``trainer.fed.shard`` inside FedLoop, the training loader's dataset under a plain
``lightning.Trainer``; :func:`~lightning_fed.data.loaders.dataset_labels`). Nothing is stored and nothing extra is
sent: the messages are FedAvg's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.context import fed_context
from lightning_fed.data.loaders import dataset_labels
from lightning_fed.strategies.aggregators import Aggregator
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.validation import need


def check_alpha(owner: str, alpha: float) -> float:
    """``alpha`` as a float; ``ValueError`` (naming ``owner``) unless it is a number in [0, 1]."""
    need(
        owner,
        isinstance(alpha, int | float) and not isinstance(alpha, bool) and 0 <= alpha <= 1,
        "alpha",
        alpha,
        "a number in [0, 1] (1: FedAvg)",
    )
    return float(alpha)


def restrict_logits(logits: Tensor, present: Tensor, alpha: float) -> Tensor:
    """``logits`` (classes on the last dimension) with every class not in ``present`` (a 1-D tensor of class
    indices) multiplied by ``alpha``; a new tensor, differentiable.

    Raises:
        ValueError: a class index in ``present`` is not below the number of logits.
    """
    num_classes = logits.shape[-1]
    if present.numel() and int(present.max()) >= num_classes:
        raise ValueError(
            f"FedRS: the client holds label {int(present.max())} but the model's output has {num_classes} "
            "values on its last dimension; FedRS needs the forward output to be one logit per class"
        )
    scale = torch.full((num_classes,), alpha, dtype=logits.dtype, device=logits.device)
    scale[present.to(logits.device)] = 1.0
    return logits * scale


class FedRSClient(FedCallback):
    """Client side of FedRS: in train mode, the logits of the classes the client has no records of are scaled by
    ``alpha`` (a forward hook on the training module's output, installed for local training and removed after it).

    Installed by :class:`FedRS`; it also works under a plain ``lightning.Trainer``, where the classes are those of
    the training loader's dataset.

    Example::

        trainer = L.Trainer(max_epochs=2, callbacks=[FedRSClient(alpha=0.5)])
        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=30, strategy=FedRS(alpha=0.5))  # installs it

    Args:
        alpha: the scale of the missing classes' logits, in [0, 1] (1: no change).
    """

    def __init__(self, alpha: float = 0.5) -> None:
        self.alpha = check_alpha("FedRSClient", alpha)
        self._handle: Any = None
        self._present: Tensor | None = None

    @staticmethod
    def _training_data(trainer: Any) -> Dataset | None:
        ctx = fed_context(trainer)
        if ctx is not None:
            return ctx.shard
        loader = getattr(trainer, "train_dataloader", None)
        return getattr(loader, "dataset", None)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Read the client's classes from its training labels and hook the working module's output (nothing when
        ``alpha`` is 1)."""
        self._remove()
        if self.alpha == 1.0:
            return
        data = self._training_data(trainer)
        if data is None:
            raise ValueError("FedRSClient: no training data to read the client's classes from")
        self._present = torch.unique(dataset_labels(data))
        module: nn.Module = trainer.lightning_module  # the working module (tiers: not necessarily pl_module)
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not module.training or not isinstance(output, Tensor) or self._present is None:
            return None  # evaluation sees the plain logits
        return restrict_logits(output, self._present, self.alpha)

    def _remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._present = None, None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Remove the hook (no scaling outside local training)."""
        self._remove()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Remove the hook when training fails."""
        self._remove()

    def __repr__(self) -> str:
        return f"FedRSClient(alpha={self.alpha})"


class FedRS(FedAvg):
    """FedRS: FedAvg's server with the restricted softmax on the clients (:class:`FedRSClient`).

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=30, partition=Dirichlet(alpha=0.1),
                       strategy=FedRS(alpha=0.5))

    Args:
        alpha: the scale of the logits of the classes a client has no records of, in [0, 1] (the paper: 0.5;
            1: FedAvg exactly).
        server_lr: see :class:`~lightning_fed.strategies.FedAvg`.
        aggregator: see :class:`~lightning_fed.strategies.FedAvg`.
        server_optimizer: see :class:`~lightning_fed.strategies.FedAvg`.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        server_lr: float = 1.0,
        aggregator: Aggregator | None = None,
        server_optimizer: ServerOptimizer | None = None,
    ) -> None:
        self.alpha = check_alpha("FedRS", alpha)
        self.client = FedRSClient(self.alpha)
        super().__init__(server_lr=server_lr, aggregator=aggregator, server_optimizer=server_optimizer)

    def client_callbacks(self) -> list[Any]:
        """The restricted softmax on the clients, then the aggregator's callbacks."""
        return [self.client, *super().client_callbacks()]


__all__ = ["FedRS", "FedRSClient", "restrict_logits"]
