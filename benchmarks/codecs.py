"""Update-compression benchmark: accuracy and uplink bytes per codec, and codec throughput.

Accuracy table: the FedAvg MNIST-1D recipe (MNIST1DCNN, 20 clients, Dirichlet(0.5), 10 per round,
5 local epochs, SGD lr 0.05 momentum 0.9, batch 16, cosine client-LR decay to 10 % over the rounds) for
``--rounds`` rounds with each codec, run one after another in this process, a row printed as each finishes.
``--batch-size 32 --no-cosine`` is the recipe's earlier setting (the first tables in RESULTS.md). Bytes are the real message lengths the loop
counted. A configuration may also set loop options (``LOOP_OPTIONS``: diff5w-… splits the uplink budget by
the clients' examples). Throughput: encode + decode of a ``--numel``-element float32 update (default 25M).

    python benchmarks/codecs.py --rounds 100                          # the whole table
    python benchmarks/codecs.py --rounds 20 --codecs identity topk1-q7
    python benchmarks/codecs.py --throughput-only --numel 25000000

Single runs move by about ±1.5 points between seeds; ``codec_seeds.py`` summarises runs over many seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

import lightning as L
import torch

from lightning_fed import FedAvg, FedLoop
from lightning_fed.callbacks import RoundLRDecay
from lightning_fed.codecs import (
    QSGD,
    Blockwise4bit,
    Blockwise8bit,
    Cast,
    Codec,
    DecodeArgs,
    Differential,
    Identity,
    PowerSGD,
    RandomK,
    Sign,
    TimeCorrelatedTopK,
    TopK,
)
from lightning_fed.data import Dirichlet, MNIST1DDataModule
from lightning_fed.models import MNIST1DCNN

CODECS: dict[str, callable] = {
    "identity": lambda: Identity(),
    "fp16": lambda: Cast("fp16"),
    "bf16": lambda: Cast("bf16"),
    "int8": lambda: Blockwise8bit(blocksize=256),
    "nf4": lambda: Blockwise4bit("nf4", blocksize=64),
    "fp4": lambda: Blockwise4bit("fp4", blocksize=64),
    "qsgd4": lambda: QSGD(levels=7, bucket=256),
    "qsgd4-max": lambda: QSGD(levels=7, bucket=256, norm="max"),
    "qsgd2-max": lambda: QSGD(levels=1, bucket=256, norm="max"),
    "sign": lambda: Sign(block=256),
    "topk10-noef": lambda: TopK(0.10, error_feedback=False),
    "topk1-noef": lambda: TopK(0.01, error_feedback=False),
    "topk1": lambda: TopK(0.01),
    "topk1-q7": lambda: TopK(0.01, values=QSGD(levels=7, norm="max")),
    "topk2-q7": lambda: TopK(0.02, values=QSGD(levels=7, norm="max")),
    "topk2-sign": lambda: TopK(0.02, values=Sign()),
    "topk2-int8": lambda: TopK(0.02, values=Blockwise8bit(blocksize=64)),
    "topk1-int8": lambda: TopK(0.01, values=Blockwise8bit(blocksize=64)),
    "topk3-sign": lambda: TopK(0.03, values=Sign()),
    "topk35-sign": lambda: TopK(0.035, values=Sign()),
    "topk3-sign32": lambda: TopK(0.03, values=Sign(block=32)),
    "topk27-sign16": lambda: TopK(0.027, values=Sign(block=16)),
    "topk34-sign32h": lambda: TopK(0.034, values=Sign(block=32, scale_dtype="float16")),
    "topk6-g2-sign32h": lambda: TopK(0.06, values=Sign(block=32, scale_dtype="float16"), group=2),
    "topk8-g3-sign32h": lambda: TopK(0.08, values=Sign(block=32, scale_dtype="float16"), group=3),
    "topk10-g4-sign32h": lambda: TopK(0.10, values=Sign(block=32, scale_dtype="float16"), group=4),
    "topk34-sign32h-rd5": lambda: TopK(0.034, values=Sign(block=32, scale_dtype="float16"), residual_decay=0.5),
    "topk32-sign32h-warm": lambda: TopK(0.032, values=Sign(block=32, scale_dtype="float16"), warmup_rounds=10,
                                        warmup_start=0.1),
    "topk31-sign32h-w3s30": lambda: TopK(0.031, values=Sign(block=32, scale_dtype="float16"), warmup_rounds=3,
                                         warmup_start=0.3),
    "topk30-sign32h-w5s30": lambda: TopK(0.030, values=Sign(block=32, scale_dtype="float16"), warmup_rounds=5,
                                         warmup_start=0.3),
    "diff-topk31-sign32h-warm": lambda: Differential(TopK(0.031, values=Sign(block=32, scale_dtype="float16"),
                                                          warmup_rounds=10, warmup_start=0.1)),
    "diff5-topk31-sign32h-warm": lambda: Differential(TopK(0.031, values=Sign(block=32, scale_dtype="float16"),
                                                           warmup_rounds=10, warmup_start=0.1), smoothing=0.5),
    "diff5w-topk31-sign32h-warm": lambda: Differential(TopK(0.031, values=Sign(block=32, scale_dtype="float16"),
                                                            warmup_rounds=10, warmup_start=0.1), smoothing=0.5),
    "diff5-topk40-sign32h-warm": lambda: Differential(TopK(0.040, values=Sign(block=32, scale_dtype="float16"),
                                                           warmup_rounds=10, warmup_start=0.1), smoothing=0.5),
    "diff5-topk31-sign32h-warm-rd9": lambda: Differential(TopK(0.031, values=Sign(block=32, scale_dtype="float16"),
                                                               warmup_rounds=10, warmup_start=0.1, residual_decay=0.9),
                                                          smoothing=0.5),
    "diff-topk31-sign32h": lambda: Differential(TopK(0.031, values=Sign(block=32, scale_dtype="float16"))),
    "ef21-topk31-sign32h-warm": lambda: Differential(TopK(0.031, values=Sign(block=32, scale_dtype="float16"),
                                                          warmup_rounds=10, warmup_start=0.1, error_feedback=False),
                                                     beta=1.0),
    "diffnoef-topk31-sign32h-warm": lambda: Differential(TopK(0.031, values=Sign(block=32, scale_dtype="float16"),
                                                              warmup_rounds=10, warmup_start=0.1, error_feedback=False)),
    "tcs18-05-sign64h": lambda: TimeCorrelatedTopK(0.005, 0.18, values=Sign(block=64, scale_dtype="float16")),
    "tcs20-04-sign128h": lambda: TimeCorrelatedTopK(0.004, 0.2, values=Sign(block=128, scale_dtype="float16")),
    "tcs15-06-sign64h": lambda: TimeCorrelatedTopK(0.006, 0.15, values=Sign(block=64, scale_dtype="float16")),
    "topk3-sign32h-warm20": lambda: TopK(0.03, values=Sign(block=32, scale_dtype="float16"), warmup_rounds=20,
                                         warmup_start=0.1),
    "tcs18-05-sign64h-warm": lambda: TimeCorrelatedTopK(0.005, 0.18, values=Sign(block=64, scale_dtype="float16"),
                                                        warmup_rounds=10, warmup_start=0.08),
    "topk28-sign32m": lambda: TopK(0.028, values=Sign(block=32, scale_dtype="float16", magnitude_bits=1)),
    "topk3-sign64m": lambda: TopK(0.03, values=Sign(block=64, scale_dtype="float16", magnitude_bits=1)),
    "topk3-sign32-warm": lambda: TopK(0.03, values=Sign(block=32), warmup_rounds=10, warmup_start=0.1),
    "randk15-sign32": lambda: RandomK(0.15, values=Sign(block=32)),
    "topk2-sign-lw": lambda: TopK(0.02, values=Sign(), layerwise=True),
    "topk3-sign-lw": lambda: TopK(0.03, values=Sign(), layerwise=True),
    "dgc1-int8": lambda: TopK(0.01, values=Blockwise8bit(blocksize=64), momentum=0.5, warmup_rounds=10),
    "dgc2-q7": lambda: TopK(0.02, values=QSGD(levels=7, norm="max"), momentum=0.5, warmup_rounds=10),
    "warmup2-sign": lambda: TopK(0.02, values=Sign(), warmup_rounds=5),
    "randk5-fp16": lambda: RandomK(0.05, values=Cast("fp16")),
    "randk10-int8": lambda: RandomK(0.10, values=Blockwise8bit(blocksize=64)),
    "powersgd1": lambda: PowerSGD(rank=1),
    "powersgd2-int8": lambda: PowerSGD(rank=2, values=Blockwise8bit(blocksize=64)),
}
DEFAULT = [
    "identity",
    "fp16",
    "bf16",
    "int8",
    "nf4",
    "fp4",
    "qsgd4",
    "sign",
    "powersgd1",
    "randk5-fp16",
    "randk10-int8",
    "topk10-noef",
    "topk1",
    "topk1-int8",
    "topk2-q7",
    "topk2-sign",
    "topk3-sign",
    "warmup2-sign",
    "dgc1-int8",
    "topk3-sign32",
    "topk32-sign32h-warm",
    "tcs18-05-sign64h",
    "diff5-topk31-sign32h-warm",
    "diff5w-topk31-sign32h-warm",
]


# loop options of a configuration, where it is more than a codec
LOOP_OPTIONS: dict[str, dict[str, str]] = {
    "diff5w-topk31-sign32h-warm": {"uplink_allocation": "examples"},  # budget in proportion to examples
}


def run_fedavg(codec: Codec, rounds: int, seed: int = 0, batch_size: int = 16, cosine: bool = True,
               uplink_allocation: str = "uniform") -> dict[str, float]:
    """One FedAvg MNIST-1D run (the fedavg.yaml recipe) with ``codec`` on the uplink."""
    L.seed_everything(seed, verbose=False)
    model = MNIST1DCNN(channels=25, lr=0.05, optimizer="sgd", momentum=0.9)
    data = MNIST1DDataModule(batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        loop = FedLoop(
            num_clients=20,
            clients_per_round=10,
            rounds=rounds,
            local_epochs=5,
            partition=Dirichlet(alpha=0.5, min_samples=10),
            strategy=FedAvg(server_lr=1.0),
            codec=codec,
            uplink_allocation=uplink_allocation,
            callbacks=[RoundLRDecay(schedule="cosine", min_scale=0.1)] if cosine else [],
            eval_every=5,
            checkpoint_every=0,
            output_dir=tmp,
            seed=seed,
            loggers=[],
            verbose=False,
            plot=False,
        )
        t = time.perf_counter()
        res = loop.fit(model, data)
        wall = time.perf_counter() - t
    h = res.history
    up = sum(x["bytes_up"] for x in h)
    raw = sum(x["raw_bytes_up"] for x in h)
    return {
        "acc": res.final_metrics["test_acc"],
        "up_mb": up / 1e6,
        "raw_mb": raw / 1e6,
        "ratio": raw / up,
        "down_mb": sum(x["bytes_down"] for x in h) / 1e6,
        "msg_bytes": up / sum(x["good"] + x["rejected"] for x in h),
        "encode_s": sum(x["encode_s"] for x in h),
        "decode_s": sum(x["decode_s"] for x in h),
        "rejected": sum(x["rejected"] for x in h),
        "wall_s": wall,
    }


def accuracy_table(names: list[str], rounds: int, out: str | None, seed: int = 0, **recipe: object) -> list[dict]:
    """Run every codec; print a markdown row per codec as it finishes."""
    rows: list[dict] = []
    ref: dict | None = None
    print(f"FedAvg MNIST-1D, 20 clients, Dir(0.5), 10/round, {rounds} rounds, seed {seed}", flush=True)
    print(
        "| codec | config | final acc | Δ acc (pt) | uplink MB | bytes/msg | ratio vs fp32 | ratio vs identity "
        "| encode s | decode s | wall s |",
        flush=True,
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in names:
        codec = CODECS[name]()
        r = run_fedavg(codec, rounds, seed, **recipe, **LOOP_OPTIONS.get(name, {}))
        r["name"], r["config"] = name, repr(codec) if name != "identity" else "Identity()"
        r["config"] += "".join(f", {k}={v!r}" for k, v in LOOP_OPTIONS.get(name, {}).items())
        if name == "identity":
            ref = r
        d = f"{100 * (r['acc'] - ref['acc']):+.2f}" if ref else "n/a"
        vs_id = f"{ref['up_mb'] / r['up_mb']:.1f}x" if ref else "n/a"
        print(
            f"| {name} | `{r['config']}` | {100 * r['acc']:.2f} % | {d} | {r['up_mb']:.3f} | {r['msg_bytes']:.0f} | "
            f"{r['ratio']:.1f}x | {vs_id} | {r['encode_s']:.2f} | {r['decode_s']:.2f} | {r['wall_s']:.0f} |",
            flush=True,
        )
        rows.append(r)
        if out:
            with open(out, "w") as f:
                json.dump(rows, f, indent=1)
    return rows


THROUGHPUT = [
    "fp16",
    "bf16",
    "int8",
    "nf4",
    "qsgd4",
    "sign",
    "topk1",
    "topk1-int8",
    "randk5-fp16",
    "powersgd1",
]


def throughput(numel: int, names: list[str], repeats: int = 2) -> None:
    """Encode + decode MB/s of a ``numel``-element float32 update (one entry shaped [numel/1000, 1000]).

    Wall-clock MB/s and MB per CPU-second (``time.process_time``, summed over this process's threads) are both
    printed: on a shared machine the wall clock includes time spent waiting for a core; an idle machine with
    ``--threads`` cores runs at least the per-CPU-second rate.
    """
    from lightning_fed.protocol import spec_of

    torch.manual_seed(0)
    payload = {"w": torch.randn(numel // 1000, 1000) * 1e-3}
    spec = spec_of(payload)
    raw_mb = numel * 4 / 1e6
    print(
        f"throughput, {numel / 1e6:.0f}M float32 ({raw_mb:.0f} MB), {torch.get_num_threads()} threads",
        flush=True,
    )
    print(
        "| codec | message MB | ratio | encode s | decode s | enc+dec MB/s (wall) | enc+dec MB per CPU-second |"
    )
    print("|---|---|---|---|---|---|---|", flush=True)
    for name in names:
        codec = CODECS[name]()
        state: dict = {}
        best = (float("inf"), float("inf"), float("inf"))
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            msg = codec.encode(payload, state)
            te = time.perf_counter() - t
            t = time.perf_counter()
            codec.decode(msg, {}, DecodeArgs(spec=spec))
            td = time.perf_counter() - t
            cpu = time.process_time() - c
            if te + td < best[0] + best[1]:
                best = (te, td, cpu)
        te, td, cpu = best
        print(
            f"| {name} | {len(msg) / 1e6:.2f} | {raw_mb * 1e6 / len(msg):.1f}x | {te:.3f} | {td:.3f} | "
            f"{raw_mb / (te + td):.0f} | {raw_mb / cpu:.0f} |",
            flush=True,
        )


def main() -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--codecs", nargs="+", default=DEFAULT, choices=sorted(CODECS))
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the partition, the initial model and training"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16, help="client batch size (the recipe's; 32 before)")
    p.add_argument("--no-cosine", action="store_true", help="no cosine LR decay (the recipe's earlier setting)")
    p.add_argument("--numel", type=int, default=25_000_000)
    p.add_argument("--throughput-codecs", nargs="+", default=THROUGHPUT, choices=sorted(CODECS))
    p.add_argument("--throughput-only", action="store_true")
    p.add_argument("--no-throughput", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning_fed").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if not args.throughput_only:
        accuracy_table(args.codecs, args.rounds, args.out, args.seed, batch_size=args.batch_size,
                       cosine=not args.no_cosine)
    if not args.no_throughput:
        throughput(args.numel, args.throughput_codecs)


if __name__ == "__main__":
    main()
