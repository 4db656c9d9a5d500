"""Federated Averaging.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017.
Clients send weight deltas; the server adds the example-weighted mean delta, scaled by an optional server
learning rate (``server_lr=1`` is plain FedAvg; other values give the FedOpt-style server step of
Reddi et al. 2021 with SGD).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_fed.flat import FlatSpec
from lightning_fed.protocol import Instruction, Payload, PayloadSpec, Reply
from lightning_fed.strategies.aggregate import apply_update_, example_weights, flat_norm, weighted_sum_
from lightning_fed.strategies.base import Strategy
from lightning_fed.weights import delta, float_state, load_into


class FedAvg(Strategy):
    """Example-weighted averaging of client weight deltas.

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=50, strategy=FedAvg(server_lr=1.0))

    Args:
        server_lr: step size applied to the averaged delta on the server (1.0 = FedAvg).
    """

    def __init__(self, *, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise ValueError(f"FedAvg: server_lr must be > 0, got {server_lr}")
        self.server_lr = server_lr
        self.spec: FlatSpec | None = None
        self.global_flat: Tensor | None = None
        self._acc: Tensor | None = None
        self._tmp: Tensor | None = None
        self._views: Payload = {}

    def setup(self, model: nn.Module) -> None:
        """Copy the model's float weights into one flat float32 master buffer."""
        state = float_state(model)
        self.spec = FlatSpec.from_payload(state)
        self.global_flat = self.spec.flatten({k: v.detach().float().cpu() for k, v in state.items()})
        self._acc = self.spec.empty()
        self._tmp = self.spec.empty()
        self._views = self.spec.unflatten(self.global_flat)  # updated in place: the views stay valid

    def _require_setup(self) -> tuple[FlatSpec, Tensor]:
        if self.spec is None or self.global_flat is None:
            raise RuntimeError("FedAvg.setup(model) must be called before use")
        return self.spec, self.global_flat

    def global_payload(self) -> Payload:
        """The global weights as views of the flat master buffer."""
        self._require_setup()
        return dict(self._views)

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
        """A float32 tensor per federated weight, shaped like the global model."""
        spec, _ = self._require_setup()
        return spec.tensor_specs()

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """Add ``server_lr`` times the example-weighted mean delta to the global weights."""
        spec, flat = self._require_setup()
        assert self._acc is not None and self._tmp is not None
        weights = example_weights([r.num_examples for r in replies])
        update = weighted_sum_(self._acc, (spec.as_flat(r.payload, out=self._tmp) for r in replies), weights)
        apply_update_(flat, update, self.server_lr)
        return {"update_norm": flat_norm(update)}

    def load_global(self, model: nn.Module) -> None:
        """Write the global weights into the working model."""
        load_into(model, self.global_payload())

    def state_dict(self) -> dict[str, Any]:
        """The global weights (flat) and the layout names, for checkpoints."""
        spec, flat = self._require_setup()
        return {"global_flat": flat.clone(), "names": list(spec.names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the global weights; the layout must match the model given to :meth:`setup`."""
        spec, flat = self._require_setup()
        if list(state["names"]) != list(spec.names) or state["global_flat"].numel() != flat.numel():
            raise ValueError("FedAvg checkpoint does not match the model's federated weights")
        flat.copy_(state["global_flat"])


__all__ = ["FedAvg"]
