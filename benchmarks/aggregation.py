"""Server aggregation against the flat axpy floor: the time the server takes to decode, validate and average a
round's replies, next to a plain ``acc.add_(flat, alpha=w)`` over the same number of ready flat float32 buffers.

    OMP_NUM_THREADS=1 python benchmarks/aggregation.py
    OMP_NUM_THREADS=1 python benchmarks/aggregation.py --replies 10 100 --params 1e6 --codecs identity

"ours" is the server's decode and accumulate for a FedAvg round, with FedLoop's defaults: ``Server.collect`` (per
message: size limit, the example claim capped, decode with the uplink codec and the sender's state, validation,
fold into the mean with the reply's norm summed in the same pass; the round's norm check), with the compiled
loops of ``lightning_fed.kernels`` when numba is installed (the ``fast`` extra; the table says which). "+ server step" is what ``Server.aggregate`` adds once per round (``codec.accept``, ``FedAvg.aggregate``:
the fold's sum taken as the update, ``global += update``, the update's norm), not in the ratio. Messages are produced one at a time by a generator (a copy of one of two pre-encoded replies, so no two
replies share memory) and handed to the server as they are made; the generator's time is not counted. "floor"
is a plain axpy over flat float32 replies, timed the same way: each flat buffer is a fresh copy of a delta's
bytes made with the same copy as a message, just before its add (not counted), and kept until the end as the
server keeps its replies; it times ``acc.zero_()`` plus one ``acc.add_(flat, alpha=w)`` per buffer. One torch thread; the best of ``--repeat`` runs of each (ours and
floor alternating; fewer for a combination whose runs take longer than ``--repeat-budget-s``). Times are the
thread's CPU time (``time.thread_time``): other jobs on a shared machine add no waiting to either side, while the
kernel's work for the thread (page faults) still counts.

The timed round is the server's second: an untimed first round of 3 replies gives the norm check its reference
(the median norm of the previous round's replies), so each timed reply is judged as it is folded, as in every
FedLoop round after the first: an ``Identity`` reply (float32) is added block by block while its running norm
stays within the limit, measured in the same read, and released at once (``--replay-undo``: added whole, judged,
and released once the fold's undo window moves past it, the path 8-bit replies take); a codec whose ``accept``
reads the accepted payloads would keep them (neither codec here does). The generator lets go of each message once
the server has it, and the server once it is folded. The floor keeps its flat buffers the way the server keeps
its replies (here: it frees each after its add).

Memory: "held" counts the bytes of the buffers the server holds when aggregation starts (the distinct storages of
the payloads of the accepted replies still held, plus FedAvg's accumulator; the undo window's snapshot and
replies are gone by then, the RSS peak shows them); "RSS peak" is the largest growth of
the process's resident memory over the timed region (the kernel's high-water mark ``VmHWM``, reset when the
region starts), which includes the message being decoded and the generator's copy. A combination whose replies
the server would hold beyond ``--max-held-gb`` is skipped, and so is one over ``--max-gvalues`` (replies times
parameters, in billions: the time it takes), and the table says so.
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
import time
import warnings
from collections.abc import Iterator
from importlib.metadata import version
from typing import Self

import torch
from torch import nn

from lightning_fed import kernels
from lightning_fed.codecs import Blockwise8bit, Codec, Identity
from lightning_fed.protocol import RELEASED, ClientMessage
from lightning_fed.server import Server
from lightning_fed.store import ClientStore
from lightning_fed.strategies import FedAvg
from lightning_fed.strategies.aggregate import MeanFold

CODECS = {"identity": Identity, "int8": Blockwise8bit}
clock = time.thread_time  # CPU time of this thread: other jobs on a shared machine do not count (page faults do)
POOL = 2  # distinct encoded replies; each message is a fresh copy of one of them


class Params(nn.Module):
    """A model of ``n`` float32 parameters in four entries (halves, quarters…), initialised to zero."""

    def __init__(self, n: int) -> None:
        super().__init__()
        sizes = [n // 2, n // 4, n // 8]
        sizes.append(n - sum(sizes))
        for i, s in enumerate(sizes):
            self.register_parameter(f"w{i}", nn.Parameter(torch.zeros(s), requires_grad=False))


class RssPeak:
    """The growth of the process's peak resident memory while the context is open: the kernel's high-water mark
    (``VmHWM``), reset on entry by writing 5 to ``/proc/self/clear_refs`` (no sampling thread to perturb timing)."""

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    def __enter__(self) -> Self:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = self._status("VmRSS")
        self.peak = self.base
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = self._status("VmHWM")

    @property
    def delta(self) -> int:
        """Bytes above the resident size at entry."""
        return self.peak - self.base


def counts(replies: int) -> list[int]:
    """Example counts of the replies (uneven, so the weights differ)."""
    return [100 + (i * 37) % 50 for i in range(replies)]


def held_bytes(strategy: FedAvg, replies: list) -> int:
    """Bytes of the distinct storages the accepted replies' payloads live in, plus the accumulator."""
    seen: dict[int, int] = {}
    for r in replies:
        if r.payload is RELEASED:  # folded and let go
            continue
        for t in r.payload.values():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    assert strategy._acc is not None
    return sum(seen.values()) + strategy._acc.numel() * 4


