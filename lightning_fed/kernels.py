"""Compiled loops of the server's hot paths, each with a plain torch (or bitsandbytes) fallback that gives the
same values.

* :func:`axpy_measure_`, the fold's fused pass: a reply is added into the accumulator and measured (sum of
  squares, largest magnitude) in one read of its memory (:func:`axpy_measure_array_`: the reply a numpy view).
* :func:`axpy_to_measure_`, the same pass writing ``acc + w * x`` into another buffer (``acc`` untouched): the
  fold's ping-pong accumulator for small replies.
* :func:`measure`, the same measures without the add (a reply's values measured where they lie).
* :func:`dequantize_axpy_measure_` (and :func:`dequantize_axpy_`, :func:`dequantize_measure`), the fold of a
  blockwise 8-bit reply read from its codes: decoded, added and measured in one loop, never stored as float32; on
  a CPU with AVX-512F the code book is read with one gather per 16 codes (``_compiled.GATHER``;
  ``LIGHTNING_FED_GATHER=0`` keeps the scalar lookups), the same additions bit for bit.
* :func:`dequantize_blockwise`, the blockwise 8-bit decode: code book lookup times the block's absmax, in one
  pass over the codes, bit-identical to bitsandbytes' ``dequantize_blockwise`` (the same one float32 product
  per value), about four times faster than bitsandbytes' CPU loop.

With numba installed (``pip install lightning-fed[fast]``) each is one compiled loop; without it, the fold's
pass runs as torch calls over cache-sized pieces (each piece added, then measured while cached) and the decode
as bitsandbytes' own. The weighted add is bit-identical either way: both compute ``acc + w * x`` per element
with one fused multiply-add and ``w`` rounded to float32 first, as ``torch.Tensor.add_(x, alpha=w)`` does. The
fold's compiled passes add a block of 512 values, then sum its float32 squares in float32 vector lanes (a helper
allowed to reassociate, the same for every pass, so the in-place and the aside passes agree bit for bit) and the
block sums in float64; a sum past float32's range is summed again in float64 (:func:`_in_float64`). The
elementwise add has nothing to reassociate, and the tests hold it bit-identical to ``add_``. The decode allows
contraction only. :func:`measure` (a reply judged before it is added) sums in float64. The measures differ in
their last bits between the paths (torch sums in float32, its ``dot``); each is deterministic on a given
machine.
"""

from __future__ import annotations

import importlib.util
import math
import os
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
"""Whether numba is installed (the `fast` extra)."""

PIECE = 1 << 20
"""Elements per piece of the torch path (4 MiB of float32: added, then measured while in the cache)."""

NUMBA = HAVE_NUMBA and os.environ.get("LIGHTNING_FED_NO_NUMBA", "") in ("", "0")
"""Whether the compiled loops are used (numba installed and ``LIGHTNING_FED_NO_NUMBA`` unset)."""


_LOOPS: ModuleType | None = None


def _loops() -> ModuleType:
    global _LOOPS
    if _LOOPS is None:  # imports numba (a fifth of a second): only once a loop is needed
        from lightning_fed import _compiled

        _LOOPS = _compiled
    return _LOOPS


def _array(t: Tensor | np.ndarray) -> np.ndarray:
    """A numpy view of a tensor, or the array itself."""
    return t if isinstance(t, np.ndarray) else t.numpy()


def as_tensor(t: Tensor | np.ndarray) -> Tensor:
    """A tensor view of a numpy array (read-only ones too: only read), or the tensor itself."""
    return t if isinstance(t, Tensor) else tensor_view(t)


def dequantize_blockwise(codes: memoryview, absmax: Tensor | np.ndarray, code: Tensor, blocksize: int) -> Tensor:
    """``out[i] = code[codes[i]] * absmax[i // blocksize]`` as a new float32 tensor: bitsandbytes' blockwise
    8-bit dequantization (its fallback here without numba).

    Args:
        codes: one byte per value (read where it lies: no copy of the message).
        absmax: float32 scale of each block, ``ceil(len(codes) / blocksize)`` of them (a tensor, or a numpy
            view of the message's scales).
        code: the 256 float32 code points.
        blocksize: values per block.
    """
    n = len(codes)
    if NUMBA and n:
        out = torch.empty(n)
        _loops().dequantize(
            np.frombuffer(codes, dtype=np.uint8), _array(absmax), code.numpy(), blocksize, out.numpy()
        )
        return out
    import bitsandbytes.functional as F

    codes_t = torch.frombuffer(bytearray(codes), dtype=torch.uint8)
    return F.dequantize_blockwise(codes_t, absmax=as_tensor(absmax), code=code, blocksize=blocksize)


