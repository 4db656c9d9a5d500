"""Accuracy of the default recipes: FedAvg on MNIST-1D (target >= 92 %) and the centralized baseline (>= 94 %).

Run from the repository root::

    python benchmarks/accuracy.py            # both recipes, as written (100 FedAvg rounds, 150 epochs)
    python benchmarks/accuracy.py --quick    # 10 rounds each, a smoke check
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from lightning_fed.cli import run

RECIPES = [("recipes/mnist1d/fedavg.yaml", 0.92), ("recipes/mnist1d/centralized.yaml", 0.94)]


def main() -> None:
    """Run each recipe through the CLI and print final/best accuracy against its target."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="10 rounds per recipe")
    ap.add_argument("--output_dir", default="runs/bench-accuracy")
    args = ap.parse_args()
    table = Table(title="MNIST-1D accuracy (test split, 1,000 samples)")
    for col in ("recipe", "rounds", "final acc", "best acc", "target", "met", "uplink MB", "wall s"):
        table.add_column(col)
    for recipe, target in RECIPES:
        extra = ["--loop.rounds", "10"] if args.quick else []
        name = recipe.split("/")[-1].removesuffix(".yaml")
        t0 = time.perf_counter()
        res = run(["fit", "--config", recipe, *extra, "--loop.verbose", "false",
                   "--loop.output_dir", f"{args.output_dir}/{name}"])
        wall = time.perf_counter() - t0
        accs = [h["test_acc"] for h in res.history if "test_acc" in h]
        final, best = accs[-1], max(accs)
        up = sum(h["bytes_up"] for h in res.history) / 1e6
        table.add_row(recipe, str(len(res.history)), f"{final:.2%}", f"{best:.2%}", f">= {target:.0%}",
                      "yes" if final >= target else "NO", f"{up:.2f}", f"{wall:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