def run_ours(codec: Codec, n_params: int, n_replies: int, pool: list[bytes], workdir: str,
             ping_pong: bool = False, judge_first: bool = False, hold_bytes: int | None = None,
             snapshot_aside: bool | None = None, drop_at_once: bool = False,
             replay: bool = False) -> dict[str, float]:
    """Time the server's path over ``n_replies`` generated messages; return seconds and memory. ``ping_pong``:
    the fold adds small replies judged first in the read that measures them (``MeanFold(ping_pong=True)``;
    implies ``judge_first``); ``judge_first``: small replies (``aggregate.SMALL_BYTES``) are measured and judged
    before they are added (``MeanFold(judge_first_bytes=SMALL_BYTES)``), not added and measured in one pass with a
    rejection undone from the snapshot and window (the default); ``hold_bytes``: the most the window holds
    (``None``: the fold's default);
    ``snapshot_aside``: how the undo window's snapshot is taken (``MeanFold(snapshot_aside=...)``: ``True`` by the
    add of the reply that follows it, ``False`` by a copy of the accumulator, ``None`` the fold's rule);
    ``drop_at_once``: a small fold drops the messages its window lets go together (``MeanFold.lazy`` off), not one
    per arriving reply; ``replay``: float32 replies are added whole and a rejection undone from the snapshot and
    the window (``MeanFold(checked=False)``), not checked block by block as they are added."""
    strategy = FedAvg()
    strategy.setup(Params(n_params))
    if ping_pong or judge_first or hold_bytes is not None or snapshot_aside is not None or drop_at_once or replay:
        begin = strategy.begin_fold

        def begin_fold(server_round: int, total_examples: int) -> MeanFold | None:
            fold = begin(server_round, total_examples)
            if fold is not None:
                fold.ping_pong = ping_pong
                fold.judge_first = fold.small and (judge_first or ping_pong)
                fold.hold_bytes = fold.hold_bytes if hold_bytes is None else hold_bytes
                fold.snapshot_aside = snapshot_aside
                fold.lazy = fold.lazy and not drop_at_once
                fold.checked = fold.checked and not replay
            return fold

        strategy.begin_fold = begin_fold  # type: ignore[method-assign]
    ns = counts(n_replies)
    # FedLoop's defaults: claims capped at the partition size, the norm check against the round's median
    server = Server(strategy, codec, ClientStore(workdir), trusted_examples=lambda cid: ns[cid], max_norm_ratio=1e4)
    gen_s = 0.0

    def messages(count: int) -> Iterator[ClientMessage]:
        nonlocal gen_s
        for i in range(count):
            t = clock()
            msg = ClientMessage(i, bytes(memoryview(pool[i % POOL])), ns[i])  # a fresh copy: what a rank receives
            gen_s += clock() - t
            yield msg
            del msg  # let go before the next is made, as the server lets go of it

    # untimed: touch the accumulator's pages once, and give the norm check its reference (3 replies at least)
    warm = strategy.configure_round(0, [0, 1, 2])
    server.aggregate(0, server.collect(0, warm, messages(3), total_examples=sum(ns[:3])).replies)
    gen_s = 0.0
    instructions = strategy.configure_round(1, list(range(n_replies)))
    with RssPeak() as rss:
        t0 = clock()
        got = server.collect(1, instructions, messages(n_replies), total_examples=sum(ns))
        t1 = clock()
        held = held_bytes(strategy, got.replies)
        t2 = clock()
        server.aggregate(1, got.replies)
        t3 = clock()
    assert len(got.replies) == n_replies, got.reasons
    kept = sum(r.payload is not RELEASED for r in got.replies)
    return {"s": t1 - t0 - gen_s, "step_s": t3 - t2, "held": held, "rss": rss.delta, "kept": kept}


