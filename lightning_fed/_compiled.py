"""The compiled loops of :mod:`lightning_fed.kernels` (numba, the `fast` extra): imported on first use only, so a
process that never folds or decodes 8-bit replies does not import numba. Call them through
:mod:`lightning_fed.kernels`, which checks their inputs and holds their torch fallbacks."""

from __future__ import annotations

import numba
import numpy as np

BLOCK = 512
"""Values per block of the fold's passes: a block's float32 squares are summed in float32, the block sums in
float64."""


# The last, partial block's squares, summed one after the other (no reassociation: a loop of any length sums in
# one order, whatever pass calls it).
@numba.njit(boundscheck=False, nogil=True, cache=True)
def _tail_sumsq(v: np.ndarray) -> float:  # pragma: no cover - compiled
    p = np.float32(0.0)
    for j in range(v.shape[0]):
        p += v[j] * v[j]
    return np.float64(p)


# The fold's passes (``axpy_*``): per block of ``BLOCK`` values, one fma per element (``contract``: the bits of
# ``Tensor.add_``; ``reassoc`` has nothing to reassociate in it) and the block's float32 squares summed in float32
# (``reassoc``: LLVM's vector lanes), the block sums in float64 (exact enough for a norm check: a block's sum has a
# relative error of about 1e-6). Float32 squares keep every loop at float32 width; the float64 widening of each
# value set the pace before. Every pass runs the same loop body (the same operations, only the store's target
# differs; the largest magnitude is taken by a second loop over the block, from the cache), so LLVM vectorises them
# alike and their sums agree bit for bit, with or without the bound; the last, partial block is summed in order by
# ``_tail_sumsq`` (``tests/test_kernels.py``). A square or a block sum past float32's range gives ``inf``: the
# wrappers in ``kernels`` then sum the squares again in float64 (``sumsq``).
@numba.njit(fastmath={"contract", "reassoc", "nsz"}, boundscheck=False, nogil=True, cache=True)
def axpy_measure(acc: np.ndarray, x: np.ndarray, w: np.float32) -> tuple[float, float]:  # pragma: no cover
    n = x.shape[0]
    bits = x.view(np.int32)
    sq = 0.0
    top = np.int32(0)
    for s in range(0, n - n % BLOCK, BLOCK):
        a, v, b = acc[s : s + BLOCK], x[s : s + BLOCK], bits[s : s + BLOCK]
        p = np.float32(0.0)
        for j in range(BLOCK):
            t = v[j]
            a[j] += w * t
            p += t * t
        sq += np.float64(p)
        for j in range(BLOCK):  # from the cache: the largest magnitude, an integer max of the sign-cleared bits
            top = max(top, b[j] & np.int32(0x7FFFFFFF))
    s = n - n % BLOCK
    a, v, b = acc[s:], x[s:], bits[s:]
    for j in range(n - s):
        a[j] += w * v[j]
    sq += _tail_sumsq(v)
    for j in range(n - s):
        top = max(top, b[j] & np.int32(0x7FFFFFFF))
    return sq, np.float64(np.array([top], dtype=np.int32).view(np.float32)[0])


@numba.njit(fastmath={"contract", "reassoc", "nsz"}, boundscheck=False, nogil=True, cache=True)
def axpy_sumsq(acc: np.ndarray, x: np.ndarray, w: np.float32) -> float:  # pragma: no cover
    n = x.shape[0]
    sq = 0.0
    for s in range(0, n - n % BLOCK, BLOCK):
        a, v = acc[s : s + BLOCK], x[s : s + BLOCK]
        p = np.float32(0.0)
        for j in range(BLOCK):
            t = v[j]
            a[j] += w * t
            p += t * t
        sq += np.float64(p)
    s = n - n % BLOCK
    a, v = acc[s:], x[s:]
    for j in range(n - s):
        a[j] += w * v[j]
    return sq + _tail_sumsq(v)


@numba.njit(fastmath={"reassoc", "nsz"}, boundscheck=False, nogil=True, cache=True)
def sumsq(x: np.ndarray) -> float:  # pragma: no cover - compiled
    sq = 0.0
    for i in range(x.shape[0]):
        d = np.float64(x[i])
        sq += d * d
    return sq


