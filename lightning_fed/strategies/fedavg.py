"""Federated Averaging.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017.
Clients send weight deltas; the server adds the example-weighted mean delta, scaled by an optional server
learning rate (``server_lr=1`` is plain FedAvg; other values give the FedOpt-style server step of
Reddi et al. 2021 with SGD). The averaging rule and the server step are plug points: ``aggregator`` (default
:class:`~lightning_fed.strategies.WeightedMean`) and ``server_optimizer`` (default
:class:`~lightning_fed.strategies.ServerSGD`).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from lightning_fed.flat import FlatSpec
from lightning_fed.protocol import Instruction, Payload, PayloadSpec, Reply
from lightning_fed.strategies.aggregate import MeanFold, example_weights, flat_norm
from lightning_fed.strategies.aggregators import Aggregator, WeightedMean, resolve_aggregator
from lightning_fed.strategies.base import Strategy
from lightning_fed.strategies.server_opt import ServerOptimizer, resolve_server_optimizer
from lightning_fed.weights import delta, float_state, load_into

log = logging.getLogger("lightning_fed")


class FedAvg(Strategy):
    """Example-weighted averaging of client weight deltas.

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=50, strategy=FedAvg(server_lr=1.0))
        FedAvg(aggregator=WeightedMean(), server_optimizer=ServerSGD(lr=1.0))  # the same, spelled out

    Args:
        server_lr: step size applied to the averaged delta on the server (1.0 = FedAvg); shorthand for
            ``server_optimizer=ServerSGD(lr=server_lr)``, so it cannot be combined with ``server_optimizer``.
        aggregator: the rule turning the replies' deltas and example weights into one update
            (``None``: :class:`~lightning_fed.strategies.WeightedMean`).
        server_optimizer: how the update is applied to the global weights
            (``None``: :class:`~lightning_fed.strategies.ServerSGD` with ``lr=server_lr``); its state is
            part of :meth:`state_dict`.
    """

    def __init__(self, *, server_lr: float = 1.0, aggregator: Aggregator | None = None,
                 server_optimizer: ServerOptimizer | None = None) -> None:
        owner = type(self).__name__
        if not server_lr > 0:
            raise ValueError(f"{owner}: server_lr={server_lr!r} is not allowed; server_lr must be > 0")
        self.server_lr = server_lr
        self.aggregator = resolve_aggregator(owner, aggregator)
        self.server_optimizer = resolve_server_optimizer(owner, server_optimizer, server_lr)
        self.spec: FlatSpec | None = None
        self.global_flat: Tensor | None = None
        self._acc: Tensor | None = None
        self._tmp: Tensor | None = None
        self._views: Payload = {}
        self._fold: MeanFold | None = None
        self._reply_spec: PayloadSpec | None = None

    def federated_state(self, model: nn.Module) -> Payload:
        """The model's entries this strategy averages: every float state entry (subclasses may keep some local)."""
        return float_state(model)

    def setup(self, model: nn.Module) -> None:
        """Copy the model's federated weights (:meth:`federated_state`) into one flat float32 master buffer and set
        the server optimizer up for it (again after a structural change: its state sized to the old layout is
        dropped)."""
        self.setup_state(self.federated_state(model))

    def setup_state(self, state: Payload) -> None:
        """:meth:`setup` from the federated weights themselves (a strategy that changes which weights it federates
        mid-run rebuilds its buffer with them)."""
        self.spec = FlatSpec.from_payload(state)
        self.global_flat = self.spec.flatten({k: v.detach().float().cpu() for k, v in state.items()})
        self._acc = self.spec.empty()
        self._tmp = self.spec.empty().zero_()  # its pages touched once here, not by the first fold's snapshot
        self._views = self.spec.unflatten(self.global_flat)  # updated in place: the views stay valid
        self._fold = None  # a fold over the previous buffers is void
        self._reply_spec = None
        self.server_optimizer.setup(self.global_flat)

    def _require_setup(self) -> tuple[FlatSpec, Tensor]:
        if self.spec is None or self.global_flat is None:
            raise RuntimeError("FedAvg.setup(model) must be called before use")
        return self.spec, self.global_flat

    def global_payload(self) -> Payload:
        """The global weights as views of the flat master buffer."""
        self._require_setup()
        return dict(self._views)

    def client_callbacks(self) -> list[Any]:
        """The aggregator's callbacks (:meth:`~lightning_fed.strategies.Aggregator.callbacks`; none for the
        built-in rules but :class:`~lightning_fed.strategies.FLTrust`)."""
        return self.aggregator.callbacks()

    def configure_round(self, server_round: int, clients: list[int]) -> list[Instruction]:
        """Every client gets the same global weights (one shared payload, encoded once)."""
        payload = self.global_payload()
        return [Instruction(cid, payload) for cid in clients]

    def client_receive(self, model: nn.Module, instruction: Instruction) -> None:
        """Load the global weights into the working model in place."""
        load_into(model, instruction.payload)

    def client_reply(self, model: nn.Module, instruction: Instruction) -> Payload:
        """The float32 delta ``local - received``."""
        return delta(model, instruction.payload)

    def reply_spec(self, instruction: Instruction) -> PayloadSpec:
        """A float32 tensor per federated weight, shaped like the global model (one dict, built once per layout:
        read it, do not modify it)."""
        spec, _ = self._require_setup()
        if self._reply_spec is None:
            self._reply_spec = spec.tensor_specs()
        return self._reply_spec

    def begin_fold(self, server_round: int, total_examples: int) -> MeanFold | None:
        """A :class:`~lightning_fed.strategies.aggregate.MeanFold` into the accumulator buffer when the aggregator
        is the plain :class:`~lightning_fed.strategies.WeightedMean` and :meth:`aggregate` is FedAvg's own;
        ``None`` otherwise."""
        if type(self.aggregator) is not WeightedMean or type(self).aggregate is not FedAvg.aggregate:
            self._fold = None
            return None
        spec, _ = self._require_setup()
        assert self._acc is not None and self._tmp is not None
        self._fold = MeanFold(spec, self._acc, total_examples, scratch=self._tmp)  # the fold's snapshot
        return self._fold

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """Aggregate the deltas with their example shares (the aggregator), then step the global weights
        (the server optimizer): by default ``global += server_lr * example-weighted mean delta``. When the
        server folded exactly these replies while receiving them (:meth:`begin_fold`), the fold's sum is the
        aggregate (bit-identical); otherwise the replies are aggregated here."""
        spec, flat = self._require_setup()
        assert self._acc is not None and self._tmp is not None
        fold, self._fold = self._fold, None
        if fold is not None and fold.covers(replies):
            update = fold.result()
        else:  # read from the decoded replies where they lie; a copy goes through one scratch buffer at most
            weights = example_weights([r.num_examples for r in replies])
            update = self.aggregator.aggregate_payloads(self._acc, spec, (r.payload for r in replies), weights,
                                                        self._tmp)
        self.server_optimizer.step(flat, update)
        metrics = {"update_norm": flat_norm(update), **self.aggregator.report()}
        last = getattr(self.aggregator, "last", None)  # a robust rule's record: positions in ``replies``
        if last is not None:
            log.info("round %d: %r took %.4f s; dropped clients %s, clipped clients %s", server_round + 1,
                     self.aggregator, last.seconds, [replies[i].client_id for i in last.dropped],
                     [replies[i].client_id for i in last.clipped])
        return metrics

    def load_global(self, model: nn.Module) -> None:
        """Write the global weights into the working model."""
        load_into(model, self.global_payload())

    def state_dict(self) -> dict[str, Any]:
        """The global weights (flat), the layout names and the server optimizer's state, for checkpoints."""
        spec, flat = self._require_setup()
        return {"global_flat": flat.clone(), "names": list(spec.names),
                "server_optimizer": self.server_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the global weights and the server optimizer's state; the layout must match the model given
        to :meth:`setup` (checkpoints without optimizer state leave it as :meth:`setup` made it)."""
        spec, flat = self._require_setup()
        if list(state["names"]) != list(spec.names) or state["global_flat"].numel() != flat.numel():
            raise ValueError("FedAvg checkpoint does not match the model's federated weights")
        flat.copy_(state["global_flat"])
        if "server_optimizer" in state:
            self.server_optimizer.load_state_dict(state["server_optimizer"])


__all__ = ["FedAvg"]
