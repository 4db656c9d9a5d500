"""Where the 8-bit fold's time goes: nanoseconds per value of the compiled fold of a blockwise 8-bit reply
(``kernels.dequantize_axpy_measure_``: decode, weighted add and measures in one loop over the codes) next to each
of its inner loops run alone, and to a plain float32 ``acc.add_(x, alpha=w)``.

    OMP_NUM_THREADS=1 python benchmarks/int8_fold_loops.py
    OMP_NUM_THREADS=1 python benchmarks/int8_fold_loops.py --params 1e6 1e7 --blocksize 256

Rows: "fold, gathers" is the library's loop on a CPU with AVX-512F (``_compiled.GATHER``: one gather of the code
book per 16 codes, the product, the fma into the accumulator and the measures in registers); "fold, scalar lookups"
the library's loop elsewhere (``LIGHTNING_FED_GATHER=0``), whose inner loops the rows below time alone; "fold,
offset indices" the scalar loops indexed at an offset into the whole
arrays (how the library wrote them before: the weighted add is not vectorised); "lookups" the code book lookups times the block's scale into a block buffer
(``vals[j] = code[codes[j]] * scale``); "weighted add" ``acc[j] += w * vals[j]`` from that buffer; "measures"
the sum of squares (float32 squares in float32 lanes) and the largest magnitude of the buffer; "float32 add_" torch's ``add_`` over a
float32 reply (12 bytes moved per value, the fold moves 9). The loops alone run over the same arrays as the fold
(the accumulator and the codes at full size, the block buffer in the first-level cache). Times are the best of
``--repeat`` runs of the thread's CPU time; the last columns say whether LLVM vectorised the loop (packed
multiply-adds in its machine code: the weighted add) and whether it emits a gather instruction.
"""

from __future__ import annotations

import argparse
import re
import time

import numba
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from lightning_fed import _compiled


@numba.njit(fastmath={"contract"}, boundscheck=False, nogil=True)
def offset_indexed(
    acc: np.ndarray,
    dst: int,
    codes: np.ndarray,
    src: int,
    n: int,
    absmax: np.ndarray,
    code: np.ndarray,
    blocksize: int,
    w: np.float32,
) -> float:
    """The fold's loops with the arrays indexed at an offset (``acc[dst + k]``, ``vals[k - i]``), as the library
    had them: numba cannot prove such an index non-negative, keeps its wraparound, and the add stays scalar."""
    vals = np.empty(blocksize, dtype=np.float32)
    bits = vals.view(np.int32)
    sq = 0.0
    i = 0
    while i < n:
        b = (src + i) // blocksize
        end = min(n, (b + 1) * blocksize - src)
        scale = absmax[b]
        for k in range(i, end):
            vals[k - i] = code[codes[src + k]] * scale
        for k in range(i, end):
            acc[dst + k] += w * vals[k - i]
        s, _ = _compiled._block_measure32(vals, bits, end - i)
        sq += s
        i = end
    return sq


