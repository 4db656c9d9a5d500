"""Heterogeneous clients: capacity tiers of architectures, and the plumbing strategies share for them.

A tier is one architecture. Tier 0 is always the loop's own model (the recipe's ``model:``); a
:class:`ModelTiers` adds more architectures and assigns every client to one tier by a seeded rule or an
explicit map. The loop keeps one working module per tier (never one per client): a strategy's
``client_module`` returns the tier's module and the loop moves it to the device and attaches it once.

Algorithms whose clients keep their own models (FedMD, FedGKT, decentralized distillation) install
:class:`ClientModels`: it loads the client's weights from ``trainer.client_state`` into its tier's module
when the client becomes active and saves them after its reply, so only the active client's weights are in
memory. At evaluation rounds it also evaluates up to ``eval_clients`` stored client models per tier and
logs the mean (``tier<t>/val_acc`` at validation, ``tier<t>/test_acc`` at the test).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.context import fed_context
from lightning_fed.evaluate import stage_metrics
from lightning_fed.flat import FlatSpec
from lightning_fed.protocol import Payload
from lightning_fed.strategies.aggregate import example_weights
from lightning_fed.strategies.aggregators import Aggregator, WeightedMean
from lightning_fed.strategies.base import Strategy
from lightning_fed.strategies.server_opt import ServerOptimizer, ServerSGD
from lightning_fed.validation import CheckedArguments
from lightning_fed.weights import float_state, load_into

log = logging.getLogger("lightning_fed")

ASSIGNMENTS = ("round_robin", "random")


def _hash_int(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def architecture_of(module: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The names and shapes of a module's float state: two modules share an architecture iff these match."""
    return tuple((k, tuple(v.shape)) for k, v in float_state(module).items())


class ModelTiers(CheckedArguments):
    """Client architectures by capacity tier; tier 0 is the loop's model, ``models`` are tiers 1, 2, ….

    Example::

        tiers = ModelTiers(models=[MNIST1DCNN(channels=16), MNIST1DCNN(channels=32)])   # 3 tiers
        strategy = FedDF(tiers=tiers, public=PublicData(seed=7))
        # client i trains tier i % 3: 0 -> the loop's MNIST1DCNN(channels=8), 1 -> 16 channels, 2 -> 32

    Args:
        models: the extra architectures (tiers 1..T-1); each is one working module shared by its clients.
        assignment: ``"round_robin"`` (client ``i`` gets tier ``i % T``, as HtFLlib) or ``"random"``
            (a seeded uniform draw per client).
        client_map: explicit ``{client_id: tier}`` entries that override the rule.
        seed: seed of the ``"random"`` rule.
        names: one name per tier, tier 0 first (``None``: ``tier0``, ``tier1``, ...); teacher-assistant chains
            (``assistant_chain``) name tiers by these.
    """

    def __init__(self, models: list[L.LightningModule] | None = None, assignment: str = "round_robin",
                 client_map: dict[int, int] | None = None, seed: int = 0, names: list[str] | None = None) -> None:
        self.models = list(models or [])
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"ModelTiers: assignment={assignment!r} is not allowed; assignment must be one of {ASSIGNMENTS}")
        bad = [type(m).__name__ for m in self.models if not isinstance(m, nn.Module)]
        if bad:
            raise ValueError(f"ModelTiers: models must be LightningModules, got {bad[0]}")
        self.assignment = assignment
        self.client_map = {int(k): int(v) for k, v in (client_map or {}).items()}
        for cid, tier in self.client_map.items():
            if not 0 <= tier < self.num_tiers or cid < 0:
                raise ValueError(
                    f"ModelTiers: client_map={{{cid}: {tier}}} is not allowed; client ids must be >= 0 and tiers "
                    f"between 0 and {self.num_tiers - 1}"
                )
        self.seed = seed
        self.names = [f"tier{t}" for t in range(self.num_tiers)] if names is None else [str(n) for n in names]
        if len(self.names) != self.num_tiers or len(set(self.names)) != len(self.names):
            raise ValueError(f"ModelTiers: names={names} is not allowed; give {self.num_tiers} distinct names, "
                             "tier 0 (the loop's model) first")

    @property
    def num_tiers(self) -> int:
        """Number of tiers, the loop's model included."""
        return 1 + len(self.models)

    def tier_of(self, client_id: int) -> int:
        """The tier of ``client_id``."""
        if client_id in self.client_map:
            return self.client_map[client_id]
        if self.assignment == "random":
            return _hash_int(self.seed, client_id) % self.num_tiers
        return client_id % self.num_tiers

    def module(self, tier: int, default: nn.Module) -> nn.Module:
        """The working module of ``tier`` (``default``, the loop's model, for tier 0)."""
        return default if tier == 0 else self.models[tier - 1]

    def clients_of(self, tier: int, num_clients: int) -> list[int]:
        """The clients among ``range(num_clients)`` that belong to ``tier``."""
        return [c for c in range(num_clients) if self.tier_of(c) == tier]


