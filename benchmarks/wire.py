"""Wire-format speed: our safetensors reader/writer (``codecs/wire``) against the ``safetensors`` library.

Both sides handle the same bytes (a message is byte-for-byte a safetensors file). Decode: ``wire.unpack`` (with
its parsed-header cache warm, as in a run where every round repeats the layout, and cold) against
``safetensors.torch.load``; encode: ``wire.pack`` against ``safetensors.torch.save``. Payloads: the MNIST-1D CNN
of the recipes (25 channels, 5,210 float32 parameters in 8 tensors) and a 1.3M-parameter MLP layout (8 tensors).
Times are the best of interleaved blocks (as `timeit` advises: on a shared machine the slower blocks measure
the other jobs), one torch thread.

    OMP_NUM_THREADS=1 python benchmarks/wire.py
    OMP_NUM_THREADS=1 python benchmarks/wire.py --blocks 15 --calls 200
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import safetensors.torch
import torch
from rich.console import Console
from rich.table import Table

from lightning_fed.codecs import wire
from lightning_fed.models import MNIST1DCNN


def payloads() -> dict[str, dict[str, torch.Tensor]]:
    """The benchmark payloads: name -> state dict (float32)."""
    torch.manual_seed(0)
    cnn = {k: v.detach().clone() for k, v in MNIST1DCNN(channels=25).state_dict().items() if v.is_floating_point()}
    big = {}
    for i, (out, inp) in enumerate([(512, 512), (1024, 512), (512, 1024), (10, 512)]):
        big[f"layers.{i}.weight"] = torch.randn(out, inp)
        big[f"layers.{i}.bias"] = torch.randn(out)
    return {"MNIST-1D CNN": cnn, "MLP 1.3M": big}


def median_us(fn: Callable[[], object], blocks: int, calls: int) -> list[float]:
    """Per-call microseconds of ``fn`` for each of ``blocks`` blocks of ``calls`` calls."""
    out = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t) / calls * 1e6)
    return out


def cold_unpack(message: bytes) -> object:
    """``wire.unpack`` with its parsed-header cache emptied first (a layout seen for the first time)."""
    wire._PARSED.clear()
    return wire.unpack(message)


def main(argv: list[str] | None = None) -> None:
    """Measure and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=9, help="interleaved timing blocks (the fastest is reported)")
    p.add_argument("--calls", type=int, default=100, help="calls per block for the small payload (scaled down "
                   "for the large one)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    table = Table(title="wire format: lightning_fed.codecs.wire vs safetensors (best-of-blocks µs per call)")
    for col in ("payload", "params", "bytes", "op", "ours", "ours, cold header", "safetensors", "safetensors / ours"):
        table.add_column(col, justify="right" if col not in ("payload", "op") else "left")
    for name, tensors in payloads().items():
        message = wire.pack(tensors, {})
        assert message == safetensors.torch.save(tensors) or safetensors.torch.load(message).keys() == tensors.keys()
        n = sum(t.numel() for t in tensors.values())
        calls = max(5, args.calls if n < 100_000 else args.calls // 20)
        cases = {
            "decode": (lambda m=message: wire.unpack(m), lambda m=message: cold_unpack(m),
                       lambda m=message: safetensors.torch.load(m)),
            "encode": (lambda t=tensors: wire.pack(t, {}), None, lambda t=tensors: safetensors.torch.save(t)),
        }
        for op, (ours, cold, theirs) in cases.items():
            times: dict[str, list[float]] = {"ours": [], "cold": [], "theirs": []}
            for _ in range(args.blocks):  # interleave so drifts of a shared machine hit all sides alike
                times["ours"] += median_us(ours, 1, calls)
                if cold is not None:
                    times["cold"] += median_us(cold, 1, calls)
                times["theirs"] += median_us(theirs, 1, calls)
            o, t = min(times["ours"]), min(times["theirs"])
            c = f"{min(times['cold']):.1f}" if times["cold"] else "—"
            table.add_row(name, f"{n:,}", f"{len(message):,}", op, f"{o:.1f}", c, f"{t:.1f}", f"{t / o:.2f}x")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
