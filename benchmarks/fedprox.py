"""The FedProx paper's straggler experiment on Synthetic(1, 1): FedAvg dropping stragglers against FedProx keeping
their partial work, with mu = 0 and mu = 1 (Li et al. 2020, Figure 1), plus FedNova keeping partial work.

Setting (recipes/synthetic/fedprox_synthetic_1_1.yaml, the paper's): 30 devices, one client each, 10 per round, 20
local epochs, batch 10, multinomial logistic regression with SGD lr 0.01. A fraction (0 %, 50 %, 90 %) of each
round's clients straggle: they run 1 to 19 of the 20 epochs (``Stragglers``, seeded per round); FedAvg drops them,
the others aggregate their partial work. Reported per method: the global model's training loss (the paper's
y-axis: the loss of the global model on every device's training data) after the last round and its lowest value,
and the test accuracy on the union of the devices' test parts.

Run from the repository root (one straggler fraction at a time keeps a run to a few minutes on 2 CPU cores)::

    python benchmarks/fedprox.py --stragglers 0.9 --rounds 100
    python benchmarks/fedprox.py --stragglers 0 0.5 0.9 --rounds 200 --out runs/fedprox.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from lightning_fed import FedLoop
from lightning_fed.callbacks import FedCallback, Stragglers
from lightning_fed.data import Natural, SyntheticDataModule
from lightning_fed.models import LogisticRegression
from lightning_fed.strategies import FedAvg, FedNova, FedProx

METHODS = {  # name: (strategy factory, what happens to stragglers)
    "FedAvg (drop)": (FedAvg, "drop"),
    "FedProx mu=0": (lambda: FedProx(mu=0.0), "partial"),
    "FedProx mu=1": (lambda: FedProx(mu=1.0), "partial"),
    "FedNova": (FedNova, "partial"),
}


class GlobalTrainLoss(FedCallback):
    """After each round, the global model's mean cross-entropy on the whole training set (every device's part)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.losses: list[float] = []

    @torch.no_grad()
    def on_round_end(self, trainer, pl_module, metrics):
        loss = float(F.cross_entropy(pl_module(self.x), self.y))
        self.losses.append(loss)
        metrics["global_train_loss"] = loss


def one_run(method: str, fraction: float, rounds: int, local_epochs: int, seed: int, out: Path) -> dict:
    """One method at one straggler fraction: its training-loss and test-accuracy curves and the wall time."""
    make, mode = METHODS[method]
    L.seed_everything(seed)
    dm = SyntheticDataModule(alpha=1.0, beta=1.0, num_devices=30, seed=0, batch_size=10)
    dm.setup("fit")
    probe = GlobalTrainLoss(*dm.train_set.tensors)
    loop = FedLoop(
        num_clients=30,
        clients_per_round=10,
        rounds=rounds,
        local_epochs=local_epochs,
        partition=Natural(),
        strategy=make(),
        callbacks=[Stragglers(fraction, mode, seed=seed), probe],
        test_every=10,
        eval_every=10,
        checkpoint_every=0,
        verbose=False,
        plot=False,
        loggers=[],
        output_dir=str(out / f"{method.replace(' ', '_')}-{fraction}"),
        seed=seed,
    )
    t0 = time.perf_counter()
    res = loop.fit(LogisticRegression(lr=0.01), dm)
    accs = [(int(h["round"]), float(h["test_acc"])) for h in res.history if "test_acc" in h]
    return {
        "method": method,
        "stragglers": fraction,
        "train_loss": probe.losses,
        "test_acc": accs,
        "wall_s": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> None:
    """Run every method at every straggler fraction and print the table (JSON too with ``--out``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stragglers", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--local_epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output_dir", type=Path, default=Path("runs/bench-fedprox"))
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    rows = [
        one_run(m, f, args.rounds, args.local_epochs, args.seed, args.output_dir)
        for f in args.stragglers
        for m in args.methods
    ]
    table = Table(
        title=f"Synthetic(1,1), 30 devices, 10 per round, E={args.local_epochs}, batch 10, SGD lr 0.01, "
        f"{args.rounds} rounds, seed {args.seed}"
    )
    for col in (
        "stragglers",
        "method",
        "final train loss",
        "min train loss",
        "final test acc",
        "best test acc",
        "wall s",
    ):
        table.add_column(col)
    for r in rows:
        losses, accs = r["train_loss"], [a for _, a in r["test_acc"]]
        final = losses[-1] if losses else math.nan
        table.add_row(
            f"{r['stragglers']:.0%}",
            r["method"],
            f"{final:.3f}",
            f"{min(losses):.3f}",
            f"{accs[-1]:.2%}",
            f"{max(accs):.2%}",
            f"{r['wall_s']:.0f}",
        )
    Console(width=140).print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
