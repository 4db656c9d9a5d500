"""The capacity gap on MNIST-1D: does a student learn worse from a much larger teacher, and does an assistant help?

The student is the small tier's model (MNIST1DCNN with 8 channels). Teachers have 1x, 2x, 4x and 8x its
channels (8, 16, 32, 64) and are trained on the same data as the student (the MNIST-1D training set,
``--train-samples`` of it). For every teacher the student is trained three ways, each for ``--epochs``
epochs with the same seed and optimizer (Adam, 3e-3):

* alone: cross-entropy only (the baseline);
* direct: ``Distillation(teacher)`` (``alpha * CE + (1 - alpha) * T^2 * KL``, ``alpha = 0.5``, ``T = 4`` by default);
* assistant: ``AssistantDistillation(teacher, assistants=[A])``, ``A`` a CNN with ``round(sqrt(8 * c))``
  channels between the teacher's ``c`` and the student's 8, trained from the teacher first (none for 1x).

It prints a table (rich) of test accuracy per teacher, averaged over ``--seeds`` seeds, with the
teacher/student parameter ratio, and plots student accuracy against that ratio
(``benchmarks/plots/capacity_gap.png``).

    python benchmarks/capacity_gap.py --epochs 15 --seeds 2

``--federated`` runs the same question inside FedDF on the tiered setting of ``recipes/mnist1d/feddf.yaml``
(tiers small / medium / large = 8 / 16 / 32 channels, 20 clients, 10 per round, Dirichlet 0.5, proxy data
1,000 public MNIST-1D samples): a server-side teacher of ``--teachers`` channels (2x, 4x and 8x the large tier's
by default) learns from the client ensemble each round and teaches a tier, either directly
(``assistant_chain=[teacher, <tier>]``) or through the other tiers (``[teacher, large, medium, small]``);
against each tier trained alone (``distill_steps=0``: FedAvg within the tier, the same clients and data).
It prints a table per student tier and plots student accuracy against the teacher/student parameter ratio
(``benchmarks/plots/capacity_gap_federated.png``).

    python benchmarks/capacity_gap.py --federated --rounds 20 --seeds 2
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

from lightning_fed.callbacks import AssistantDistillation, Distillation
from lightning_fed.data import MNIST1DDataModule
from lightning_fed.models import MNIST1DCNN

STUDENT = 8
FACTORS = (1, 2, 4, 8)


def cnn(channels: int) -> MNIST1DCNN:
    """The benchmark's model, trained with Adam at 3e-3 (SGD at 0.05 with momentum diverges under the
    ``T^2``-scaled distillation loss at ``T = 4``)."""
    return MNIST1DCNN(channels=channels, lr=3e-3, optimizer="adam")


def params(module: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())


def fit(model: MNIST1DCNN, dm: MNIST1DDataModule, epochs: int, callbacks: list | None = None) -> float:
    """Train ``model`` on ``dm`` and return its test accuracy."""
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks or [],
        limit_val_batches=0,
    )
    trainer.fit(model, dm)
    return float(trainer.test(model, dm, verbose=False)[0]["test_acc"])


def run_seed(
    seed: int,
    epochs: int,
    train_samples: int,
    factors: tuple[int, ...] = FACTORS,
    alpha: float = 0.5,
    temperature: float = 4.0,
) -> dict[str, float]:
    """Accuracies of one seed: ``teacher/<c>``, ``alone``, ``direct/<c>``, ``assistant/<c>``."""
    dm = MNIST1DDataModule(batch_size=32, num_samples=train_samples + 1000, seed=42)
    out: dict[str, float] = {}
    L.seed_everything(seed, verbose=False)
    out["alone"] = fit(cnn(STUDENT), dm, epochs)
    for f in factors:
        c = STUDENT * f
        L.seed_everything(seed, verbose=False)
        teacher = cnn(c)
        out[f"teacher/{c}"] = fit(teacher, dm, epochs)
        teacher.eval()
        L.seed_everything(seed, verbose=False)
        out[f"direct/{c}"] = fit(
            cnn(STUDENT), dm, epochs, [Distillation(teacher=teacher, alpha=alpha, temperature=temperature)]
        )
        if f > 1:
            a = round(math.sqrt(STUDENT * c))
            # its own seed, so that the student below starts exactly as in the other routes
            L.seed_everything(seed + 1000, verbose=False)
            assistant = cnn(a)
            cb = AssistantDistillation(
                teacher=teacher,
                assistants=[assistant],
                assistant_epochs=epochs,
                assistant_lr=3e-3,
                alpha=alpha,
                temperature=temperature,
            )
            L.seed_everything(seed, verbose=False)
            out[f"assistant/{c}"] = fit(cnn(STUDENT), dm, epochs, [cb])
            out[f"assistant_channels/{c}"] = a
        print(
            f"seed {seed} teacher {c} ch: "
            + ", ".join(f"{k}={v:.3f}" for k, v in out.items() if k.endswith(f"/{c}")),
            flush=True,
        )
    return out


def plot(rows: list[dict], alone: float, path: Path) -> None:
    """Student accuracy against the teacher/student parameter ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ratios = [r["ratio"] for r in rows]
    ax.plot(ratios, [100 * r["direct"] for r in rows], "o-", label="direct (teacher -> student)")
    with_a = [r for r in rows if r["assistant"] is not None]
    ax.plot(
        [r["ratio"] for r in with_a],
        [100 * r["assistant"] for r in with_a],
        "s-",
        label="through an assistant",
    )
    ax.axhline(100 * alone, color="gray", ls="--", label="student alone")
    ax.set_xscale("log")
    ax.set_xticks(ratios, [f"{r:.1f}" for r in ratios])
    ax.set_xlabel("teacher / student parameters")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"MNIST-1D, student {STUDENT} channels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    """Run every seed, print the table, write the plot."""
    if "--federated" in sys.argv:
        federated_main()
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--factors", type=int, nargs="+", default=list(FACTORS), help="teacher channels / 8")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the task loss in every distillation")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--plot", default=str(Path(__file__).parent / "plots" / "capacity_gap.png"))
    p.add_argument("--json", default=None, help="also write the per-seed results to this JSON file")
    args = p.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    start = time.perf_counter()
    factors = tuple(args.factors)
    seeds = [
        run_seed(s, args.epochs, args.train_samples, factors, args.alpha, args.temperature)
        for s in range(args.seeds)
    ]
    if args.json:
        Path(args.json).write_text(json.dumps(seeds, indent=1))
    mean = lambda key: statistics.fmean(s[key] for s in seeds)
    sd = lambda key: statistics.stdev(s[key] for s in seeds) if len(seeds) > 1 else 0.0
    student_params = params(cnn(STUDENT))
    alone = mean("alone")
    rows = []
    for f in factors:
        c = STUDENT * f
        rows.append(
            {
                "channels": c,
                "ratio": params(cnn(c)) / student_params,
                "teacher": mean(f"teacher/{c}"),
                "direct": mean(f"direct/{c}"),
                "direct_sd": sd(f"direct/{c}"),
                "assistant": mean(f"assistant/{c}") if f > 1 else None,
                "assistant_sd": sd(f"assistant/{c}") if f > 1 else None,
                "assistant_channels": seeds[0].get(f"assistant_channels/{c}"),
            }
        )
    table = Table(
        title=f"Capacity gap, MNIST-1D, student {STUDENT} ch ({student_params} params), "
        f"{args.epochs} epochs, {args.seeds} seeds, alpha {args.alpha}, T {args.temperature}; student alone {100 * alone:.1f} % "
        f"(sd {100 * sd('alone'):.1f})"
    )
    for col in (
        "teacher ch",
        "params ratio",
        "teacher acc",
        "direct",
        "assistant (ch)",
        "direct - alone",
        "assistant - alone",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        a = r["assistant"]
        table.add_row(
            str(r["channels"]),
            f"{r['ratio']:.1f}",
            f"{100 * r['teacher']:.1f} %",
            f"{100 * r['direct']:.1f} % (sd {100 * r['direct_sd']:.1f})",
            "n/a"
            if a is None
            else f"{100 * a:.1f} % (sd {100 * r['assistant_sd']:.1f}; {r['assistant_channels']} ch)",
            f"{100 * (r['direct'] - alone):+.1f}",
            "n/a" if a is None else f"{100 * (a - alone):+.1f}",
        )
    Console(width=160).print(table)
    plot(rows, alone, Path(args.plot))
    print(f"plot: {args.plot}; {time.perf_counter() - start:.0f} s")


# ---------------------------------------------------------------- --federated: the gap inside FedDF

TIER_CHANNELS = (8, 16, 32)
TIER_NAMES = ("small", "medium", "large")
TEACHERS = (64, 128, 256)


def fed_cnn(channels: int) -> MNIST1DCNN:
    """A client model of the feddf recipe (SGD 0.05, momentum 0.9)."""
    return MNIST1DCNN(channels=channels, lr=0.05, optimizer="sgd", momentum=0.9)


def fed_run(seed: int, rounds: int, chain: list[str] | None, teacher: int | None, distill_steps: int) -> dict:
    """One FedDF run on the feddf recipe's setting; the final test accuracy of every tier (and the teacher)."""
    import tempfile

    from lightning_fed import FedLoop
    from lightning_fed.data import Dirichlet, PublicData
    from lightning_fed.strategies import FedDF, ModelTiers

    L.seed_everything(seed, verbose=False)
    tiers = ModelTiers(models=[fed_cnn(c) for c in TIER_CHANNELS[1:]], names=list(TIER_NAMES))
    model = fed_cnn(TIER_CHANNELS[0])
    assistants = None
    if teacher is not None:
        with torch.random.fork_rng():  # the tiers and the loop start as in every other route
            torch.manual_seed(seed + 1000)
            assistants = {"teacher": cnn(teacher)}
    strategy = FedDF(
        public=PublicData(num_samples=1000, seed=7),
        tiers=tiers,
        proxy_size=1000,
        distill_steps=distill_steps,
        distill_lr=1e-3,
        temperature=1.0,
        assistant_chain=chain,
        assistants=assistants,
    )
    with tempfile.TemporaryDirectory() as out:
        loop = FedLoop(
            num_clients=20,
            clients_per_round=10,
            rounds=rounds,
            local_epochs=2,
            partition=Dirichlet(alpha=0.5, min_samples=10),
            strategy=strategy,
            eval_every=rounds,
            checkpoint_every=0,
            output_dir=out,
            seed=seed,
            verbose=False,
            plot=False,
            loggers=[],
        )
        res = loop.fit(model, MNIST1DDataModule(batch_size=32))
    last = res.history[-1]
    row = {name: last[f"tier{t}/test_acc"] for t, name in enumerate(TIER_NAMES)}
    if teacher is not None:
        row["teacher"] = last["assistant/teacher/test_acc"]
    return row