def num_tiers(tiers: ModelTiers | None) -> int:
    """Tiers of an optional :class:`ModelTiers` (1 when there are none)."""
    return 1 if tiers is None else tiers.num_tiers


def tier_names(tiers: ModelTiers | None) -> list[str]:
    """Names of the tiers of optional tiers (``["tier0"]`` when there are none)."""
    return ["tier0"] if tiers is None else list(tiers.names)


def tier_of(tiers: ModelTiers | None, client_id: int) -> int:
    """Tier of a client under optional tiers (0 when there are none)."""
    return 0 if tiers is None else tiers.tier_of(client_id)


def tier_module(tiers: ModelTiers | None, tier: int, default: nn.Module) -> nn.Module:
    """Working module of ``tier`` under optional tiers."""
    return default if tiers is None else tiers.module(tier, default)


def require_homogeneous(tiers: ModelTiers | None, owner: str) -> None:
    """Raise ``ValueError`` if ``tiers`` adds any architecture: for strategies that average whole models."""
    if tiers is not None and tiers.models:
        raise ValueError(
            f"{owner}: tiers with {tiers.num_tiers} architectures are not allowed; {owner} averages whole models "
            f"and cannot aggregate across architectures. Use FedDF, FedMD, FedGKT or DecentralizedDistillation for "
            f"heterogeneous clients, or leave tiers unset"
        )


class TierAverage:
    """FedAvg state of one architecture: the global weights in a flat buffer and the averaging step.

    Example::

        avg = TierAverage(model)
        avg.average([delta_a, delta_b], [100, 50])    # global += weighted mean delta
        load_into(model, avg.payload())

    Args:
        model: the architecture's module; its float weights are the initial global weights.
        aggregator: the rule applied to the deltas and example shares (``None``: :class:`WeightedMean`).
        server_optimizer: how the aggregate is applied to the global weights (``None``: ``ServerSGD(lr=1)``);
            it is set up for this tier's buffer, so give every tier its own instance (see
            :func:`tier_optimizers`).
    """

    def __init__(self, model: nn.Module, aggregator: Aggregator | None = None,
                 server_optimizer: ServerOptimizer | None = None) -> None:
        state = float_state(model)
        self.spec = FlatSpec.from_payload(state)
        self.flat = self.spec.flatten({k: v.detach().float().cpu() for k, v in state.items()})
        self._acc = self.spec.empty()
        self._tmp = self.spec.empty()
        self.aggregator = aggregator if aggregator is not None else WeightedMean()
        self.server_optimizer = server_optimizer if server_optimizer is not None else ServerSGD()
        self.server_optimizer.setup(self.flat)

    def payload(self) -> Payload:
        """The global weights as views of the flat buffer."""
        return self.spec.unflatten(self.flat)

    def average(self, deltas: list[Payload], num_examples: list[int]) -> Tensor:
        """Aggregate ``deltas`` by their example shares and step the global weights with the server optimizer
        (by default ``global += weighted mean delta``); return the aggregated update."""
        update = self.aggregator.aggregate_payloads(self._acc, self.spec, deltas, example_weights(num_examples),
                                                    self._tmp)
        self.server_optimizer.step(self.flat, update)
        last = getattr(self.aggregator, "last", None)  # a robust rule's record: positions in ``deltas``
        if last is not None:
            log.info("%r on %d replies took %.4f s; dropped positions %s, clipped positions %s", self.aggregator,
                     len(deltas), last.seconds, last.dropped, last.clipped)
        return update

    def read_from(self, model: nn.Module) -> None:
        """Overwrite the global weights with ``model``'s (after server-side training)."""
        self.flat.copy_(self.spec.flatten({k: v.detach().float().cpu() for k, v in float_state(model).items()}))


