"""Pure aggregation math on flat contiguous buffers (no Fabric, no I/O)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_fed.flat import FlatSpec
from lightning_fed.kernels import (
    as_tensor,
    axpy_checked_,
    axpy_measure_,
    axpy_to_measure_,
    measure,
)
from lightning_fed.protocol import RELEASED, Payload, value_bounds, values_within

SMALL_BYTES = 8 << 20
"""A fold whose accumulator has at most this many bytes (2 M float32 parameters) is *small* (:attr:`MeanFold.small`):
its undo window is cut at :data:`SMALL_HOLD_BYTES` and the replies it lets go are dropped one per arriving reply,
not all at once. Such messages come from the allocator's heap: a message dropped just before the next is made
lends it its memory, where dropping a whole window at once hands the memory back to the system and every next
message lands in fresh pages (``benchmarks/RESULTS.md``, "Server aggregation against the axpy floor")."""

SMALL_HOLD_BYTES = 32 << 20
"""The undo window's default byte limit in a small fold (:data:`SMALL_BYTES`): 8 replies of 1 M float32 parameters,
4 of 2 M; larger folds hold up to 2 GiB."""

MAX_WINDOW = 16
"""The most replies a fold's undo window holds (:attr:`MeanFold.window`), whatever their size: undoing a rejection
re-adds each of them."""


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


def _measure_parts(parts: list[Tensor], bound: bool) -> tuple[float, float]:
    """``(sum of squares, largest magnitude)`` of a reply's entries, as :func:`~lightning_fed.kernels.measure`
    gives them for one buffer (the magnitude ``inf`` for a value not finite, else ``0.0`` without ``bound``)."""
    sq = sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in parts)
    top = math.inf if not math.isfinite(sq) else 0.0
    if bound:
        lo, hi = value_bounds([t for t in parts if t.numel()])
        top = max(-lo, hi) if math.isfinite(lo) and math.isfinite(hi) else math.inf
    return sq, top


def _verdict(sq: float, top: float, max_abs: float | None, max_norm: float) -> tuple[str | None, float]:
    """``(why, norm)`` of a reply measured as ``(sum of squares, largest magnitude)``: ``why`` is ``None`` (kept),
    ``"values"`` (a value not finite, or above ``max_abs``) or ``"norm"`` (its L2 norm above ``max_norm``)."""
    norm = math.sqrt(sq) if math.isfinite(sq) else math.inf
    if not math.isfinite(top) or not math.isfinite(sq) or (max_abs is not None and top > max_abs):
        return "values", norm
    if not norm <= max_norm:
        return "norm", norm
    return None, norm


def _overflow_checked(sq: float, top: float, flat: list[Tensor]) -> tuple[float, float]:
    """A pass's ``(sum of squares, largest magnitude)`` when its float32 sum may have overflowed (torch's path):
    a sum that is not finite while the magnitude is, summed again in float64 over ``flat`` if every value is
    finite, else the magnitude made ``inf`` (a value that is not finite)."""
    if math.isfinite(sq) or not math.isfinite(top):
        return sq, top
    lo, hi = value_bounds(flat)
    if math.isfinite(lo) and math.isfinite(hi):
        return sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in flat), top
    return sq, math.inf


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
    judged as it is folded and its payload released (:data:`~lightning_fed.protocol.RELEASED`;
    :meth:`add_released`). A reply of float32 values (an ``Identity`` message, a decoded payload) takes the
    checked pass (``checked``, the default): it is added block by block while its running norm stays within the
    limit and its values finite, measured in the same read, and released at once; a rejected one was never added
    past the block that failed, and the blocks before are subtracted again (each such element off by a rounding
    or two: ``acc + w * x - w * x``), so no window of replies is held. Any other (8-bit codes; every reply with
    ``checked=False``) is added and measured in one pass and judged right after; a rejection is undone exactly
    from a snapshot of the accumulator and the few replies added since (at most :attr:`window` replies holding
    at most ``hold_bytes``), whose payloads are released once the snapshot moves past them. In a small fold
    (:data:`SMALL_BYTES`) the window holds up to
    :data:`SMALL_HOLD_BYTES` and the replies it lets go are dropped one per arriving reply (:attr:`lazy`). With
    ``judge_first_bytes``, a small reply of float32 values is measured and judged first instead and added only
    when kept, then released at once: nothing to undo, but read twice.
    Once a reply is released the fold is never voided: when the kept replies' example counts do not sum to the
    total the fold bet on (a rejection, a client's failure), :meth:`result` rescales the sum once by
    ``total / kept``, the example-weighted mean of the kept replies up to one rounding per element.

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
        acc: a flat buffer of ``spec``: the accumulator. What it holds is ignored: a first reply taken by the
            checked pass is written into it (no zeroing pass over it: the same bits), and anything else that reads
            it zeroes it first.
        total: the sum of the example counts the fold bets on; each reply is weighted ``n / total``.
        hold_bytes: the most bytes the undo window's replies hold (:meth:`add_released`), counted by what each
            really keeps alive: an 8-bit reply its codes and block scales (a quarter of the accumulator's size), a
            float32 reply its values. The window holds 1 to :data:`MAX_WINDOW` replies: one larger than
            ``hold_bytes`` is still held alone until the next reply comes. ``None`` (default):
            :data:`SMALL_HOLD_BYTES` in a small fold (:data:`SMALL_BYTES`), 2 GiB otherwise.
        judge_first_bytes: replies of float32 values no larger than this (at the accumulator's size) are
            judged before they are added: read twice, no undo window; ``0`` (default): never, every reply is added
            and measured in one read (``benchmarks/RESULTS.md``, "Server aggregation against the axpy floor").
        small_bytes: the largest accumulator (in bytes) of a small fold (:data:`SMALL_BYTES`): its window's
            replies are let go one per arriving reply (:attr:`lazy`) and ``hold_bytes`` defaults to
            :data:`SMALL_HOLD_BYTES`.
        scratch: a flat buffer of ``spec`` for the accumulator's snapshot (a strategy's own scratch buffer, its
            pages already in memory); ``None``: allocated when first needed.
        ping_pong: fold the replies judged first (``judge_first_bytes``) in one read each, ``acc + w * x`` written
            into the scratch buffer while they are measured, the buffers swapping roles when a reply is kept
            (:meth:`add_released`); off by default: the write into the other buffer costs about what the second
            read it saves costs (``benchmarks/RESULTS.md``, "The ping-pong accumulator").
        checked: fold replies of float32 values with the checked pass (the default; see above), which holds no
            window and reads each reply once, at the floor's pace (``benchmarks/RESULTS.md``, "Server aggregation
            against the axpy floor"); ``False``: add them whole and undo a rejection from the snapshot and the
            window, exactly (a rejection then leaves no rounding behind).
        snapshot_aside: take the undo window's snapshot of the accumulator with the add of the reply that follows
            it when that reply is one flat float32 buffer: ``acc + w * x`` is written into the scratch buffer (read
            once, measured in the same pass), which becomes the accumulator, and the buffer it was read from is the
            snapshot, so no copy of the accumulator is made; ``False``: the snapshot is a copy, then the reply is
            added in place; ``None`` (default): aside when the window is cut by ``hold_bytes`` before
            :attr:`window` replies of the accumulator's size (so a copy would recur every few replies: 100 M
            parameters), by a copy otherwise (measured faster at 10 M). The same sums and measures either way
            (``benchmarks/RESULTS.md``, "The snapshot taken by the add").
    """

    def __init__(self, spec: FlatSpec, acc: Tensor, total: int, hold_bytes: int | None = None,
                 scratch: Tensor | None = None, judge_first_bytes: int = 0,
                 ping_pong: bool = False, snapshot_aside: bool | None = None,
                 small_bytes: int = SMALL_BYTES, checked: bool = True) -> None:
        self.spec = spec
        self.total = total
        self._acc = acc
        self._fresh = True  # ``acc`` is taken as zeros: the first reply of the checked pass is written into it
        self._acc_np: tuple[Tensor, Any] | None = None  # (the accumulator, its numpy view) for the compiled pass
        self._parts = list(spec.unflatten(acc).values())
        self._home = acc  # where the sum ends (result()); an add aside may leave it in the scratch buffer until then
        self._other_parts: list[Tensor] | None = None  # views of the buffer that is not ``_acc`` (built when needed)
        self._folded: list[tuple[Any, Any, int, list[tuple[int, int]]]] = []
        self._unchecked = False
        self.broken = False
        self.released = 0
        """How many replies were added by :meth:`add_released` (their payloads released, or to be)."""
        self._rescaled = False
        acc_bytes = acc.numel() * acc.element_size()
        self.small = acc_bytes <= small_bytes
        """Whether the accumulator is small (``small_bytes``): its messages come from the allocator's heap."""
        self.lazy = self.small
        """Whether the replies the window lets go are dropped one per arriving reply (the next message then takes
        the memory of the one dropped just before it) rather than all at once; at most a window's worth wait."""
        if hold_bytes is None:
            hold_bytes = SMALL_HOLD_BYTES if self.small else 2 << 30
        if hold_bytes < 0:
            raise ValueError(f"MeanFold: hold_bytes={hold_bytes!r} is not allowed; hold_bytes must be >= 0")
        self.hold_bytes = hold_bytes
        """The most bytes the undo window's replies hold together (what they keep alive: codes or values)."""
        self.window = MAX_WINDOW
        """How many released replies the fold holds at most, to undo a rejection exactly (also within
        :attr:`hold_bytes`)."""
        self._held = 0  # bytes the window's replies hold
        self.judge_first = acc_bytes <= judge_first_bytes
        """Whether replies of float32 values are measured and judged before they are added (``judge_first_bytes``)."""
        self.ping_pong = ping_pong
        """Whether those replies are added aside in the same read that measures them (``ping_pong``)."""
        self.checked = checked
        """Whether replies of float32 values are judged block by block as they are added (``checked``), a
        rejection subtracted, rather than added whole and undone from the snapshot and window."""
        self.snapshot_aside = snapshot_aside
        """Whether a snapshot is taken by the add that follows it rather than by a copy (``None``: when the window
        is cut by :attr:`hold_bytes` before :attr:`window` replies of the accumulator's size; see ``snapshot_aside``)."""
        self._window: list[tuple[Any, Any, float, int]] = []
        self._letgo: deque[Any] = deque()  # what the replies let go (lazily) still keep alive, oldest first
        self._snap: Tensor | None = scratch
        self._snapped = False
        self._snap_due = False  # the window was released: retake the snapshot before the next add (not after the last)
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
        self._zeroed()
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

    def add_released(self, reply: Any, values: Any, max_abs: float | None, max_norm: float) -> tuple[str | None, float]:
        """Add ``reply.num_examples / total`` times the reply in one pass that also measures it, and judge it:
        its values must be finite (and of magnitude at most ``max_abs`` when given), its L2 norm at most
        ``max_norm``. ``values``: the reply's values still in their message (a :class:`~lightning_fed.codecs.
        deferred.DeferredValues`, e.g. 8-bit codes, read from there), or ``None`` (its payload).

        Float32 values (with :attr:`checked`, the default) take the checked pass (:meth:`_add_checked`): judged
        block by block as they are added, a rejection subtracted, the payload released at once.

        Exact undo (8-bit codes; float32 values without :attr:`checked`): the fold keeps a snapshot of the accumulator
        and the replies added since (its window: at most :attr:`window` replies, holding at most :attr:`hold_bytes`,
        each counted by what it keeps alive: 8-bit codes and scales, or float32 values); a rejected reply restores the
        snapshot and adds those replies again (the same elementwise ``acc + w * x``, in the same order: the same bits),
        so it never reaches the sum. When the next reply would pass either limit (checked right after an add against a
        reply as large as the one just added, so that the window is let go before the next is made, and again when the
        next comes), the window's payloads are released (:data:`~lightning_fed.protocol.RELEASED`; :meth:`flush`
        releases the rest at the end of the round) and the snapshot is retaken before that reply is added (so never
        after the round's last one). In a small fold (:attr:`lazy`) what the released replies keep alive (their
        messages) is dropped one per call, oldest first, so that each next message is made in the memory of one just
        dropped. A small reply of float32 values (:attr:`judge_first`, off by default) is measured and judged first
        instead, added only when kept and released at once: nothing to undo, no window; with :attr:`ping_pong`, in one
        read: ``acc + w * x`` written into the scratch buffer as it is measured, the two buffers swapping roles when it
        is kept (:meth:`result` leaves the sum in the buffer given). Such a reply lets the window's replies go first and
        has the snapshot retaken before the next reply with a window.

        Returns ``(None, norm)`` when kept, or ``(why, norm)``: ``"values"`` (validate it for the named reason)
        or ``"norm"``. The structure must already match ``spec``."""
        if self._letgo:  # one reply let go before is dropped: the next message is made in its memory
            self._letgo.popleft()
        w = reply.num_examples / float(self.total)
        bound = max_abs is not None
        if self.judge_first and (values is None or values.judge_first):  # small, float32: judged, then added
            self._zeroed()
            # a reply held to undo (values of another kind) is decided: let it go; an undo after this reply
            # restores a snapshot taken anew, with this reply in it (the scratch may hold the sum now)
            self.flush(lazily=self.lazy)
            self._snap_due = True
            verdict = self._add_aside(reply, values, w, max_abs, max_norm) if self.ping_pong else None
            return verdict if verdict is not None else self._judge_then_add(reply, values, w, max_abs, max_norm)
        if self.checked and (values is None or values.judge_first):  # float32: checked block by block, no window
            return self._add_checked(reply, self._runs_checked(reply, values), w, max_abs, max_norm)
        self._zeroed()
        source: Any = values
        if values is None:
            source = self.spec.flat_view(reply.payload)
            if source is None:  # entries in several buffers: added where they lie, measured entry by entry
                source = [reply.payload[k].detach() for k in self.spec.names]
            size = sum(t.numel() * t.element_size() for t in ([source] if isinstance(source, Tensor) else source))
        else:
            size = values.nbytes  # what it keeps alive: 8-bit codes count a quarter of their float32 values
        # the window with this reply would pass the limit: the snapshot moves past the window, before the add
        if self._window and self._held + size > self.hold_bytes:
            self._snap_due = True
            self.flush(lazily=self.lazy)
        aside = None
        if self._snap_due:  # the accumulator as it is now is what a rejection of this reply restores
            self._snapped = True
            self._snap_due = False
            aside = self._runs_aside(values, source) if self._aside() else None
            if aside is None:
                self._go_home()  # the snapshot's buffer may hold the sum (replies added aside)
                self._other().copy_(self._acc)
        if aside is not None:  # the add takes the snapshot: the buffer it reads is left as it was (no copy)
            sq, top = self._axpy_to_other(values.values() if values is not None else source, aside, w, bound)
            self._swap()
        elif values is not None:
            sq, top = values.add_measure(self._acc, w, self._segments(values.layout), bound)
        elif isinstance(source, Tensor):
            sq, top = axpy_measure_(self._acc, source, w, bound=bound)
        else:
            torch._foreach_add_(self._parts, source, alpha=w)
            sq, top = _measure_parts(source, bound)
        if not math.isfinite(sq) and math.isfinite(top):  # torch's float32 sum overflowed: finite values?
            flat = [t for t in reply.payload.values() if t.numel()] if values is None else [values.values()]
            sq, top = _overflow_checked(sq, top, flat)
        why, norm = _verdict(sq, top, max_abs, max_norm)
        if why is not None:
            self._undo()
            return why, norm
        self._window.append((reply, source, w, size))
        self._held += size
        self.released += 1
        self._folded.append((reply, None, reply.num_examples, []))
        # a next reply as large would pass a limit: let the window go now, not while the next one is made (the
        # snapshot is retaken before the next add, so never after the round's last)
        if len(self._window) >= self.window or self._held + size > self.hold_bytes:
            self._snap_due = True
            self.flush(lazily=self.lazy)
        return None, norm

    def _zeroed(self) -> None:
        """Zero the accumulator if nothing was written into it yet (see ``acc``)."""
        if self._fresh:
            self._acc.zero_()
            self._fresh = False

    def _numpy_acc(self) -> Any:
        """A numpy view of the accumulator, made once per buffer: a reply's pass follows the copy of its message,
        which leaves the cache cold, and there even ``Tensor.numpy()`` costs microseconds per call."""
        if self._acc_np is None or self._acc_np[0] is not self._acc:
            self._acc_np = (self._acc, self._acc.numpy())
        return self._acc_np[1]

    def _runs_checked(self, reply: Any, values: Any) -> list[tuple[Any, Any]]:
        """The ``(accumulator piece, values)`` pairs of a reply of float32 values, 1-D: the whole accumulator and
        the message's values when they lie in its order (numpy views: no tensor made per message), else one
        pair per segment of the layout, or per entry of a payload in several buffers."""
        if values is not None:
            segments = self._segments(values.layout)
            array = getattr(values, "array", None)
            if array is not None and len(segments) == 1 and segments[0][2] == array.shape[0] == self._acc.numel():
                return [(self._numpy_acc(), array)]
            x = values.values()
            return [(self._acc[dst : dst + n], x[src : src + n]) for src, dst, n in segments]
        flat = self.spec.flat_view(reply.payload)
        if flat is not None:
            return [(self._acc, flat)]
        return [(part.view(-1), reply.payload[k].detach().reshape(-1))
                for part, k in zip(self._parts, self.spec.names, strict=True)]

    def _add_checked(self, reply: Any, runs: list[tuple[Any, Any]], w: float, max_abs: float | None,
                     max_norm: float) -> tuple[str | None, float]:
        """:meth:`add_released` for a reply of float32 values: added block by block while its running norm stays
        within ``max_norm`` and its values finite (and within ``max_abs``), measured in the same read
        (:func:`~lightning_fed.kernels.axpy_checked_`). Kept, its payload is released at once (no window);
        rejected, the blocks added before the one that failed are subtracted again (``acc - w * x``, one fma per
        element): nothing past that block was ever added, and each value subtracted is off by at most a rounding
        of its add and one of its subtraction. The fold's first reply, in one run, is written into the
        accumulator rather than added to it (``fresh``: no zeroing pass before it, the same bits); rejected, it
        leaves the accumulator taken as zeros still. Replies the window holds for an undo are decided first, and
        the snapshot is retaken before the next reply with a window."""
        if self._window:
            self.flush(lazily=self.lazy)
        self._snap_due = True
        # the first reply, in one run over the whole accumulator: written into it
        fresh = self._fresh and len(runs) == 1 and runs[0][0].shape[0] == self._acc.numel()
        if not fresh:
            self._zeroed()
        self._fresh = False
        limit = max_norm * max_norm if math.isfinite(max_norm) else math.inf
        sq, top, stops, failed = 0.0, 0.0, [], False
        for acc, x in runs:
            s, t, stop = axpy_checked_(acc, x, w, before=sq, limit=-1.0 if failed else limit, max_abs=max_abs,
                                       fresh=fresh)
            failed = failed or stop < x.shape[0]
            sq, top = sq + s, max(top, t)
            stops.append(stop)
        if not math.isfinite(sq):  # a float32 sum past its range (torch's path), or a value that is not finite
            sq, top = _overflow_checked(sq, top, [as_tensor(x) for _, x in runs])
        why, norm = _verdict(sq, top, max_abs, max_norm)
        if fresh and why is not None:  # what it wrote counts for nothing: the accumulator is still taken as zeros
            self._fresh = True
        elif failed or why is not None:
            for (acc, x), stop in zip(runs, stops, strict=True):
                acc = as_tensor(acc)
                if why is None and stop < x.shape[0]:  # stopped by a float32 overflow or at the limit's edge
                    if fresh:
                        acc[stop:].zero_()  # never written: what it held before
                    acc[stop:].add_(as_tensor(x)[stop:], alpha=w)
                elif why is not None and stop:
                    acc[:stop].add_(as_tensor(x)[:stop], alpha=-w)
        if why is not None:
            return why, norm
        reply.payload = RELEASED
        self.released += 1
        self._folded.append((reply, None, reply.num_examples, []))
        return None, norm

    def _add_aside(self, reply: Any, values: Any, w: float, max_abs: float | None,
                   max_norm: float) -> tuple[str | None, float] | None:
        """:meth:`add_released` for a small reply of float32 values in one buffer, read once: ``acc + w * x`` is
        written into the other buffer (the scratch) while the reply is measured (the ping-pong accumulator); kept,
        the two buffers swap roles, rejected, nothing is undone (the accumulator was not written). ``None``: the
        reply is not one this pass takes (entries in several buffers, values not covering the accumulator)."""
        x = values.values() if values is not None else self.spec.flat_view(reply.payload)
        runs = self._runs_aside(values, x)
        if runs is None:
            return None
        sq, top = self._axpy_to_other(x, runs, w, max_abs is not None)
        sq, top = _overflow_checked(sq, top, [x])  # torch's float32 sum may have overflowed: finite values?
        why, norm = _verdict(sq, top, max_abs, max_norm)
        if why is not None:
            return why, norm
        self._swap()
        reply.payload = RELEASED
        self.released += 1
        self._folded.append((reply, None, reply.num_examples, []))
        return None, norm

    def _axpy_to_other(self, x: Tensor, runs: list[tuple[int, int, int]], w: float,
                       bound: bool) -> tuple[float, float]:
        """``acc + w * x`` written into the other buffer run by ``(src, dst, n)`` run, ``x`` measured in the same
        pass (the ping-pong kernel); the accumulator is left as it was. Returns the summed measures."""
        out = self._other()
        sq, top = 0.0, 0.0
        for src, dst, n in runs:
            s, t = axpy_to_measure_(out[dst : dst + n], self._acc[dst : dst + n], x[src : src + n], w, bound=bound)
            sq, top = sq + s, max(top, t)
        return sq, top

    def _aside(self) -> bool:
        """Whether the next snapshot is taken by an add aside (:attr:`snapshot_aside`, or its rule when ``None``)."""
        if self.snapshot_aside is not None:
            return self.snapshot_aside
        return self._acc.numel() * self._acc.element_size() * self.window > self.hold_bytes

    def _runs_aside(self, values: Any, source: Any) -> list[tuple[int, int, int]] | None:
        """The ``(src, dst, n)`` runs of a reply that can be added aside (float32 values in one buffer covering
        the whole accumulator: a payload's flat view, or values that lie as float32), else ``None``."""
        if values is None:
            return [(0, 0, source.numel())] if isinstance(source, Tensor) else None
        if not values.judge_first:  # codes (8-bit): decoded in the add's own loop, in place
            return None
        runs = self._segments(values.layout)
        return runs if sum(n for _, _, n in runs) == self._acc.numel() else None

    def _other(self) -> Tensor:
        """The buffer that is not the accumulator now: the strategy's scratch (the snapshot's), or its own."""
        if self._acc is not self._home:
            return self._home
        if self._snap is None:
            self._snap = torch.empty_like(self._acc)
        return self._snap

    def _swap(self) -> None:
        """The other buffer becomes the accumulator (its views too); no copy."""
        other = self._other()
        if self._other_parts is None:
            self._other_parts = list(self.spec.unflatten(other).values())
        self._acc, self._parts, self._other_parts = other, self._other_parts, self._parts

    def _go_home(self) -> None:
        """The sum back in the buffer the fold was given (one copy, only when the last add left it aside)."""
        if self._acc is not self._home:
            self._home.copy_(self._acc)
            self._swap()

    def _judge_then_add(self, reply: Any, values: Any, w: float, max_abs: float | None,
                        max_norm: float) -> tuple[str | None, float]:
        """:meth:`add_released` for a small reply of float32 values (``values`` that lie as float32, or the
        payload): measured (one read), judged, and added only when kept (a second read, from the cache), its
        payload released at once."""
        bound = max_abs is not None
        flat = values.values() if values is not None else self.spec.flat_view(reply.payload)
        parts = None
        if flat is not None:
            sq, top = measure(flat, bound=bound)
        else:  # entries in several buffers
            parts = [reply.payload[k].detach() for k in self.spec.names]
            sq, top = _measure_parts(parts, bound)
        why, norm = _verdict(sq, top, max_abs, max_norm)
        if why is not None:
            return why, norm
        if values is not None:
            values.add_into(self._acc, w, self._segments(values.layout))
        elif parts is not None:
            torch._foreach_add_(self._parts, parts, alpha=w)
        else:
            self._acc.add_(flat, alpha=w)
        reply.payload = RELEASED
        self.released += 1
        self._folded.append((reply, None, reply.num_examples, []))
        return None, norm

    def _undo(self) -> None:
        """The accumulator as it was before the reply just added: the snapshot, then the window's replies again."""
        if self._snapped:  # the snapshot is the buffer that is not the accumulator (taken by a copy or an add)
            self._acc.copy_(self._other())
        else:
            self._acc.zero_()
        for _, source, w, _ in self._window:
            if isinstance(source, Tensor):
                self._acc.add_(source, alpha=w)
            elif isinstance(source, list):
                torch._foreach_add_(self._parts, source, alpha=w)
            else:
                source.add_into(self._acc, w, self._segments(source.layout))

    def flush(self, *, lazily: bool = False) -> None:
        """Release the payloads of the replies in the window (nothing can undo them any more). ``lazily``: what
        they keep alive (their messages) waits to be dropped one per :meth:`add_released` call; otherwise it is
        dropped now, with whatever still waited (the server's call at the end of a round)."""
        for reply, source, _, _ in self._window:
            reply.payload = RELEASED
            if lazily:
                self._letgo.append(source)
        self._window.clear()
        self._held = 0
        if not lazily:
            self._letgo.clear()

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
        self._zeroed()
        return math.isfinite(float(self._acc.sum()))

    def covers(self, replies: list[Any]) -> bool:
        """Whether ``replies`` are exactly the folded replies: the same objects in the same order, each with the
        payload dict it was folded with, its entries neither replaced nor written in place since, its example
        count unchanged, and the counts summing to the total the fold weighted by (or, once a payload was
        released, to any positive total: :meth:`result` rescales)."""
        if self.broken or len(replies) != len(self._folded):
            return False
        for r, (reply, payload, n, stamp) in zip(replies, self._folded):
            if payload is None:  # released: its payload was let go (or will be, unread)
                if r is not reply or r.num_examples != n:
                    return False
            elif r is not reply or r.payload is not payload or r.num_examples != n or self._stamp(payload) != stamp:
                return False
        return self.released > 0 or self._kept() == self.total

    def _kept(self) -> int:
        return sum(n for _, _, n, _ in self._folded)

    def result(self) -> Tensor:
        """The accumulated ``sum_i n_i / total * x_i`` (the buffer given), rescaled once by ``total / kept`` when
        released replies were folded and the kept replies' counts sum to ``kept != total``."""
        self._zeroed()
        self._go_home()
        kept = self._kept()
        if kept != self.total and kept > 0 and not self._rescaled:
            self._acc.mul_(self.total / kept)
            self._rescaled = True
        return self._acc