@numba.njit(fastmath={"contract"}, boundscheck=False, nogil=True)
def lookups(
    codes: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int, vals: np.ndarray
) -> float:
    """The fold's lookup loop alone, block after block into one buffer."""
    t = np.float32(0.0)
    for b in range(codes.shape[0] // blocksize):
        block = codes[b * blocksize : (b + 1) * blocksize]
        scale = absmax[b]
        for j in range(blocksize):
            vals[j] = code[block[j]] * scale
        t += vals[b % blocksize]  # keeps the loop from being dropped
    return t


@numba.njit(fastmath={"contract"}, boundscheck=False, nogil=True)
def weighted_add(acc: np.ndarray, vals: np.ndarray, w: np.float32) -> None:
    """The fold's weighted add alone: every block of the accumulator from one buffer."""
    m = vals.shape[0]
    for b in range(acc.shape[0] // m):
        out = acc[b * m : (b + 1) * m]
        for j in range(m):
            out[j] += w * vals[j]


@numba.njit(fastmath={"contract", "reassoc", "nsz"}, boundscheck=False, nogil=True)
def measures(vals: np.ndarray, blocks: int) -> float:
    """The fold's per-block measures alone, ``blocks`` times over one buffer (with the scalar fold's flags: numba
    compiles ``_block_measure32`` once, with the flags of its first caller added, so every caller has the same)."""
    sq = 0.0
    bits = vals.view(np.int32)
    top = np.int32(0)
    for _ in range(blocks):
        s, t = _compiled._block_measure32(vals, bits, vals.shape[0])
        sq += s
        top = max(top, t)
    return sq + top


def float32_add(acc: torch.Tensor, x: torch.Tensor, w: float) -> None:
    """The floor's step: ``acc += w * x`` over float32 (torch)."""
    acc.add_(x, alpha=w)


def best(repeat: int, fn, *args) -> float:
    """Fewest CPU seconds of ``repeat`` calls (after one untimed call: compilation, first touch)."""
    fn(*args)
    out = float("inf")
    for _ in range(repeat):
        t = time.thread_time()
        fn(*args)
        out = min(out, time.thread_time() - t)
    return out


def machine_code(fn) -> tuple[str, str]:
    """("yes"/"no": a packed float32 multiply-add, "yes"/"no": a gather) in the compiled function's assembly."""
    asm = "\n".join(fn.inspect_asm().values())
    vector = re.search(r"\bv(fmadd|fnmadd)\w*ps\b", asm) is not None
    gather = re.search(r"\bv(p)?gather", asm) is not None
    return ("yes" if vector else "no"), ("yes" if gather else "no")


def main(argv: list[str] | None = None) -> None:
    """Time the fold and its loops; print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    p.add_argument("--blocksize", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    table = Table(title=f"int8 fold, ns per value (blocksize {args.blocksize}, numba {numba.__version__})")
    for col in ("params", "loop", "ns/value", "packed fma", "gather"):
        table.add_column(col)
    rng = np.random.default_rng(0)
    code = np.sort(rng.standard_normal(256).astype(np.float32))
    code /= np.abs(code).max()
    w = np.float32(0.01)
    bs = args.blocksize

    def afresh(loop):  # compiled afresh: cached machine code cannot be inspected
        return numba.njit(**{k: v for k, v in loop.targetoptions.items() if k not in ("cache", "nopython")})(
            loop.py_func
        )

    folds = [("fold, scalar lookups", afresh(_compiled.dequantize_axpy_measure_lookups))]
    if _compiled._host_gathers():
        folds.insert(0, ("fold, gathers", afresh(_compiled.dequantize_axpy_measure_gather)))
    for n in (int(x) // bs * bs for x in args.params):
        codes = rng.integers(0, 256, n, dtype=np.uint8)
        absmax = rng.random(n // bs).astype(np.float32)
        acc = np.zeros(n, np.float32)
        vals = rng.standard_normal(bs).astype(np.float32)
        x = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        acc_t = torch.from_numpy(acc)
        rows = [(name, fold, (acc, 0, codes, 0, n, absmax, code, bs, w)) for name, fold in folds] + [
            ("fold, offset indices", offset_indexed, (acc, 0, codes, 0, n, absmax, code, bs, w)),
            ("lookups", lookups, (codes, absmax, code, bs, vals)),
            ("weighted add", weighted_add, (acc, vals, w)),
            ("measures", measures, (vals, n // bs)),
        ]
        for name, fn, fn_args in rows:
            s = best(args.repeat, fn, *fn_args)
            table.add_row(f"{n / 1e6:.3g} M", name, f"{s / n * 1e9:.2f}", *machine_code(fn))
        s = best(args.repeat, float32_add, acc_t, x, float(w))
        table.add_row(f"{n / 1e6:.3g} M", "float32 add_", f"{s / n * 1e9:.2f}", "", "")
        del codes, absmax, acc, x, acc_t
    Console().print(table)


if __name__ == "__main__":
    main()