def _in_float64(sq: float, x: np.ndarray) -> float:
    """A compiled pass's sum of squares, or, when it is not finite (a float32 square or block sum past float32's
    range, or a value that is not finite), the squares of ``x`` summed again in float64: finite exactly when every
    value is."""
    return sq if math.isfinite(sq) else _loops().sumsq(x)


def _top(sq: float, top: float, x: np.ndarray) -> tuple[float, float]:
    """A compiled pass's ``(sum of squares, largest magnitude)``: the sum as :func:`_in_float64` gives it, the
    magnitude ``inf`` when that sum is not finite (a NaN escapes the integer max of the bits, not the sum)."""
    sq = _in_float64(sq, x)
    return sq, (top if math.isfinite(sq) else math.inf)


def _piece_top(top: float, piece: Tensor) -> float:
    """The torch path's largest magnitude so far, with a piece's (one ``aminmax`` read): ``inf`` when a value of
    it is not finite."""
    lo, hi = (float(v) for v in torch.aminmax(piece))
    return max(top, -lo, hi) if math.isfinite(lo) and math.isfinite(hi) else math.inf


def axpy_measure_(acc: Tensor, x: Tensor, w: float, *, bound: bool) -> tuple[float, float]:
    """``acc += w * x`` in place (1-D contiguous float32 tensors of one size), reading ``x`` once.

    Returns ``(sum of squares of x, largest |x|)``; the second is computed only with ``bound`` (else ``0.0``) and
    is ``inf`` when a value of ``x`` is not finite, so ``top <= max_abs`` is the value rule of
    :func:`~lightning_fed.protocol.values_within`. A finite sum of squares proves every value finite (squares
    are not negative: nothing cancels); one that is not finite proves a bad value with numba (a float32 overflow
    of the pass's sums is summed again in float64) but may be an overflow of torch's float32 sum.
    """
    if NUMBA and x.numel():
        a, b, w32 = acc.numpy(), x.numpy(), np.float32(w)
        if not bound:
            return _in_float64(_loops().axpy_sumsq(a, b, w32), b), 0.0
        return _top(*_loops().axpy_measure(a, b, w32), b)
    sq, top = 0.0, 0.0
    for s in range(0, x.numel(), PIECE):
        piece = x[s : s + PIECE]
        if bound:
            top = _piece_top(top, piece)  # reads the piece into the cache...
        acc[s : s + PIECE].add_(piece, alpha=w)  # ...(or this does)...
        sq += float(torch.dot(piece, piece))  # ...and its squares are summed from there
    return sq, top


def axpy_measure_array_(acc: Tensor, x: np.ndarray, w: float, *, bound: bool) -> tuple[float, float]:
    """:func:`axpy_measure_` with ``x`` a 1-D float32 numpy array (a message's values viewed without torch, which
    may be read-only): the same pass, the same bits and measures."""
    if NUMBA and x.shape[0]:
        a, w32 = acc.numpy(), np.float32(w)
        if not bound:
            return _in_float64(_loops().axpy_sumsq(a, x, w32), x), 0.0
        return _top(*_loops().axpy_measure(a, x, w32), x)
    from lightning_fed.codecs.wire import read_only_view

    return axpy_measure_(acc, read_only_view(x, torch.float32, 0) if x.shape[0] else torch.empty(0), w, bound=bound)


def axpy_to_measure_(out: Tensor, acc: Tensor, x: Tensor, w: float, *, bound: bool) -> tuple[float, float]:
    """``out = acc + w * x`` (1-D contiguous float32 tensors of one size; ``out`` neither ``acc`` nor ``x``), reading
    ``x`` once and leaving ``acc`` as it was: :func:`axpy_measure_` into another buffer, the same fma per element
    (the same bits as ``acc.add_(x, alpha=w)``) and the same measures."""
    if NUMBA and x.numel():
        o, a, b, w32 = out.numpy(), acc.numpy(), x.numpy(), np.float32(w)
        if not bound:
            return _in_float64(_loops().axpy_to_sumsq(o, a, b, w32), b), 0.0
        return _top(*_loops().axpy_to_measure(o, a, b, w32), b)
    sq, top = 0.0, 0.0
    for s in range(0, x.numel(), PIECE):
        piece = x[s : s + PIECE]
        if bound:
            top = _piece_top(top, piece)
        torch.add(acc[s : s + PIECE], piece, alpha=w, out=out[s : s + PIECE])
        sq += float(torch.dot(piece, piece))
    return sq, top


