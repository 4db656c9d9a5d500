"""FedPer: federated base layers, personal layers that never leave the client.

Arivazhagan, Aggarwal, Singh & Choudhary, "Federated Learning with Personalization Layers", arXiv:1912.00818, 2019.
The model is split into base layers, averaged by FedAvg, and personalization layers (typically the classifier head),
which every client trains and keeps. Here the personal layers are named in the recipe (``personal_layers``: module
or state-entry names, e.g. ``["head"]``); every float state entry under such a name stays in the client store
(``trainer.fed.client_state["fedper"]``), loaded into the working model by the client callback
:class:`PersonalLayers` when the client starts and saved after its reply. Neither the instruction nor the reply
contains them, so ``bytes_down`` / ``bytes_up`` count the base layers only.

With ``warmup_rounds=0`` (the paper's algorithm) a client starts its personal layers from the model's initial
weights (the same model every client builds from the recipe's seed), which the strategy keeps in its state. With
``warmup_rounds=k`` the first ``k`` rounds are FedAvg on the whole model; from round ``k`` on, the personal layers
are personal and start from the global model's at that round: every instruction then also carries them (the
instruction's ``config["fedper_init"]`` names them), and a client without personal layers of its own starts from
them; they are never sent back (``bytes_down`` counts them, ``bytes_up`` does not). Personal layers trained from
scratch on one client's data see a few hundred examples; started from the federated ones they only adapt them.

There is no global model to evaluate on its own (its head would be nobody's): personalized evaluation
(:class:`~lightning_fed.personal.PersonalEval`) scores each client's base layers + own head, and the loop's
``val_acc`` / ``test_acc`` use the initial head (during a warm-up: the global model's).
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
from lightning_fed.weights import delta, float_state, load_into

STATE_KEY = "fedper"  # the client's personal layers in its store
INIT_KEY = (
    "fedper_init"  # instruction config: the names of the personal entries the payload carries as a start
)


def is_personal(name: str, layers: list[str]) -> bool:
    """Whether state entry ``name`` lies under one of ``layers`` (equal, or a dotted child: ``head`` → ``head.bias``)."""
    return any(name == p or name.startswith(p + ".") for p in layers)


class PersonalLayers(FedCallback):
    """Client side of FedPer: loads the client's personal layers before local training and stores them after.

    Installed by :class:`FedPer`; under a plain ``lightning.Trainer`` (no ``trainer.fed``) it does nothing. An
    instruction whose payload holds personal entries without naming them in ``config["fedper_init"]`` is a warm-up
    round (the whole model is federated): nothing is loaded or stored then.

    Args:
        initial: the personal layers' initial weights (for a client never sampled, without a warm-up).
        layers: the personal layer names.
    """

    def __init__(self, initial: Callable[[], Payload], layers: list[str]) -> None:
        self.initial = initial
        self.layers = list(layers)
        self._personal = False

    def on_client_start(self, trainer: Any, pl_module: Any, instruction: Instruction) -> None:
        """The client's own personal layers (or, without any, the received start or the initial ones) into the
        working model."""
        ctx = fed_context(trainer)
        if ctx is None:
            return
        start = instruction.config.get(INIT_KEY)
        self._personal = bool(start) or not any(is_personal(k, self.layers) for k in instruction.payload)
        if not self._personal:  # warm-up: the received personal layers are the global ones, trained as FedAvg
            return
        own = ctx.client_state.get(STATE_KEY)
        if own:
            load_into(trainer.lightning_module, own)
        elif not start:  # with a start, client_receive has loaded it already
            load_into(trainer.lightning_module, self.initial())

    def on_client_end(self, trainer: Any, pl_module: Any, reply: Reply) -> None:
        """Save the trained personal layers into the client's state (they are not in the reply)."""
        ctx = fed_context(trainer)
        if ctx is not None and self._personal:
            state = float_state(trainer.lightning_module)
            ctx.client_state[STATE_KEY] = {
                k: v.detach().cpu().clone() for k, v in state.items() if is_personal(k, self.layers)
            }


