"""The compiled loops of :mod:`lightning_fed.kernels` (numba, the `fast` extra): imported on first use only, so a
process that never folds or decodes 8-bit replies does not import numba. Call them through
:mod:`lightning_fed.kernels`, which checks their inputs and holds their torch fallbacks."""

from __future__ import annotations

import os
import platform

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

BLOCK = 512
"""Values per block of the fold's passes: a block's float32 squares are summed in float32, the block sums in
float64."""


# The last, partial block's squares. numba compiles a callee once per signature, with the fast-math flags of the
# first caller that needs it added to its own, so every caller of a compiled loop here has the same flags as its
# siblings: the four passes below call one compiled ``_tail_sumsq`` (contract, reassoc, nsz) and sum alike.
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
# alike and their sums agree bit for bit, with or without the bound; the last, partial block is summed by one compiled
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
            top = max(top, np.int32(b[j] & np.int32(0x7FFFFFFF)))
    s = n - n % BLOCK
    a, v, b = acc[s:], x[s:], bits[s:]
    for j in range(n - s):
        a[j] += w * v[j]
    sq += _tail_sumsq(v)
    for j in range(n - s):
        top = max(top, np.int32(b[j] & np.int32(0x7FFFFFFF)))
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
# inf), and an integer max vectorises where a float max (NaN rules) does not. numba types ``int32 & int32`` as
# int64: every such max casts the masked bits back to int32, so it runs at int32 width (without AVX-512 there is no
# vector int64 max, and an int64 max compiled to compares and blends took about twice as long).
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
        top = max(top, np.int32(bits[j] & np.int32(0x7FFFFFFF)))
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
        top = max(top, np.int32(bits[j] & np.int32(0x7FFFFFFF)))
    return np.float64(p), top


# Every array below is indexed by a ``range`` variable only, on per-block views: numba proves such an index
# non-negative and drops its negative-index wraparound (a select per access), which otherwise keeps LLVM from
# vectorising the loop (``acc[dst + k]`` was one scalar fma per value). The table lookups are scalar loads (LLVM
# emits no gather for them); the weighted add and the measures run in vectors. ``dequantize_axpy_measure_gather``
# does the lookups with one AVX-512 gather per 16 values instead, where the CPU has it.
@numba.njit(fastmath={"contract"}, boundscheck=False, nogil=True, cache=True)
def dequantize_axpy_measure_lookups(
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


def _host_gathers() -> bool:
    """Whether numba compiles for this machine's own CPU (no ``NUMBA_CPU_NAME``) and it has AVX-512F: the
    16-lane gather of :func:`_fold16`."""
    if platform.machine().lower() not in ("x86_64", "amd64") or numba.config.CPU_NAME not in (None, "", "host"):
        return False
    return bool(llvm.get_host_cpu_features().get("avx512f", False))


GATHER = _host_gathers() and os.environ.get("LIGHTNING_FED_GATHER", "") not in ("0", "no", "false")
"""Whether the 8-bit fold looks its codes up with AVX-512 gathers (:func:`dequantize_axpy_measure_gather`): the
CPU has AVX-512F and ``LIGHTNING_FED_GATHER=0`` is not set. Both loops add the same bits; their sums of squares
differ in the last bits (another order of the same float32 squares)."""

LANES = 16
"""Values per gather (one AVX-512 register of float32), and lanes of the gather fold's sums of squares."""

_F32, _I1, _I8, _I32 = ir.FloatType(), ir.IntType(1), ir.IntType(8), ir.IntType(32)
_VF, _VI, _VB, _VM = (ir.VectorType(t, LANES) for t in (_F32, _I32, _I8, _I1))


def _splat(builder: ir.IRBuilder, value: ir.Value, vty: ir.VectorType) -> ir.Value:
    undef = ir.Constant(vty, None)
    one = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(_VI, [0] * LANES))


def _contiguous(ty: types.Type, dtype: types.Type) -> bool:
    return isinstance(ty, types.Array) and ty.ndim == 1 and ty.layout == "C" and ty.dtype == dtype


