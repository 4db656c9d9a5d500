"""The Strategy API: the server side of a federated algorithm.

A strategy decides what each sampled client is sent (:meth:`Strategy.configure_round`), how a client
turns its local work into a reply (:meth:`Strategy.client_receive` / :meth:`Strategy.client_reply`, run on
the client), what a valid reply looks like (:meth:`Strategy.reply_spec`) and how valid replies become the
new server state (:meth:`Strategy.aggregate`). Algorithms whose client side needs hooks inside local
training (a proximal term, a distillation step) return Lightning callbacks from
:meth:`Strategy.client_callbacks`. Strategies know nothing of Fabric, files or transport.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_fed.protocol import Instruction, Payload, PayloadSpec, Reply
from lightning_fed.validation import CheckedArguments

if TYPE_CHECKING:
    from lightning_fed.strategies.aggregate import MeanFold as Fold


class Strategy(CheckedArguments):
    """Base class of server strategies. Subclasses implement every method that raises here.

    Attributes:
        has_global_model: whether :meth:`load_global` writes one global model that every client could use (not
            for strategies whose clients keep their own models or layers): personalized evaluation then also
            scores it on every client's split.
    """

    has_global_model: bool = True

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model this strategy's configuration does not fit (e.g. a layer name it does not have), before
        anything is written; raise ``ValueError`` naming the key, the value and what is allowed."""

    def personal_model(self, client_id: int, client_state: dict[str, Any], module: nn.Module,
                       train: Callable[..., int]) -> nn.Module | None:
        """Personalized evaluation (simulation): write client ``client_id``'s personal model into ``module`` (the
        client's working module, holding the global weights where there are any) and return it; ``None`` (the
        default): this strategy keeps no personal model.

        Args:
            client_id: the client.
            client_state: a copy of the client's stored state (empty for a client never sampled).
            module: the working module to load it into (restored to the global weights afterwards).
            train: ``train(module, *, epochs=1, max_steps=None, callbacks=())`` trains ``module`` on the client's
                training shard with its own ``configure_optimizers``, ``training_step`` and hooks (fine-tuning;
                batches seeded by the evaluation round and the client); returns the optimizer steps taken.
        """
        return None

    def setup(self, model: nn.Module) -> None:
        """Initialise the server state from the (freshly built) working model."""
        raise NotImplementedError

    def check_plan(self, num_clients: int, clients_per_round: int, rounds: int, sampling: str) -> None:
        """Called by ``FedLoop.__init__`` with the loop's sampling plan, before anything runs: a strategy whose
        settings depend on it (a privacy budget over the planned rounds) checks them here and raises
        ``ValueError`` naming the key. Nothing to check by default."""

    def configure_round(self, server_round: int, clients: list[int]) -> list[Instruction]:
        """One instruction per sampled client, in the order of ``clients``."""
        raise NotImplementedError

    def client_receive(self, model: nn.Module, instruction: Instruction) -> None:
        """Client side: apply the received instruction to the working model (load weights in place)."""
        raise NotImplementedError

    def client_reply(self, model: nn.Module, instruction: Instruction) -> Payload:
        """Client side: the payload to send back after local training."""
        raise NotImplementedError

    def reply_spec(self, instruction: Instruction) -> PayloadSpec:
        """The exact names, shapes and dtypes a valid reply to ``instruction`` has."""
        raise NotImplementedError

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """Fold validated replies into the server state; return scalar metrics to log."""
        raise NotImplementedError

    def begin_fold(self, server_round: int, total_examples: int) -> Fold | None:
        """Optionally fold the round's replies into the aggregate while the server receives them.

        The server calls this before decoding a round's messages when it knows the sum of their example counts
        (and nothing else needs to see the replies first); a strategy whose aggregate is a streaming weighted
        mean returns a fold (:class:`~lightning_fed.strategies.aggregate.MeanFold`) that reads each reply once,
        checking its values in the same pass, and uses it in :meth:`aggregate` when the replies it is given are
        exactly those folded. ``None`` (the default): the server validates each reply on its own and
        :meth:`aggregate` does all the work."""
        return None

    def load_global(self, model: nn.Module) -> None:
        """Write the current global model into the working model (for evaluation and checkpoints)."""
        raise NotImplementedError

    def model_changed(self, model: nn.Module) -> None:
        """The working model's structure changed on the server (e.g. pruning): re-read the global state."""
        self.setup(model)

    def client_module(self, client_id: int, default: nn.Module) -> nn.Module:
        """The working module that trains for ``client_id``: ``default`` (the loop's one working model)
        unless the algorithm gives clients other architectures (capacity tiers). A strategy returning other
        modules keeps one working module per architecture, never one per client."""
        return default

    def evaluate(self, evaluate_module: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
        """Extra evaluation (e.g. per tier), called once per evaluation the loop runs: ``evaluate_module(m)``
        runs the loop's evaluator on any module for that evaluation's stage, returning ``val_*`` names on the
        validation data or ``test_*`` names on the test data; return metrics to log under prefixed names that
        keep the stage (e.g. :func:`~lightning_fed.evaluate.stage_metrics`: ``tier0/val_acc``, ``tier0/test_acc``)."""
        return {}

    def client_callbacks(self) -> list[Callback]:
        """Callbacks this algorithm installs on every client's local training."""
        return []

    def schedule(self) -> Any:
        """The asynchronous schedule that decides which clients run when and which replies each server update
        receives (e.g. :class:`~lightning_fed.systems.asynchronous.BufferedSchedule` of ``FedBuff``); ``None`` (the
        default): synchronous rounds."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Server state to checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
