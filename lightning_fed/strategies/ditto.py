"""Ditto: a personal model per client, pulled towards the global model.

Li, Hu, Beirami & Smith, "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021,
Algorithm 1. The global model ``w`` is trained exactly as FedAvg. Each sampled client ``k`` also updates its
personal model ``v_k`` by local steps on its own objective plus a proximal pull to the global model it received::

    h_k(v; w) = F_k(v) + lam / 2 * ||v - w||^2        v <- v - lr * (grad F_k(v) + lam * (v - w))

``lam = 0`` is isolated local training (each ``v_k`` sees its own data only); a large ``lam`` keeps ``v_k`` near the
global model. Here ``F_k`` is the cross-entropy of ``module(x)`` on the client's shard (classification), the steps are
plain SGD (the paper's solver) over ``personal_epochs`` passes with ``personal_batch_size``, and ``v_k`` starts from
the model's initial weights, as every ``v_k`` does in the paper. ``v_k`` is stored in the client store
(``trainer.fed.client_state["ditto"]``) and never sent: the messages are FedAvg's. The client callback
:class:`DittoClient` trains ``v_k`` before the global model's local training, with the random state saved and
restored around it, so the global model trains bit-identically to FedAvg.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.context import fed_context
from lightning_fed.data.loaders import client_loader
from lightning_fed.protocol import Instruction, Payload
from lightning_fed.seeding import Stream, derive_seed, generator, rng_untouched, seed_rngs
from lightning_fed.strategies.aggregators import Aggregator
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.validation import need
from lightning_fed.weights import float_state, load_into

STATE_KEY = "ditto"  # the client's personal model in its store


def ditto_step(
    module: nn.Module, batch: Any, reference: list[Tensor], lam: float, optimizer: torch.optim.Optimizer
) -> float:
    """One step on ``h(v; w) = CE(module(x), y) + lam / 2 * ||v - w||^2`` for the module's trainable parameters
    ``v`` (in ``named_parameters`` order) and ``reference`` ``w`` (the same shapes); returns the cross-entropy.

    The proximal gradient ``lam * (v - w)`` is added to each parameter's gradient before ``optimizer.step()``.
    """
    x, y = batch[0], batch[1]
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(module(x), y)
    loss.backward()
    with torch.no_grad():
        for p, w in zip(params, reference):
            prox = (p - w) * lam
            if p.grad is None:
                p.grad = prox
            else:
                p.grad.add_(prox)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def train_personal(
    module: nn.Module,
    batches: Callable[[], Iterable[Any]],
    reference: Payload,
    lam: float,
    lr: float,
    epochs: int,
) -> None:
    """``epochs`` passes of :func:`ditto_step` with SGD(``lr``) over ``batches()`` (the module in train mode)."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    device = next(module.parameters()).device
    ref = [reference[n].detach().to(device) for n in names]
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)
    was_training = module.training
    module.train()
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in batches():
                ditto_step(module, [batch[0].to(device), batch[1].to(device)], ref, lam, optimizer)
    module.train(was_training)


class DittoClient(FedCallback):
    """Client side of Ditto: trains the client's personal model ``v`` against the received global ``w`` and stores it.

    Installed by :class:`Ditto`. Under a plain ``lightning.Trainer`` (no ``trainer.fed``) it does nothing.

    Args:
        strategy: the :class:`Ditto` whose ``lam``, ``personal_lr``, ``personal_epochs``, ``personal_batch_size`` and
            initial weights it uses.
    """

    def __init__(self, strategy: Ditto) -> None:
        self.strategy = strategy

    def on_client_start(self, trainer: Any, pl_module: Any, instruction: Instruction) -> None:
        """Update ``v`` (from the store, or the initial weights) on the client's shard with the pull to ``w``, store
        it, and put ``w`` back into the working model for the global model's local training."""
        ctx = fed_context(trainer)
        if ctx is None or ctx.shard is None or len(ctx.shard) == 0:
            return
        s, module, w = self.strategy, trainer.lightning_module, instruction.payload
        with rng_untouched():  # the global model's training draws the same random numbers as under FedAvg
            seed_rngs(derive_seed(s.seed, Stream.DITTO, ctx.round, ctx.client_id))  # dropout, if any
            load_into(module, ctx.client_state.get(STATE_KEY) or s.initial)
            root = (
                ctx.shard.dataset if isinstance(ctx.shard, Subset) else ctx.shard
            )  # tensor datasets: fast batches
            template = DataLoader(root, batch_size=s.personal_batch_size)
            g = generator(s.seed, Stream.DITTO, ctx.round, ctx.client_id)
            train_personal(
                module,
                lambda: client_loader(template, ctx.shard, g),
                w,
                s.lam,
                s.personal_lr,
                s.personal_epochs,
            )
            ctx.client_state[STATE_KEY] = {
                k: v.detach().cpu().clone() for k, v in float_state(module).items()
            }
        load_into(module, w)


