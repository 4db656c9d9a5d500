"""FedPer: federated base layers, personal layers that never leave the client.

Arivazhagan, Aggarwal, Singh & Choudhary, "Federated Learning with Personalization Layers", arXiv:1912.00818, 2019.
The model is split into base layers, averaged by FedAvg, and personalization layers (typically the classifier head),
which every client trains and keeps. Here the personal layers are named in the recipe (``personal_layers``: module
or state-entry names, e.g. ``["head"]``); every float state entry under such a name stays in the client store
(``trainer.fed.client_state["fedper"]``), loaded into the working model by the client callback
:class:`PersonalLayers` when the client starts and saved after its reply. Neither the instruction nor the reply
contains them, so ``bytes_down`` / ``bytes_up`` count the base layers only.

A client never sampled starts its personal layers from the model's initial weights (the same model every client
builds from the recipe's seed), which the strategy keeps in its state. There is no global model to evaluate on its
own (its head would be nobody's): personalized evaluation (:class:`~lightning_fed.personal.PersonalEval`) scores
each client's base layers + own head, and the loop's ``val_acc`` / ``test_acc`` use the initial head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.context import fed_context
from lightning_fed.protocol import Instruction, Payload, Reply
from lightning_fed.strategies.aggregators import Aggregator
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.validation import need
from lightning_fed.weights import float_state, load_into

STATE_KEY = "fedper"  # the client's personal layers in its store


def is_personal(name: str, layers: list[str]) -> bool:
    """Whether state entry ``name`` lies under one of ``layers`` (equal, or a dotted child: ``head`` → ``head.bias``)."""
    return any(name == p or name.startswith(p + ".") for p in layers)


class PersonalLayers(FedCallback):
    """Client side of FedPer: loads the client's personal layers before local training and stores them after.

    Installed by :class:`FedPer`; under a plain ``lightning.Trainer`` (no ``trainer.fed``) it does nothing.

    Args:
        initial: the personal layers' initial weights (for a client never sampled).
    """

    def __init__(self, initial: Callable[[], Payload]) -> None:
        self.initial = initial

    def on_client_start(self, trainer: Any, pl_module: Any, instruction: Instruction) -> None:
        """The client's own personal layers (or the initial ones) into the working model."""
        ctx = fed_context(trainer)
        if ctx is not None:
            load_into(trainer.lightning_module, ctx.client_state.get(STATE_KEY) or self.initial())

    def on_client_end(self, trainer: Any, pl_module: Any, reply: Reply) -> None:
        """Save the trained personal layers into the client's state (they are not in the reply)."""
        ctx = fed_context(trainer)
        if ctx is not None:
            state = float_state(trainer.lightning_module)
            ctx.client_state[STATE_KEY] = {k: state[k].detach().cpu().clone() for k in self.initial()}


class FedPer(FedAvg):
    """FedAvg on the base layers; the layers named in ``personal_layers`` stay on each client.

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=50, strategy=FedPer(personal_layers=["head"]),
                       personal_eval=PersonalEval())

    Args:
        personal_layers: module or state-entry names whose entries stay personal (e.g. ``["head"]``, or
            ``["conv3", "head"]``); each must name an entry of the model, and at least one entry must remain shared.
        server_lr: step size on the averaged base-layer delta (FedAvg's).
        aggregator: averages the base-layer deltas (``None``: FedAvg's example-weighted mean).
        server_optimizer: applies the averaged delta (``None``: ``ServerSGD(lr=server_lr)``).
    """

    has_global_model = False

    def __init__(
        self,
        *,
        personal_layers: list[str],
        server_lr: float = 1.0,
        aggregator: Aggregator | None = None,
        server_optimizer: ServerOptimizer | None = None,
    ) -> None:
        need(
            "FedPer",
            isinstance(personal_layers, (list, tuple))
            and len(personal_layers) > 0
            and all(isinstance(p, str) and p.strip(".") == p and p for p in personal_layers),
            "personal_layers",
            personal_layers,
            "a non-empty list of module names (e.g. ['head'])",
        )
        super().__init__(server_lr=server_lr, aggregator=aggregator, server_optimizer=server_optimizer)
        self.personal_layers = list(personal_layers)
        self._init_personal: Payload = {}
        self.client = PersonalLayers(lambda: self._init_personal)

    def check_model(self, model: nn.Module) -> None:
        """Every name in ``personal_layers`` must name state entries of ``model``, and some entry must be shared.

        Raises:
            ValueError: naming ``personal_layers``, the unknown names and the model's layer names.
        """
        names = list(float_state(model))
        unknown = [p for p in self.personal_layers if not any(is_personal(n, [p]) for n in names)]
        modules = sorted({n.rsplit(".", 1)[0] for n in names})
        need(
            "FedPer",
            not unknown,
            "personal_layers",
            self.personal_layers,
            f"names of {type(model).__name__}'s layers; {unknown} name none (its layers: {modules})",
        )
        need(
            "FedPer",
            not all(is_personal(n, self.personal_layers) for n in names),
            "personal_layers",
            self.personal_layers,
            "a part of the model: with every layer personal nothing is federated",
        )

    def federated_state(self, model: nn.Module) -> Payload:
        """The base layers: every float state entry not under ``personal_layers``."""
        return {k: v for k, v in float_state(model).items() if not is_personal(k, self.personal_layers)}

    def setup(self, model: nn.Module) -> None:
        """FedAvg's buffer for the base layers; the personal layers' initial weights for new clients."""
        self.check_model(model)
        super().setup(model)
        if not self._init_personal or model_changed_shapes(self._init_personal, model):
            self._init_personal = {
                k: v.detach().cpu().clone()
                for k, v in float_state(model).items()
                if is_personal(k, self.personal_layers)
            }

    def client_callbacks(self) -> list[Any]:
        """:class:`PersonalLayers`."""
        return [self.client]

    def load_global(self, model: nn.Module) -> None:
        """The global base layers and the initial personal layers (a deterministic stand-in: no client's head)."""
        super().load_global(model)
        load_into(model, self._init_personal)

    def personal_model(
        self,
        client_id: int,
        client_state: dict[str, Any],
        module: nn.Module,
        train: Callable[..., int],
    ) -> nn.Module:
        """The global base layers (already in ``module``) with the client's own personal layers."""
        super().load_global(module)
        load_into(module, client_state.get(STATE_KEY) or self._init_personal)
        return module

    def state_dict(self) -> dict[str, Any]:
        """FedAvg's state and the personal layers' initial weights."""
        return {**super().state_dict(), "init_personal": dict(self._init_personal)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self._init_personal = dict(state["init_personal"])


def model_changed_shapes(payload: Payload, model: nn.Module) -> bool:
    """Whether ``payload``'s entries no longer fit ``model`` (after pruning): missing, or another shape."""
    state = model.state_dict()
    return any(k not in state or state[k].shape != v.shape for k, v in payload.items())


__all__ = ["FedPer", "PersonalLayers", "is_personal"]
