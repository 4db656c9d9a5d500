"""Downlink delta coding: the server sends each client what the global model adds to the model that client last
received, through an inner codec (e.g. 8-bit blockwise quantization).

The server keeps, per client, the reference that client reconstructed from its last message (in its store of
per-receiver state, on disk); the client keeps the same reference in its own state. A client's first message
carries the whole model through the inner codec; later ones ``inner.encode(w - reference)``. Both sides set
``reference <- reference + inner.decode(message)``: the server decodes its own message, so the two references
stay bit-identical and the quantization error of one round is carried into the next delta (it is never lost,
only delayed). Between a client's rounds the global model moves by the aggregated updates of the rounds it
missed, so the delta is smaller than the weights and quantizes with a smaller error at the same bits.

The reference is only advanced on the server when the client confirmed it received the message (the loop
acknowledges every client that replied, see :func:`lightning_fed.plan.acknowledge_downlink`): a client that dropped
out or failed keeps its old reference on both sides. Every message carries a 4-byte digest of the reference it
was coded against; a client whose reference differs refuses it (:class:`~lightning_fed.codecs.wire.MalformedMessage`).

Only floating-point entries are coded; other entries (integer buffers) travel uncompressed.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from lightning_fed.codecs.base import Codec, DecodeArgs, EncodeArgs, Identity
from lightning_fed.codecs.wire import MalformedMessage, expect_codec, pack, unpack
from lightning_fed.protocol import Payload, PayloadSpec, spec_of

INNER = "__inner__"  # the inner codec's message, as a uint8 entry of this codec's message


def reference_digest(reference: dict[str, Tensor] | None) -> str:
    """A short hex digest of a reference's names, shapes, dtypes and bytes (``"none"`` for no reference)."""
    if reference is None:
        return "none"
    h = hashlib.blake2b(digest_size=4)
    for k in sorted(reference):
        t = reference[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DownlinkDelta(Codec):
    """Send each client the change to the model it last received, through ``inner`` (a downlink codec).

    Example::

        loop = FedLoop(..., downlink_codec=DownlinkDelta(Blockwise8bit()))

    Args:
        inner: codes the floating-point entries (whole on first contact, deltas after); default ``Identity``.
    """

    name = "downlink-delta"
    per_receiver = True

    def __init__(self, inner: Codec | None = None) -> None:
        inner = inner if inner is not None else Identity()
        if getattr(inner, "per_receiver", False):
            raise ValueError(
                f"DownlinkDelta: inner={type(inner).__name__} is not allowed; inner must be a codec "
                "whose messages do not depend on the receiver (not another DownlinkDelta)"
            )
        self.inner = inner

    @staticmethod
    def _split(payload: Payload) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        floats = {k: v for k, v in payload.items() if v.is_floating_point()}
        return floats, {k: v for k, v in payload.items() if k not in floats}

    def _advance(self, reference: dict[str, Tensor] | None, sent: dict[str, Tensor]) -> dict[str, Tensor]:
        if reference is None:
            return {k: v.detach().clone() for k, v in sent.items()}
        return {k: (reference[k] + sent[k]).to(reference[k].dtype) for k in reference}

    def encode(self, payload: Payload, state: dict[str, Any], args: EncodeArgs = EncodeArgs()) -> bytes:
        """Server side: code ``payload`` for one client; ``state`` is the server's state about that receiver."""
        floats, rest = self._split(payload)
        ref = state.get("reference")
        if ref is not None and spec_of(ref) != spec_of(floats):  # the model's structure changed: start over
            ref = None
        body = floats if ref is None else {k: v - ref[k] for k, v in floats.items()}
        inner_msg = self.inner.encode(body, state.setdefault("inner", {}), args)
        sent = self.inner.decode(
            inner_msg, state.setdefault("inner_rx", {}), DecodeArgs(round=args.round, spec=spec_of(body))
        )
        meta = {
            "codec": self.name,
            "mode": "full" if ref is None else "delta",
            "reference": reference_digest(ref),
        }
        message = pack({INNER: torch.frombuffer(bytearray(inner_msg), dtype=torch.uint8), **rest}, meta)
        state["reference"] = self._advance(ref, sent)
        return message

    def decode(self, message: bytes, state: dict[str, Any], args: DecodeArgs = DecodeArgs()) -> Payload:
        """Client side: rebuild the global model from the message and this client's reference (``state``)."""
        tensors, meta = unpack(message, max_bytes=args.max_bytes)
        expect_codec(meta, self.name)
        if INNER not in tensors or meta.get("mode") not in ("full", "delta"):
            raise MalformedMessage("downlink-delta message without its inner message or mode")
        ref = state.get("reference") if meta["mode"] == "delta" else None
        if meta["mode"] == "delta" and reference_digest(ref) != meta.get("reference"):
            raise MalformedMessage(
                f"downlink delta coded against reference {meta.get('reference')}, this receiver "
                f"holds {reference_digest(ref)}"
            )
        inner_bytes = tensors.pop(INNER).numpy().tobytes()
        spec: PayloadSpec | None = None
        if args.spec is not None:
            spec = {k: s for k, s in args.spec.items() if s.dtype.is_floating_point}
        elif ref is not None:
            spec = spec_of(ref)
        sent = self.inner.decode(
            inner_bytes, state.setdefault("inner_rx", {}), DecodeArgs(round=args.round, spec=spec)
        )
        state["reference"] = self._advance(ref, sent)
        out = {k: v.clone() for k, v in state["reference"].items()}
        out.update(tensors)
        if args.spec is not None:
            return {k: out[k] for k in args.spec if k in out}
        return out


__all__ = ["DownlinkDelta", "reference_digest"]
