"""The server's cost of FedDF's ensemble distillation, per round, against FedAvg's aggregation.

One round's server step of ``recipes/mnist1d/feddf_fedavg.yaml`` (fedavg.yaml's 25-channel MNIST1DCNN, 10 replies,
1,000 proxy records, batches of 64) with each ``--distill_steps``: the teacher logits of the round's 10 client models
on the proxy records, the average, then the distillation steps; FedAvg's step (the average only) beside it. The
replies are random deltas (the time does not depend on their values). Each measurement is the median over
``--rounds`` rounds.

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/feddf_server_cost.py
    OMP_NUM_THREADS=1 python benchmarks/feddf_server_cost.py --distill_steps 100 300 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from lightning_fed.data import PublicData
from lightning_fed.models import MNIST1DCNN
from lightning_fed.protocol import Reply
from lightning_fed.strategies import FedAvg, FedDF
from lightning_fed.strategies.base import Strategy


def server_seconds(strategy: Strategy, clients: int, rounds: int) -> float:
    """The median seconds of ``strategy.aggregate`` on ``clients`` random replies, over ``rounds`` rounds."""
    torch.manual_seed(0)
    strategy.setup(MNIST1DCNN(channels=25))
    spec = strategy.configure_round(1, [0])[0].payload
    out = []
    for r in range(1, rounds + 1):
        replies = [
            Reply(c, {k: 0.01 * torch.randn_like(v) for k, v in spec.items()}, 100) for c in range(clients)
        ]
        t0 = time.perf_counter()
        strategy.aggregate(r, replies)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> None:
    """Time FedAvg's and FedDF's server step and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--distill_steps", type=int, nargs="+", default=[100, 300])
    ap.add_argument(
        "--clients", type=int, default=10, help="replies per round (fedavg.yaml's clients per round)"
    )
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    public = PublicData(num_samples=1000, seed=7)
    table = Table(
        title=f"Server seconds per round, {args.clients} replies, MNIST1DCNN(channels=25), median of {args.rounds}"
    )
    for col in ("strategy", "server ms / round"):
        table.add_column(col)
    table.add_row("FedAvg", f"{1e3 * server_seconds(FedAvg(), args.clients, args.rounds):.1f}")
    for steps in args.distill_steps:
        s = FedDF(public=public, proxy_size=1000, distill_steps=steps, distill_lr=1e-3, temperature=1.0)
        table.add_row(
            f"FedDF, {steps} distillation steps", f"{1e3 * server_seconds(s, args.clients, args.rounds):.1f}"
        )
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
