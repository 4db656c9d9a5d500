"""The fold's fused passes: the compiled loop (numba) and the torch fallback add bit-identically to
``Tensor.add_`` and measure the same values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_fed import kernels as fused

SIZES = [1, 7, 333, 1000, 4097]


def _paths(monkeypatch) -> list[str]:
    monkeypatch.setattr(fused, "PIECE", 100)  # several pieces on the torch path
    return ["torch"] + (["numba"] if fused.HAVE_NUMBA else [])


def _run(path: str, monkeypatch, acc: torch.Tensor, x: torch.Tensor, w: float, bound: bool):
    monkeypatch.setattr(fused, "NUMBA", path == "numba")
    return fused.axpy_measure_(acc, x, w, bound=bound)


@pytest.mark.parametrize("n", SIZES)
def test_both_paths_add_bit_identically_to_add_and_measure_the_same(n, monkeypatch):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 0.03
    start = torch.randn(n, generator=g)
    w = 13 / 97  # not a float32: rounded to float32 as add_ does
    want = start.clone().add_(x, alpha=w)
    exact = float((x.double() ** 2).sum())
    for path in _paths(monkeypatch):
        for bound in (False, True):
            acc = start.clone()
            sq, top = _run(path, monkeypatch, acc, x, w, bound)
            assert torch.equal(acc, want), (path, bound)
            assert sq == pytest.approx(exact, rel=1e-5)
            assert top == (float(x.abs().max()) if bound else 0.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_value_that_is_not_finite_makes_the_largest_magnitude_infinite(bad, monkeypatch):
    x = torch.linspace(-1, 1, 1000)
    x[777] = bad
    for path in _paths(monkeypatch):
        sq, top = _run(path, monkeypatch, torch.zeros(1000), x, 0.5, True)
        assert top == math.inf, path
        assert not math.isfinite(sq), path


def test_an_empty_reply_adds_nothing(monkeypatch):
    for path in _paths(monkeypatch):
        acc = torch.zeros(0)
        assert _run(path, monkeypatch, acc, torch.zeros(0), 0.5, True) == (0.0, 0.0)


@pytest.mark.parametrize("n", [1, 9, 511, 512, 513, 1100, 4097])
def test_every_compiled_pass_sums_the_same_squares_bit_for_bit(n):
    """The in-place, the aside and the checked passes, with and without the bound, give one sum of squares (blocks
    of float32 squares in float32, their sums in float64), within 1e-5 of the float64 sum, and add the bits of
    ``add_``."""
    if not fused.HAVE_NUMBA:
        pytest.skip("numba (the `fast` extra) not installed")
    import numpy as np

    loops = fused._loops()
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 0.03).astype(np.float32)
    start = rng.standard_normal(n).astype(np.float32)
    w = np.float32(13 / 97)
    want = torch.from_numpy(start).clone().add_(torch.from_numpy(x), alpha=float(w)).numpy()
    bufs = [start.copy() for _ in range(2)] + [np.zeros(n, np.float32) for _ in range(2)]
    bufs += [start.copy() for _ in range(2)]
    sums = [
        loops.axpy_sumsq(bufs[0], x, w),
        loops.axpy_measure(bufs[1], x, w)[0],
        loops.axpy_to_sumsq(bufs[2], start, x, w),
        loops.axpy_to_measure(bufs[3], start, x, w)[0],
        loops.axpy_checked(bufs[4], x, float(w), 0.0, 1e300, False, 0, False, 0.0)[0],
        loops.axpy_checked(bufs[5], x, float(w), 0.0, 1e300, True, 0x7F000000, False, 0.0)[0],
    ]
    assert len(set(sums)) == 1
    assert sums[0] == pytest.approx(float((x.astype(np.float64) ** 2).sum()), rel=1e-5)
    assert all(np.array_equal(b, want) for b in bufs)


@pytest.mark.parametrize("bound", [False, True])
def test_squares_past_float32_range_are_summed_again_in_float64(bound, monkeypatch):
    """A finite value whose square (or a block of squares) passes float32's range still gives a finite sum of
    squares, summed again in float64, and its true largest magnitude; a value that is not finite still gives
    ``inf``."""
    x = torch.zeros(2000)
    x[5], x[1500] = 3e19, -2e19  # squares of 9e38 and 4e38: past float32's 3.4e38
    exact = 3e19**2 + 2e19**2
    for path in _paths(monkeypatch):
        monkeypatch.setattr(fused, "NUMBA", path == "numba")
        for run in (
            lambda xx: fused.axpy_measure_(torch.zeros(2000), xx, 0.5, bound=bound),
            lambda xx: fused.axpy_to_measure_(torch.empty(2000), torch.zeros(2000), xx, 0.5, bound=bound),
            lambda xx: fused.axpy_measure_array_(torch.zeros(2000), xx.numpy(), 0.5, bound=bound),
            lambda xx: fused.axpy_checked_(torch.zeros(2000), xx, 0.5, before=0.0, limit=math.inf,
                                           max_abs=math.inf if bound else None)[:2],
        ):
            sq, top = run(x)
            if path == "numba":  # torch's float32 dot overflows: the fold checks the values then (its caller)
                assert sq == pytest.approx(exact, rel=1e-6), path
            assert top == (pytest.approx(3e19) if bound else 0.0), path
            bad = x.clone()
            bad[7] = math.inf
            sq, top = run(bad)
            assert not math.isfinite(sq) and (top == math.inf or not bound), path


@pytest.mark.parametrize("n", [0, *SIZES])
def test_the_pass_over_a_read_only_numpy_view_is_the_tensor_pass_bit_for_bit(n, monkeypatch):
    """``axpy_measure_array_`` (a message's values viewed by numpy, read-only) adds and measures exactly as
    ``axpy_measure_`` over the same values as a tensor, on both paths."""
    import numpy as np

    g = torch.Generator().manual_seed(n + 1)
    x = torch.randn(n, generator=g) * 0.03
    if n > 3:
        x[3] = math.inf if n % 2 else math.nan
    start = torch.randn(n, generator=g)
    message = b"head" + x.numpy().tobytes()  # bytes: read-only, the values at an offset
    view = np.frombuffer(message, dtype=np.float32, count=n, offset=4)
    assert not view.flags.writeable
    for path in _paths(monkeypatch):
        for bound in (False, True):
            monkeypatch.setattr(fused, "NUMBA", path == "numba")
            acc, want = start.clone(), start.clone()
            got = fused.axpy_measure_array_(acc, view, 13 / 97, bound=bound)
            expected = fused.axpy_measure_(want, x, 13 / 97, bound=bound)
            assert torch.equal(acc.isnan(), want.isnan()), (path, bound)  # the same bits, NaN where NaN was added
            assert torch.equal(acc.nan_to_num(), want.nan_to_num()), (path, bound)
            assert got[1] == expected[1] and (got[0] == expected[0] or math.isnan(got[0]) and math.isnan(expected[0]))


@pytest.mark.parametrize(("n", "blocksize"), [(1, 64), (255, 64), (1000, 256), (5000, 4096)])
def test_blockwise_dequantization_is_bitsandbytes_bit_for_bit(n, blocksize, monkeypatch):
    import bitsandbytes.functional as F

    code = F.create_dynamic_map(signed=True)
    v = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.02
    codes, qs = F.quantize_blockwise(v, code=code, blocksize=blocksize)
    want = F.dequantize_blockwise(codes, absmax=qs.absmax, code=code, blocksize=blocksize)
    message = memoryview(codes.numpy().tobytes())  # read-only, as a message's codes are
    for path in _paths(monkeypatch):
        monkeypatch.setattr(fused, "NUMBA", path == "numba")
        got = fused.dequantize_blockwise(message, qs.absmax, code, blocksize)
        assert got.dtype == torch.float32 and torch.equal(got, want), path


@pytest.mark.parametrize(("n", "blocksize"), [(1, 64), (255, 64), (1000, 256), (5000, 4096), (777, 32)])
def test_int8_fold_from_the_codes_is_decode_then_add_bit_for_bit(n, blocksize, monkeypatch):
    """Dequantize + weighted add in one loop equals decoding then ``add_``, over any span (segments that start
    and end inside blocks, the last partial block), and the measures are those of the decoded values."""
    import bitsandbytes.functional as F

    code = F.create_dynamic_map(signed=True)
    g = torch.Generator().manual_seed(n)
    v = torch.randn(n, generator=g) * 0.02
    codes, qs = F.quantize_blockwise(v, code=code, blocksize=blocksize)
    message = memoryview(codes.numpy().tobytes())
    x = F.dequantize_blockwise(codes, absmax=qs.absmax, code=code, blocksize=blocksize)
    start = torch.randn(n + 10, generator=g)
    w = 29 / 113
    spans = [(0, 3, n)] + ([(n // 3, 0, n - n // 3), (5, 7, n // 2)] if n > 10 else [])
    for path in _paths(monkeypatch):
        monkeypatch.setattr(fused, "NUMBA", path == "numba")
        for src, dst, count in spans:
            want = start.clone()
            want[dst : dst + count].add_(x[src : src + count], alpha=w)
            acc = start.clone()
            fused.dequantize_axpy_(acc, dst, message, src, count, qs.absmax, code, blocksize, w)
            assert torch.equal(acc, want), (path, src, dst, count)
            acc = start.clone()
            sq, top = fused.dequantize_axpy_measure_(acc, dst, message, src, count, qs.absmax, code, blocksize, w)
            assert torch.equal(acc, want), (path, src, dst, count)
            part = x[src : src + count]
            assert sq == pytest.approx(float((part.double() ** 2).sum()), rel=1e-6)
            assert top == float(part.abs().max())
        sq, top = fused.dequantize_measure(message, qs.absmax, code, blocksize)
        assert sq == pytest.approx(float((x.double() ** 2).sum()), rel=1e-6), path
        assert top == float(x.abs().max()), path
        assert fused.measure(x) == (pytest.approx(sq, rel=1e-6), top), path
        assert fused.measure(x, bound=False) == (pytest.approx(sq, rel=1e-6), 0.0), path


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None])
def test_measure_alone_finds_the_largest_magnitude_and_bad_values(bad, monkeypatch):
    x = torch.linspace(-3, 2, 1001)
    if bad is not None:
        x[500] = bad
    for path in _paths(monkeypatch):
        monkeypatch.setattr(fused, "NUMBA", path == "numba")
        for bound in (True, False):
            sq, top = fused.measure(x, bound=bound)
            if bad is None:
                assert top == (3.0 if bound else 0.0), (path, bound)
                assert sq == pytest.approx(float((x.double() ** 2).sum()), rel=1e-6)
            else:
                assert top == math.inf, (path, bound)


@pytest.mark.skipif(not fused.HAVE_NUMBA, reason="numba (the `fast` extra) not installed")
def test_the_int8_fold_adds_in_vectors(capsys):
    """The compiled 8-bit fold's weighted add is vectorised (packed fused multiply-adds), as the same loops
    indexed at an offset are not (``benchmarks/int8_fold_loops.py``); both add the same bits. On a CPU with
    AVX-512F the library's loop looks its codes up with gathers."""
    import platform

    import numpy as np
    from conftest import load_benchmark

    from lightning_fed import _compiled

    flags = ""
    if platform.system() == "Linux":
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    if platform.machine() != "x86_64" or " fma " not in flags:
        pytest.skip("needs an x86-64 CPU with FMA")
    bench = load_benchmark("int8_fold_loops")
    bench.main(["--params", "4096", "--repeat", "1"])
    rows = {line.split("│")[2].strip(): line for line in capsys.readouterr().out.splitlines() if "│ fold" in line}
    want = ["fold, scalar lookups", "fold, offset indices"] + (["fold, gathers"] if _compiled._host_gathers() else [])
    assert sorted(rows) == sorted(want)
    assert "yes" in rows["fold, scalar lookups"] and "yes" not in rows["fold, offset indices"]
    if "fold, gathers" in rows:  # packed fma, and a gather
        assert rows["fold, gathers"].count("yes") == 2
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, 1000, dtype=np.uint8)
    absmax, code = rng.random(16).astype(np.float32), rng.standard_normal(256).astype(np.float32)
    a, b = np.zeros(1010, np.float32), np.zeros(1010, np.float32)
    _compiled.dequantize_axpy_measure_lookups(a, 7, codes, 5, 990, absmax, code, 64, np.float32(0.3))
    bench.offset_indexed(b, 7, codes, 5, 990, absmax, code, 64, np.float32(0.3))
    assert np.array_equal(a, b)