def run_floor(n_params: int, n_replies: int, raw: list[bytes], keep: bool) -> float:
    """Seconds of ``acc.zero_()`` and one ``acc.add_(flat, alpha=w)`` per reply, timed the same way as the
    server: each ``flat`` is made just before its add (not counted) as a float32 view of a fresh copy of a delta's
    bytes, made with the same copy as a message, and kept until the end when ``keep`` (as the server keeps its
    replies when it cannot release them), else freed right after its add (timed, as the server's freeing of a
    folded message is), so memory, page faults and the cache are in the same state for both."""
    acc = torch.zeros(n_params)
    ns = counts(n_replies)
    total = float(sum(ns))
    kept = []
    t = clock()
    acc.zero_()
    timed = clock() - t
    for i in range(n_replies):
        data = bytes(memoryview(raw[i % POOL]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only buffer: only read
            flat = torch.frombuffer(data, dtype=torch.float32)
        t = clock()
        acc.add_(flat, alpha=ns[i] / total)
        if keep:
            kept.append(flat)
        del flat, data  # freed here when not kept, as the server frees a folded message: timed on both sides
        timed += clock() - t
    return timed


def release() -> None:
    """Hand freed memory back to the system, so the next run's resident-memory growth starts from a low base."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def main(argv: list[str] | None = None) -> None:
    """Run the grid and print the table (and its markdown rows)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replies", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--params", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    p.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    p.add_argument("--repeat", type=int, default=3, help="runs per combination (best of), ours and floor alternating")
    p.add_argument("--repeat-budget-s", type=float, default=10.0,
                   help="no further run of a combination once its runs took this long")
    p.add_argument("--max-held-gb", type=float, default=12.0,
                   help="skip a combination whose replies the server would hold beyond this")
    p.add_argument("--ping-pong", action="store_true",
                   help="fold small replies with MeanFold(ping_pong=True): one read each, written aside")
    p.add_argument("--judge-first", action="store_true",
                   help="measure and judge small replies before adding them (MeanFold(judge_first_bytes=...)): "
                   "two reads, no undo window")
    p.add_argument("--replay-undo", action="store_true",
                   help="add float32 replies whole and undo a rejection from the snapshot and the window's replies "
                   "(MeanFold(checked=False)) instead of the checked pass")
    p.add_argument("--drop-at-once", action="store_true",
                   help="a small fold drops the messages its window lets go together (MeanFold.lazy off)")
    p.add_argument("--hold-mb", type=float, default=None,
                   help="the most MB the fold's undo window holds (default: the fold's, 32 MiB for a model of "
                   "at most 2 M parameters, else 2 GiB)")
    snap = p.add_mutually_exclusive_group()
    snap.add_argument("--snapshot-copy", dest="snapshot_aside", action="store_false", default=None,
                      help="take the undo window's snapshot by a copy of the accumulator (MeanFold(snapshot_aside=False))")
    snap.add_argument("--snapshot-aside", dest="snapshot_aside", action="store_true", default=None,
                      help="take it by the add of the reply that follows it (MeanFold(snapshot_aside=True)); "
                           "default: the fold's rule (aside when the window is cut by its byte limit)")
    p.add_argument("--max-gvalues", type=float, default=100.0,
                   help="skip a combination of more than this many billion reply values (replies x parameters)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.codecs:
        codec = CODECS[name]()
        for n_params in (int(x) for x in args.params):
            g = torch.Generator().manual_seed(0)
            deltas = [torch.randn(n_params, generator=g) * 0.01 for _ in range(POOL)]
            spec_model = FedAvg()
            spec_model.setup(Params(n_params))
            assert spec_model.spec is not None
            pool = [codec.encode(spec_model.spec.unflatten(d), {}) for d in deltas]
            raw = [d.numpy().tobytes() for d in deltas]
            del spec_model
            for n_replies in args.replies:
                label = f"{n_params / 1e6:g} M"
                held = codec.reads_accepted  # every codec here decodes to float32; kept only when accept reads it
                need = n_replies * n_params * 4
                why = None
                if held and need > args.max_held_gb * 2**30:
                    why = f"skipped: the server would hold {n_replies} replies = {need / 2**30:.0f} GiB"
                elif n_replies * n_params > args.max_gvalues * 1e9:
                    why = f"skipped: {n_replies * n_params / 1e9:g} G values > --max-gvalues {args.max_gvalues:g}"
                if why is not None:
                    rows.append((name, n_replies, label, None, None, None, None, None, None, why))
                    print(why, f"({name}, {n_replies} x {label})", flush=True)
                    continue
                ours, floor, spent, runs = {"s": float("inf")}, float("inf"), 0.0, 0
                while runs < args.repeat and (runs == 0 or spent < args.repeat_budget_s):
                    t = time.perf_counter()
                    release()
                    with tempfile.TemporaryDirectory() as workdir:
                        hold = None if args.hold_mb is None else int(args.hold_mb * 1e6)
                        run = run_ours(codec, n_params, n_replies, pool, workdir, args.ping_pong, args.judge_first, hold,
                                       args.snapshot_aside, args.drop_at_once, args.replay_undo)
                    ours = run if run["s"] < ours["s"] else ours
                    release()
                    floor = min(floor, run_floor(n_params, n_replies, raw, keep=run["kept"] > 0))
                    spent += time.perf_counter() - t
                    runs += 1
                rows.append((name, n_replies, label, ours["s"] * 1e3, floor * 1e3, 100 * floor / ours["s"],
                             ours["step_s"] * 1e3, ours["held"] / 2**20, ours["rss"] / 2**20, ""))
                print(f"{name} {n_replies} x {label}: ours {ours['s'] * 1e3:.1f} ms, floor {floor * 1e3:.1f} ms "
                      f"({100 * floor / ours['s']:.0f} %), step {ours['step_s'] * 1e3:.1f} ms, "
                      f"held {ours['held'] / 2**20:.0f} MiB, RSS peak +{ours['rss'] / 2**20:.0f} MiB", flush=True)
            del deltas, pool, raw
    print()
    print("kernels:", f"numba {version('numba')}" if kernels.NUMBA else "torch (numba not installed or disabled)")
    small = "checked block by block as they are added, a rejection subtracted (the default)"
    if args.replay_undo:
        small = "added and measured in one pass, a rejection undone from the snapshot and the window"
    if args.judge_first:
        small = "measured, judged, then added"
    if args.ping_pong:
        small = "ping-pong (one read, written aside)"
    window = "" if args.hold_mb is None else f"; undo window at most {args.hold_mb:g} MB"
    window += "; a small fold's let-go messages dropped at once" if args.drop_at_once else ""
    print("float32 replies:", small + window)
    how = {None: "the fold's rule (aside when the window is cut by its byte limit, else a copy)",
           True: "taken by the add that follows it", False: "a copy"}
    print("undo window's snapshot:", how[args.snapshot_aside])
    print("| codec | replies | params | ours ms | floor ms | floor/ours | + server step ms | server held MiB "
          "| RSS peak +MiB | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, n, label, ours_ms, floor_ms, pct, step_ms, held, rss, note in rows:
        if ours_ms is None:
            print(f"| {name} | {n} | {label} | | | | | | | {note} |")
        else:
            print(f"| {name} | {n} | {label} | {ours_ms:.1f} | {floor_ms:.1f} | {pct:.0f} % | {step_ms:.1f} | "
                  f"{held:.0f} | {rss:.0f} | |")


if __name__ == "__main__":
    main()
