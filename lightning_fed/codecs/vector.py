"""Base classes of the compressing codecs: a payload becomes one float32 vector in a compact frame.

:class:`VectorCodec` does what every compressing codec shares: the flat layout, the frame header and its
fingerprint, the optional self-describing layout section, lossless transport of non-float entries, error
feedback (the residual kept in the per-client state) and size checks on decode. A subclass only encodes
and decodes the vector (:meth:`VectorCodec.encode_vector` / :meth:`VectorCodec.decode_vector`).

:class:`ValueCodec` is the elementwise kind (casts and quantizers): besides being codecs on their own they
encode the values that a sparsifier or a low-rank codec selected (``TopK(values=QSGD(levels=7))``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_fed.codecs.base import Codec, DecodeArgs, EncodeArgs
from lightning_fed.codecs.deferred import DeferredValues, arrange
from lightning_fed.codecs.frame import (
    FLAG_EXTRAS,
    FLAG_LAYOUT,
    MAX_LAYOUT_BYTES,
    Reader,
    Writer,
    fingerprint,
    read_header,
    write_header,
)
from lightning_fed.codecs.wire import MalformedMessage, pack, unpack
from lightning_fed.flat import FlatSpec
from lightning_fed.protocol import Payload

_LAYOUT_ID = "layout_id"


class VectorCodec(Codec):
    """A codec that encodes the payload's float entries as one flat vector (see :mod:`.frame`).

    The per-call inputs travel down as arguments: :meth:`encode_flat` and :meth:`encode_vector` get the
    client's state and the :class:`~lightning_fed.codecs.base.EncodeArgs`, :meth:`decode_vector` the sender's
    server state and the :class:`~lightning_fed.codecs.base.DecodeArgs`; nothing per call is kept on the codec.

    Args:
        error_feedback: keep the compression error in the client's state and add it to the next update
            (Seide et al. 2014; Karimireddy et al. 2019), so nothing is lost, only delayed.
        self_describing: also send the layout (names, dtypes, shapes) so that a receiver without the
            expected spec can decode; costs about 30 bytes per entry.
    """

    name = "vector"

    def __init__(self, *, error_feedback: bool = False, self_describing: bool = False) -> None:
        self.error_feedback = bool(error_feedback)
        self.self_describing = bool(self_describing)

    # ------------------------------------------------------------------ to implement
    def wire_config(self) -> str:
        """The settings a decoder must share with the encoder (hashed into every frame's fingerprint)."""
        return self.name

    def encode_vector(self, x: Tensor, state: dict[str, Any], w: Writer, layout: FlatSpec, args: EncodeArgs) -> Tensor:
        """Write the code of float32 vector ``x`` to ``w``; return what the decoder will reconstruct.

        Args:
            x: the flat update (with error feedback: already corrected by the residual).
            state: the client's codec state (read and updated in place, e.g. PowerSGD's warm start).
            w: the frame writer.
            layout: the payload's flat layout.
            args: the per-call inputs of :meth:`encode`.
        """
        raise NotImplementedError

    def decode_vector(self, r: Reader, layout: FlatSpec, state: dict[str, Any], args: DecodeArgs) -> Tensor:
        """Read the code written by :meth:`encode_vector`; return the float32 vector of ``layout.numel``.

        Args:
            r: the frame reader, positioned at the codec body.
            layout: the payload's flat layout.
            state: the receiver's state about the sender (read and updated in place; kept only if the whole
                message turns out valid).
            args: the per-call inputs of :meth:`decode`.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ Codec API
    def encode(self, payload: Payload, state: dict[str, Any], args: EncodeArgs = EncodeArgs()) -> bytes:
        """Encode ``payload``; with error feedback, read and update ``state["residual"]``.

        ``args.share`` scales the rate of codecs whose size follows a density (``TopK``); others ignore it.
        """
        layout, extras = FlatSpec.from_floats(payload)
        flags = (FLAG_LAYOUT if self.self_describing else 0) | (FLAG_EXTRAS if extras else 0)
        w = Writer()
        write_header(w, flags, fingerprint(self.wire_config(), layout.key()))
        if self.self_describing:
            w.blob(layout.to_bytes())
        if extras:
            w.blob(pack(extras, {}))
        self.encode_flat(layout.flatten(payload), state, w, layout, args)
        return w.getvalue()

    def encode_flat(self, x: Tensor, state: dict[str, Any], w: Writer, layout: FlatSpec, args: EncodeArgs) -> Tensor:
        """Encode the flat update with error feedback if enabled; return the reconstruction."""
        if not self.error_feedback:
            return self.encode_vector(x, state, w, layout, args)
        e = x + client_tensor(state, "residual", layout)
        sent = self.encode_vector(e, state, w, layout, args)
        state["residual"] = e - sent
        return sent

    def decode(self, message: bytes, state: dict[str, Any], args: DecodeArgs = DecodeArgs()) -> Payload:
        """Decode a frame; the layout comes from the frame (self-describing) or from ``args.spec``.

        ``state`` (the receiver's state about ``args.sender``) changes only when the whole message is valid: a
        rejected message leaves it as it was.

        Raises:
            MalformedMessage: too large, truncated, trailing bytes, wrong codec or configuration, a layout
                that is not the expected one, or inconsistent fields.
        """
        r, flags, layout = self._open(message, args)
        extras: Payload = {}
        if flags & FLAG_EXTRAS:
            extras, _ = unpack(r.blob("extras", len(r.data)))
        pending = dict(state)  # the sender's state as this message leaves it, kept only if the message is valid
        flat = self.decode_vector(r, layout, pending, args)
        r.finish()
        if flat.numel() != layout.numel:
            raise MalformedMessage(f"decoded {flat.numel()} values, the layout has {layout.numel}")
        state.clear()
        state.update(pending)
        return arrange({**layout.unflatten(flat), **extras}, args.spec)

    def decode_deferred(self, message: bytes, state: dict[str, Any], args: DecodeArgs = DecodeArgs()
                        ) -> DeferredValues | None:
        """The message's values left in the message (:meth:`defer_vector`), when its layout is the expected
        spec's, every entry float32, with nothing else in the frame; else ``None``."""
        spec = args.spec
        if spec is None or not all(v.dtype == torch.float32 and not v.optional for v in spec.values()):
            return None
        r, flags, layout = self._open(message, args)
        if flags:  # a layout or extras travel: decoded in full
            return None
        deferred = self.defer_vector(r, layout, args)
        if deferred is not None:
            r.finish()
        return deferred

    def defer_vector(self, r: Reader, layout: FlatSpec, args: DecodeArgs) -> DeferredValues | None:
        """Read the code as :meth:`decode_vector` does, but leave the values in the message; ``None``: this
        codec cannot (the default)."""
        return None

    def _open(self, message: bytes, args: DecodeArgs) -> tuple[Reader, int, FlatSpec]:
        """Size limit, header, layout and fingerprint of a frame: a reader at the codec body, the flags and the
        layout."""
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise MalformedMessage(f"message must be bytes, got {type(message).__name__}")
        message = bytes(message)
        if args.max_bytes is not None and len(message) > args.max_bytes:
            raise MalformedMessage(f"message of {len(message)} bytes exceeds the limit of {args.max_bytes}")
        r = Reader(message)
        flags, digest = read_header(r)
        spec = args.spec
        config = self.wire_config()
        if flags & FLAG_LAYOUT:
            layout = FlatSpec.from_bytes(r.blob("layout", MAX_LAYOUT_BYTES))
            expected = fingerprint(config, layout.key())
        elif spec is None:
            raise MalformedMessage(
                f"{self.name}: the message does not carry its layout; decode with DecodeArgs(spec=expected_spec) or "
                "encode with self_describing=True"
            )
        else:  # the layout and fingerprint the expected spec implies: derived once per spec (and configuration)
            known = self._expected
            if known is None or known[0] is not spec or known[1] != config:
                layout = FlatSpec.from_spec(spec)
                known = self._expected = (spec, config, layout, fingerprint(config, layout.key()))
            _, _, layout, expected = known
        if expected != digest:
            raise MalformedMessage(
                f"fingerprint mismatch: the message was not encoded by {self.wire_config()} for this payload layout"
            )
        return r, flags, layout

    _expected: tuple[Any, str, FlatSpec, bytes] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.wire_config()})"


