"""Values left in their message: what a codec hands a server that folds a reply into a mean without keeping it
(:meth:`Codec.decode_deferred <lightning_fed.codecs.Codec.decode_deferred>`). The server measures the values,
judges them and adds them straight from the message; it decodes them into a payload only if something else must
read them (a rejected reply, to name its bad entry)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_fed.flat import FlatSpec
from lightning_fed.protocol import Payload


class DeferredValues:
    """A reply's values still in their message (:meth:`Codec.decode_deferred
    <lightning_fed.codecs.Codec.decode_deferred>`): a server folding them into a mean measures them and adds
    them straight from the code, and decodes them (:meth:`payload`) only if something else must read them.

    Attributes:
        layout: the codec layout of the values (set by the codec).
        spec: the expected spec, for the payload's entry order (set by the codec).
    """

    layout: FlatSpec
    spec: Any = None
    judge_first = False
    """Whether the values lie as float32 (:meth:`values` is free) so that measuring them is one read at memory
    speed, and they can be added aside (a snapshot taken by the add): the fold's checked pass takes these (judged
    block by block as they are added, :meth:`values` read where they lie), and a fold asked to judge small replies
    first (``MeanFold(judge_first_bytes=...)``) may judge these. Codes that must be decoded are added and measured
    in one pass instead."""

    @property
    def nbytes(self) -> int:
        """The bytes these values keep alive while a fold holds them to undo a rejection (what its window counts
        against ``hold_bytes``). The default is their float32 size; a code counts what it really holds."""
        return self.layout.numel * 4

    def measure(self, bound: bool = True) -> tuple[float, float]:
        """``(sum of squares, largest magnitude)`` of the values (``inf`` magnitude for a value not finite;
        without ``bound`` the magnitude may be ``0.0`` for finite values, as :func:`~lightning_fed.kernels.
        measure` gives it)."""
        raise NotImplementedError

    def add_into(self, acc: Tensor, w: float, segments: list[tuple[int, int, int]]) -> None:
        """``acc[dst : dst + n] += w * x[src : src + n]`` for each ``(src, dst, n)`` of ``segments`` (``x`` the
        values in layout order), bit-identical to decoding ``x`` and calling ``add_``."""
        raise NotImplementedError

    def add_measure(
        self, acc: Tensor, w: float, segments: list[tuple[int, int, int]], bound: bool
    ) -> tuple[float, float]:
        """:meth:`add_into` and :meth:`measure` in one pass over the values."""
        raise NotImplementedError

    def values(self) -> Tensor:
        """The decoded float32 vector, in layout order."""
        raise NotImplementedError

    def payload(self) -> Payload:
        """What :meth:`Codec.decode <lightning_fed.codecs.Codec.decode>` returns for the message."""
        return arrange(self.layout.unflatten(self.values()), self.spec)


def arrange(payload: Payload, spec: Any) -> Payload:
    """``payload`` in the spec's order where it names the entries (the others after)."""
    if spec is None:
        return payload
    return {**{k: payload[k] for k in spec if k in payload}, **payload}


class FlatValues(DeferredValues):
    """float32 values lying back to back in a message (an :class:`~lightning_fed.codecs.Identity` reply of a
    known layout): measured and added where they lie, one call each for a reply in the accumulator's order.

    The fold's pass reads them through a numpy view of the message (:attr:`array`, made without torch: a
    server handles one such reply per client per round, so what it does per message counts at small models);
    the torch view (:attr:`flat`) is made only when something reads it.

    Args:
        message: the message.
        offset: where the values start in it.
        layout: their layout (the message's entry order); ``layout.numel`` values.
        decode: what decoding the message in full gives (called only when the payload is read).
    """

    judge_first = True

    def __init__(self, message: bytes, offset: int, layout: FlatSpec, decode: Any) -> None:
        self.layout, self._decode = layout, decode
        self._message, self._offset = message, offset
        self.array = np.frombuffer(message, dtype=np.float32, count=layout.numel, offset=offset)
        """The values, a read-only numpy view of the message."""
        self._nbytes = 4 * layout.numel
        self._flat: Tensor | None = None

    @property
    def flat(self) -> Tensor:
        """The values, a read-only tensor view of the message (made on first use)."""
        if self._flat is None:
            from lightning_fed.codecs.wire import read_only_view

            self._flat = read_only_view(self._message, torch.float32, self._offset)[: self.layout.numel]
        return self._flat

    @property
    def nbytes(self) -> int:
        """The float32 values' bytes in the message."""
        return self._nbytes

    def measure(self, bound: bool = True) -> tuple[float, float]:
        """One read of the values (:func:`~lightning_fed.kernels.measure`)."""
        from lightning_fed.kernels import measure

        return measure(self.flat, bound=bound)

    def add_into(self, acc: Tensor, w: float, segments: list[tuple[int, int, int]]) -> None:
        """``add_`` where the values lie, one call per segment."""
        flat = self.flat
        if len(segments) == 1 and segments[0][2] == self.layout.numel == acc.numel():
            acc.add_(flat, alpha=w)
            return
        for src, dst, n in segments:
            acc[dst : dst + n].add_(flat[src : src + n], alpha=w)

    def add_measure(
        self, acc: Tensor, w: float, segments: list[tuple[int, int, int]], bound: bool
    ) -> tuple[float, float]:
        """The fold's fused pass (:func:`~lightning_fed.kernels.axpy_measure_`) where the values lie: one call
        over the numpy view for a reply in the accumulator's order."""
        from lightning_fed.kernels import axpy_measure_, axpy_measure_array_

        if len(segments) == 1 and segments[0][2] == self.layout.numel == acc.numel():
            return axpy_measure_array_(acc, self.array, w, bound=bound)
        flat = self.flat
        sq, top = 0.0, 0.0
        for src, dst, n in segments:
            s, t = axpy_measure_(acc[dst : dst + n], flat[src : src + n], w, bound=bound)
            sq, top = sq + s, max(top, t)
        return sq, top

    def values(self) -> Tensor:
        """The values (a read-only view)."""
        return self.flat

    def payload(self) -> Payload:
        """The message decoded in full (views of it)."""
        return self._decode()


__all__ = ["DeferredValues", "FlatValues", "arrange"]
