"""Ditto: a personal model per client, pulled towards the global model.

Li, Hu, Beirami & Smith, "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021,
Algorithm 1. The global model ``w`` is trained exactly as FedAvg. Each sampled client ``k`` also updates its
personal model ``v_k`` by local steps on its own objective plus a proximal pull to the global model it received::

    h_k(v; w) = F_k(v) + lam / 2 * ||v - w||^2        gradient: grad F_k(v) + lam * (v - w)

``lam = 0`` is isolated local training (each ``v_k`` sees its own data only); a large ``lam`` keeps ``v_k`` near the
global model. ``F_k`` is the module's own objective: ``v_k`` trains as local training trains, with the module's
``configure_optimizers`` (a fresh optimizer each round), ``training_step`` and hooks, the loop's gradient clipping
and accumulation and the data module's batch size, for ``personal_epochs`` passes over the client's shard
(``FedContext.train``); the pull is added to the gradients by the callback :class:`DittoPull` before each optimizer
step, so ``training_step`` is unchanged. The loop's callbacks do not run on ``v_k`` (they act on the federated update;
a per-round learning-rate schedule such as ``RoundLRDecay`` does not apply to it; ``lr_scale`` scales the rates
``configure_optimizers`` sets). ``v_k`` is stored in the client store (``trainer.fed.client_state["ditto"]``) and
never sent: the messages are FedAvg's.

Where ``v_k`` starts (``personal_init``): ``"global"`` (the default), the global model the client receives the first
time it is sampled, and a client never sampled is judged with the global model; ``"initial"``, the model's initial
weights, as every ``v_k`` in Algorithm 1 (``w^0``), and a client never sampled keeps them. The two agree under full
participation; under partial participation a client first sampled in round ``t`` would otherwise start ``t`` rounds
of federated training behind, with only its own participations to catch up (100 clients, 10 per round: about one
participation in ten rounds). Isolated local training (``lam=0``) needs ``"initial"``: it must not see the global
model. The client callback :class:`DittoClient` trains ``v_k`` before the global model's local training, with the
random state saved and restored around it, so the global model trains bit-identically to FedAvg.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.context import fed_context
from lightning_fed.protocol import Instruction, Payload
from lightning_fed.seeding import Stream, derive_seed, generator, rng_untouched, seed_rngs
from lightning_fed.strategies.aggregators import Aggregator
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.fedavg_ft import ScaleLR
from lightning_fed.strategies.fedprox import FedProxClient
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.validation import need
from lightning_fed.weights import float_state, load_into

STATE_KEY = "ditto"  # the client's personal model in its store
PERSONAL_INITS = ("global", "initial")


class DittoPull(FedProxClient):
    """Ditto's proximal pull: adds ``lam * (v - w)`` to every trainable parameter's gradient before each optimizer
    step, ``w`` being a fixed reference (the received global model), not the weights training started from.

    Example::

        trainer = L.Trainer(max_epochs=1, callbacks=[DittoPull(global_weights, lam=0.1)])

    Args:
        reference: ``w`` by state-entry name (parameters without an entry get no pull).
        lam: the proximal weight, >= 0.
    """

    def __init__(self, reference: Payload, lam: float) -> None:
        super().__init__(mu=lam)
        self.reference = reference

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """``w`` for every trainable parameter of the working module, on its device and in its dtype."""
        self._anchor = {}
        if self.mu == 0:
            return
        module = trainer.lightning_module
        self._anchor = {
            id(p): self.reference[n].detach().to(p.device, p.dtype)
            for n, p in module.named_parameters()
            if p.requires_grad and n in self.reference
        }

    def __repr__(self) -> str:
        return f"DittoPull(lam={self.mu})"


class DittoClient(FedCallback):
    """Client side of Ditto: trains the client's personal model ``v`` against the received global ``w`` and stores it.

    Installed by :class:`Ditto`. Under a plain ``lightning.Trainer`` (no ``trainer.fed``) it does nothing.

    Args:
        strategy: the :class:`Ditto` whose ``lam``, ``personal_epochs``, ``seed`` and initial weights it uses.
    """

    def __init__(self, strategy: Ditto) -> None:
        self.strategy = strategy

    def on_client_start(self, trainer: Any, pl_module: Any, instruction: Instruction) -> None:
        """Update ``v`` (from the store, or where :class:`Ditto`'s ``personal_init`` says) on the client's shard with
        the pull to ``w``, store it, and put ``w`` back into the working model for the global model's local
        training."""
        ctx = fed_context(trainer)
        if ctx is None or ctx.shard is None or len(ctx.shard) == 0:
            return
        s, module, w = self.strategy, trainer.lightning_module, instruction.payload
        with rng_untouched():  # the global model's training draws the same random numbers as under FedAvg
            seed_rngs(derive_seed(s.seed, Stream.DITTO, ctx.round, ctx.client_id))  # dropout, if any
            load_into(module, ctx.client_state.get(STATE_KEY) or s.start(w))
            g = generator(s.seed, Stream.DITTO, ctx.round, ctx.client_id)
            scale = [ScaleLR(s.lr_scale)] if s.lr_scale != 1.0 else []
            ctx.train(module, ctx.shard, g, epochs=s.personal_epochs, callbacks=[DittoPull(w, s.lam), *scale])
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
        personal_epochs: passes over the client's shard per round for the personal model (>= 1), with the
            module's ``configure_optimizers`` and ``training_step`` and the data module's batch size.
        lr_scale: multiplies the learning rates ``configure_optimizers`` sets, for the personal model only (> 0;
            :class:`~lightning_fed.strategies.fedavg_ft.ScaleLR`).
        personal_init: where a personal model starts: ``"global"``, the global model received at the client's first
            participation (never sampled: the global model); ``"initial"``, the model's initial weights (the paper's
            ``w^0``; isolated training).
        seed: seed of the personal models' batches (with round and client).
        server_lr: step size on the averaged delta of the global model (FedAvg's).
        aggregator: averages the global model's deltas (``None``: FedAvg's example-weighted mean).
        server_optimizer: applies the averaged delta (``None``: ``ServerSGD(lr=server_lr)``).
    """

    def __init__(
        self,
        *,
        lam: float = 0.1,
        personal_epochs: int = 1,
        lr_scale: float = 1.0,
        personal_init: str = "global",
        seed: int = 0,
        server_lr: float = 1.0,
        aggregator: Aggregator | None = None,
        server_optimizer: ServerOptimizer | None = None,
    ) -> None:
        need(
            "Ditto",
            lam >= 0,
            "lam",
            lam,
            ">= 0",
        )
        need(
            "Ditto",
            personal_epochs >= 1,
            "personal_epochs",
            personal_epochs,
            "an integer >= 1",
        )
        need(
            "Ditto",
            lr_scale > 0,
            "lr_scale",
            lr_scale,
            "> 0",
        )
        need(
            "Ditto",
            personal_init in PERSONAL_INITS,
            "personal_init",
            personal_init,
            f"one of {PERSONAL_INITS}",
        )
        super().__init__(server_lr=server_lr, aggregator=aggregator, server_optimizer=server_optimizer)
        self.personal_init = personal_init
        self.lam, self.personal_epochs, self.seed = float(lam), personal_epochs, seed
        self.lr_scale = float(lr_scale)
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

    def start(self, received: Payload) -> Payload:
        """Where a personal model with nothing stored starts: ``received`` (the global model the client holds) or
        the initial weights, as ``personal_init`` says."""
        return received if self.personal_init == "global" else self.initial

    def client_callbacks(self) -> list[Any]:
        """:class:`DittoClient`."""
        return [self.client]

    def personal_model(
        self,
        client_id: int,
        client_state: dict[str, Any],
        module: nn.Module,
        train: Callable[..., int],
    ) -> nn.Module:
        """The client's personal model ``v``; for a client never sampled, ``module`` as given (the global model)
        or the initial weights, as ``personal_init`` says."""
        stored = client_state.get(STATE_KEY)
        if stored or self.personal_init == "initial":
            load_into(module, stored or self.initial)
        return module

    def state_dict(self) -> dict[str, Any]:
        """FedAvg's state and the personal models' initial weights."""
        return {**super().state_dict(), "initial": dict(self.initial)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.initial = dict(state["initial"])


__all__ = ["Ditto", "DittoClient", "DittoPull"]