class ValueCodec(VectorCodec):
    """An elementwise (stateless) quantizer of a float vector; also usable as ``values=`` of other codecs."""

    name = "values"

    def encode_values(self, v: Tensor, w: Writer, reconstruct: bool = True) -> Tensor | None:
        """Write the code of ``v``; return the values the decoder will reconstruct (``None`` allowed when
        ``reconstruct`` is false: nobody needs them, e.g. without error feedback)."""
        raise NotImplementedError

    def decode_values(self, r: Reader, n: int) -> Tensor:
        """Read ``n`` values written by :meth:`encode_values`."""
        raise NotImplementedError

    def encode_vector(self, x: Tensor, state: dict[str, Any], w: Writer, layout: FlatSpec, args: EncodeArgs) -> Tensor:
        """The whole vector through :meth:`encode_values`."""
        return self.encode_values(x, w, reconstruct=self.error_feedback)

    def decode_vector(self, r: Reader, layout: FlatSpec, state: dict[str, Any], args: DecodeArgs) -> Tensor:
        """The whole vector through :meth:`decode_values`."""
        return self.decode_values(r, layout.numel)

    def defer_vector(self, r: Reader, layout: FlatSpec, args: DecodeArgs) -> DeferredValues | None:
        """The whole vector through :meth:`defer_values`."""
        deferred = self.defer_values(r, layout.numel)
        if deferred is not None:
            deferred.layout, deferred.spec = layout, args.spec
        return deferred

    def defer_values(self, r: Reader, n: int) -> DeferredValues | None:
        """Read ``n`` values' code as :meth:`decode_values` does, leaving the values in the message; ``None``
        (the default): this codec decodes them in full."""
        return None


