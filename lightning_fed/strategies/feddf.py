"""FedDF: ensemble distillation for robust model fusion.

Lin, Kong, Stich & Jaggi, "Ensemble Distillation for Robust Model Fusion in Federated Learning",
NeurIPS 2020. Clients train and send weights as in FedAvg; the server first averages per architecture
(one FedAvg per tier), then fine-tunes every architecture's averaged model on unlabeled proxy data to match
the ensemble teacher: the mean logits of all received client models, across architectures (KL at
temperature ``T``, Adam; the paper used ``T = 1`` and Adam 1e-3). Clients of different tiers therefore
learn from each other although no weights cross architectures.

With ``assistant_chain`` (Mirzadeh et al. 2020, teacher-assistant distillation) the ensemble teaches only the
chain's first model, which then teaches the next, and so on (e.g. ensemble -> large -> medium -> small); the
chain's models are tiers (by name) or server-side ``assistants`` of a given architecture. Tiers outside the
chain learn from the ensemble as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fed.callbacks.kd_losses import kd_loss
from lightning_fed.data.public import PublicData
from lightning_fed.evaluate import stage_metrics
from lightning_fed.protocol import Instruction, Payload, PayloadSpec, Reply
from lightning_fed.seeding import Stream, generator
from lightning_fed.strategies.aggregators import Aggregator, resolve_aggregator
from lightning_fed.strategies.assistants import AssistantChain
from lightning_fed.strategies.base import Strategy
from lightning_fed.strategies.server_opt import ServerOptimizer, resolve_server_optimizer
from lightning_fed.strategies.tiers import (
    LogitEnsemble,
    ModelTiers,
    TierAverage,
    num_tiers,
    predict_logits,
    tier_module,
    tier_names,
    tier_of,
    tier_optimizers,
)
from lightning_fed.weights import delta, load_into

log = logging.getLogger("lightning_fed")


class FedDF(Strategy):
    """FedAvg per architecture group, then server-side ensemble distillation on proxy data.

    Example::

        strategy = FedDF(public=PublicData(num_samples=2000, seed=7), proxy_size=1000, distill_steps=100,
                         tiers=ModelTiers(models=[MNIST1DCNN(channels=16), MNIST1DCNN(channels=32)]))

    Evaluation logs ``tier<t>/<stage>_acc`` (each architecture's fused global model) and ``server/<stage>_acc``
    (the logit ensemble of the tiers' global models), ``<stage>`` being ``val`` at validation and ``test`` at
    the test (docs/evaluation.md); the loop's ``val_acc``/``test_acc`` are tier 0's.

    Args:
        public: the unlabeled proxy data (default: 1,000 MNIST-1D samples made with seed 7).
        tiers: client architectures (``None``: one architecture, i.e. FedAvg followed by distillation).
        proxy_size: proxy samples drawn each round for the teacher and the distillation.
        distill_steps: server optimizer steps per architecture per round (0: plain FedAvg per tier).
        distill_batch_size: proxy batch size of the distillation.
        distill_lr: Adam learning rate of the distillation.
        temperature: softmax temperature of the distillation loss.
        seed: seed of the proxy subsets and batches.
        aggregator: the averaging rule applied per tier, before distillation (``None``:
            :class:`~lightning_fed.strategies.WeightedMean`).
        server_optimizer: how each tier's aggregate is applied to its global weights (``None``: the plain
            step); every tier gets its own copy, and their states are part of :meth:`state_dict`.
        assistant_chain: teaching order by name, largest first (``None``: every tier learns from the
            ensemble): the ensemble teaches ``assistant_chain[0]``, which teaches ``assistant_chain[1]``, and
            so on. Names are tier names (:class:`ModelTiers` ``names``, ``tier<t>`` by default) or keys of
            ``assistants``; no name twice, parameter counts strictly decreasing along the chain.
        assistants: server-side models by name, used only inside ``assistant_chain``; their weights persist
            across rounds, are evaluated as ``assistant/<name>/<stage>_acc`` and are part of :meth:`state_dict`.
    """

    def __init__(self, *, public: PublicData | None = None, tiers: ModelTiers | None = None,
                 proxy_size: int = 500, distill_steps: int = 100, distill_batch_size: int = 64,
                 distill_lr: float = 1e-3, temperature: float = 1.0, seed: int = 0,
                 aggregator: Aggregator | None = None, server_optimizer: ServerOptimizer | None = None,
                 assistant_chain: list[str] | None = None, assistants: dict[str, nn.Module] | None = None) -> None:
        checks = (("proxy_size", proxy_size, proxy_size >= 1, ">= 1"),
                  ("distill_steps", distill_steps, distill_steps >= 0, ">= 0"),
                  ("distill_batch_size", distill_batch_size, distill_batch_size >= 1, ">= 1"),
                  ("distill_lr", distill_lr, distill_lr > 0, "> 0"),
                  ("temperature", temperature, temperature > 0, "> 0"))
        for key, val, ok, allowed in checks:
            if not ok:
                raise ValueError(f"FedDF: {key}={val} is not allowed; {key} must be {allowed}")
        self.public = public if public is not None else PublicData()
        self.tiers = tiers
        self.proxy_size = proxy_size
        self.distill_steps = distill_steps
        self.distill_batch_size = distill_batch_size
        self.distill_lr = distill_lr
        self.temperature = temperature
        self.seed = seed
        self.aggregator = resolve_aggregator("FedDF", aggregator)
        self.server_optimizer = resolve_server_optimizer("FedDF", server_optimizer)
        self._default: nn.Module | None = None
        self.avg: list[TierAverage] = []
        self._ensemble: LogitEnsemble | None = None
        if assistant_chain is None and assistants:
            raise ValueError(f"FedDF: assistants={sorted(assistants)} is not allowed without assistant_chain; name "
                             "them in assistant_chain, or leave assistants unset")
        if assistant_chain is not None and distill_steps == 0:
            raise ValueError(f"FedDF: assistant_chain={assistant_chain} is not allowed with distill_steps=0; "
                             "a chain distills, so distill_steps must be >= 1")
        self.chain = None if assistant_chain is None else AssistantChain("FedDF", assistant_chain, tiers, assistants)
        self.assistant_avg: dict[str, TierAverage] = {}
        self.last_routes: list[tuple[str, str]] = []
        """``(teacher, student)`` pairs of the last round's distillation, in order (``"ensemble"`` first)."""

    def _module(self, tier: int) -> nn.Module:
        if self._default is None:
            raise RuntimeError("FedDF.setup(model) must be called before use")
        return tier_module(self.tiers, tier, self._default)

    def setup(self, model: nn.Module) -> None:
        """One FedAvg state per architecture (with its own server optimizer), from the tiers' initial weights."""
        self._default = model
        count = num_tiers(self.tiers)
        opts = tier_optimizers(self.server_optimizer, count)
        self.avg = [TierAverage(self._module(t), self.aggregator, opts[t]) for t in range(count)]
        self._ensemble = None
        if self.chain is not None:
            self.chain.check_sizes(model)
            self.assistant_avg = {n: TierAverage(m) for n, m in self.chain.assistants.items()}

    def client_module(self, client_id: int, default: nn.Module) -> nn.Module:
        """The working module of the client's tier."""
        return tier_module(self.tiers, tier_of(self.tiers, client_id), default)

    def configure_round(self, server_round: int, clients: list[int]) -> list[Instruction]:
        """Each client gets its architecture's global weights (one payload per tier, encoded once)."""
        payloads = [a.payload() for a in self.avg]
        out = []
        for cid in clients:
            t = tier_of(self.tiers, cid)
            out.append(Instruction(cid, payloads[t], {"tier": t}))
        return out

    def client_receive(self, model: nn.Module, instruction: Instruction) -> None:
        """Load the tier's global weights in place."""
        load_into(model, instruction.payload)

    def client_reply(self, model: nn.Module, instruction: Instruction) -> Payload:
        """The float32 delta ``local - received``."""
        return delta(model, instruction.payload)

    def reply_spec(self, instruction: Instruction) -> PayloadSpec:
        """The client's architecture's weights, exactly."""
        return self.avg[tier_of(self.tiers, instruction.client_id)].spec.tensor_specs()

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """Teacher logits of every client model on the proxy subset, FedAvg per tier, then distillation."""
        idx = self.public.sample_indices(self.proxy_size, generator(self.seed, Stream.FEDDF_PROXY, server_round))
        x = self.public.x[idx]
        teacher = torch.zeros(0)
        groups: dict[int, list[Reply]] = {}
        for r in replies:
            groups.setdefault(tier_of(self.tiers, r.client_id), []).append(r)
        for t, group in sorted(groups.items()):
            module, avg = self._module(t), self.avg[t]
            base = avg.payload()
            for r in group:  # the client's model = global + delta, only to compute its proxy logits
                load_into(module, {k: base[k] + r.payload[k] for k in base})
                logits = predict_logits(module, x)
                teacher = logits if teacher.numel() == 0 else teacher + logits
            avg.average([r.payload for r in group], [r.num_examples for r in group])
        teacher = teacher / len(replies)
        metrics: dict[str, float] = {}
        self.last_routes = []
        chain = self.chain.chain if self.chain is not None else []
        for t, avg in enumerate(self.avg):
            module = self._module(t)
            load_into(module, avg.payload())
            if self.distill_steps and tier_names(self.tiers)[t] not in chain[1:]:
                g = generator(self.seed, Stream.FEDDF_DISTILL, server_round, t)
                metrics[f"tier{t}/distill_loss"] = self._distill(module, x, teacher, g)
                avg.read_from(module)
                self.last_routes.append(("ensemble", tier_names(self.tiers)[t]))
        if self.chain is not None:
            metrics.update(self._distill_chain(server_round, x, teacher))
        return metrics

    def _chain_member(self, name: str) -> tuple[nn.Module, TierAverage, str, int]:
        """The working module (loaded with the member's weights), its weights, metric prefix and stream index."""
        assert self.chain is not None
        t = self.chain.tier_index(name)
        if t is not None:
            module, avg, prefix, index = self._module(t), self.avg[t], f"tier{t}/", t
        else:
            module, avg = self.chain.assistants[name], self.assistant_avg[name]
            prefix, index = f"assistant/{name}/", len(self.avg) + list(self.chain.assistants).index(name)
        load_into(module, avg.payload())
        return module, avg, prefix, index

    def _distill_chain(self, server_round: int, x: Tensor, ensemble: Tensor) -> dict[str, float]:
        """A server-side assistant at the chain's head learns from the ensemble; then each member teaches the
        next (a tier at the head was already distilled from the ensemble with the other tiers)."""
        assert self.chain is not None
        metrics: dict[str, float] = {}
        head = self.chain.chain[0]
        if self.chain.tier_index(head) is None:
            module, avg, prefix, index = self._chain_member(head)
            g = generator(self.seed, Stream.FEDDF_DISTILL, server_round, index)
            metrics[f"{prefix}distill_loss"] = self._distill(module, x, ensemble, g)
            avg.read_from(module)
            self.last_routes.append(("ensemble", head))
        for teacher_name, student_name in self.chain.steps():
            teacher_module, _, _, _ = self._chain_member(teacher_name)
            logits = predict_logits(teacher_module, x)
            module, avg, prefix, index = self._chain_member(student_name)
            g = generator(self.seed, Stream.FEDDF_DISTILL, server_round, index)
            metrics[f"{prefix}distill_loss"] = self._distill(module, x, logits, g)
            avg.read_from(module)
            self.last_routes.append((teacher_name, student_name))
        return metrics

    def _distill(self, module: nn.Module, x: Tensor, teacher: Tensor, g: torch.Generator) -> float:
        device = next(module.parameters()).device
        was_training = module.training
        module.train()
        opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=self.distill_lr)
        last = 0.0
        with torch.enable_grad():
            for _ in range(self.distill_steps):
                b = torch.randint(len(x), (min(self.distill_batch_size, len(x)),), generator=g)
                loss = kd_loss(module(x[b].to(device)), teacher[b].to(device), self.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                last = float(loss.detach())
        module.zero_grad(set_to_none=True)
        module.train(was_training)
        return last

    def load_global(self, model: nn.Module) -> None:
        """Tier 0's global weights into the loop's model."""
        load_into(model, self.avg[0].payload())

    def evaluate(self, evaluate_module: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
        """Each tier's global model (``tier<t>/val_acc`` or ``tier<t>/test_acc``, following the stage that
        ``evaluate_module`` runs), and their logit ensemble (``server/val_acc`` / ``server/test_acc``)."""
        out: dict[str, float] = {}
        modules = []
        for t, avg in enumerate(self.avg):
            module = self._module(t)
            load_into(module, avg.payload())
            out.update(stage_metrics(evaluate_module(module), f"tier{t}/"))
            modules.append(module)
        if self._ensemble is None:
            self._ensemble = LogitEnsemble(modules)
        out.update(stage_metrics(evaluate_module(self._ensemble), "server/"))
        if self.chain is not None:
            for name in self.chain.assistants:
                module, _, prefix, _ = self._chain_member(name)
                out.update(stage_metrics(evaluate_module(module), prefix))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Every tier's global weights (flat) and server optimizer state, and the server-side assistants'
        weights."""
        return {"flats": [a.flat.clone() for a in self.avg],
                "server_optimizers": [a.server_optimizer.state_dict() for a in self.avg],
                "assistants": {n: a.flat.clone() for n, a in self.assistant_avg.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the tiers must be the same architectures."""
        flats = state["flats"]
        if len(flats) != len(self.avg) or any(f.numel() != a.flat.numel() for f, a in zip(flats, self.avg)):
            raise ValueError("FedDF checkpoint does not match the tiers' architectures")
        for f, a in zip(flats, self.avg):
            a.flat.copy_(f)
        for opt_state, a in zip(state.get("server_optimizers", []), self.avg, strict=False):
            a.server_optimizer.load_state_dict(opt_state)
        saved = state.get("assistants", {})
        if set(saved) != set(self.assistant_avg) or any(
                f.numel() != self.assistant_avg[n].flat.numel() for n, f in saved.items()):
            raise ValueError(f"FedDF checkpoint's assistants {sorted(saved)} do not match assistants "
                             f"{sorted(self.assistant_avg)}")
        for n, f in saved.items():
            self.assistant_avg[n].flat.copy_(f)


__all__ = ["FedDF"]