@intrinsic
def _fold16(typingctx, acc, dst, codes, src, chunks, code, scale, w, lanes, tops, valid):  # pragma: no cover
    """``chunks`` times 16 values: ``x = code[codes[src + i]] * scale`` (one gather of the code book per 16 codes,
    one float32 product), ``acc[dst + i] = fma(w, x, acc[dst + i])``, and the first ``valid`` values of each 16 (16:
    all) measured into ``lanes`` (``lanes[j] += x * x``, value ``i`` into lane ``i % 16``: a product and a sum, never
    fused or reordered) and ``tops`` (the sign-cleared bits' max). ``code`` must hold 256 values."""
    if not (_contiguous(acc, types.float32) and _contiguous(codes, types.uint8) and _contiguous(code, types.float32)
            and _contiguous(lanes, types.float32) and _contiguous(tops, types.int32)):
        return None
    sig = types.void(acc, dst, codes, src, chunks, code, scale, w, lanes, tops, valid)

    def codegen(context, builder, signature, args):
        a_v, dst_v, c_v, src_v, n_v, t_v, s_v, w_v, l_v, p_v, valid_v = args
        at, dt, ct, srt, nt, tt, st, wt, lt, pt, vt = signature.args
        arr = [context.make_array(ty)(context, builder, v) for ty, v in
               ((at, a_v), (ct, c_v), (tt, t_v), (lt, l_v), (pt, p_v))]
        acc_p, codes_p, code_p, lanes_p, tops_p = (a.data for a in arr)
        dst_v, src_v = context.cast(builder, dst_v, dt, types.intp), context.cast(builder, src_v, srt, types.intp)
        n_v = context.cast(builder, n_v, nt, types.intp)
        s_v, w_v = context.cast(builder, s_v, st, types.float32), context.cast(builder, w_v, wt, types.float32)
        valid_v = builder.trunc(context.cast(builder, valid_v, vt, types.int64), _I32)
        mod = builder.module
        gather = cgutils.get_or_insert_function(
            mod, ir.FunctionType(_VF, [_VF, ir.PointerType(_I8), _VI, _VM, _I32]),
            "llvm.x86.avx512.mask.gather.dps.512")
        fma = cgutils.get_or_insert_function(mod, ir.FunctionType(_VF, [_VF, _VF, _VF]), "llvm.fma.v16f32")
        smax = cgutils.get_or_insert_function(mod, ir.FunctionType(_VI, [_VI, _VI]), "llvm.smax.v16i32")
        lanes_vp = builder.bitcast(lanes_p, _VF.as_pointer())
        tops_vp = builder.bitcast(tops_p, _VI.as_pointer())
        sq = cgutils.alloca_once_value(builder, builder.load(lanes_vp, align=4))
        top = cgutils.alloca_once_value(builder, builder.load(tops_vp, align=4))
        sv, wv = _splat(builder, s_v, _VF), _splat(builder, w_v, _VF)
        keep = builder.icmp_signed("<", ir.Constant(_VI, list(range(LANES))), _splat(builder, valid_v, _VI))
        base = builder.bitcast(code_p, ir.PointerType(_I8))
        every = ir.Constant(_VM, [1] * LANES)
        with cgutils.for_range(builder, n_v) as loop:
            k = builder.mul(loop.index, ir.Constant(loop.index.type, LANES))
            cp = builder.bitcast(builder.gep(codes_p, [builder.add(src_v, k)]), _VB.as_pointer())
            idx = builder.zext(builder.load(cp, align=1), _VI)
            x = builder.fmul(builder.call(gather, [ir.Constant(_VF, None), base, idx, every, ir.Constant(_I32, 4)]), sv)
            ap = builder.bitcast(builder.gep(acc_p, [builder.add(dst_v, k)]), _VF.as_pointer())
            builder.store(builder.call(fma, [wv, x, builder.load(ap, align=4)]), ap, align=4)
            x = builder.select(keep, x, ir.Constant(_VF, [0.0] * LANES))
            builder.store(builder.fadd(builder.load(sq), builder.fmul(x, x)), sq)
            bits = builder.and_(builder.bitcast(x, _VI), ir.Constant(_VI, [0x7FFFFFFF] * LANES))
            builder.store(builder.call(smax, [builder.load(top), bits]), top)
        builder.store(builder.load(sq), lanes_vp, align=4)
        builder.store(builder.load(top), tops_vp, align=4)
        return context.get_dummy_value()

    return sig, codegen