def layout_id(layout: FlatSpec) -> Tensor:
    """The layout's fingerprint as an int64 scalar tensor (stored beside layout-bound state, see
    :func:`client_tensor`)."""
    return torch.tensor(int.from_bytes(fingerprint(layout.key()), "little"), dtype=torch.int64)


def client_tensor(state: dict[str, Any], key: str, layout: FlatSpec, numel: int | None = None) -> Tensor:
    """A per-client float32 buffer (residual, momentum, reference…) of ``numel`` (default ``layout.numel``)
    elements, in a client's state or in the server's state about a sender.

    Zeros when missing, of another size, or recorded for another layout (the model changed structure,
    e.g. after pruning): then every layout-bound buffer of that state is dropped.
    """
    numel = layout.numel if numel is None else numel
    lid = layout_id(layout)
    if _LAYOUT_ID in state and not torch.equal(state[_LAYOUT_ID], lid):
        for k in list(state):
            del state[k]
    state[_LAYOUT_ID] = lid
    t = state.get(key)
    if t is None or t.numel() != numel:
        t = torch.zeros(numel, dtype=torch.float32)
        state[key] = t
    return t


def value_config(values: ValueCodec | None) -> str:
    """Wire configuration of an optional nested value codec (``None`` = raw float32)."""
    return "f32" if values is None else values.wire_config()


def check_values(owner: str, values: object) -> None:
    """Raise ``ValueError`` unless ``values`` is ``None`` or a :class:`ValueCodec`."""
    if values is not None and not isinstance(values, ValueCodec):
        raise ValueError(
            f"{owner}: values={values!r} is not allowed; values must be None (float32) or a value codec "
            "(Cast, Blockwise8bit, Blockwise4bit, QSGD, Sign)"
        )


def write_values(values: ValueCodec | None, v: Tensor, w: Writer) -> Tensor:
    """Encode selected values with ``values`` (raw float32 if ``None``); return their reconstruction."""
    if values is None:
        w.floats(v)
        return v.float()
    out = values.encode_values(v, w, reconstruct=True)
    assert out is not None
    return out


def read_values(values: ValueCodec | None, r: Reader, n: int) -> Tensor:
    """Decode ``n`` values written by :func:`write_values`."""
    return r.floats(n) if values is None else values.decode_values(r, n)