# The largest magnitude as the largest of the values' bits with the sign cleared (``bits`` is ``x`` viewed as
# int32): for non-negative floats the integer order is the float order (inf above every finite value, NaN above
# inf), and an integer max vectorises where a float max (NaN rules) does not.
@numba.njit(fastmath={"reassoc", "nsz"}, boundscheck=False, nogil=True, cache=True)
def measure(x: np.ndarray, bits: np.ndarray) -> tuple[float, int]:  # pragma: no cover - compiled
    return _block_measure(x, bits, x.shape[0])


@numba.njit(fastmath={"contract"}, boundscheck=False, nogil=True, cache=True)
def dequantize(
    codes: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int, out: np.ndarray
) -> None:  # pragma: no cover - compiled
    n = codes.shape[0]
    whole = n // blocksize
    points = np.empty(blocksize, dtype=np.float32)
    for b in range(whole):  # per block: the table lookups (gathers) first, then one vectorised scaling
        start = b * blocksize
        for j in range(blocksize):
            points[j] = code[codes[start + j]]
        scale = absmax[b]
        for j in range(blocksize):
            out[start + j] = points[j] * scale
    for i in range(whole * blocksize, n):  # the last, partial block
        out[i] = code[codes[i]] * absmax[whole]


@numba.njit(fastmath={"contract"}, boundscheck=False, nogil=True, cache=True)
def dequantize_axpy(
    acc: np.ndarray, dst: int, codes: np.ndarray, src: int, n: int, absmax: np.ndarray, code: np.ndarray,
    blocksize: int, w: np.float32,
) -> None:  # pragma: no cover - compiled
    # the undo replay: the fold's own loop (the same additions, so the same bits), its measures discarded
    dequantize_axpy_measure(acc, dst, codes, src, n, absmax, code, blocksize, w)


