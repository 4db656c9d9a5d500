"""Where a reply's time goes in the server's aggregation (``benchmarks/aggregation.py``'s "ours"), per reply.

    OMP_NUM_THREADS=1 python benchmarks/aggregation_breakdown.py
    OMP_NUM_THREADS=1 python benchmarks/aggregation_breakdown.py --params 1e6 --replies 500 --codecs identity int8
    OMP_NUM_THREADS=1 python benchmarks/aggregation_breakdown.py --codecs identity --judge-first
    OMP_NUM_THREADS=1 python benchmarks/aggregation_breakdown.py --codecs identity --replay-undo

"In the server": the round of ``aggregation.py`` (the same model, messages, defaults and clock: the thread's CPU
time, the generator's copies not counted), with the thread time of each step of a reply's path summed over the
round and divided by the replies: ``Server.receive`` (everything for one message but the loop around it),
``MeanFold.add_released`` (the fold), inside it the checked pass of a float32 reply (the default:
``MeanFold._add_checked``, and in it ``kernels.axpy_checked_``), the measure (``kernels.measure``) and the add
(``FlatValues.add_into``) of a reply judged first (``--judge-first``), or the fused pass of one added whole
(``--replay-undo``: ``FlatValues.add_measure``, and ``MeanFold._axpy_to_other``, the add aside that takes the
snapshot; the window let go, ``MeanFold.flush``) or of 8-bit codes (``BlockwiseCodes.add_measure``), and the
decode (``decode_deferred``; for 8-bit codes its frame and the check of its block scales, read where they lie).
Steps nest: a row includes the rows indented below it. Each wrapped call adds about a microsecond of clock reads. "floor" is
``aggregation.run_floor`` over the same number of replies. The best of ``--repeat`` rounds (by "ours").

"Kernels alone": one reply of float32 values at a time, each a fresh copy made as a message is (not counted), the
accumulator reused: torch's ``add_`` (the floor's add); ``sumsq`` (the measure of a reply judged first, float64
sums of the squares); the two one after the other (judging first, an option); ``axpy_sumsq`` (the fused add and
measure, which then needs a snapshot and an undo window to take a rejection back: ``--replay-undo`` and 8-bit
codes); ``axpy_checked`` (the checked pass, the library's path for float32 replies: each block added, and put
back from a scratch copy unless it and the blocks before it pass), and the same into a fresh accumulator (a fold's first reply: the accumulator
written, not read); a float32 sum of squares (torch's ``dot``); and ``add_`` and ``axpy_sumsq``
again with the last 16 messages kept alive, as an undo window keeps them (the oldest dropped as each new one is
made, not timed). Best and median of ``--repeat``
runs of ``--kernel-replies`` replies. Last, for how many sizes the fused pass's sum of squares has other bits than
the measure's. Needs numba (the ``fast`` extra).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import aggregation as agg
import numba
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from lightning_fed import _compiled, kernels
from lightning_fed import server as server_mod
from lightning_fed.codecs import base, blockwise, deferred, vector
from lightning_fed.strategies import FedAvg
from lightning_fed.strategies import aggregate as fold_mod

clock = agg.clock
STEPS: list[tuple[Any, str, str, int]] = [  # (owner, attribute, label, depth)
    (server_mod.Server, "receive", "Server.receive", 0),
    (fold_mod.MeanFold, "add_released", "MeanFold.add_released", 1),
    (fold_mod.MeanFold, "_add_checked", "MeanFold._add_checked (the checked pass)", 2),
    (fold_mod, "axpy_checked_", "kernels.axpy_checked_", 3),
    (fold_mod, "measure", "kernels.measure (judged first)", 2),
    (deferred.FlatValues, "add_into", "FlatValues.add_into (torch add_)", 2),
    (deferred.FlatValues, "add_measure", "FlatValues.add_measure (added first, fused)", 2),
    (fold_mod.MeanFold, "_axpy_to_other", "MeanFold._axpy_to_other (added aside: the snapshot)", 2),
    (fold_mod.MeanFold, "flush", "MeanFold.flush (the window let go)", 2),
    (blockwise.BlockwiseCodes, "add_measure", "BlockwiseCodes.add_measure (8-bit fold)", 2),
    (base.Identity, "decode_deferred", "Identity.decode_deferred", 1),
    (vector.VectorCodec, "decode_deferred", "decode_deferred (8-bit)", 1),
    (vector.VectorCodec, "_open", "frame header and fingerprint", 2),
    (blockwise, "_check_absmax", "block scales checked", 2),
]


@numba.njit(fastmath={"reassoc", "nsz"}, boundscheck=False, nogil=True)
def sumsq_f32(x: np.ndarray) -> float:  # pragma: no cover - compiled
    """Sum of squares in float32 (a cheaper check than ``sumsq``, with other last bits)."""
    sq = np.float32(0.0)
    for i in range(x.shape[0]):
        sq += x[i] * x[i]
    return sq


class Timed:
    """Wrap each step with a thread-time accumulator while the context is open, counting in the timed round (the
    server's second) only."""

    def __enter__(self) -> Counter:
        self.spent: Counter = Counter()
        self.active = False  # counted in the timed round only (the second), not in the untimed first
        self.saved = []
        for owner, name, label, _ in STEPS:
            f = getattr(owner, name)
            self.saved.append((owner, name, f))
            setattr(owner, name, self._wrap(f, label))
        collect = server_mod.Server.collect
        self.saved.append((server_mod.Server, "collect", collect))

        def collect_round(server: server_mod.Server, server_round: int, *a: Any, **k: Any) -> Any:
            self.active = server_round == 1
            try:
                return collect(server, server_round, *a, **k)
            finally:
                self.active = False

        server_mod.Server.collect = collect_round  # type: ignore[method-assign]
        return self.spent

    def _wrap(self, f: Callable[..., Any], label: str) -> Callable[..., Any]:
        spent = self.spent

        def timed(*a: Any, **k: Any) -> Any:
            if not self.active:
                return f(*a, **k)
            t = clock()
            try:
                return f(*a, **k)
            finally:
                spent[label] += clock() - t

        return timed

    def __exit__(self, *exc: object) -> None:
        for owner, name, f in self.saved:
            setattr(owner, name, f)


def in_server(
    name: str,
    n_params: int,
    n_replies: int,
    repeat: int,
    judge_first: bool = False,
    hold_bytes: int | None = None,
    replay: bool = False,
) -> tuple[dict[str, float], float, float]:
    """Per-reply seconds of each step, of "ours" and of the floor: the best of ``repeat`` rounds (``judge_first``,
    ``hold_bytes``, ``replay``: as ``aggregation.run_ours``)."""
    codec = agg.CODECS[name]()
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(n_params, generator=g) * 0.01 for _ in range(agg.POOL)]
    spec_model = FedAvg()
    spec_model.setup(agg.Params(n_params))
    assert spec_model.spec is not None
    pool = [codec.encode(spec_model.spec.unflatten(d), {}) for d in deltas]
    raw = [d.numpy().tobytes() for d in deltas]
    best: tuple[dict[str, float], float, float] | None = None
    with tempfile.TemporaryDirectory() as workdir:
        agg.run_ours(
            codec, n_params, 20, pool, workdir, False, judge_first, hold_bytes, replay=replay
        )  # compiles and warms up
        for _ in range(repeat):
            agg.release()
            with Timed() as spent:
                run = agg.run_ours(codec, n_params, n_replies, pool, workdir, False, judge_first, hold_bytes,
                                   replay=replay)
            agg.release()
            floor = agg.run_floor(n_params, n_replies, raw, keep=run["kept"] > 0)
            if best is None or run["s"] < best[1]:
                best = ({k: v / n_replies for k, v in spent.items()}, run["s"] / n_replies, floor / n_replies)
    assert best is not None
    return best