def axpy_checked_(acc: Tensor | np.ndarray, x: Tensor | np.ndarray, w: float, *, before: float, limit: float,
                  max_abs: float | None, fresh: bool = False) -> tuple[float, float, int]:
    """``acc += w * x`` block by block (1-D contiguous float32, one size; each a tensor or a numpy view) while
    ``x`` stays acceptable: a block is added only if ``before`` plus the running sum of squares of ``x`` stays at
    most ``limit`` (and, with ``max_abs``, every magnitude so far at most ``max_abs``); from the first block that
    fails on, nothing more is added. Every value is still measured once. With ``fresh``, ``acc`` counts as zeros
    whatever it holds (it is written, not read, where it is added: the bits of ``acc.zero_()`` and the add);
    what lies past the returned stop is then left as it was.

    Returns ``(sum of squares of x, largest |x|, stop)``: the measures of :func:`axpy_measure_` (the same bits
    as its compiled pass; the magnitude ``0.0`` without ``max_abs``), and how many leading values were added
    (``len(x)`` when all were). A value that is not finite stops the adds at its block (its square is not
    finite); so may a float32 overflow of the squares of finite values (the sum is then summed again in float64
    and the caller decides)."""
    n = x.shape[0]
    if not n:
        return 0.0, 0.0, 0
    bound = max_abs is not None
    lim = limit if math.isfinite(limit) else np.finfo(np.float64).max  # a sum that is not finite still stops
    if NUMBA:
        a, b = _array(acc), _array(x)
        max_bits = 0
        if bound:
            m32 = np.float32(max_abs)
            if m32 < max_abs:  # rounded down to float32: the next one up, so no allowed value fails
                m32 = np.nextafter(m32, np.float32(np.inf))
            max_bits = int(np.array([abs(m32)], dtype=np.float32).view(np.int32)[0])
        sq, top, stop = _loops().axpy_checked(a, b, w, before, lim, bound, max_bits, fresh, 0.0)
        if not bound:
            return _in_float64(sq, b), 0.0, stop
        sq, top = _top(sq, top, b)
        return sq, top, stop
    t, into = as_tensor(x), as_tensor(acc)
    sq, top, stop = 0.0, 0.0, n
    for s in range(0, n, PIECE):
        piece = t[s : s + PIECE]
        if bound:
            top = _piece_top(top, piece)  # reads the piece into the cache...
        sq += float(torch.dot(piece, piece))  # ...(or this does)...
        if stop == n:
            if before + sq <= lim and (not bound or top <= max_abs):
                if fresh:
                    into[s : s + PIECE].zero_()
                into[s : s + PIECE].add_(piece, alpha=w)  # ...and it is added from there
            else:
                stop = s
    return sq, top, stop