@numba.njit(fastmath={"reassoc", "nsz"}, boundscheck=False, nogil=True, cache=True)
def dequantize_measure(
    codes: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int
) -> tuple[float, float]:  # pragma: no cover - compiled
    sq = 0.0
    top = np.float32(0.0)
    n = codes.shape[0]
    for b in range((n + blocksize - 1) // blocksize):
        scale = absmax[b]
        for i in range(b * blocksize, min(n, (b + 1) * blocksize)):
            v = code[codes[i]] * scale
            d = np.float64(v)
            sq += d * d
            top = max(top, abs(v))
    return sq, np.float64(top)


@numba.njit(fastmath={"reassoc", "nsz"}, boundscheck=False, nogil=True, cache=True)
def _block_measure(vals: np.ndarray, bits: np.ndarray, m: int) -> tuple[float, int]:  # pragma: no cover
    sq = 0.0
    top = np.int32(0)
    for j in range(m):  # the largest magnitude as an integer max of the sign-cleared bits (see ``measure``): the
        # first ``m`` values (a block of the 8-bit fold, or all of ``vals`` for ``measure``)
        d = np.float64(vals[j])
        sq += d * d
        top = max(top, bits[j] & np.int32(0x7FFFFFFF))
    return sq, top


# A block of the 8-bit fold: its float32 squares summed in float32 (vector lanes; a block of codes is at most a few
# thousand values) and its largest magnitude; the block sums add up in float64 (``dequantize_axpy_measure``). A
# square past float32's range gives ``inf``: the fold then checks the decoded values and sums them in float64.
@numba.njit(fastmath={"reassoc", "nsz"}, boundscheck=False, nogil=True, cache=True)
def _block_measure32(vals: np.ndarray, bits: np.ndarray, m: int) -> tuple[float, int]:  # pragma: no cover
    p = np.float32(0.0)
    top = np.int32(0)
    for j in range(m):
        t = vals[j]
        p += t * t
        top = max(top, bits[j] & np.int32(0x7FFFFFFF))
    return np.float64(p), top


# Every array below is indexed by a ``range`` variable only, on per-block views: numba proves such an index
# non-negative and drops its negative-index wraparound (a select per access), which otherwise keeps LLVM from
# vectorising the loop (``acc[dst + k]`` was one scalar fma per value). The table lookups stay scalar loads
# (LLVM emits no gather on AMD Zen); the weighted add and the measures run in 512-bit vectors.
@numba.njit(fastmath={"contract"}, boundscheck=False, nogil=True, cache=True)
def dequantize_axpy_measure(
    acc: np.ndarray, dst: int, codes: np.ndarray, src: int, n: int, absmax: np.ndarray, code: np.ndarray,
    blocksize: int, w: np.float32,
) -> tuple[float, float]:  # pragma: no cover - compiled
    # acc[dst + k] += w * (code[codes[src + k]] * absmax[(src + k) // blocksize]): the decoded value rounded to
    # float32 first, then one fma, as decoding and ``Tensor.add_`` do; and the decoded values measured per block
    # from a small buffer (the sums, in a helper allowed to reassociate, never touch the elementwise add, which
    # keeps one rounding of the product and one fma)
    vals = np.empty(blocksize, dtype=np.float32)
    bits = vals.view(np.int32)
    sq = 0.0
    top = np.int32(0)
    k = 0
    b = src // blocksize
    m = min(n, (b + 1) * blocksize - src)  # the first block may start inside a block
    while k < n:
        out = acc[dst + k : dst + k + m]
        block = codes[src + k : src + k + m]
        scale = absmax[b]
        for j in range(m):
            vals[j] = code[block[j]] * scale
        for j in range(m):
            out[j] += w * vals[j]
        s, t = _block_measure32(vals, bits, m)
        sq += s
        top = max(top, t)
        k += m
        b += 1
        m = min(blocksize, n - k)
    return sq, np.float64(np.array([top], dtype=np.int32).view(np.float32)[0])


# The ping-pong fold's pass (``MeanFold``, small replies) and the snapshot taken by the add: ``out = acc + w * x``
# into the other buffer, ``acc`` left as it was: the loops above with another store target (the same bits as
# ``Tensor.add_``, the same measures).
@numba.njit(fastmath={"contract", "reassoc", "nsz"}, boundscheck=False, nogil=True, cache=True)
def axpy_to_measure(
    out: np.ndarray, acc: np.ndarray, x: np.ndarray, w: np.float32
) -> tuple[float, float]:  # pragma: no cover - compiled
    n = x.shape[0]
    bits = x.view(np.int32)
    sq = 0.0
    top = np.int32(0)
    for s in range(0, n - n % BLOCK, BLOCK):
        o, a, v, b = out[s : s + BLOCK], acc[s : s + BLOCK], x[s : s + BLOCK], bits[s : s + BLOCK]
        p = np.float32(0.0)
        for j in range(BLOCK):
            t = v[j]
            o[j] = a[j] + w * t
            p += t * t
        sq += np.float64(p)
        for j in range(BLOCK):
            top = max(top, b[j] & np.int32(0x7FFFFFFF))
    s = n - n % BLOCK
    o, a, v, b = out[s:], acc[s:], x[s:], bits[s:]
    for j in range(n - s):
        o[j] = a[j] + w * v[j]
    sq += _tail_sumsq(v)
    for j in range(n - s):
        top = max(top, b[j] & np.int32(0x7FFFFFFF))
    return sq, np.float64(np.array([top], dtype=np.int32).view(np.float32)[0])


@numba.njit(fastmath={"contract", "reassoc", "nsz"}, boundscheck=False, nogil=True, cache=True)
def axpy_to_sumsq(out: np.ndarray, acc: np.ndarray, x: np.ndarray, w: np.float32) -> float:  # pragma: no cover
    n = x.shape[0]
    sq = 0.0
    for s in range(0, n - n % BLOCK, BLOCK):
        o, a, v = out[s : s + BLOCK], acc[s : s + BLOCK], x[s : s + BLOCK]
        p = np.float32(0.0)
        for j in range(BLOCK):
            t = v[j]
            o[j] = a[j] + w * t
            p += t * t
        sq += np.float64(p)
    s = n - n % BLOCK
    o, a, v = out[s:], acc[s:], x[s:]
    for j in range(n - s):
        o[j] = a[j] + w * v[j]
    return sq + _tail_sumsq(v)
