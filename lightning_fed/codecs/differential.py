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

The client keeps ``h`` in its own codec state; the server keeps its copy in its state about that sender, the
dict :meth:`Differential.decode` is handed (the loop keeps one per client, on disk), under the same keys
(``"reference"`` and ``"layout_id"``). Every message carries a 2-byte digest of the reference it was coded
against; a message coded against another reference (server or client state lost, another client's message,
another client's state) is rejected with :class:`~lightning_fed.codecs.wire.MalformedMessage`, and a rejected
message leaves the server's state as it was.

On the wire, after the frame header: the reference digest (2 bytes), ``beta`` (float16), then the inner
codec's body.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from lightning_fed.codecs.base import DecodeArgs, EncodeArgs
from lightning_fed.codecs.frame import Reader, Writer
from lightning_fed.codecs.tcs import TimeCorrelatedTopK
from lightning_fed.codecs.vector import VectorCodec, client_tensor
from lightning_fed.codecs.wire import MalformedMessage
from lightning_fed.flat import FlatSpec


def _digest(ref: Tensor) -> bytes:
    return hashlib.blake2b(ref.contiguous().numpy().tobytes(), digest_size=2).digest()


class Differential(VectorCodec):
    """Code each client's update as ``beta * h + inner(rest)``, ``h`` a reference both sides share per client.

    Example::

        codec = Differential(TopK(0.031, values=Sign(block=32, scale_dtype="float16")), smoothing=0.5)
        loop = FedLoop(..., codec=codec)     # the loop keeps the server's state per sender

        client_state, server_state = {}, {}   # one client; the server's state about it
        msg = codec.encode(update, client_state, EncodeArgs(round=r))
        out = codec.decode(msg, server_state, DecodeArgs(round=r, sender=cid, spec=spec))

    Args:
        inner: the vector codec of the difference (``TopK``, ``QSGD``, ``Sign``, ``PowerSGD``…); its error
            feedback and schedules work as usual (it gets the same ``EncodeArgs``). ``TimeCorrelatedTopK`` is
            refused (the client here decodes its own message, and only the server holds TCS's mask).
        beta: ``None`` fits ``beta`` by least squares per message; a number fixes it (still sent).
        smoothing: the reference after a message is ``(1 - smoothing) * h + smoothing * reconstruction``
            (1: the last reconstruction); in ``(0, 1]``.
        max_beta: the largest ``|beta|`` sent (clamped on the client, checked on the server).
        self_describing: also send the layout.
    """

    name = "differential"

    def __init__(self, inner: VectorCodec, *, beta: float | None = None, smoothing: float = 1.0, max_beta: float = 2.0,
                 self_describing: bool = False) -> None:
        # a misconfiguration, not a programming error: ValueError as every constructor check (STYLE rule 3)
        if isinstance(inner, Differential):
            raise ValueError(f"Differential: inner={inner!r} is not allowed; it must be a vector codec (TopK, QSGD, "
                             "Sign, PowerSGD, RandomK, Cast…), not another Differential")
        if isinstance(inner, TimeCorrelatedTopK):
            raise ValueError("Differential: inner=TimeCorrelatedTopK is not supported; Differential's client decodes "
                             "its own message, and TimeCorrelatedTopK decodes against the server's mask")
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

    def wire_config(self) -> str:
        """``differential(topk(sign(32,float16)))`` and the like."""
        return f"differential({self.inner.wire_config()})"

    def broadcast(self, server_round: int) -> bytes:
        """The inner codec's broadcast (handed back to it in ``EncodeArgs.broadcast``)."""
        return self.inner.broadcast(server_round)

    def _next_reference(self, ref: Tensor, new: Tensor) -> Tensor:
        """The reference of the next message: the reconstruction, or its running average (``smoothing < 1``)."""
        if self.smoothing == 1.0 or not bool(ref.any()):
            return new.clone()
        return ref * (1.0 - self.smoothing) + new * self.smoothing

    # ------------------------------------------------------------------ client side
    def encode_flat(self, x: Tensor, state: dict[str, Any], w: Writer, layout: FlatSpec, args: EncodeArgs) -> Tensor:
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
        self.inner.encode_flat(x - b * ref if b else x, state, body, layout, args)  # same round, share, broadcast
        data = body.getvalue()
        w.raw(data)
        r = Reader(data)  # decode the body exactly as the server will, so both references stay bit-identical
        rest = self.inner.decode_vector(r, layout, {}, DecodeArgs(round=args.round))
        r.finish()
        new = rest.add_(ref, alpha=b) if b else rest
        state["reference"] = self._next_reference(ref, new)
        return new

    # ------------------------------------------------------------------ server side
    def decode_vector(self, r: Reader, layout: FlatSpec, state: dict[str, Any], args: DecodeArgs) -> Tensor:
        """Check the reference digest and ``beta`` against ``state``, the server's state about ``args.sender``;
        add ``beta * h`` to the inner codec's vector and advance ``h`` in ``state`` as the client did."""
        ref = client_tensor(state, "reference", layout)  # as the client's: dropped when the layout changes
        if bytes(r.take(2, "reference digest")) != _digest(ref):
            raise MalformedMessage(f"differential: the message of sender {args.sender} was coded against another "
                                   "reference (the client's or the server's state was lost or is foreign)")
        b = float(torch.frombuffer(bytearray(r.take(2, "beta")), dtype=torch.float16)[0])
        if not abs(b) <= self.max_beta:  # also rejects NaN
            raise MalformedMessage(f"differential: beta={b} is outside [-{self.max_beta}, {self.max_beta}]")
        rest = self.inner.decode_vector(r, layout, {}, args)
        new = rest.add_(ref, alpha=b) if b else rest
        state["reference"] = self._next_reference(ref, new)
        return new

    def state_dict(self) -> dict[str, Any]:
        """The inner codec's codec-wide state (the references per sender live in the per-sender states)."""
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.inner.load_state_dict(state.get("inner", {}))


__all__ = ["Differential"]
