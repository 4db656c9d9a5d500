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
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
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


if __name__ == "__main__":
    main()
