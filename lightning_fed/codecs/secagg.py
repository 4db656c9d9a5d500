"""The client half of secure aggregation as an uplink codec: quantize, weight and mask a reply.

Bonawitz et al., CCS 2017 (SecAgg); Bell et al., CCS 2020 (SecAgg+); the protocol is
:mod:`lightning_fed.privacy.secagg`. :class:`~lightning_fed.strategies.SecAggFedAvg` wraps the run's uplink codec
(``inner``) in :class:`SecAggUplink`, and sends each client the round's setup in its instruction config (the
protocol's public parameters, the neighbours' keys and the encrypted shares addressed to it). The client then

1. takes the coordinates of its update that every client sends: all of them (``Identity``), or the ``k`` that
   a seed shared by the round selects (``RandomK``: the seed comes from the server, not the client, so the
   positions are the same for everyone; error feedback keeps the rest for later rounds as ``RandomK`` does);
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
from lightning_fed.codecs.wire import MalformedMessage
from lightning_fed.errors import ClientError
from lightning_fed.privacy.secagg import ClientSecrets, Params, masked_input
from lightning_fed.protocol import Payload

_REFUSED = {
    "TopK": "each client sends its own top-k positions, so the masked values of different clients sit at different "
    "positions and their sum means nothing (use RandomK, whose positions the round's shared seed selects)",
    "TimeCorrelatedTopK": "besides the shared mask it sends each client's own top-k positions (private indices), "
    "whose masked sum means nothing",
    "Sign": "signs with a per-client scale are not additive: a sum of masked signs is not a sum of updates",
    "QSGD": "stochastic levels with a per-client norm are not additive across clients",
    "PowerSGD": "low-rank factors are not additive: the sum of the factors is not the factor of the sum",
    "Differential": "it encodes against a per-sender reference the server keeps, which masking hides",
    "Blockwise8bit": "per-block scales differ between clients (SecAgg quantizes to fixed point itself)",
    "Blockwise4bit": "per-block scales differ between clients (SecAgg quantizes to fixed point itself)",
}


def check_linear(codec: Codec) -> None:
    """Raise ``ValueError`` naming why, unless ``codec``'s messages can be summed under masks: ``Identity``, or
    ``RandomK`` with float32 values (its positions then come from the round's shared seed)."""
    name = type(codec).__name__
    if type(codec) is Identity:
        return
    if type(codec) is RandomK:
        if codec.values is not None:
            raise ValueError(
                f"SecAggFedAvg: codec=RandomK(values={codec.values!r}) is not allowed; secure "
                "aggregation quantizes to fixed point itself, leave values=None"
            )
        return
    why = _REFUSED.get(
        name, "it is not known to be linear (its messages' sum may not be the sum of the updates)"
    )
    raise ValueError(
        f"SecAggFedAvg: codec={name} is not allowed under secure aggregation: {why}. "
        "Allowed: Identity, RandomK"
    )


def support_size(codec: Codec, n: int) -> int:
    """How many coordinates of an ``n``-entry update each client sends under ``codec``."""
    if type(codec) is RandomK:
        return min(n, max(1, round(codec.ratio * n))) if n else 0
    return n


def support(codec: Codec, n: int, seed: int) -> Tensor | None:
    """The positions every client sends this round (``None``: all of them)."""
    if type(codec) is RandomK:
        return random_indices(seed, support_size(codec, n), n)
    return None


class SecAggUplink(Codec):
    """A linear ``inner`` codec behind secure aggregation (client half; see the module doc).

    Built by :class:`~lightning_fed.strategies.SecAggFedAvg` around the run's ``codec``, not by hand.

    Args:
        inner: the linear codec (``Identity`` or ``RandomK``); others are refused (:func:`check_linear`).
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
        x = (
            torch.cat([t.detach().reshape(-1).float() for t in payload.values()])
            if payload
            else torch.zeros(0)
        )
        idx = support(self.inner, x.numel(), cfg["support_seed"])
        if idx is not None:
            if self.inner.error_feedback:  # type: ignore[attr-defined]
                residual = state.get("residual")
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

    def decode(self, message: bytes, state: dict[str, Any], args: DecodeArgs = DecodeArgs()) -> Payload:
        """The masked bytes, unread, as a ``uint8`` entry ``"masked"`` (the strategy sums them)."""
        if args.max_bytes is not None and len(message) > args.max_bytes:
            raise MalformedMessage(f"message of {len(message)} bytes exceeds max_bytes={args.max_bytes}")
        return {"masked": torch.frombuffer(bytearray(message), dtype=torch.uint8)}


__all__ = ["SecAggUplink", "check_linear", "support", "support_size"]