def fed_seed(seed: int, rounds: int, teachers: tuple[int, ...], distill_steps: int) -> dict[str, float]:
    """Every route of one seed: ``alone/<tier>``, ``ensemble/<tier>``, ``teacher/<c>``, ``direct/<c>/<tier>``,
    ``assistant/<c>/<tier>``."""
    out: dict[str, float] = {}

    def note(route: str, row: dict) -> None:
        print(f"seed {seed} {route}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()), flush=True)

    row = fed_run(seed, rounds, None, None, 0)  # FedAvg within each tier
    out.update({f"alone/{k}": v for k, v in row.items()})
    note("alone", row)
    row = fed_run(seed, rounds, None, None, distill_steps)  # plain FedDF: every tier from the client ensemble
    out.update({f"ensemble/{k}": v for k, v in row.items()})
    note("ensemble", row)
    for c in teachers:
        row = fed_run(seed, rounds, ["teacher", *reversed(TIER_NAMES)], c, distill_steps)
        out[f"teacher/{c}"] = row.pop("teacher")
        out[f"direct/{c}/large"] = row["large"]  # the chain's first tier learns from the teacher directly
        out.update({f"assistant/{c}/{k}": row[k] for k in TIER_NAMES[:2]})
        note(f"teacher {c} ch -> large -> medium -> small", row)
        for student in TIER_NAMES[:2]:
            row = fed_run(seed, rounds, ["teacher", student], c, distill_steps)
            out[f"direct/{c}/{student}"] = row[student]
            note(f"teacher {c} ch -> {student}", row)
    return out


def fed_plot(stats: dict, teachers: tuple[int, ...], path: Path) -> None:
    """Student accuracy (mean over seeds) against the teacher/student parameter ratio, per student tier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    for i, (name, ch) in enumerate(zip(TIER_NAMES, TIER_CHANNELS, strict=True)):
        color = f"C{i}"
        ratios = [params(cnn(c)) / params(cnn(ch)) for c in teachers]
        ax.plot(
            ratios,
            [100 * stats[f"direct/{c}/{name}"][0] for c in teachers],
            "o-",
            color=color,
            label=f"{name} ({ch} ch): direct",
        )
        if name != TIER_NAMES[-1]:
            ax.plot(
                ratios,
                [100 * stats[f"assistant/{c}/{name}"][0] for c in teachers],
                "s--",
                color=color,
                label=f"{name}: through the larger tiers",
            )
        ax.axhline(100 * stats[f"alone/{name}"][0], color=color, ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("teacher / student parameters")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title("FedDF on MNIST-1D: server teacher -> tier (dotted: tier alone)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def federated_main() -> None:
    """``--federated``: run every seed and route, print a table per student tier, write the plot."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--federated", action="store_true")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--teachers", type=int, nargs="+", default=list(TEACHERS), help="server teacher channels")
    p.add_argument("--distill-steps", type=int, default=100)
    p.add_argument("--plot", default=str(Path(__file__).parent / "plots" / "capacity_gap_federated.png"))
    p.add_argument("--json", default=None, help="also write the per-seed results to this JSON file")
    p.add_argument(
        "--from-json", default=None, help="print the tables and plot of a saved --json, without running"
    )
    args = p.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    start = time.perf_counter()
    teachers = tuple(args.teachers)
    seeds = json.loads(Path(args.from_json).read_text()) if args.from_json else []
    for s in range(len(seeds), args.seeds):
        seeds.append(fed_seed(s, args.rounds, teachers, args.distill_steps))
        if args.json:
            Path(args.json).write_text(json.dumps(seeds, indent=1))
    stats = {
        k: (
            statistics.fmean(r[k] for r in seeds),
            statistics.stdev(r[k] for r in seeds) if len(seeds) > 1 else 0.0,
        )
        for k in seeds[0]
    }
    pct = lambda k: f"{100 * stats[k][0]:.1f} % ({100 * stats[k][1]:.1f})"
    console = Console(width=160)
    for name, ch in zip(TIER_NAMES, TIER_CHANNELS, strict=True):
        table = Table(
            title=f"FedDF, student tier {name} ({ch} ch, {params(cnn(ch))} params), {args.rounds} rounds, "
            f"{args.seeds} seeds: alone (FedAvg in the tier) {pct(f'alone/{name}')}, "
            f"client ensemble (no teacher) {pct(f'ensemble/{name}')}"
        )
        for col in (
            "teacher ch",
            "params ratio",
            "teacher acc",
            "direct",
            "through larger tiers",
            "direct - alone",
            "direct lost",
            "recovered",
        ):
            table.add_column(col, justify="right")
        best = stats[f"ensemble/{name}"][
            0
        ]  # the best direct route from a smaller teacher (the client ensemble first)
        for c in teachers:
            d = stats[f"direct/{c}/{name}"][0]
            a = stats.get(f"assistant/{c}/{name}", (None, None))[0]
            lost, best = best - d, max(best, d)
            table.add_row(
                str(c),
                f"{params(cnn(c)) / params(cnn(ch)):.1f}",
                pct(f"teacher/{c}"),
                pct(f"direct/{c}/{name}"),
                "n/a" if a is None else pct(f"assistant/{c}/{name}"),
                f"{100 * (d - stats[f'alone/{name}'][0]):+.1f}",
                f"{100 * lost:+.1f}",
                "n/a" if a is None or lost <= 0 else f"{(a - d) / lost:.0%}",
            )
        console.print(table)
    fed_plot(stats, teachers, Path(args.plot))
    print(f"plot: {args.plot}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
