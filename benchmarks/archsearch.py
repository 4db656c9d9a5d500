"""Architecture search against hand-picked tiers: train the recipe `lightning-fed search` wrote and the recipe it
searched (e.g. ``recipes/mnist1d/feddf.yaml``, the hand-picked tiers) with the same settings and seeds, and print
each tier's architecture, measured footprint (MACs per sample, parameters) and final test accuracy.

    lightning-fed search --config recipes/search/mnist1d_tiers.yaml
    python benchmarks/archsearch.py --searched runs/search-mnist1d/recipe.yaml --hand recipes/mnist1d/feddf.yaml
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lightning_fed.callbacks.footprint import measure_size
from lightning_fed.cli import build_parser, run


def tier_models(recipe: Path) -> list[torch.nn.Module]:
    """The recipe's tier models, built (tier 0 first)."""
    parser = build_parser()
    init = parser.instantiate(parser.parse_args(["fit", "--config", str(recipe)]))["fit"]
    tiers = getattr(init.loop.strategy, "tiers", None)
    return [init.model, *(tiers.models if tiers is not None else [])]


def knobs(model: torch.nn.Module) -> str:
    """``channels x depth`` of an MNIST-1D CNN (its hyperparameters otherwise)."""
    hp = dict(getattr(model, "hparams", {}))
    if "channels" in hp:
        return f"{hp['channels']} ch x {hp.get('depth', 3)}"
    return str(hp)


def test_accuracy(recipe: Path, seed: int, out: Path, extra: list[str]) -> tuple[list[float], float]:
    """Each tier's final ``tier<t>/test_acc`` (``test_acc`` without tiers) after a full run, and its seconds."""
    started = time.perf_counter()
    res = run(
        [
            "fit",
            "--config",
            str(recipe),
            "--loop.seed",
            str(seed),
            "--loop.verbose",
            "false",
            "--loop.plot",
            "false",
            "--loop.checkpoint_every",
            "0",
            "--loop.output_dir",
            str(out),
            *extra,
        ]
    )
    final = res.final_metrics
    accs = [final[k] for k in sorted(k for k in final if k.startswith("tier") and k.endswith("/test_acc"))]
    return (accs or [final["test_acc"]]), time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    """Run both recipes and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--searched", type=Path, required=True, help="the recipe `lightning-fed search` wrote")
    p.add_argument(
        "--hand", type=Path, default=None, help="the recipe with hand-picked tiers it searched (none: skip)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--override", nargs="*", default=[], help="extra `fit` overrides for both (e.g. --loop.rounds 5)"
    )
    args = p.parse_args(argv)
    console = Console()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in (("hand-picked", args.hand), ("searched", args.searched)):
            if recipe is None:
                continue
            models = tier_models(recipe)
            runs = [test_accuracy(recipe, s, Path(tmp) / f"{name}-{s}", args.override) for s in args.seeds]
            rows[name] = {"models": models, "accs": [r[0] for r in runs], "seconds": sum(r[1] for r in runs)}
            console.print(
                f"{name}: {[[round(a, 4) for a in r[0]] for r in runs]} ({rows[name]['seconds']:.0f} s)"
            )
    table = Table(title=f"Tiers: hand-picked against searched, test accuracy (seeds {args.seeds})")
    for col in ("tier", "recipe", "architecture", "MACs", "params", "test acc (mean)", "per seed"):
        table.add_column(col, justify="right" if col in ("MACs", "params", "test acc (mean)") else "left")
    for t in range(len(rows["searched"]["models"])):
        for name, row in rows.items():
            model = row["models"][t]
            fp = measure_size(model, torch.zeros(1, model.hparams.get("length", 40)))
            accs = [a[t] for a in row["accs"]]
            table.add_row(
                f"tier{t}",
                name,
                knobs(model),
                f"{fp['macs']:,.0f}",
                f"{fp['params']:,.0f}",
                f"{100 * statistics.mean(accs):.1f} %",
                " / ".join(f"{100 * a:.1f}" for a in accs),
            )
    console.print(table)


if __name__ == "__main__":
    main()