class FedPer(FedAvg):
    """FedAvg on the base layers; the layers named in ``personal_layers`` stay on each client.

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=50, strategy=FedPer(personal_layers=["head"]),
                       personal_eval=PersonalEval())

    Args:
        personal_layers: module or state-entry names whose entries stay personal (e.g. ``["head"]``, or
            ``["conv3", "head"]``); each must name an entry of the model, and at least one entry must remain shared.
        warmup_rounds: rounds of FedAvg on the whole model before the layers become personal, starting from the
            global ones (0: the paper's FedPer, personal layers from the initial weights).
        server_lr: step size on the averaged base-layer delta (FedAvg's).
        aggregator: averages the base-layer deltas (``None``: FedAvg's example-weighted mean).
        server_optimizer: applies the averaged delta (``None``: ``ServerSGD(lr=server_lr)``).
    """

    has_global_model = False

    def __init__(
        self,
        *,
        personal_layers: list[str],
        warmup_rounds: int = 0,
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
        need(
            "FedPer",
            warmup_rounds >= 0,
            "warmup_rounds",
            warmup_rounds,
            "an integer >= 0",
        )
        super().__init__(server_lr=server_lr, aggregator=aggregator, server_optimizer=server_optimizer)
        self.personal_layers = list(personal_layers)
        self.warmup_rounds = warmup_rounds
        self._split = warmup_rounds == 0  # whether the personal layers are personal yet
        self._init_personal: Payload = {}
        self.client = PersonalLayers(lambda: self._init_personal, self.personal_layers)

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
        """The base layers: every float state entry not under ``personal_layers`` (during a warm-up: every one)."""
        state = float_state(model)
        return {k: v for k, v in state.items() if not (self._split and is_personal(k, self.personal_layers))}

    def setup(self, model: nn.Module) -> None:
        """A new run: FedAvg's buffer (the whole model during a warm-up, else the base layers); the personal layers'
        initial weights for new clients."""
        self._split = self.warmup_rounds == 0
        self.model_changed(model)

    def model_changed(self, model: nn.Module) -> None:
        """Re-read the model's federated weights (after a structural change), keeping the warm-up's progress."""
        self.check_model(model)
        super().setup(model)
        if self._split and (not self._init_personal or model_changed_shapes(self._init_personal, model)):
            self._init_personal = {
                k: v.detach().cpu().clone()
                for k, v in float_state(model).items()
                if is_personal(k, self.personal_layers)
            }

    def _end_warmup(self) -> None:
        """The global personal layers become every client's start; the buffer keeps the base layers only (the
        server optimizer restarts on that layout)."""
        glob = self.global_payload()
        self._init_personal = {
            k: v.detach().clone() for k, v in glob.items() if is_personal(k, self.personal_layers)
        }
        self._split = True
        self.setup_state({k: v for k, v in glob.items() if not is_personal(k, self.personal_layers)})

    def configure_round(self, server_round: int, clients: list[int]) -> list[Instruction]:
        """FedAvg's instructions (the base layers); after a warm-up also the personal layers' start, named in
        ``config["fedper_init"]``."""
        if not self._split and server_round >= self.warmup_rounds:
            self._end_warmup()
        instructions = super().configure_round(server_round, clients)
        if not (self._split and self.warmup_rounds):
            return instructions
        payload = {**instructions[0].payload, **self._init_personal} if instructions else {}
        names = sorted(self._init_personal)
        return [Instruction(i.client_id, payload, {**i.config, INIT_KEY: names}) for i in instructions]

    def client_reply(self, model: nn.Module, instruction: Instruction) -> Payload:
        """The base layers' delta (never the personal layers, even when the instruction carried their start)."""
        start = set(instruction.config.get(INIT_KEY) or ())
        return delta(model, {k: v for k, v in instruction.payload.items() if k not in start})

    def client_callbacks(self) -> list[Any]:
        """:class:`PersonalLayers`."""
        return [self.client]

    def load_global(self, model: nn.Module) -> None:
        """The global base layers and the initial personal layers (a deterministic stand-in: no client's head);
        during a warm-up the whole global model."""
        super().load_global(model)
        if self._split:
            load_into(model, self._init_personal)

    def personal_model(
        self,
        client_id: int,
        client_state: dict[str, Any],
        module: nn.Module,
        train: Callable[..., int],
    ) -> nn.Module:
        """The global base layers (already in ``module``) with the client's own personal layers (during a warm-up:
        the global model)."""
        super().load_global(module)
        if self._split:
            load_into(module, client_state.get(STATE_KEY) or self._init_personal)
        return module

    def state_dict(self) -> dict[str, Any]:
        """FedAvg's state, the personal layers' initial weights and whether the warm-up is over."""
        return {**super().state_dict(), "init_personal": dict(self._init_personal), "split": self._split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`setup`: a checkpoint after the warm-up rebuilds the buffer on
        the base layers first)."""
        if state.get("split", True) and not self._split:
            self._split = True
            glob = self.global_payload()
            self.setup_state({k: v for k, v in glob.items() if not is_personal(k, self.personal_layers)})
        super().load_state_dict(state)
        self._init_personal = dict(state["init_personal"])


def model_changed_shapes(payload: Payload, model: nn.Module) -> bool:
    """Whether ``payload``'s entries no longer fit ``model`` (after pruning): missing, or another shape."""
    state = model.state_dict()
    return any(k not in state or state[k].shape != v.shape for k, v in payload.items())


__all__ = ["FedPer", "PersonalLayers", "is_personal"]
