"""Codec API: a client half encodes a reply payload into bytes, a server half decodes them.

The bytes a codec returns are exactly what would cross the wire, so ``len(message)`` is the byte count
the loop reports. Both halves are methods of one object, but they share nothing per call: every per-call
input is an argument (:class:`EncodeArgs`, :class:`DecodeArgs`), per-client state is a dict passed in and
updated in place (the client's own state on the client; the server's state about that sender on the
server), and both dicts live in stores on disk, loaded only while that client is active.

What a codec may keep on itself is codec-wide server state that every client shares (TCS's global mask);
it checkpoints it through :meth:`Codec.state_dict`. The server tells a codec which decoded replies it kept
(:meth:`Codec.accept`), after validation and the callbacks' say: a decoder never aggregates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_fed.codecs.deferred import FlatValues
from lightning_fed.codecs.wire import expect_codec, header_prefix, pack, unpack
from lightning_fed.flat import FlatSpec
from lightning_fed.protocol import Payload, PayloadSpec
from lightning_fed.validation import CheckedArguments


def check_share(share: float) -> float:
    """``share`` as a float; ``ValueError`` unless it is finite and > 0."""
    share = float(share)
    if not (share > 0 and math.isfinite(share)):
        raise ValueError(f"share={share!r} is not allowed; an uplink share must be finite and > 0")
    return share


@dataclass(frozen=True)
class EncodeArgs:
    """The per-call inputs of :meth:`Codec.encode` (client side).

    Attributes:
        round: the server round (0-based); schedules such as a density warm-up read it.
        share: this client's part of the uplink budget relative to an average client (1.0 = the codec's
            configured rate). Codecs whose size follows a density (``TopK`` and the codecs built on it) scale
            their rate by it; fixed-rate codecs ignore it.
        broadcast: what the server's codec broadcast to every sampled client this round
            (:meth:`Codec.broadcast`, e.g. TCS's global mask), exactly as received; ``b""`` when none.
        client_id: the encoding client (``None`` outside a round).
        num_examples: the client's number of training examples (a codec that weights the update itself before
            it leaves the client, as secure aggregation must, reads it).
        config: the plain config of the client's instruction (per-client setup data of a protocol whose
            strategy prepares the encoding, e.g. the keys of secure aggregation).
    """

    round: int = 0
    share: float = 1.0
    broadcast: bytes = b""
    client_id: int | None = None
    num_examples: int = 0
    config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_share(self.share)


@dataclass(frozen=True)
class DecodeArgs:
    """The per-call inputs of :meth:`Codec.decode` (server side, or a client decoding the downlink).

    Attributes:
        round: the server round (0-based).
        sender: the client that sent the message (the transport knows it: it costs no bytes); ``None`` for
            the server's own downlink messages.
        spec: the payload the receiver expects (``Strategy.reply_spec`` on the server). Compact codecs rebuild
            names and shapes from it instead of carrying them; others may ignore it.
        max_bytes: reject larger messages before parsing them.
    """

    round: int = 0
    sender: int | None = None
    spec: PayloadSpec | None = None
    max_bytes: int | None = None


class Codec(CheckedArguments):
    """Base class of update codecs.

    Subclasses set ``name`` and implement :meth:`encode` and :meth:`decode`; codecs with codec-wide server
    state also :meth:`broadcast`, :meth:`accept`, :meth:`state_dict` and :meth:`load_state_dict`.
    """

    name: str = "codec"
    per_receiver: bool = False
    """As a downlink codec: its messages depend on the receiving client (a delta to what that client last
    received), so the server encodes one message per client with its state about that client, and each client
    decodes with its own state (see :class:`~lightning_fed.codecs.DownlinkDelta`)."""

    reads_accepted: bool = False
    """Whether :meth:`accept` reads the payloads it is given (TCS sums them). ``False`` lets the server release a
    reply's payload once it is folded into the mean (see :class:`~lightning_fed.server.Server`); a codec that
    overrides :meth:`accept` declares it in its own class."""

    def encode(self, payload: Payload, state: dict[str, Any], args: EncodeArgs = EncodeArgs()) -> bytes:
        """Client side: encode ``payload`` into a message.

        Args:
            payload: the reply payload.
            state: this client's own codec state (error-feedback residual, reference…), read and updated in
                place; kept in the client store between the client's rounds.
            args: the per-call inputs.
        """
        raise NotImplementedError

    def decode(self, message: bytes, state: dict[str, Any], args: DecodeArgs = DecodeArgs()) -> Payload:
        """Server side: decode a message produced by :meth:`encode`; raise ``MalformedMessage`` if it is not one.

        Args:
            message: the bytes received.
            state: the receiver's state about this sender (e.g. ``Differential``'s reference), read and
                updated in place; kept on disk between the sender's rounds. It only keeps the two sides in
                step: decoding never aggregates (see :meth:`accept`).
            args: the per-call inputs.
        """
        raise NotImplementedError

    def decode_deferred(self, message: bytes, state: dict[str, Any], args: DecodeArgs = DecodeArgs()) -> Any:
        """Server side, optional: the message's values left where they are, for a server that folds them into
        a mean without keeping them (:class:`~lightning_fed.codecs.vector.DeferredValues`: measured, added
        and, only if something else reads them, decoded), or ``None`` (the default; also for a message this
        codec cannot defer): the server calls :meth:`decode`. Raises ``MalformedMessage`` as :meth:`decode`
        would; ``state`` changes as with :meth:`decode`."""
        return None

    def broadcast(self, server_round: int) -> bytes:
        """Server side: codec data every sampled client of ``server_round`` receives before it encodes (e.g. a
        shared sparsity mask), passed to :meth:`encode` as ``args.broadcast``; the loop counts its length in
        ``bytes_down`` once per sampled client. Empty by default."""
        return b""

    def accept(self, server_round: int, payloads: list[Payload]) -> None:
        """Server side: the decoded payloads of ``server_round`` that passed validation and the callbacks and
        are aggregated (in client order). Codecs that adapt to the aggregate (TCS's next mask) update their
        codec-wide state here; rejected or dropped replies never reach it. No-op by default."""

    def state_dict(self) -> dict[str, Any]:
        """Codec-wide (not per-client) server state to checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class Identity(Codec):
    """No compression: the payload is sent as raw safetensors (the uncompressed baseline)."""

    name = "identity"

    def encode(self, payload: Payload, state: dict[str, Any], args: EncodeArgs = EncodeArgs()) -> bytes:
        """Serialise the payload unchanged."""
        return pack(payload, {"codec": self.name})

    def decode(self, message: bytes, state: dict[str, Any], args: DecodeArgs = DecodeArgs()) -> Payload:
        """Deserialise and check the codec tag (the message names its entries: ``args.spec`` is not needed).

        A message from a client (``args.sender`` set) received as ``bytes`` decodes without a copy: the entries
        are read-only views of the message, back to back in the sender's order (one flat buffer in the strategy's
        layout for FedAvg, so aggregation reads the message itself). The downlink (``args.sender is None``, one
        message shared by every client) is decoded into a writable copy."""
        tensors, meta = unpack(message, max_bytes=args.max_bytes, share=args.sender is not None)
        expect_codec(meta, self.name)
        return tensors

    def decode_deferred(self, message: bytes, state: dict[str, Any], args: DecodeArgs = DecodeArgs()) -> Any:
        """A sender's message of the expected layout (its header byte for byte what :meth:`encode` writes for a
        payload matching ``args.spec``, every entry float32, in the spec's order) as one read-only float32 view
        of its body (:class:`~lightning_fed.codecs.deferred.FlatValues`), without parsing it: such a message
        decodes to exactly that structure. Any other message: ``None`` (the server decodes it in full, with
        every check)."""
        spec = args.spec
        if args.sender is None or spec is None or type(message) is not bytes:
            return None
        known = self._known
        if known is None or known[0] is not spec:
            if not all(v.dtype == torch.float32 and not v.optional and min(v.shape, default=0) >= 0
                       for v in spec.values()):
                return None
            layout = FlatSpec.build(list(spec), [tuple(v.shape) for v in spec.values()])
            prefix = header_prefix([(k, torch.float32, tuple(v.shape)) for k, v in spec.items()], {"codec": self.name})
            known = self._known = (spec, prefix, layout)
        _, prefix, layout = known
        if (len(message) != len(prefix) + 4 * layout.numel or not message.startswith(prefix)
                or (args.max_bytes is not None and len(message) > args.max_bytes) or not layout.numel):
            return None
        return FlatValues(message, len(prefix), layout, lambda: self.decode(message, {}, args))

    _known: tuple[PayloadSpec, bytes, FlatSpec] | None = None