def kernels_alone(n_params: int, n_replies: int, repeat: int) -> dict[str, tuple[float, float]]:
    """(best, median) seconds per reply of each kernel, each reply a fresh copy of a message-sized buffer."""
    g = torch.Generator().manual_seed(0)
    raw = [(torch.randn(n_params, generator=g) * 0.01).numpy().tobytes() for _ in range(agg.POOL)]
    acc = torch.zeros(n_params)
    a = acc.numpy()
    w = 1e-3
    steps: dict[str, Callable[[torch.Tensor, np.ndarray], object]] = {
        "torch add_ (the floor's add)": lambda x, xn: acc.add_(x, alpha=w),
        "sumsq (the measure)": lambda x, xn: _compiled.sumsq(xn),
        "sumsq, then add_ (judged first)": lambda x, xn: (_compiled.sumsq(xn), acc.add_(x, alpha=w)),
        "axpy_sumsq (added first, fused)": lambda x, xn: _compiled.axpy_sumsq(a, xn, np.float32(w)),
        "axpy_checked (the checked pass)": lambda x, xn: _compiled.axpy_checked(
            a, xn, w, 0.0, 1e300, False, 0, False, 0.0
        ),
        "axpy_checked, a fresh accumulator (a fold's first)": lambda x, xn: _compiled.axpy_checked(
            a, xn, w, 0.0, 1e300, False, 0, True, 0.0
        ),
        "float32 sum of squares (not used)": lambda x, xn: sumsq_f32(xn),
        "torch add_, the last 16 messages kept": lambda x, xn: acc.add_(x, alpha=w),
        "axpy_sumsq, the last 16 messages kept": lambda x, xn: _compiled.axpy_sumsq(a, xn, np.float32(w)),
    }

    def one(step: Callable[[torch.Tensor, np.ndarray], object], count: int, keep: int = 0) -> float:
        spent = 0.0
        kept: collections.deque[bytes] = collections.deque(maxlen=keep or None)
        for i in range(count):
            data = bytes(memoryview(raw[i % agg.POOL]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a read-only buffer: only read
                x = torch.frombuffer(data, dtype=torch.float32)
            xn = x.numpy()
            t = clock()
            step(x, xn)
            spent += clock() - t
            if keep:  # as an undo window keeps its messages (the oldest dropped, not timed)
                kept.append(data)
            del x, xn, data
        return spent / count

    for step in steps.values():
        one(step, 5)  # compile, warm up
    runs: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeat):  # the kernels alternate, so a load from other jobs spreads over all of them
        for k, step in steps.items():
            runs[k].append(one(step, n_replies, 16 if "kept" in k else 0))
    return {k: (min(v), statistics.median(v)) for k, v in runs.items()}


def fused_sums_differ(sizes: range) -> int:
    """How many of ``sizes`` give a sum of squares from the fused pass (``axpy_sumsq``: float32 squares per block)
    whose bits differ from the measure's (``sumsq``: float64), for seeded values."""
    rng = np.random.default_rng(0)
    differ = 0
    for n in sizes:
        x = (rng.standard_normal(n) * 0.01).astype(np.float32)
        differ += _compiled.sumsq(x) != _compiled.axpy_sumsq(np.zeros(n, np.float32), x, np.float32(0.5))
    return differ


def main(argv: list[str] | None = None) -> None:
    """Print both tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=1e6)
    p.add_argument("--replies", type=int, default=500, help="replies of the timed round (in the server)")
    p.add_argument("--codecs", nargs="+", default=list(agg.CODECS), choices=list(agg.CODECS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--kernel-replies", type=int, default=200)
    p.add_argument("--judge-first", action="store_true", help="as aggregation.py's (small replies judged first)")
    p.add_argument(
        "--hold-mb", type=float, default=None, help="as aggregation.py's (the undo window's limit)"
    )
    p.add_argument("--replay-undo", action="store_true",
                   help="as aggregation.py's (float32 replies added whole, a rejection undone from the window)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    n = int(args.params)
    console = Console(width=120)
    if not kernels.NUMBA:
        raise SystemExit("numba is needed (pip install lightning-fed[fast])")
    for name in args.codecs:
        hold = None if args.hold_mb is None else int(args.hold_mb * 1e6)
        steps, ours, floor = in_server(name, n, args.replies, args.repeat, args.judge_first, hold, args.replay_undo)
        table = Table(
            title=f"{name}, {n / 1e6:g} M parameters, {args.replies} replies: us per reply (in the server)"
        )
        table.add_column("step")
        table.add_column("us", justify="right")
        table.add_row("ours (Server.collect)", f"{ours * 1e6:.1f}")
        for _, _, label, depth in STEPS:
            if label in steps:
                table.add_row("  " * (depth + 1) + label, f"{steps[label] * 1e6:.1f}")
        table.add_row("floor", f"{floor * 1e6:.1f}")
        table.add_row("floor / ours", f"{100 * floor / ours:.0f} %")
        console.print(table)
    table = Table(title=f"kernels alone, {n / 1e6:g} M float32 values: us per reply (best / median)")
    table.add_column("kernel")
    table.add_column("best", justify="right")
    table.add_column("median", justify="right")
    for k, (b, m) in kernels_alone(n, args.kernel_replies, args.repeat).items():
        table.add_row(k, f"{b * 1e6:.0f}", f"{m * 1e6:.0f}")
    console.print(table)
    sizes = range(1, 1025)
    console.print(
        f"the fused pass's sum of squares differs from the measure's in {fused_sums_differ(sizes)} of "
        f"{len(sizes)} sizes (1 to {sizes[-1]} values)"
    )


if __name__ == "__main__":
    main()
