"""Why FedPer's personal heads fall behind FedAvg at Dirichlet 0.5: stale heads, or weak ones?

Runs ``fedavg.yaml`` and ``fedper.yaml`` with ``warmup_rounds=0`` (the paper's FedPer: heads from the initial
weights) at Dirichlet(0.5) with personalized evaluation, then, on each client's 100-example test slice (the same
``PersonalEval`` slices), scores:

* FedPer: the client's stored head on the final base; the same head re-fitted on the final base (base frozen);
* FedAvg: the global model; a per-client head fitted from zero on FedAvg's final base; one fitted starting from
  FedAvg's global head.

Re-fitting: ``--epochs`` passes over the client's shard, SGD lr 0.05 momentum 0.9 (the recipes' client optimizer),
batch 16, head parameters only, batches seeded by ``torch.manual_seed(0)``.

    python benchmarks/fedper_heads.py --rounds 20
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from lightning_fed import PersonalEval
from lightning_fed.cli import run
from lightning_fed.data import Dirichlet, MNIST1DDataModule
from lightning_fed.models import MNIST1DCNN

ROOT = Path(__file__).parents[1] / "recipes" / "mnist1d"


def fit(recipe: str, rounds: int, alpha: float, out: Path, extra: list[str]) -> Path:
    """One recipe through the CLI; returns its run folder."""
    res = run(
        [
            "fit",
            "--config",
            str(ROOT / f"{recipe}.yaml"),
            *extra,
            "--loop.personal_eval",
            "lightning_fed.PersonalEval",
            "--loop.rounds",
            str(rounds),
            "--loop.partition.init_args.alpha",
            str(alpha),
            "--loop.checkpoint_every",
            "0",
            "--loop.verbose",
            "false",
            "--loop.plot",
            "false",
            "--loop.output_dir",
            str(out / recipe),
        ]
    )
    return res.run_dir


def main(argv: list[str] | None = None) -> None:
    """Run both recipes and print the head diagnostics."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "fedavg": fit("fedavg", args.rounds, args.alpha, Path(tmp), []),
            "fedper": fit(
                "fedper", args.rounds, args.alpha, Path(tmp), ["--loop.strategy.init_args.warmup_rounds", "0"]
            ),
        }
        finals = {k: load_file(str(v / "final.safetensors")) for k, v in runs.items()}
        stored = {
            c: torch.load(runs["fedper"] / "clients" / f"client-{c}.pt", weights_only=True)["fedper"]
            for c in range(20)
        }
    dm = MNIST1DDataModule(batch_size=16)
    dm.setup("fit")
    train = dm.train_dataloader().dataset
    dm.setup("test")
    test = dm.test_dataloader().dataset
    (x, y), (xt, yt) = train.tensors, test.tensors
    part = Dirichlet(alpha=args.alpha, min_samples=10)
    shards = part.split_dataset(train, part.dataset_labels(train), 20, 0)
    _, held = PersonalEval(holdout="test", size=100).split(shards, y, test)
    model = MNIST1DCNN(channels=25)
    torch.manual_seed(0)

    def acc(c: int) -> float:
        model.eval()
        with torch.no_grad():
            return float((model(xt[held[c]]).argmax(-1) == yt[held[c]]).float().mean())

    def refit(c: int) -> float:
        opt = torch.optim.SGD(model.head.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for _ in range(args.epochs):
            perm = shards[c][torch.randperm(len(shards[c]))]
            for i in range(0, len(perm), 16):
                b = perm[i : i + 16]
                opt.zero_grad()
                F.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()
        return acc(c)

    scores: dict[str, list[float]] = {k: [] for k in ("stored", "refit", "global", "zero", "from_global")}
    for c in range(20):
        model.load_state_dict(finals["fedper"], strict=False)
        model.load_state_dict(stored[c], strict=False)
        scores["stored"].append(acc(c))
        scores["refit"].append(refit(c))
        model.load_state_dict(finals["fedavg"], strict=False)
        scores["global"].append(acc(c))
        scores["from_global"].append(refit(c))
        model.load_state_dict(finals["fedavg"], strict=False)
        torch.nn.init.zeros_(model.head.weight)
        torch.nn.init.zeros_(model.head.bias)
        scores["zero"].append(refit(c))
    table = Table(
        title=f"MNIST-1D, Dirichlet({args.alpha}), 20 clients, {args.rounds} rounds: mean accuracy on the "
        "clients' test slices"
    )
    table.add_column("model")
    table.add_column("mean")
    for key, name in (
        ("stored", "FedPer (heads from the initial weights): stored heads"),
        ("refit", "FedPer: stored heads re-fitted on the final base"),
        ("global", "FedAvg: global model"),
        ("zero", "FedAvg base + per-client head fitted from zero"),
        ("from_global", "FedAvg base + per-client head fitted from the global head"),
    ):
        table.add_row(name, f"{sum(scores[key]) / 20:.2%}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
