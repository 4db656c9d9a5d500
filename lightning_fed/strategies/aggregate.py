"""Pure aggregation math on flat contiguous buffers (no Fabric, no I/O)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_fed.flat import FlatSpec
from lightning_fed.kernels import axpy_measure_, measure
from lightning_fed.protocol import RELEASED, Payload, value_bounds, values_within


def example_weights(num_examples: Sequence[int]) -> list[float]:
    """Normalised FedAvg weights ``n_i / sum(n)``.

    Raises:
        ValueError: empty input or a non-positive total.
    """
    total = float(sum(num_examples))
    if not num_examples or total <= 0:
        raise ValueError(f"cannot weight replies with example counts {list(num_examples)}")
    return [n / total for n in num_examples]


def weighted_sum_(out: Tensor, flats: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
    """``out = sum_i weights[i] * flats[i]``, accumulated in place into ``out`` and returned."""
    out.zero_()
    count = 0
    for flat, w in zip(flats, weights, strict=False):
        out.add_(flat, alpha=w)
        count += 1
    if count != len(weights):
        raise ValueError(f"got {count} buffers for {len(weights)} weights")
    return out


def weighted_sum_payloads_(out: Tensor, spec: FlatSpec, payloads: Iterable[Payload],
                           weights: Sequence[float]) -> Tensor:
    """``out = sum_i weights[i] * payloads[i]`` in ``spec``'s flat layout, without copying any payload.

    A payload whose entries tile one buffer in ``spec``'s order (:meth:`FlatSpec.as_flat` returns a view, e.g. a
    message decoded by :class:`~lightning_fed.codecs.Identity`) is added with one ``add_``; any other is added
    entry by entry into views of ``out`` (one ``_foreach_add_``), reading the decoded tensors where they lie.
    Bit-identical to :func:`weighted_sum_` over ``spec.flatten(payload)``: the same elementwise ``out + w * x``,
    in the same reply order (an elementwise add gives the same bits whatever the split into pieces).
    """
    out.zero_()
    parts = list(spec.unflatten(out).values())
    count = 0
    for payload, w in zip(payloads, weights, strict=False):
        span = spec.flat_view(payload)
        if span is not None:
            out.add_(span, alpha=w)
        else:
            torch._foreach_add_(parts, [payload[k].detach() for k in spec.names], alpha=w)
        count += 1
    if count != len(weights):
        raise ValueError(f"got {count} payloads for {len(weights)} weights")
    return out


def apply_update_(global_flat: Tensor, update: Tensor, server_lr: float = 1.0) -> Tensor:
    """``global += server_lr * update`` in place."""
    return global_flat.add_(update, alpha=server_lr)


def flat_norm(flat: Tensor) -> float:
    """L2 norm of a flat buffer, as a Python float."""
    return float(torch.linalg.vector_norm(flat))


class MeanFold:
    """The example-weighted mean folded into the accumulator while the replies arrive, with the value check of
    validation folded in too: each reply is read once from memory, as by a plain ``axpy``.

    The server opens a fold for a round when it knows the total example count of the round's messages
    (:meth:`~lightning_fed.strategies.Strategy.begin_fold`), betting that every reply will be accepted, and adds
    each reply whose structure is valid (:meth:`add`). Its values are checked in the same pass:

    * a reply that is one flat buffer is added, its squares summed (its norm, for the server's norm check) and,
      with a bound (``max_abs``), its largest magnitude taken in one fused pass
      (:func:`~lightning_fed.kernels.axpy_measure_`); a finite sum of squares clears it of values that
      are not finite;
    * any other reply, without a bound, is not checked per reply: a non-finite value makes the sum non-finite,
      so one check of the sum when the round's messages are all in (:meth:`settle`) clears every such reply
      at once (as it does a reply whose sum of squares was not finite); only when it fails does the server
      check each folded reply to find (and reject) the culprits.

    A reply the server can judge on its own (its norm check has a reference: the previous round's median) is
    *decided* before it is added (:meth:`add_decided`): measured in one read, rejected or added (a small reply
    is still in the cache for the add), and then its payload may be released (:data:`~lightning_fed.protocol.
    RELEASED`): nothing needs it again. Its rejection leaves the accumulator untouched, and once a reply is
    released the fold is never voided: when the kept replies' example counts do not sum to the total the fold
    bet on (a rejection, a client's failure), :meth:`result` rescales the sum once by ``total / kept``, the
    example-weighted mean of the kept replies up to one rounding per element.

    A rejected reply voids (*breaks*) the fold: it is never used (a rejection changes the total it bet on
    anyway). The strategy uses the fold only when the replies it is asked to aggregate are exactly the ones
    folded (:meth:`covers`: same replies, same order, payload entries neither replaced nor written in place,
    example counts summing to the total); otherwise it aggregates the replies again the ordinary way. So no
    rejected reply ever reaches the aggregate, and the result is bit-identical to :func:`weighted_sum_payloads_`
    over the same replies (same ``acc + w * x`` per element, in the same order: an elementwise add gives the
    same bits whatever the split into pieces).

    Example::

        fold = MeanFold(spec, acc, total=sum(counts))
        for reply in replies:
            if not fold.add(reply, max_abs=None):
                ...  # reject the reply (the fold is broken now)
        if not fold.settle():
            ...  # check every folded reply; a rejection breaks the fold
        update = fold.result() if fold.covers(replies) else weighted_sum_payloads_(...)

    Args:
        spec: the flat layout of the payloads (the strategy's).
        acc: a flat buffer of ``spec`` (zeroed here): the accumulator.
        total: the sum of the example counts the fold bets on; each reply is weighted ``n / total``.
    """

    def __init__(self, spec: FlatSpec, acc: Tensor, total: int) -> None:
        self.spec = spec
        self.total = total
        self._acc = acc.zero_()
        self._parts = list(spec.unflatten(acc).values())
        self._folded: list[tuple[Any, Any, int, list[tuple[int, int]]]] = []
        self._unchecked = False
        self.broken = False
        self.released = 0
        """How many folded replies' payloads were released (:meth:`add_decided`)."""
        self._rescaled = False
        self.norms: dict[int, float] = {}
        """L2 norm of each reply folded from one flat buffer (by ``id(reply)``), summed from the pieces while
        they are in the cache: the server's norm check then reads no reply twice."""

    def add(self, reply: Any, max_abs: float | None = None) -> bool:
        """Add ``reply.num_examples / total`` times ``reply.payload``.

        With ``max_abs``, its values are checked first (finite, ``|x| <= max_abs``), piece by piece; without,
        only their finiteness is, later, for all replies at once (:meth:`settle`). Returns ``False`` when the
        values failed (the fold is broken then), ``True`` otherwise. The payload must already match ``spec``
        (names, shapes, float32 dtype): the server checks the structure before folding."""
        payload = reply.payload
        if self.broken:  # nothing more to add: just the check the caller needs
            return values_within(*value_bounds([t for t in payload.values() if t.numel()]), max_abs)
        w = reply.num_examples / float(self.total)
        x = self.spec.flat_view(payload)
        ok = True
        if x is not None:  # one fused pass: added, its squares summed (and with a bound, its largest magnitude)
            sq, top = axpy_measure_(self._acc, x, w, bound=max_abs is not None)
            self.norms[id(reply)] = math.sqrt(sq)
            if max_abs is not None:
                ok = top <= max_abs
            elif not math.isfinite(sq):  # a bad value, or (torch's float32 sum) an overflow: left to settle()
                self._unchecked = True
        elif max_abs is None:  # entries in another order or in several buffers: added entry by entry, where they lie
            self._unchecked = True
            torch._foreach_add_(self._parts, [payload[k].detach() for k in self.spec.names], alpha=w)
        else:
            ok = values_within(*value_bounds([t for t in payload.values() if t.numel()]), max_abs)
            if ok:
                torch._foreach_add_(self._parts, [payload[k].detach() for k in self.spec.names], alpha=w)
        if not ok:
            self.broken = True
        else:
            self._folded.append((reply, payload, reply.num_examples, self._stamp(payload)))
        return ok

    def add_decided(self, reply: Any, max_abs: float | None, max_norm: float, release: bool) -> tuple[str | None, float]:
        """Judge ``reply`` first, then add ``reply.num_examples / total`` times its payload: its values must be
        finite (and of magnitude at most ``max_abs`` when given) and its L2 norm at most ``max_norm``.

        Returns ``(None, norm)`` when added (its payload replaced by :data:`~lightning_fed.protocol.RELEASED`
        when ``release``), or ``(why, norm)`` when rejected: ``"values"`` (validate it for the named reason) or
        ``"norm"``; the accumulator is untouched then. The structure must already match ``spec``."""
        payload = reply.payload
        x = self.spec.flat_view(payload)
        if x is not None:
            sq, top = measure(x, bound=max_abs is not None)
        else:  # entries in several buffers: measured entry by entry, added where they lie
            parts = [payload[k].detach().reshape(-1) for k in self.spec.names]
            lo, hi = value_bounds([t for t in parts if t.numel()])
            top = max(-lo, hi) if math.isfinite(lo) and math.isfinite(hi) else math.inf
            sq = sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in parts)
        norm = math.sqrt(sq)
        if not math.isfinite(top) or (max_abs is not None and top > max_abs):
            return "values", norm
        if not norm <= max_norm:
            return "norm", norm
        if not self.broken:
            w = reply.num_examples / float(self.total)
            if x is not None:
                self._acc.add_(x, alpha=w)
            else:
                torch._foreach_add_(self._parts, [payload[k].detach() for k in self.spec.names], alpha=w)
            if release:
                reply.payload = RELEASED
                self.released += 1
            self._folded.append((reply, reply.payload, reply.num_examples, self._stamp(reply.payload)))
        return None, norm

    def add_deferred(self, reply: Any, values: Any, max_abs: float | None, max_norm: float) -> tuple[str | None, float]:
        """:meth:`add_decided` for values still in their message (:class:`~lightning_fed.codecs.vector.
        DeferredValues`, e.g. 8-bit codes): measured and added straight from the code, never decoded into a
        buffer; ``reply``'s payload is :data:`~lightning_fed.protocol.RELEASED` once added. The values' layout
        must be the expected spec's (the codec defers only then)."""
        sq, top = values.measure(bound=max_abs is not None)
        norm = math.sqrt(sq)
        if not math.isfinite(top) or (max_abs is not None and top > max_abs):
            return "values", norm
        if not norm <= max_norm:
            return "norm", norm
        values.add_into(self._acc, reply.num_examples / float(self.total), self._segments(values.layout))
        reply.payload = RELEASED
        self.released += 1
        self._folded.append((reply, RELEASED, reply.num_examples, []))
        return None, norm

    def _segments(self, layout: FlatSpec) -> list[tuple[int, int, int]]:
        """``(src, dst, n)`` runs mapping a codec layout's flat vector onto the accumulator (``spec``'s order)."""
        known = getattr(self, "_layout", None)
        if known is not None and known[0] is layout:
            return known[1]
        where = dict(zip(self.spec.names, self.spec.offsets, strict=True))
        runs: list[tuple[int, int, int]] = []
        for name, src, n in zip(layout.names, layout.offsets, layout.sizes, strict=True):
            dst = where[name]
            if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + n)
            elif n:
                runs.append((src, dst, n))
        self._layout = (layout, runs)
        return runs

    @staticmethod
    def _stamp(payload: Payload) -> list[tuple[int, int]]:
        return [] if payload is RELEASED else [(id(t), t._version) for t in payload.values()]

    def settle(self) -> bool:
        """Whether the replies added without a check (no ``max_abs``) are certainly finite: the sum of the
        accumulator is finite (one read of one buffer for the round). ``False``: some value is not finite, or the
        sum overflowed; the caller checks each folded reply (and breaks the fold if it rejects one)."""
        if self.broken or not self._unchecked:
            return True
        return math.isfinite(float(self._acc.sum()))

    def covers(self, replies: list[Any]) -> bool:
        """Whether ``replies`` are exactly the folded replies: the same objects in the same order, each with the
        payload dict it was folded with, its entries neither replaced nor written in place since, its example
        count unchanged, and the counts summing to the total the fold weighted by (or, once a payload was
        released, to any positive total: :meth:`result` rescales)."""
        if self.broken or len(replies) != len(self._folded):
            return False
        for r, (reply, payload, n, stamp) in zip(replies, self._folded):
            if r is not reply or r.payload is not payload or r.num_examples != n or self._stamp(payload) != stamp:
                return False
        return self.released > 0 or self._kept() == self.total

    def _kept(self) -> int:
        return sum(n for _, _, n, _ in self._folded)

    def result(self) -> Tensor:
        """The accumulated ``sum_i n_i / total * x_i`` (the buffer given), rescaled once by ``total / kept`` when
        released replies were folded and the kept replies' counts sum to ``kept != total``."""
        kept = self._kept()
        if kept != self.total and kept > 0 and not self._rescaled:
            self._acc.mul_(self.total / kept)
            self._rescaled = True
        return self._acc
