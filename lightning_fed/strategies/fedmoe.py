"""FedMoE: federated averaging with expert-sparse replies for mixture-of-experts models.

A client's reply carries the deltas of the dense weights, of each MoE layer's router, and only of the
experts its data was routed to in this round, plus each expert's share of the client's routed assignments.
The server averages dense weights and routers by examples (FedAvg, McMahan et al. 2017) and each expert over
the clients that sent it, weighted by the tokens routed to it there (``num_examples * share``: the tokens
routed to the expert per pass over the client's data), so an expert is moved by the data that trained it
and uplink bytes shrink with expert sparsity. Shares lie in [0, 1], so a client cannot outweigh its own
example count and a ``max_update_abs`` bound never rejects them. With ``personal_router=True`` each client keeps its
own routers in its client state; they are never sent (personalised gating, in the spirit of
mixture-of-experts personalisation such as Zec et al. 2020, "Federated learning using a mixture of experts").
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.flat import FlatSpec
from lightning_fed.moe.layer import moe_layers
from lightning_fed.protocol import Instruction, Payload, PayloadSpec, Reply, TensorSpec
from lightning_fed.strategies.aggregate import flat_norm
from lightning_fed.strategies.aggregators import Aggregator, WeightedMean
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.weights import float_state

log = logging.getLogger("lightning_fed")

SHARE_PREFIX = "moe_share::"
"""Reply entries ``moe_share::<layer>`` (float32 ``[num_experts]``): each expert's share of the client's
kept assignments in the round (they sum to 1 when the layer saw any token)."""

_WEIGHTINGS = ("tokens", "examples")

Group = tuple[str, str, int]  # (kind, layer, expert): ("dense", "", -1), ("router", L, -1), ("expert", L, e)


class FedMoE(FedAvg):
    """FedAvg with expert-sparse uplink and per-expert, token-weighted aggregation.

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=50, strategy=FedMoE(),
                       callbacks=[MoERouting(convert=["ffn"], num_experts=4, k=1)])

    Args:
        server_lr: step size applied to the averaged delta on the server (1.0 = FedAvg).
        expert_weighting: ``"tokens"`` weights each client's expert delta by the tokens routed to the
            expert there (``num_examples * share``); ``"examples"`` by the client's examples (then, when
            every client uses every expert, the result equals FedAvg exactly).
        min_tokens: an expert is sent only if it processed at least this many assignments in the round.
        min_share: an expert is sent only if it processed at least this share of the client's assignments
            in that layer (0 = any use); a lossy knob: the local updates of rarely used experts are dropped.
        personal_router: each client keeps its routers locally (in its client state) and never sends
            them; the server's routers then stay at their initial values.
        aggregator: the rule applied per group (dense weights, each router, each expert) over the replies that
            sent the group, with their weights normalised within the group (``None``:
            :class:`~lightning_fed.strategies.WeightedMean`, computed for all groups in one pass).
        server_optimizer: how the aggregated update is applied to the global weights (``None``:
            ``ServerSGD(lr=server_lr)``); its state is part of :meth:`state_dict`.
    """

    def __init__(self, *, server_lr: float = 1.0, expert_weighting: str = "tokens", min_tokens: int = 1,
                 min_share: float = 0.0, personal_router: bool = False, aggregator: Aggregator | None = None,
                 server_optimizer: ServerOptimizer | None = None) -> None:
        super().__init__(server_lr=server_lr, aggregator=aggregator, server_optimizer=server_optimizer)
        if expert_weighting not in _WEIGHTINGS:
            raise ValueError(f"FedMoE: expert_weighting={expert_weighting!r} is not allowed; use one of {_WEIGHTINGS}")
        if min_tokens < 1:
            raise ValueError(f"FedMoE: min_tokens={min_tokens!r} is not allowed; must be an int >= 1")
        if not 0.0 <= min_share < 1.0:
            raise ValueError(f"FedMoE: min_share={min_share!r} is not allowed; must be in [0, 1)")
        self.expert_weighting = expert_weighting
        self.min_share = min_share
        self.min_tokens = min_tokens
        self.personal_router = personal_router
        self.layers: dict[str, int] = {}
        self.groups: dict[Group, list[str]] = {}
        self._ranges: dict[Group, list[tuple[int, int]]] = {}
        self._index: dict[str, int] = {}

    # ------------------------------------------------------------------ layout
    def setup(self, model: nn.Module) -> None:
        """FedAvg's flat master buffer, plus the grouping of its entries into dense, router and expert."""
        super().setup(model)
        assert self.spec is not None
        self.layers = {name: m.num_experts for name, m in moe_layers(model).items()}
        if not self.layers:
            log.warning("FedMoE: the model has no MoE layers; FedMoE behaves as FedAvg")
        self.groups = {}
        for key in self.spec.names:
            g = self.group_of(key)
            self.groups.setdefault(g, []).append(key)
        self._ranges = {g: _ranges(self.spec, keys) for g, keys in self.groups.items()}
        self._index = {k: i for i, k in enumerate(self.spec.names)}

    def group_of(self, key: str) -> Group:
        """Which group a state entry belongs to: dense, a layer's router, or one expert of a layer."""
        for layer in sorted(self.layers, key=len, reverse=True):
            prefix = f"{layer}." if layer else ""
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            m = re.match(r"experts\.(\d+)\.", rest)
            if m:
                return ("expert", layer, int(m.group(1)))
            if rest.startswith(("router.", "noise.")):
                return ("router", layer, -1)
        return ("dense", "", -1)

    def _sent_groups(self) -> list[Group]:
        return [g for g in self.groups if not (self.personal_router and g[0] == "router")]

    # ------------------------------------------------------------------ client side
    def client_receive(self, model: nn.Module, instruction: Instruction) -> None:
        """Load the global weights and start counting routed tokens from zero."""
        super().client_receive(model, instruction)
        for m in moe_layers(model).values():
            m.reset_counts()

    def client_reply(self, model: nn.Module, instruction: Instruction) -> Payload:
        """Deltas of dense weights, routers (unless personal) and the experts used; per-expert shares."""
        local = float_state(model)
        layers = moe_layers(model)
        counts = {name: m.token_counts.detach().cpu() for name, m in layers.items()}
        out: Payload = {}
        for key, ref in instruction.payload.items():
            kind, layer, e = self.group_of(key)
            if kind == "router" and self.personal_router:
                continue
            if kind == "expert":
                c = counts[layer]
                if int(c[e]) < self.min_tokens or float(c[e]) < self.min_share * float(c.sum()):
                    continue
            out[key] = local[key].detach().float().cpu() - ref.float()
        for name, c in counts.items():
            out[SHARE_PREFIX + name] = c.float() / c.sum().clamp(min=1).float()
        return out

    def client_callbacks(self) -> list[Callback]:
        """The personal-router keeper when ``personal_router`` is set."""
        return [PersonalRouter(self)] if self.personal_router else []

    # ------------------------------------------------------------------ server side
    def reply_spec(self, instruction: Instruction) -> PayloadSpec:
        """Dense and router entries required, expert entries optional, one share vector per MoE layer."""
        spec = super().reply_spec(instruction)
        out: PayloadSpec = {}
        for key, ts in spec.items():
            kind = self.group_of(key)[0]
            if kind == "router" and self.personal_router:
                continue
            out[key] = TensorSpec(ts.shape, ts.dtype, optional=kind == "expert")
        for name, e in self.layers.items():
            out[SHARE_PREFIX + name] = TensorSpec((e,), torch.float32)
        return out

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """Per group: the aggregate of the deltas of the replies that sent it; then the server optimizer's step
        (by default ``global += server_lr * weighted mean``)."""
        _, flat = self._require_setup()
        parts, sent = self._contributions(server_round, replies)
        if isinstance(self.aggregator, WeightedMean):
            totals = self._mean_in_one_pass(replies, parts)
        else:
            totals = self._aggregate_groups(replies, parts)
        update = self._acc
        assert update is not None
        self.server_optimizer.step(flat, update)
        num_experts = sum(self.layers.values())
        metrics = {"update_norm": flat_norm(update)}
        if num_experts:
            updated = sum(1 for g, total in totals.items() if g[0] == "expert" and total > 0)
            metrics["moe_experts_sent"] = sent / (len(replies) * num_experts)
            metrics["moe_experts_updated"] = updated / num_experts
        return metrics

    def _contributions(self, server_round: int, replies: list[Reply]) -> tuple[list[list[tuple[Group, float]]], int]:
        """Per reply, the groups it updates with their raw weights (examples, times the expert's share under
        ``"tokens"``), in group order; and the number of complete experts sent."""
        parts: list[list[tuple[Group, float]]] = []
        sent = 0
        for r in replies:
            shares = {name: _shares(r.payload[SHARE_PREFIX + name]) for name in self.layers}
            mine: list[tuple[Group, float]] = []
            for g in self._sent_groups():
                keys = self.groups[g]
                if g[0] == "expert":
                    present = sum(k in r.payload for k in keys)
                    if present < len(keys):
                        if present:  # a partial expert is not an expert update: ignore it, keep the rest
                            log.warning("round %d: client %d sent %d of %d entries of expert %d of %r; ignored",
                                        server_round + 1, r.client_id, present, len(keys), g[2], g[1])
                        continue
                    sent += 1
                    w = float(r.num_examples)
                    if self.expert_weighting == "tokens":
                        w *= float(shares[g[1]][g[2]])
                else:
                    w = float(r.num_examples)
                if w > 0:
                    mine.append((g, w))
            parts.append(mine)
        return parts, sent

    def _copy_group(self, reply: Reply, g: Group, out: Tensor, start: int = 0, end: int | None = None) -> None:
        """Copy the entries of group ``g`` lying in flat ``[start, end)`` from ``reply`` into ``out``, which
        holds the flat range starting at ``start``."""
        spec = self.spec
        assert spec is not None
        for key in self.groups[g]:
            off = spec.offsets[self._index[key]]
            if off < start or (end is not None and off >= end):
                continue
            t = reply.payload[key]
            out[off - start : off - start + t.numel()].copy_(t.reshape(-1))

    def _mean_in_one_pass(self, replies: list[Reply], parts: list[list[tuple[Group, float]]]) -> dict[Group, float]:
        """The weighted mean of every group in one pass over the replies (each copied once into the scratch
        buffer): ``acc = sum_i w_i * delta_i / sum_i w_i`` per group; groups nobody sent stay zero."""
        assert self._acc is not None and self._tmp is not None
        acc, tmp = self._acc.zero_(), self._tmp
        totals: dict[Group, float] = {g: 0.0 for g in self.groups}
        for r, mine in zip(replies, parts, strict=True):
            for g, w in mine:
                self._copy_group(r, g, tmp)
                for a, b in self._ranges[g]:
                    acc[a:b].add_(tmp[a:b], alpha=w)
                totals[g] += w
        for g, total in totals.items():
            for a, b in self._ranges[g]:
                if total > 0:
                    acc[a:b].div_(total)
        return totals

    def _aggregate_groups(self, replies: list[Reply], parts: list[list[tuple[Group, float]]]) -> dict[Group, float]:
        """Any other aggregator, called per contiguous range of each group over the replies that sent the
        group, with their weights normalised within the group; groups nobody sent stay zero."""
        assert self._acc is not None and self._tmp is not None
        acc, tmp = self._acc.zero_(), self._tmp
        senders: dict[Group, list[tuple[Reply, float]]] = {g: [] for g in self.groups}
        for r, mine in zip(replies, parts, strict=True):
            for g, w in mine:
                senders[g].append((r, w))
        totals: dict[Group, float] = {}
        for g, group in senders.items():
            totals[g] = total = sum(w for _, w in group)
            if not group:
                continue
            weights = [w / total for _, w in group]
            for a, b in self._ranges[g]:
                if self.aggregator.streaming:
                    flats: Any = (self._filled(r, g, tmp[a:b], a, b) for r, _ in group)
                else:
                    flats = [self._filled(r, g, torch.empty(b - a), a, b) for r, _ in group]
                self.aggregator(acc[a:b], flats, weights)
        return totals

    def _filled(self, reply: Reply, g: Group, out: Tensor, start: int, end: int) -> Tensor:
        self._copy_group(reply, g, out, start, end)
        return out


