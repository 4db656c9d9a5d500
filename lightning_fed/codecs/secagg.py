"""The client half of secure aggregation as an uplink codec: quantize, weight and mask a reply.

Bonawitz et al., CCS 2017 (SecAgg); Bell et al., CCS 2020 (SecAgg+); the protocol is
:mod:`lightning_fed.privacy.secagg`. :class:`~lightning_fed.strategies.SecAggFedAvg` wraps the run's uplink codec
(``inner``) in :class:`SecAggUplink`, and sends each client the round's setup in its instruction config (the
protocol's public parameters, the neighbours' keys and the encrypted shares addressed to it). The client then

1. takes the coordinates of its update that every client sends: all of them (``Identity``), the ``k`` that
   a seed shared by the round selects (``RandomK``: the seed comes from the server, not the client, so the
   positions are the same for everyone), or ``TimeCorrelatedTopK``'s broadcast global mask plus ``ratio * n``
   positions outside it from the shared seed (the shared exploration stands in for each client's private top
   entries, which a masked sum cannot carry); error feedback keeps the rest for later rounds;
2. clips them to ``[-clip, clip]``, multiplies by its weight ``c / weight_cap`` with ``c = min(examples,
   weight_cap)`` and rounds them to fixed point (``frac_bits`` fraction bits): the server cannot weight a masked
   update, so the client weights it, and appends ``c`` itself, so the sum also carries the total weight;
3. masks the integers modulo ``2**bits`` (:func:`~lightning_fed.privacy.secagg.masked_input`).

Only codecs whose sum means something are accepted: the message is a sum term. :func:`check_linear` names why each
other codec is refused. The server half (:meth:`SecAggUplink.decode`) hands the masked bytes to the strategy
unread: nothing about one client can be decoded from them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_fed.codecs.base import Codec, DecodeArgs, EncodeArgs, Identity
from lightning_fed.codecs.randk import RandomK, random_indices
from lightning_fed.codecs.tcs import TimeCorrelatedTopK, parse_mask
from lightning_fed.codecs.wire import MalformedMessage
from lightning_fed.errors import ClientError
from lightning_fed.flat import FlatSpec
from lightning_fed.privacy.secagg import ClientSecrets, Params, masked_input
from lightning_fed.protocol import Payload

_REFUSED = {
    "TopK": "each client sends its own top-k positions, so the masked values of different clients sit at different "
    "positions and their sum means nothing (use RandomK, whose positions the round's shared seed selects)",
    "Sign": "signs with a per-client scale are not additive: a sum of masked signs is not a sum of updates",
    "QSGD": "stochastic levels with a per-client norm are not additive across clients",
    "PowerSGD": "low-rank factors are not additive: the sum of the factors is not the factor of the sum",
    "Differential": "it encodes against a per-sender reference the server keeps, which masking hides",
    "Blockwise8bit": "per-block scales differ between clients (SecAgg quantizes to fixed point itself)",
    "Blockwise4bit": "per-block scales differ between clients (SecAgg quantizes to fixed point itself)",
}
_LINEAR = (Identity, RandomK, TimeCorrelatedTopK)


def check_linear(codec: Codec) -> None:
    """Raise ``ValueError`` naming why, unless ``codec``'s messages can be summed under masks: ``Identity``, or
    ``RandomK`` / ``TimeCorrelatedTopK`` with float32 values (their positions then come from the round's shared
    seed and the broadcast mask)."""
    name = type(codec).__name__
    if type(codec) in _LINEAR:
        values = getattr(codec, "values", None)
        if values is not None:
            raise ValueError(
                f"SecAggFedAvg: codec={name}(values={values!r}) is not allowed; secure aggregation quantizes to "
                "fixed point itself, leave values=None"
            )
        return
    why = _REFUSED.get(
        name, "it is not known to be linear (its messages' sum may not be the sum of the updates)"
    )
    raise ValueError(
        f"SecAggFedAvg: codec={name} is not allowed under secure aggregation: {why}. "
        "Allowed: Identity, RandomK, TimeCorrelatedTopK"
    )


def support(codec: Codec, n: int, seed: int, broadcast: bytes = b"") -> Tensor | None:
    """The positions every client sends this round (``None``: all of them): ``RandomK``'s ``k`` drawn from the
    round's shared ``seed``; for ``TimeCorrelatedTopK`` the mask in ``broadcast`` plus ``ratio * n`` positions
    outside it drawn from ``seed`` (shared exploration in place of each client's private top entries)."""
    if type(codec) is RandomK:
        return random_indices(seed, min(n, max(1, round(codec.ratio * n))) if n else 0, n)
    if type(codec) is TimeCorrelatedTopK:
        mask = parse_mask(broadcast, n)
        rest = torch.ones(n, dtype=torch.bool)
        rest[mask] = False
        free = rest.nonzero().flatten()
        k = min(len(free), max(1, round(codec.ratio * n))) if n else 0
        pick = free[torch.randperm(len(free), generator=torch.Generator().manual_seed(seed))[:k]]
        return torch.cat([mask, pick]).sort().values
    return None


class SecAggUplink(Codec):
    """A linear ``inner`` codec behind secure aggregation (client half; see the module doc).

    Built by :class:`~lightning_fed.strategies.SecAggFedAvg` around the run's ``codec``, not by hand.

    Args:
        inner: the linear codec (``Identity``, ``RandomK``, ``TimeCorrelatedTopK``); others are refused
            (:func:`check_linear`).
        key_seed: the simulated clients' secret (see :meth:`ClientSecrets.derive`); the server half never reads it.
    """

    name = "secagg"

    def __init__(self, inner: Codec, key_seed: bytes) -> None:
        check_linear(inner)
        self.inner, self.key_seed = inner, key_seed

    def encode(self, payload: Payload, state: dict[str, Any], args: EncodeArgs = EncodeArgs()) -> bytes:
        """Weight, quantize and mask the update (``args.config["secagg"]``: the round's setup for this client)."""
        cfg = args.config.get("secagg")
        if cfg is None or args.client_id is None:
            raise ValueError(
                "SecAggUplink encodes only with the round's secure-aggregation setup in the "
                "instruction config: use it through strategy SecAggFedAvg"
            )
        if cfg["drop"]:
            raise ClientError("dropped out after sharing its keys (simulated secure-aggregation dropout)")
        x = FlatSpec.from_floats(payload)[0].flatten(payload)  # the codec layout (entries sorted by name)
        idx = support(self.inner, x.numel(), cfg["support_seed"], args.broadcast)
        if idx is not None:
            if self.inner.error_feedback:  # type: ignore[attr-defined]
                residual = state.get("residual")  # what earlier rounds did not send
                if residual is not None and residual.numel() == x.numel():
                    x = x + residual
            sent = x[idx]
            if self.inner.error_feedback:  # type: ignore[attr-defined]
                rest = x.clone()
                rest[idx] = 0
                state["residual"] = rest
            x = sent
        cap = cfg["weight_cap"]
        count = min(int(args.num_examples), cap)
        q = torch.round(x.double().clamp(-cfg["clip"], cfg["clip"]) * (count / cap * 2.0 ** cfg["frac_bits"]))
        q = torch.cat([q.to(torch.int64), torch.tensor([count], dtype=torch.int64)])
        params = Params(args.round, cfg["bits"], q.numel(), cfg["threshold"])
        secrets = ClientSecrets.derive(self.key_seed, args.round, args.client_id)
        return masked_input(secrets, params, args.client_id, cfg["roster"], cfg["inbox"], q)

    def broadcast(self, server_round: int) -> bytes:
        """The inner codec's broadcast (``TimeCorrelatedTopK``'s global mask)."""
        return self.inner.broadcast(server_round)

    def state_dict(self) -> dict[str, Any]:
        """The inner codec's codec-wide state (the global mask)."""
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.inner.load_state_dict(state)

    def decode(self, message: bytes, state: dict[str, Any], args: DecodeArgs = DecodeArgs()) -> Payload:
        """The masked bytes, unread, as a ``uint8`` entry ``"masked"`` (the strategy sums them)."""
        if args.max_bytes is not None and len(message) > args.max_bytes:
            raise MalformedMessage(f"message of {len(message)} bytes exceeds max_bytes={args.max_bytes}")
        return {"masked": torch.frombuffer(bytearray(message), dtype=torch.uint8)}


__all__ = ["SecAggUplink", "check_linear", "support"]
