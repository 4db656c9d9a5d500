"""Codec API: a client encodes its reply payload into bytes, the server decodes them.

The bytes a codec returns are exactly what would cross the wire, so ``len(message)`` is the byte count
the loop reports. Codecs may keep per-client state (error-feedback residuals, momentum) in the
``state`` dict they are handed; the loop keeps it in the client store and checkpoints it.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from torch import Tensor

from lightning_fed.codecs.wire import expect_codec, pack, unpack
from lightning_fed.protocol import Payload, PayloadSpec


class Codec:
    """Base class of update codecs.

    Subclasses set ``name`` and implement :meth:`encode` and :meth:`decode`.
    """

    name: str = "codec"

    def encode(self, payload: Payload, state: dict[str, Tensor]) -> bytes:
        """Encode ``payload`` into a message; may read and update the per-client ``state`` in place.

        Codecs whose message size follows a density (``TopK`` and the codecs built on it) also accept
        ``share=``: this client's part of the uplink budget relative to an average client (see
        :func:`encode_budgeted`)."""
        raise NotImplementedError

    def decode(self, message: bytes, *, max_bytes: int | None = None, spec: PayloadSpec | None = None) -> Payload:
        """Decode a message produced by :meth:`encode`; raise ``MalformedMessage`` if it is not one.

        Args:
            message: the bytes received.
            max_bytes: reject larger messages before parsing them.
            spec: the payload the receiver expects (``Strategy.reply_spec`` on the server). Compact codecs
                rebuild names and shapes from it instead of carrying them; others may ignore it.
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Codec-wide (not per-client) state to checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def on_round_start(self, server_round: int) -> None:
        """Called by the loop before each round (schedules such as density warm-up use it)."""

    def broadcast(self) -> bytes:
        """Codec data every sampled client must receive this round (e.g. a shared sparsity mask); the loop
        counts its length in ``bytes_down`` once per sampled client. Empty by default."""
        return b""


class Identity(Codec):
    """No compression: the payload is sent as raw safetensors (the uncompressed baseline)."""

    name = "identity"

    def encode(self, payload: Payload, state: dict[str, Tensor]) -> bytes:
        """Serialise the payload unchanged."""
        return pack(payload, {"codec": self.name})

    def decode(self, message: bytes, *, max_bytes: int | None = None, spec: PayloadSpec | None = None) -> Payload:
        """Deserialise and check the codec tag (the message names its entries: ``spec`` is not needed)."""
        tensors, meta = unpack(message, max_bytes=max_bytes)
        expect_codec(meta, self.name)
        return tensors


_KEYWORDS: dict[tuple[type, str], frozenset[str]] = {}


def _keywords(codec: Codec, method: str) -> frozenset[str]:
    """The parameter names of ``codec.<method>``, cached per class (checked once, not once per message)."""
    key = (type(codec), method)
    names = _KEYWORDS.get(key)
    if names is None:
        try:
            names = frozenset(inspect.signature(getattr(codec, method)).parameters)
        except (TypeError, ValueError):
            names = frozenset()
        _KEYWORDS[key] = names
    return names


def check_share(share: float) -> float:
    """``share`` as a float; ``ValueError`` unless it is finite and > 0."""
    share = float(share)
    if not (share > 0 and math.isfinite(share)):
        raise ValueError(f"share={share!r} is not allowed; an uplink share must be finite and > 0")
    return share


def encode_budgeted(codec: Codec, payload: Payload, state: dict[str, Tensor], *, share: float = 1.0) -> bytes:
    """``codec.encode`` with the client's ``share`` of the uplink budget, for codecs that accept it.

    ``share`` scales the codec's configured rate for this one message: ``TopK(ratio=0.03)`` keeps
    ``0.03 * share`` of the entries (at most all of them). 1.0 is the configured rate; the loop's
    ``uplink_allocation="examples"`` gives every client its number of training examples over the mean, so the
    expected bytes of a round stay the same. Codecs with a fixed rate (casts, quantizers, ``Identity``) and
    codecs written without the argument ignore it.
    """
    share = check_share(share)
    if "share" in _keywords(codec, "encode"):
        return codec.encode(payload, state, share=share)
    return codec.encode(payload, state)


def decode_expected(codec: Codec, message: bytes, *, max_bytes: int | None = None, spec: PayloadSpec | None = None,
                    sender: int | None = None) -> Payload:
    """``codec.decode`` with the receiver's expected ``spec`` and the message's ``sender`` (a client id; ``None``
    for the server) for codecs whose ``decode`` accepts them (``spec``: the compact codecs; ``sender``: codecs
    with per-client server state such as ``Differential``). Codecs written without these arguments keep
    working. The signature check is cached per class: it runs once per message otherwise."""
    names = _keywords(codec, "decode")
    kwargs: dict[str, Any] = {"max_bytes": max_bytes}
    if "spec" in names:
        kwargs["spec"] = spec
    if "sender" in names:
        kwargs["sender"] = sender
    return codec.decode(message, **kwargs)