class PersonalRouter(FedCallback):
    """Client side of ``FedMoE(personal_router=True)``: each client's routers live in its client state.

    After the global weights are loaded, a client that has trained before gets its own routers back; after
    local training its routers are saved (they never enter the reply).

    Args:
        strategy: the FedMoE strategy that installed this callback.
    """

    KEY = "moe_router"

    def __init__(self, strategy: FedMoE) -> None:
        self.strategy = strategy

    def on_client_start(self, trainer: Any, pl_module: Any, instruction: Instruction) -> None:
        """Overwrite the global routers with this client's own."""
        saved = trainer.client_state.get(self.KEY)
        if not saved:
            return
        state = pl_module.state_dict()
        with torch.no_grad():
            for key, value in saved.items():
                if key in state and state[key].shape == value.shape:
                    state[key].copy_(value)

    def on_client_end(self, trainer: Any, pl_module: Any, reply: Reply) -> None:
        """Store this client's routers in its client state."""
        state = float_state(pl_module)
        trainer.client_state[self.KEY] = {
            k: v.detach().cpu().clone() for k, v in state.items() if self.strategy.group_of(k)[0] == "router"
        }


def _shares(share: Tensor) -> Tensor:
    """Untrusted shares made safe: clamped to [0, 1] and rescaled if they add up to more than 1."""
    share = share.float().clamp(0.0, 1.0)
    total = float(share.sum())
    return share / total if total > 1.0 else share


def _ranges(spec: FlatSpec, keys: list[str]) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` ranges of ``keys`` in the flat layout, adjacent ones merged."""
    index = {k: i for i, k in enumerate(spec.names)}
    spans = []
    for k in keys:
        i = index[k]
        n = 1
        for d in spec.shapes[i]:
            n *= d
        spans.append((spec.offsets[i], spec.offsets[i] + n))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


__all__ = ["SHARE_PREFIX", "FedMoE", "PersonalRouter"]