def tier_optimizers(server_optimizer: ServerOptimizer | None, count: int) -> list[ServerOptimizer | None]:
    """One independent copy of ``server_optimizer`` per tier (its state is sized to one tier's weights), or
    ``count`` times ``None`` (each tier then gets the default plain step)."""
    if server_optimizer is None:
        return [None] * count
    return [copy.deepcopy(server_optimizer) for _ in range(count)]


class LogitEnsemble(L.LightningModule):
    """Evaluation-only module whose logits are the mean of its members' logits (a server ensemble).

    Example::

        ens = LogitEnsemble([small, medium, large])
        metrics = evaluate_module(ens)
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        """Mean logits of the members."""
        return torch.stack([m(x) for m in self.members]).mean(0)


class ClientModels(FedCallback):
    """Per-client model weights for algorithms where every client keeps its own model.

    On ``on_client_start`` the active client's weights (``trainer.client_state["model"]``, or its tier's
    initial weights for a client never seen) are loaded into the tier's working module; on
    ``on_client_end`` they are saved back. At evaluation rounds, up to ``eval_clients`` stored client models
    per tier (lowest ids first) are evaluated and their mean accuracy is logged as ``tier<t>/val_acc`` on the
    validation data and ``tier<t>/test_acc`` on the test data at the rounds each is evaluated (and
    ``clients/val_acc`` / ``clients/test_acc`` over all of them; docs/evaluation.md). Under a plain ``lightning.Trainer``
    it does nothing.

    Example::

        cb = ClientModels(initial=lambda tier: init_states[tier], tiers=tiers, eval_clients=5)

    Args:
        initial: returns the initial weights of a tier (for clients never seen).
        tiers: the tiers (``None``: one tier, the loop's model).
        eval_clients: stored client models evaluated per tier at evaluation rounds (0 disables).
        extra_eval: optional ``(module, tier, evaluate_module) -> metrics`` run for every evaluated client
            model (e.g. FedGKT's server model on top of the client's extractor); each name is logged as the
            mean over all evaluated clients and as ``tier<t>/<name with / replaced by _>`` per tier.
    """

    state_key_name = "model"

    def __init__(self, initial: Callable[[int], Payload], tiers: ModelTiers | None, eval_clients: int = 5,
                 extra_eval: Callable[[nn.Module, int, Callable[[nn.Module], dict[str, float]]], dict[str, float]]
                 | None = None) -> None:
        if eval_clients < 0:
            raise ValueError(f"ClientModels: eval_clients={eval_clients} is not allowed; it must be >= 0")
        self.initial = initial
        self.tiers = tiers
        self.eval_clients = eval_clients
        self.extra_eval = extra_eval

    def on_client_start(self, trainer: Any, pl_module: Any, instruction: Any) -> None:
        """Load the active client's own weights into its working module."""
        module = trainer.lightning_module
        stored = trainer.client_state.get(self.state_key_name)
        tier = tier_of(self.tiers, trainer.client_id)
        load_into(module, stored if stored is not None else self.initial(tier))

    def on_client_end(self, trainer: Any, pl_module: Any, reply: Any) -> None:
        """Save the active client's weights into its state."""
        trainer.client_state[self.state_key_name] = {
            k: v.detach().cpu().clone() for k, v in float_state(trainer.lightning_module).items()
        }

    def on_round_end(self, trainer: Any, pl_module: Any, metrics: dict[str, float]) -> None:
        """At evaluation rounds, evaluate stored client models per tier and log the means."""
        fed = fed_context(trainer)
        if fed is None or self.eval_clients == 0 or not fed.eval_stages():
            return
        stored = set(fed.stored_clients())
        overall: dict[str, list[float]] = {}
        for t in range(num_tiers(self.tiers)):
            module = tier_module(self.tiers, t, pl_module)
            clients = [c for c in range(fed.num_clients) if tier_of(self.tiers, c) == t and c in stored]
            per_tier: dict[str, list[float]] = {}
            for cid in clients[: self.eval_clients]:
                weights = fed.stored_client_state(cid).get(self.state_key_name)
                if weights is None:
                    continue
                load_into(module, weights)
                for stage in fed.eval_stages():
                    evaluate = functools.partial(fed.evaluate, stage=stage)
                    out = stage_metrics(evaluate(module), "clients/")
                    if self.extra_eval is not None:
                        out.update(self.extra_eval(module, t, evaluate))
                    for k, v in out.items():
                        per_tier.setdefault(k, []).append(v)
                        overall.setdefault(k, []).append(v)
            for k, vals in per_tier.items():
                name = k.split("/", 1)[1] if k.startswith("clients/") else k.replace("/", "_")
                metrics[f"tier{t}/{name}"] = sum(vals) / len(vals)
        for k, vals in overall.items():
            metrics[k] = sum(vals) / len(vals)


def snapshot(module: nn.Module) -> Payload:
    """A detached CPU copy of a module's float state."""
    return {k: v.detach().cpu().clone() for k, v in float_state(module).items()}


@torch.no_grad()
def predict_logits(module: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """``module(x)`` in eval mode, in batches, as float32 on the CPU (the train/eval mode is restored)."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    out = torch.cat([module(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])
    module.train(was_training)
    return out


class OwnModels(Strategy):
    """Base of strategies whose clients keep their own models (FedMD, FedGKT, decentralized distillation).

    It assigns clients to tiers (:meth:`client_module`), keeps every tier's initial weights for clients never
    seen, and installs :class:`ClientModels` (per-client weights in the client store, evaluation per tier). Personalized evaluation
    (:class:`~lightning_fed.personal.PersonalEval`) scores every client's own model on its own split.
    ``load_global`` leaves the loop's model as the last tier-0 client left it: there is no global model, so
    read ``tier<t>/val_acc`` / ``tier<t>/test_acc`` (mean over evaluated clients) rather than ``val_acc`` /
    ``test_acc``.

    Args:
        tiers: client architectures (``None``: every client trains the loop's model architecture).
        eval_clients: stored client models evaluated per tier at evaluation rounds.
    """

    has_global_model = False

    def __init__(self, *, tiers: ModelTiers | None = None, eval_clients: int = 5) -> None:
        self.tiers = tiers
        self._default: nn.Module | None = None
        self._init: list[Payload] = []
        self.client_models = ClientModels(self._initial, tiers, eval_clients, extra_eval=self.extra_eval)

    def _initial(self, tier: int) -> Payload:
        return self._init[tier]

    def setup(self, model: nn.Module) -> None:
        """Remember the loop's model and every tier's initial weights."""
        self._default = model
        self._init = [snapshot(tier_module(self.tiers, t, model)) for t in range(num_tiers(self.tiers))]

    def default_module(self) -> nn.Module:
        """The loop's model (tier 0)."""
        if self._default is None:
            raise RuntimeError(f"{type(self).__name__}.setup(model) must be called before use")
        return self._default

    def tier_modules(self) -> list[nn.Module]:
        """Every tier's working module, tier 0 first."""
        return [tier_module(self.tiers, t, self.default_module()) for t in range(num_tiers(self.tiers))]

    def client_module(self, client_id: int, default: nn.Module) -> nn.Module:
        """The working module of the client's tier."""
        return tier_module(self.tiers, tier_of(self.tiers, client_id), default)

    def extra_eval(self, module: nn.Module, tier: int,
                   evaluate: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
        """Extra metrics for one evaluated client model (none by default)."""
        return {}

    def client_callbacks(self) -> list[Any]:
        """:class:`ClientModels` (subclasses add theirs)."""
        return [self.client_models]

    def load_global(self, model: nn.Module) -> None:
        """No global model: the loop's model is left as the last tier-0 client left it."""

    def personal_model(self, client_id: int, client_state: dict[str, Any], module: nn.Module,
                       train: Callable[..., int]) -> nn.Module:
        """The client's own model (its tier's initial weights if it was never sampled) in its tier's module."""
        stored = client_state.get(self.client_models.state_key_name)
        load_into(module, stored if stored is not None else self._initial(tier_of(self.tiers, client_id)))
        return module

    def state_dict(self) -> dict[str, Any]:
        """The tiers' initial weights."""
        return {"init": [dict(p) for p in self._init]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._init = [dict(p) for p in state["init"]]


__all__ = [
    "ClientModels",
    "LogitEnsemble",
    "ModelTiers",
    "OwnModels",
    "TierAverage",
    "architecture_of",
    "num_tiers",
    "predict_logits",
    "require_homogeneous",
    "snapshot",
    "tier_module",
    "tier_names",
    "tier_of",
    "tier_optimizers",
]