def _lane_sums(x, blocks) -> float:
    """The gather fold's sum of squares, written out: per block, value ``j`` squared into lane ``j % 16`` in
    float32, the 16 lanes summed in order in float32, the block sums in float64."""
    import numpy as np

    sq = 0.0
    for lo, hi in blocks:
        lanes = [np.float32(0.0)] * 16
        for j, v in enumerate(x[lo:hi]):
            lanes[j % 16] = np.float32(lanes[j % 16] + np.float32(v * v))
        p = np.float32(0.0)
        for lane in lanes:
            p = np.float32(p + lane)
        sq += float(p)
    return sq


@pytest.mark.skipif(not fused.HAVE_NUMBA, reason="numba (the `fast` extra) not installed")
@pytest.mark.parametrize(("n", "blocksize", "src", "dst"),
                         [(1, 64, 0, 0), (15, 32, 0, 3), (49, 32, 0, 0), (777, 32, 5, 7), (1000, 64, 13, 0),
                          (5000, 4096, 100, 3), (4096 * 3 + 17, 256, 9, 2)])
def test_the_gather_fold_adds_the_bits_of_the_scalar_fold(n, blocksize, src, dst):
    """The 8-bit fold with AVX-512 gathers adds exactly what the scalar loop adds, over spans that start and end
    inside blocks and inside a 16-value chunk; its sum of squares is the 16-lane order written out, within float32
    rounding of the scalar loop's; its largest magnitude is the same."""
    import numpy as np

    from lightning_fed import _compiled

    if not _compiled._host_gathers():
        pytest.skip("needs a CPU with AVX-512F")
    rng = np.random.default_rng(n)
    code = np.sort(rng.standard_normal(256).astype(np.float32))
    codes = rng.integers(0, 256, n + src, dtype=np.uint8)
    absmax = rng.random((n + src) // blocksize + 1).astype(np.float32)
    start = rng.standard_normal(n + dst + 5).astype(np.float32)
    w = np.float32(0.37)
    a, b = start.copy(), start.copy()
    sq_a, top_a = _compiled.dequantize_axpy_measure_lookups(a, dst, codes, src, n, absmax, code, blocksize, w)
    sq_b, top_b = _compiled.dequantize_axpy_measure_gather(b, dst, codes, src, n, absmax, code, blocksize, w)
    assert np.array_equal(a.view(np.int32), b.view(np.int32))
    assert np.array_equal(b[:dst], start[:dst]) and np.array_equal(b[dst + n :], start[dst + n :])
    assert top_a == top_b
    assert sq_b == pytest.approx(sq_a, rel=1e-6)
    x = code[codes] * np.repeat(absmax, blocksize)[: n + src]  # the decoded values, float32
    bounds = sorted({src, src + n} | set(range((src // blocksize + 1) * blocksize, src + n, blocksize)))
    assert sq_b == _lane_sums(x, list(itertools.pairwise(bounds)))
    short = code[:200].copy()  # fewer than 256 values: the scalar loop (a gather could read past the book)
    c = start.copy()
    small = (codes % 200).astype(np.uint8)
    got = _compiled.dequantize_axpy_measure_gather(c, dst, small, src, n, absmax, short, blocksize, w)
    d = start.copy()
    assert got == _compiled.dequantize_axpy_measure_lookups(d, dst, small, src, n, absmax, short, blocksize, w)
    assert np.array_equal(c, d)


@pytest.mark.parametrize("n", SIZES)
def test_the_ping_pong_pass_writes_add_s_bits_into_the_other_buffer(n, monkeypatch):
    """``axpy_to_measure_``: ``acc + w * x`` written into ``out`` is ``acc.add_(x, alpha=w)`` bit for bit, ``acc``
    is left as it was, and the measures are :func:`axpy_measure_`'s; a value not finite gives ``inf``."""
    g = torch.Generator().manual_seed(100 + n)
    x = torch.randn(n, generator=g) * 0.03
    start = torch.randn(n, generator=g)
    w = 13 / 97
    want = start.clone().add_(x, alpha=w)
    for path in _paths(monkeypatch):
        monkeypatch.setattr(fused, "NUMBA", path == "numba")
        for bound in (False, True):
            acc, out = start.clone(), torch.full((n,), 7.0)
            got = fused.axpy_to_measure_(out, acc, x, w, bound=bound)
            assert torch.equal(out, want) and torch.equal(acc, start), (path, bound)
            assert got == fused.axpy_measure_(start.clone(), x, w, bound=bound), (path, bound)
        bad = x.clone()
        bad[n // 2] = math.nan
        sq, top = fused.axpy_to_measure_(torch.empty(n), start, bad, w, bound=True)
        assert top == math.inf and not math.isfinite(sq), path


@pytest.mark.skipif(not fused.HAVE_NUMBA, reason="numba (the `fast` extra) not installed")
def test_lightning_fed_gather_0_turns_the_gathers_off():
    """``LIGHTNING_FED_GATHER=0`` makes the 8-bit fold use the scalar lookups, whatever the CPU."""
    import os
    import subprocess
    import sys

    code = "from lightning_fed import _compiled as c; print(c.GATHER, c.dequantize_axpy_measure.__name__)"
    env = dict(os.environ, LIGHTNING_FED_GATHER="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "dequantize_axpy_measure_lookups"]


@pytest.mark.skipif(not fused.HAVE_NUMBA, reason="numba (the `fast` extra) not installed")
def test_the_gather_folds_sums_do_not_depend_on_what_compiled_first(tmp_path):
    """numba compiles a callee once, adding the flags of the first caller that needs it: the undo's replay
    (``kernels.dequantize_axpy_``) compiled first, in an empty cache, must leave the gather fold's sums as they are
    (its squares not fused into multiply-adds)."""
    import os
    import subprocess
    import sys

    from lightning_fed import _compiled

    if not _compiled._host_gathers():
        pytest.skip("needs a CPU with AVX-512F")
    code = """
import itertools, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from lightning_fed import _compiled, kernels
from test_kernels import _lane_sums
rng = np.random.default_rng(3)
n, bs, src, dst = 777, 32, 5, 7
code = np.sort(rng.standard_normal(256).astype(np.float32))
codes = rng.integers(0, 256, n + src, dtype=np.uint8)
absmax = rng.random((n + src) // bs + 1).astype(np.float32)
acc = rng.standard_normal(n + dst + 5).astype(np.float32)
kernels.dequantize_axpy_(torch.from_numpy(acc.copy()), dst, memoryview(codes.tobytes()), src, n,
                         torch.from_numpy(absmax), torch.from_numpy(code), bs, 0.3)
sq, _ = _compiled.dequantize_axpy_measure_gather(acc.copy(), dst, codes, src, n, absmax, code, bs, np.float32(0.3))
x = code[codes] * np.repeat(absmax, bs)[: n + src]
bounds = sorted({src, src + n} | set(range((src // bs + 1) * bs, src + n, bs)))
print(sq == _lane_sums(x, list(itertools.pairwise(bounds))))
"""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    here = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-c", code, here], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True"], out.stderr


def _checked(path: str, monkeypatch, acc: torch.Tensor, x: torch.Tensor, w: float, **kw):
    monkeypatch.setattr(fused, "NUMBA", path == "numba")
    return fused.axpy_checked_(acc, x, w, **kw)


@pytest.mark.parametrize("n", SIZES)
def test_the_checked_pass_adds_and_measures_as_the_fused_pass_when_nothing_fails(n, monkeypatch):
    """Within its limits the checked pass adds the bits of ``add_`` and measures what the fused pass measures
    (the same sums on each path), over a tensor or a read-only numpy view."""
    g = torch.Generator().manual_seed(n)
    x, start = torch.randn(n, generator=g) * 0.03, torch.randn(n, generator=g)
    w = 13 / 97
    want = start.clone().add_(x, alpha=w)
    for path in _paths(monkeypatch):
        for max_abs in (None, 1.0):
            acc, ref = start.clone(), start.clone()
            measured = _run(path, monkeypatch, ref, x, w, max_abs is not None)
            for xs in (x, x.numpy()):
                acc = start.clone()
                sq, top, stop = _checked(path, monkeypatch, acc, xs, w, before=0.0, limit=1e9, max_abs=max_abs)
                assert stop == n and torch.equal(acc, want), (path, max_abs)
                assert (sq, top) == measured, (path, max_abs)


@pytest.mark.parametrize("n", [1, 511, 512, 1100, 4097])
def test_the_checked_pass_into_a_fresh_accumulator_writes_the_bits_of_zeroing_and_adding(n, monkeypatch):
    """``fresh``: whatever the accumulator holds, the pass gives the bits of ``acc.zero_()`` and ``add_`` (a
    product of -0.0 ends as +0.0, as ``0.0 + -0.0`` does) and the fused pass's measures, over tensors or numpy
    views; a pass that stops leaves what lies past its stop as it was."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 0.03
    x[:: 7] = -0.0
    garbage = torch.randn(n, generator=g) * 1e3
    w = 13 / 97
    want = torch.zeros(n).add_(x, alpha=w)
    assert (want[::7].view(torch.int32) == 0).all()  # +0.0: the sign the kernel must not keep from the product
    for path in _paths(monkeypatch):
        for max_abs in (None, 1.0):
            measured = _run(path, monkeypatch, torch.zeros(n), x, w, max_abs is not None)
            for as_numpy in (False, True):
                acc = garbage.clone()
                sq, top, stop = _checked(path, monkeypatch, acc.numpy() if as_numpy else acc, x.numpy() if as_numpy
                                         else x, w, before=0.0, limit=1e9, max_abs=max_abs, fresh=True)
                assert stop == n and torch.equal(acc.view(torch.int32), want.view(torch.int32)), (path, max_abs)
                assert (sq, top) == measured, (path, max_abs)
        x_bad = x.clone()
        x_bad[n // 2] = math.nan
        acc = garbage.clone()
        _, _, stop = _checked(path, monkeypatch, acc, x_bad, w, before=0.0, limit=1e9, max_abs=None, fresh=True)
        assert stop <= n // 2 and torch.equal(acc[:stop], want[:stop]), path
        assert torch.equal(acc[stop:], garbage[stop:]), path


@pytest.mark.parametrize("why", ["nan", "inf", "norm", "max_abs", "before"])
def test_the_checked_pass_adds_nothing_from_the_block_that_fails(why, monkeypatch):
    """The block (the torch path: the piece) where a value is not finite, above ``max_abs``, or where the running
    sum of squares (plus ``before``) passes ``limit`` is not added, nor anything after it; the blocks before are;
    every value is still measured."""
    n, bad = 3000, 1700  # block 3 of 512 values; piece 17 of 100 on the torch path
    x = torch.full((n,), 0.01)
    before, limit, max_abs = 0.0, 1.0, None
    if why == "nan":
        x[bad] = math.nan
    elif why == "inf":
        x[bad] = -math.inf
    elif why == "norm":
        x[bad] = 2.0  # the running sum passes 1.0 there
    elif why == "max_abs":
        x[bad], max_abs = 0.5, 0.25
    else:  # what earlier pieces of the reply summed leaves room for 0.175 more: 1750 values of 1e-4
        before = 0.825
    start = torch.randn(n, generator=torch.Generator().manual_seed(0))
    for path in _paths(monkeypatch):
        acc = start.clone()
        sq, top, stop = _checked(path, monkeypatch, acc, x, 0.5, before=before, limit=limit, max_abs=max_abs)
        first = bad // 512 * 512 if path == "numba" else bad // 100 * 100
        assert stop == first, path
        assert torch.equal(acc[:stop], start[:stop].clone().add_(x[:stop], alpha=0.5)), path
        assert torch.equal(acc[stop:], start[stop:]), path
        if why in ("nan", "inf"):
            assert not math.isfinite(sq) and (top == math.inf or max_abs is None), path
        else:
            assert sq == pytest.approx(float((x.double() ** 2).sum()), rel=1e-5), path


@pytest.mark.parametrize("blocksize", [64, 4096])
def test_deferred_8bit_codes_read_their_scales_where_they_lie_and_decode_as_the_codec(blocksize, monkeypatch):
    """The server's 8-bit path (``decode_deferred``) reads the block scales as a view of the message, not a copy;
    its values, measures and fused add are those of the full decode, on both paths."""
    import numpy as np

    from lightning_fed.codecs import Blockwise8bit, DecodeArgs
    from lightning_fed.protocol import spec_of

    codec = Blockwise8bit(blocksize)
    p = {"w": torch.randn(5000, generator=torch.Generator().manual_seed(blocksize)) * 0.1}
    message = codec.encode(p, {})
    args = DecodeArgs(sender=0, spec=spec_of(p))
    want = codec.decode(message, {}, args)["w"]
    for path in _paths(monkeypatch):
        monkeypatch.setattr(fused, "NUMBA", path == "numba")
        codes = codec.decode_deferred(message, {}, args)
        assert isinstance(codes.absmax, np.ndarray) and not codes.absmax.flags.writeable  # the message's bytes
        assert torch.equal(codes.values(), want), path
        sq, top = codes.measure()
        assert sq == pytest.approx(float((want.double() ** 2).sum()), rel=1e-5) and top == float(want.abs().max())
        acc = torch.ones(5000)
        codes.add_measure(acc, 0.25, [(0, 0, 5000)], True)
        assert torch.equal(acc, torch.ones(5000).add_(want, alpha=0.25)), path


@pytest.mark.skipif(not fused.HAVE_NUMBA, reason="needs numba (the fast extra)")
def test_the_largest_magnitude_is_taken_at_int32_width():
    """numba types ``int32 & int32`` as int64; the compiled measures cast the masked bits back, so their max runs
    on int32 vectors (an int64 max has no vector instruction without AVX-512: compares and blends, twice the time)."""
    import numpy as np
    from numba import types

    from lightning_fed import _compiled

    x = np.linspace(-3.0, 2.0, 2000, dtype=np.float32)
    _, top = _compiled.measure(x, x.view(np.int32))
    assert top == np.array([np.float32(3.0)]).view(np.int32)[0]
    (sig,) = _compiled.measure.nopython_signatures
    assert sig.return_type[1] == types.int32
    _, top = _compiled._block_measure32(x, x.view(np.int32), 1500)  # a block of the 8-bit fold's scalar loop
    assert top == np.array([np.float32(3.0)]).view(np.int32)[0]
    (sig,) = _compiled._block_measure32.nopython_signatures
    assert sig.return_type[1] == types.int32