def tensor_view(x: np.ndarray) -> Tensor:
    """A tensor view of a numpy array that may be read-only (a message's values: only read)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(x)


def measure(x: Tensor, *, bound: bool = True) -> tuple[float, float]:
    """``(sum of squares, largest |x|)`` of a 1-D contiguous float32 tensor in one read, the measures of
    :func:`axpy_measure_` without adding it anywhere (with numba the squares are summed in float64 here, so the
    sum's last bits may differ from the pass's). The largest magnitude is ``inf`` when a value
    is not finite; without ``bound`` only that is known (``0.0`` or ``inf``, from the sum of squares)."""
    if NUMBA and x.numel():
        a = x.numpy()
        if not bound:
            sq = _loops().sumsq(a)
            return sq, (0.0 if math.isfinite(sq) else math.inf)
        sq, bits = _loops().measure(a, a.view(np.int32))
        top = float(np.array([bits], dtype=np.int32).view(np.float32)[0])
        return sq, (top if math.isfinite(top) else math.inf)  # NaN bits lie above inf's
    sq, top = 0.0, 0.0
    for s in range(0, x.numel(), PIECE):
        piece = x[s : s + PIECE]
        top = _piece_top(top, piece)
        sq += float(torch.dot(piece, piece))
    if not math.isfinite(sq) and math.isfinite(top):  # float32 overflow of finite values: sum them in float64
        sq = float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2
    return sq, (top if bound or not math.isfinite(top) else 0.0)


def _piece_step(blocksize: int) -> int:
    """Values per piece of the torch path over codes: about :data:`PIECE`, whole blocks."""
    return max(blocksize, PIECE // blocksize * blocksize)


def dequantize_measure(codes: memoryview, absmax: Tensor | np.ndarray, code: Tensor,
                       blocksize: int) -> tuple[float, float]:
    """``(sum of squares, largest |x|)`` of the values :func:`dequantize_blockwise` decodes, read from the codes
    (one byte per value) without decoding them into memory."""
    n = len(codes)
    if NUMBA and n:
        return _loops().dequantize_measure(np.frombuffer(codes, dtype=np.uint8), _array(absmax), code.numpy(),
                                           blocksize)
    sq, top = 0.0, 0.0
    step = _piece_step(blocksize)
    for s in range(0, n, step):
        e = min(s + step, n)
        piece = dequantize_blockwise(codes[s:e], absmax[s // blocksize : -(-e // blocksize)], code, blocksize)
        sq += float(torch.linalg.vector_norm(piece, dtype=torch.float64)) ** 2
        top = max(top, float(piece.abs().max()))
    return sq, top


def dequantize_axpy_(acc: Tensor, dst: int, codes: memoryview, src: int, n: int, absmax: Tensor | np.ndarray,
                     code: Tensor, blocksize: int, w: float) -> None:
    """``acc[dst : dst + n] += w * x[src : src + n]`` in place, where ``x`` is what :func:`dequantize_blockwise`
    decodes from all of ``codes``: the values are decoded as they are added, never stored; bit-identical to
    decoding then ``acc[...].add_(x[...], alpha=w)``."""
    if not n:
        return
    if NUMBA:
        # the fold's own loop (the same additions, so the same bits: the undo's replay), its measures discarded
        _loops().dequantize_axpy_measure(acc.numpy(), dst, np.frombuffer(codes, dtype=np.uint8), src, n,
                                         _array(absmax), code.numpy(), blocksize, np.float32(w))
        return
    step = _piece_step(blocksize)
    for s in range(src // blocksize * blocksize, src + n, step):  # whole blocks, about PIECE values at a time
        e = min(s + step, len(codes))
        piece = dequantize_blockwise(codes[s:e], absmax[s // blocksize : -(-e // blocksize)], code, blocksize)
        lo, hi = max(s, src), min(e, src + n)
        acc[dst + lo - src : dst + hi - src].add_(piece[lo - s : hi - s], alpha=w)


def dequantize_axpy_measure_(acc: Tensor, dst: int, codes: memoryview, src: int, n: int,
                             absmax: Tensor | np.ndarray, code: Tensor, blocksize: int,
                             w: float) -> tuple[float, float]:
    """:func:`dequantize_axpy_` that also returns ``(sum of squares, largest |x|)`` of the values it added, in the
    same pass over the codes (the values are finite: the scales were checked)."""
    if not n:
        return 0.0, 0.0
    if NUMBA:
        return _loops().dequantize_axpy_measure(acc.numpy(), dst, np.frombuffer(codes, dtype=np.uint8), src, n,
                                                _array(absmax), code.numpy(), blocksize, np.float32(w))
    step = _piece_step(blocksize)
    sq, top = 0.0, 0.0
    for s in range(src // blocksize * blocksize, src + n, step):  # whole blocks, about PIECE values at a time
        e = min(s + step, len(codes))
        piece = dequantize_blockwise(codes[s:e], absmax[s // blocksize : -(-e // blocksize)], code, blocksize)
        lo, hi = max(s, src), min(e, src + n)
        part = piece[lo - s : hi - s]
        acc[dst + lo - src : dst + hi - src].add_(part, alpha=w)
        sq += float(torch.linalg.vector_norm(part, dtype=torch.float64)) ** 2
        top = max(top, float(part.abs().max()))
    return sq, top


__all__ = [
    "NUMBA",
    "PIECE",
    "as_tensor",
    "axpy_checked_",
    "axpy_measure_",
    "axpy_measure_array_",
    "axpy_to_measure_",
    "dequantize_axpy_",
    "dequantize_axpy_measure_",
    "dequantize_blockwise",
    "dequantize_measure",
    "measure",
    "tensor_view",
]