class Ditto(FedAvg):
    """FedAvg for the global model plus, on every sampled client, a personal model with a proximal pull to it.

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=50, strategy=Ditto(lam=0.1),
                       personal_eval=PersonalEval())

    Args:
        lam: the proximal weight ``lam`` (>= 0; 0: isolated local training of the personal models).
        personal_lr: SGD learning rate of the personal model (> 0).
        personal_epochs: passes over the client's shard per round for the personal model (>= 1).
        personal_batch_size: batch size of those passes (>= 1).
        seed: seed of the personal models' batches (with round and client).
        server_lr: step size on the averaged delta of the global model (FedAvg's).
        aggregator: averages the global model's deltas (``None``: FedAvg's example-weighted mean).
        server_optimizer: applies the averaged delta (``None``: ``ServerSGD(lr=server_lr)``).
    """

    def __init__(
        self,
        *,
        lam: float = 0.1,
        personal_lr: float = 0.05,
        personal_epochs: int = 1,
        personal_batch_size: int = 16,
        seed: int = 0,
        server_lr: float = 1.0,
        aggregator: Aggregator | None = None,
        server_optimizer: ServerOptimizer | None = None,
    ) -> None:
        need(
            "Ditto",
            isinstance(lam, int | float) and not isinstance(lam, bool) and lam >= 0,
            "lam",
            lam,
            ">= 0",
        )
        need("Ditto", personal_lr > 0, "personal_lr", personal_lr, "> 0")
        need(
            "Ditto",
            isinstance(personal_epochs, int) and personal_epochs >= 1,
            "personal_epochs",
            personal_epochs,
            "an integer >= 1",
        )
        need(
            "Ditto",
            isinstance(personal_batch_size, int) and personal_batch_size >= 1,
            "personal_batch_size",
            personal_batch_size,
            "an integer >= 1",
        )
        super().__init__(server_lr=server_lr, aggregator=aggregator, server_optimizer=server_optimizer)
        self.lam, self.personal_lr, self.personal_epochs = float(lam), personal_lr, personal_epochs
        self.personal_batch_size, self.seed = personal_batch_size, seed
        self.initial: Payload = {}
        self.client = DittoClient(self)

    def setup(self, model: nn.Module) -> None:
        """FedAvg's buffer; the model's initial weights, where every personal model starts (kept across a
        structural change only while they still fit)."""
        super().setup(model)
        state = float_state(model)
        if not self.initial or any(
            k not in state or state[k].shape != v.shape for k, v in self.initial.items()
        ):
            self.initial = {k: v.detach().cpu().clone() for k, v in state.items()}

    def client_callbacks(self) -> list[Any]:
        """:class:`DittoClient`."""
        return [self.client]

    def personal_model(
        self,
        client_id: int,
        client_state: dict[str, Any],
        module: nn.Module,
        train_batches: Callable[[], Any],
    ) -> nn.Module:
        """The client's personal model ``v`` (the initial weights for a client never sampled)."""
        load_into(module, client_state.get(STATE_KEY) or self.initial)
        return module

    def state_dict(self) -> dict[str, Any]:
        """FedAvg's state and the personal models' initial weights."""
        return {**super().state_dict(), "initial": dict(self.initial)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.initial = dict(state["initial"])


__all__ = ["Ditto", "DittoClient", "ditto_step", "train_personal"]
