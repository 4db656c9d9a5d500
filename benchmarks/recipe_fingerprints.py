"""Fingerprint every recipe: a short run of each, and a digest of its final global weights and round metrics.

Refactors that must not change results compare two fingerprint files (before and after):

    OMP_NUM_THREADS=1 python benchmarks/recipe_fingerprints.py --out before.json
    ... change ...
    OMP_NUM_THREADS=1 python benchmarks/recipe_fingerprints.py --out after.json --compare before.json

The digest covers the final weights (``final.safetensors``) and every per-round metric except wall-clock
seconds; the table shows which recipes kept bit-identical results.

The same comparison checks that several processes give one process's results, recipe by recipe (``--devices``
sets ``--loop.devices`` of every recipe; runs with more than one process are started by the command line, as a
user's are):

    OMP_NUM_THREADS=1 python benchmarks/recipe_fingerprints.py --devices 1 --out one.json
    OMP_NUM_THREADS=1 python benchmarks/recipe_fingerprints.py --devices 2 --out two.json --compare one.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from lightning_fed.cli import run
from lightning_fed.report import without_wall_clock

ROOT = Path(__file__).parents[1] / "recipes"


def fingerprint(recipe: Path, rounds: int, workdir: Path, devices: int | None = None) -> dict[str, object]:
    """Run ``recipe`` for ``rounds`` rounds (one local epoch, quiet; with ``devices``, that many processes instead
    of the recipe's) and digest what it produced."""
    argv = ["fit", "--config", str(recipe), "--loop.rounds", str(rounds), "--loop.local_epochs", "1",
            "--loop.eval_every", "1", "--loop.checkpoint_every", "0", "--loop.verbose", "false",
            "--loop.plot", "false", "--loop.output_dir", str(workdir / recipe.stem)]
    if devices is not None:
        argv += ["--loop.devices", str(devices)]
    else:
        devices = yaml.safe_load(recipe.read_text())["loop"].get("devices", 1)
    if devices > 1:  # its ranks re-run the command: not this one
        subprocess.run([sys.executable, "-m", "lightning_fed.cli", *argv], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
        (run_dir,) = (workdir / recipe.stem).glob("version_*")
        history = json.loads((run_dir / "history.json").read_text())
        final = {k: v for k, v in history[-1].items() if k.startswith(("test_", "val_"))}
        result = SimpleNamespace(run_dir=run_dir, history=history, final_metrics=final)
    else:
        result = run(argv)
    weights = load_file(str(result.run_dir / "final.safetensors"))
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].contiguous().numpy().tobytes())
    metrics = without_wall_clock(result.history)
    h_metrics = hashlib.sha256(json.dumps(metrics, sort_keys=True, default=float).encode()).hexdigest()
    acc = result.final_metrics.get("test_acc", result.final_metrics.get("val_acc", float("nan")))
    return {"weights": h.hexdigest()[:16], "metrics": h_metrics[:16], "acc": float(acc)}


def main(argv: list[str] | None = None) -> None:
    """Fingerprint the recipes and print (and optionally compare) the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--recipes", nargs="*", default=None, help="recipe stems (default: every recipe)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--compare", type=Path, default=None, help="an earlier fingerprint file")
    p.add_argument("--devices", type=int, default=None,
                   help="processes per run, for every recipe (default: each recipe's own loop.devices)")
    args = p.parse_args(argv)
    recipes = sorted(r for r in ROOT.glob("*/*.yaml") if r.parent.name != "search")  # search recipes: not `fit`
    if args.recipes:
        recipes = [r for r in recipes if r.stem in args.recipes]
    old = json.loads(args.compare.read_text()) if args.compare else {}
    found: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in recipes:
            key = f"{recipe.parent.name}/{recipe.stem}"
            found[key] = fingerprint(recipe, args.rounds, Path(tmp), args.devices)
    args.out.write_text(json.dumps(found, indent=1, sort_keys=True))
    procs = "each recipe's processes" if args.devices is None else f"{args.devices} process(es)"
    table = Table(title=f"recipe fingerprints, {args.rounds} rounds, {procs}")
    for col in ("recipe", "weights", "metrics", "test acc", *(["vs. earlier"] if old else [])):
        table.add_column(col)
    moved = 0
    for key, fp in found.items():
        row = [key, str(fp["weights"]), str(fp["metrics"]), f"{fp['acc']:.4f}"]
        if old:
            before = old.get(key)
            same = before is not None and before["weights"] == fp["weights"] and before["metrics"] == fp["metrics"]
            moved += not same
            row.append("identical" if same else "new" if before is None else f"moved (was {before['acc']:.4f})")
        table.add_row(*row)
    Console(width=140).print(table)
    if old:
        print(f"{moved} of {len(found)} recipes moved", file=sys.stderr)


if __name__ == "__main__":
    main()
