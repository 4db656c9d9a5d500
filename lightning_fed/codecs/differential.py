"""Differential (predictive) coding: each message codes what a client's update adds to a prediction of it.

Under non-IID data a client's successive updates point largely the same way (toward its own local optimum):
on the FedAvg MNIST-1D recipe the cosine between a client's update and its update at its previous
participation is 0.6 early in training and 0.9 after round 30, while the cosine with the last global update
is near 0. Both sides know a per-client reference ``h`` built only from what crossed the wire: the client's
previous reconstructed update (``smoothing=1``), or a running average of its reconstructions. The client
sends

    beta = <u + e, h> / <h, h>  (float16; e = the inner codec's error-feedback residual),
    inner.encode(u - beta * h)

the receiver reconstructs ``beta * h + inner.decode(...)``, and both sides update ``h`` from that
reconstruction (the client decodes its own message, so the two references stay bit-identical). With an
error-feedback inner codec (``TopK``) the sum of the reconstructions still equals the sum of the updates
minus the residual left: the reference only lowers the norm of what the inner codec must carry. This is
the one-tap linear predictor of DPCM, applied per client. With ``beta=1``, an inner codec without error
feedback and ``smoothing=1`` it is EF21 (Richtárik et al. 2021): ``h <- h + C(u - h)``.

The server keeps one update-sized float32 vector per client it heard from (``decode(..., sender=id)``:
the transport knows who sent a message, so the id costs no bytes). Every message carries a 2-byte digest of
the reference it was coded against; a message coded against another reference (server or client state
lost, another client's message) is rejected with :class:`~lightning_fed.codecs.wire.MalformedMessage`.

On the wire, after the frame header: the reference digest (2 bytes), ``beta`` (float16), then the inner
codec's body.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from lightning_fed.codecs.frame import Reader, Writer, fingerprint
from lightning_fed.codecs.layout import Layout
from lightning_fed.codecs.tcs import TimeCorrelatedTopK
from lightning_fed.codecs.vector import VectorCodec, client_tensor
from lightning_fed.codecs.wire import MalformedMessage
from lightning_fed.protocol import Payload, PayloadSpec


def _digest(ref: Tensor) -> bytes:
    return hashlib.blake2b(ref.contiguous().numpy().tobytes(), digest_size=2).digest()


class Differential(VectorCodec):
    """Code each client's update as ``beta * h + inner(rest)``, ``h`` a reference both sides share per client.

    Example::

        codec = Differential(TopK(0.031, values=Sign(block=32, scale_dtype="float16")), smoothing=0.5)
        loop = FedLoop(..., codec=codec)     # the loop passes decode(..., sender=client_id)

    Args:
        inner: the vector codec of the difference (``TopK``, ``QSGD``, ``Sign``, ``PowerSGD``…); its error
            feedback and schedules work as usual. ``TimeCorrelatedTopK`` is refused (its server side
            accumulates what it decodes, and the client here decodes its own message too).
        beta: ``None`` fits ``beta`` by least squares per message; a number fixes it (still sent).
        smoothing: the reference after a message is ``(1 - smoothing) * h + smoothing * reconstruction``
            (1: the last reconstruction); in ``(0, 1]``.
        max_beta: the largest ``|beta|`` sent (clamped on the client, checked on the server).
        self_describing: also send the layout.
    """

    name = "differential"

    def __init__(self, inner: VectorCodec, *, beta: float | None = None, smoothing: float = 1.0, max_beta: float = 2.0,
                 self_describing: bool = False) -> None:
        if not isinstance(inner, VectorCodec) or isinstance(inner, Differential):
            raise ValueError(f"Differential: inner={inner!r} is not allowed; it must be a vector codec (TopK, QSGD, "
                             "Sign, PowerSGD, RandomK, Cast…), not another Differential")
        if isinstance(inner, TimeCorrelatedTopK):
            raise ValueError("Differential: inner=TimeCorrelatedTopK is not supported; its decoder accumulates the "
                             "round's vectors, and Differential's client decodes its own message")
        if not 0 < max_beta <= 60000:
            raise ValueError(f"Differential: max_beta={max_beta!r} is not allowed; it must be in (0, 60000]")
        if beta is not None and not abs(beta) <= max_beta:
            raise ValueError(f"Differential: beta={beta!r} is not allowed; it must be None (fitted) or in "
                             f"[-max_beta, max_beta] = [-{max_beta}, {max_beta}]")
        if not 0 < smoothing <= 1:
            raise ValueError(f"Differential: smoothing={smoothing!r} is not allowed; it must be in (0, 1]")
        super().__init__(error_feedback=False, self_describing=self_describing)
        self.inner = inner
        self.max_beta = float(max_beta)
        self.beta = beta
        self.smoothing = float(smoothing)
        self.references: dict[int, Tensor] = {}  # server side: the reference per sender
        self._layouts: dict[int, bytes] = {}  # …and the fingerprint of the layout it was built for
        self._sender: int | None = None

    def wire_config(self) -> str:
        """``differential(topk(sign(32,float16)))`` and the like."""
        return f"differential({self.inner.wire_config()})"

    def on_round_start(self, server_round: int) -> None:
        """Forwarded to the inner codec (density warm-up and other schedules)."""
        self.inner.on_round_start(server_round)

    def broadcast(self) -> bytes:
        """The inner codec's broadcast."""
        return self.inner.broadcast()

    def _next_reference(self, ref: Tensor, new: Tensor) -> Tensor:
        """The reference of the next message: the reconstruction, or its running average (``smoothing < 1``)."""
        if self.smoothing == 1.0 or not bool(ref.any()):
            return new.clone()
        return ref * (1.0 - self.smoothing) + new * self.smoothing

    # ------------------------------------------------------------------ client side
    def encode_flat(self, x: Tensor, state: dict[str, Tensor], w: Writer, layout: Layout) -> Tensor:
        """Fit ``beta``, code ``x - beta * h`` with the inner codec, and advance ``h`` as the server will."""
        ref = client_tensor(state, "reference", layout)
        hh = float(ref @ ref)
        beta = 0.0
        if hh > 0.0 and self.beta is not None:
            beta = self.beta
        elif hh > 0.0:  # least squares on what the inner codec will code: the update plus its residual
            target = x + client_tensor(state, "residual", layout) if self.inner.error_feedback else x
            beta = max(-self.max_beta, min(self.max_beta, float(target @ ref) / hh))
        beta16 = torch.tensor([beta], dtype=torch.float16)
        w.raw(_digest(ref))
        w.raw(beta16.view(torch.uint8).numpy().tobytes())
        body = Writer()
        b = float(beta16)
        self.inner.share = self.share  # the client's part of the uplink budget goes to the inner codec
        try:
            self.inner.encode_flat(x - b * ref if b else x, state, body, layout)
        finally:
            self.inner.share = 1.0
        data = body.getvalue()
        w.raw(data)
        r = Reader(data)  # decode the body exactly as the server will, so both references stay bit-identical
        rest = self.inner.decode_vector(r, layout)
        r.finish()
        new = rest.add_(ref, alpha=b) if b else rest
        state["reference"] = self._next_reference(ref, new)
        return new

    # ------------------------------------------------------------------ server side
    def decode(self, message: bytes, *, max_bytes: int | None = None, spec: PayloadSpec | None = None,
               sender: int | None = None) -> Payload:
        """Decode the message of ``sender`` against the reference kept for it (see :class:`VectorCodec`)."""
        self._sender = sender
        try:
            return super().decode(message, max_bytes=max_bytes, spec=spec)
        finally:
            self._sender = None

    def decode_vector(self, r: Reader, layout: Layout) -> Tensor:
        """Check the reference digest and ``beta``; add ``beta * h`` to the inner codec's vector."""
        key = -1 if self._sender is None else int(self._sender)
        lid = fingerprint(layout.key())
        ref = self.references.get(key)
        if ref is None or self._layouts.get(key) != lid:  # as the client's state, dropped when the layout changes
            ref = torch.zeros(layout.numel)
        if bytes(r.take(2, "reference digest")) != _digest(ref):
            raise MalformedMessage(f"differential: the message of sender {key} was coded against another reference "
                                   "(the client's or the server's state was lost or is foreign)")
        b = float(torch.frombuffer(bytearray(r.take(2, "beta")), dtype=torch.float16)[0])
        if not abs(b) <= self.max_beta:  # also rejects NaN
            raise MalformedMessage(f"differential: beta={b} is outside [-{self.max_beta}, {self.max_beta}]")
        rest = self.inner.decode_vector(r, layout)
        new = rest.add_(ref, alpha=b) if b else rest
        self.references[key], self._layouts[key] = self._next_reference(ref, new), lid
        return new

    def state_dict(self) -> dict[str, Any]:
        """The inner codec's state and the server's reference per sender."""
        return {"inner": self.inner.state_dict(), "references": {k: v.clone() for k, v in self.references.items()},
                "layouts": dict(self._layouts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.inner.load_state_dict(state.get("inner", {}))
        self.references = {int(k): v.clone() for k, v in state.get("references", {}).items()}
        self._layouts = {int(k): bytes(v) for k, v in state.get("layouts", {}).items()}


__all__ = ["Differential"]