# The 8-bit fold with its lookups done by AVX-512 gathers (``GATHER``), called from Python only (a caller with
# fast-math flags would pass them on to it, ``contract`` fusing its squares): per block, its whole 16s in one gather loop
# (lookup, product, fma into the accumulator, measures in registers); the block's last values (fewer than 16) in a
# padded copy. The same additions as ``dequantize_axpy_measure_lookups``, bit for bit; the block's squares summed
# in 16 float32 lanes, then the lanes in order (deterministic, and within float32 rounding of the other loop's).
# A code book of fewer than 256 values (never the codec's) goes to the scalar loop: a gather reads any of 256.
@numba.njit(boundscheck=False, nogil=True, cache=True)
def dequantize_axpy_measure_gather(
    acc: np.ndarray, dst: int, codes: np.ndarray, src: int, n: int, absmax: np.ndarray, code: np.ndarray,
    blocksize: int, w: np.float32,
) -> tuple[float, float]:  # pragma: no cover - compiled
    if code.shape[0] < 256:
        return dequantize_axpy_measure_lookups(acc, dst, codes, src, n, absmax, code, blocksize, w)
    lanes = np.zeros(LANES, dtype=np.float32)
    tops = np.zeros(LANES, dtype=np.int32)
    pad_codes = np.zeros(LANES, dtype=np.uint8)
    pad_acc = np.zeros(LANES, dtype=np.float32)
    sq = 0.0
    k = 0
    b = src // blocksize
    m = min(n, (b + 1) * blocksize - src)  # the first block may start inside a block
    while k < n:
        scale = absmax[b]
        full = m - m % LANES
        if full:
            _fold16(acc, dst + k, codes, src + k, full // LANES, code, scale, w, lanes, tops, LANES)
        rest = m - full
        if rest:
            for j in range(rest):
                pad_codes[j] = codes[src + k + full + j]
                pad_acc[j] = acc[dst + k + full + j]
            _fold16(pad_acc, 0, pad_codes, 0, 1, code, scale, w, lanes, tops, rest)
            for j in range(rest):
                acc[dst + k + full + j] = pad_acc[j]
        p = np.float32(0.0)
        for j in range(LANES):  # the lanes summed in order
            p += lanes[j]
            lanes[j] = np.float32(0.0)
        sq += np.float64(p)
        k += m
        b += 1
        m = min(blocksize, n - k)
    top = np.int32(0)
    for j in range(LANES):
        top = max(top, tops[j])
    return sq, np.float64(np.array([top], dtype=np.int32).view(np.float32)[0])


dequantize_axpy_measure = dequantize_axpy_measure_gather if GATHER else dequantize_axpy_measure_lookups
"""The 8-bit fold (``kernels.dequantize_axpy_measure_``): the gather loop where the CPU has AVX-512F
(:data:`GATHER`), else the scalar lookups; the same additions either way."""


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
            top = max(top, np.int32(b[j] & np.int32(0x7FFFFFFF)))
    s = n - n % BLOCK
    o, a, v, b = out[s:], acc[s:], x[s:], bits[s:]
    for j in range(n - s):
        o[j] = a[j] + w * v[j]
    sq += _tail_sumsq(v)
    for j in range(n - s):
        top = max(top, np.int32(b[j] & np.int32(0x7FFFFFFF)))
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


# The fold's checked pass: per block, the block of ``acc`` saved into a block-sized scratch while ``w * x`` is added
# to it and the block's float32 squares summed (one loop streaming ``x`` and ``acc``, as ``axpy_sumsq`` does: the
# same bits; a loop that judged a block before adding it read the two in separate passes, slower), then, with the
# bound, the block's largest magnitude; the block stays added only while the running sum (plus ``before``) stays
# within ``limit`` and the magnitudes within ``max_bits`` (the bits of the largest magnitude allowed), else it is
# put back from the scratch. From the first block that fails on, every block is put back after its add, so
# nothing more stays added, but every block is measured by the same loop, so the sums are those of the other
# passes. ``w`` is rounded to float32 here, as ``np.float32(w)`` rounds it. With ``fresh``, ``acc`` is taken as
# zeros (its content is only saved, for a block put back):
# ``zero + w * x`` is written, ``zero`` a runtime +0.0, so the compiler keeps the add that turns a product of -0.0
# into the +0.0 that zeroing ``acc`` and adding would give.
@numba.njit(fastmath={"contract", "reassoc", "nsz"}, boundscheck=False, nogil=True, cache=True)
def axpy_checked(
    acc: np.ndarray, x: np.ndarray, w64: float, before: float, limit: float, bound: bool, max_bits: int,
    fresh: bool, zero: float
) -> tuple[float, float, int]:  # pragma: no cover - compiled
    w = np.float32(w64)
    z = np.float32(zero)
    n = x.shape[0]
    bits = x.view(np.int32)
    tmp = np.empty(BLOCK, dtype=np.float32)
    sq = 0.0
    top = np.int32(0)
    stop = n
    for s in range(0, n - n % BLOCK, BLOCK):
        a, v, b = acc[s : s + BLOCK], x[s : s + BLOCK], bits[s : s + BLOCK]
        p = np.float32(0.0)
        if fresh:
            for j in range(BLOCK):
                t = v[j]
                tmp[j] = a[j]
                a[j] = z + w * t
                p += t * t
        else:
            for j in range(BLOCK):
                t = v[j]
                tmp[j] = a[j]
                a[j] += w * t
                p += t * t
        sq += np.float64(p)
        if bound:
            for j in range(BLOCK):
                top = max(top, np.int32(b[j] & np.int32(0x7FFFFFFF)))
        if stop == n and not (before + sq <= limit and top <= max_bits):
            stop = s
        if stop != n:  # the block put back as it was (past the stop, blocks are added and put back: the one loop
            for j in range(BLOCK):  # body for every block, so the sums' bits do not depend on where it stopped)
                a[j] = tmp[j]
    s = n - n % BLOCK
    a, v, b = acc[s:], x[s:], bits[s:]
    sq += _tail_sumsq(v)
    if bound:
        for j in range(n - s):
            top = max(top, np.int32(b[j] & np.int32(0x7FFFFFFF)))
    if stop == n:
        if before + sq <= limit and top <= max_bits:
            if fresh:
                for j in range(n - s):
                    a[j] = z + w * v[j]
            else:
                for j in range(n - s):
                    a[j] += w * v[j]
        else:
            stop = s
    return sq, np.float64(np.array([top], dtype=np.int32).view(np.float32)[0]), stop
