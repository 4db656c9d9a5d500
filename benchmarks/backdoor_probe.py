"""Why I-BAU and ANP miss on the robustness benchmark's backdoored models: a diagnostic, not a defence.

For saved final models of ``benchmarks/robustness.py --models DIR`` (``20-0.2-backdoor-SEED.pt``), on the server's
clean records only (``PublicData`` generator seed 7, the defences' data; seed 8, the selection records):

* I-BAU: for each radius ``eps`` (a share of the clean records' mean norm), the universal perturbation that most
  raises the clean loss: the clean accuracy under it, the class it sends most records to, and the share of its L2
  norm on the trigger's positions (the last ``TRIGGER_SIZE`` values: the one place the trigger is used, to explain,
  never to choose); then the selection accuracy change after the I-BAU repair at each learning rate;
* ANP: for each perturbation bound ``eps``, how many of conv1-3's 75 masks end below 0.05 and 0.2, and the
  selection accuracy change after pruning them.

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/robustness.py --fractions 0.2 --attacks backdoor --defences none \\
        --rounds 30 --local-epochs 5 --clients 20 --seeds 0 --models runs/models20     # trains and saves the model
    OMP_NUM_THREADS=1 python benchmarks/backdoor_probe.py --models runs/models20 --seeds 0
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
import robustness as rb

from lightning_fed.callbacks.anp import prune_
from lightning_fed.callbacks.ibau import universal_perturbation
from lightning_fed.data import PublicData
from lightning_fed.seeding import generator


def main(argv: list[str] | None = None) -> None:
    """Print the I-BAU and ANP probe tables of the requested seeds' saved models."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models", type=Path, required=True, help="the --models folder of benchmarks/robustness.py"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--attack", default="backdoor", choices=rb.BACKDOORS)
    p.add_argument("--ibau-eps", type=float, nargs="+", default=[0.1, 0.3, 0.5, 1.0])
    p.add_argument("--anp-eps", type=float, nargs="+", default=[0.4, 0.1])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    args = rb.parse(["--ibau-eps", "0.5"])
    clean = PublicData(num_samples=500, seed=7, labeled=True)
    select = PublicData(num_samples=200, seed=8, labeled=True)
    console = Console(width=200)
    ibau_t = Table(
        title="I-BAU probe: the universal perturbation, and the repair's selection-accuracy change (points)"
    )
    for h in (
        "seed",
        "eps",
        "clean acc under it",
        "top class (share)",
        "norm share on trigger",
        "lr 0.05",
        "0.02",
        "0.01",
    ):
        ibau_t.add_column(h, justify="right")
    anp_t = Table(
        title="ANP probe: masks of conv1-3 (75 channels) and the selection-accuracy change after pruning"
    )
    for h in ("seed", "eps", "masks < 0.05", "change", "masks < 0.2", "change"):
        anp_t.add_column(h, justify="right")
    for seed in a.seeds:
        model = rb.load_saved(a.models, a.attack, seed)
        base = rb.accuracy(model, select.x, select.y)
        mean_norm = float(clean.x.norm(dim=1).mean())
        for eps in a.ibau_eps:
            delta = universal_perturbation(model, clean.x, clean.y, eps * mean_norm, 20)
            with torch.no_grad():
                pred = model(clean.x + delta).argmax(1)
            counts = torch.bincount(pred, minlength=10)
            share = float(delta[-rb.TRIGGER_SIZE :].norm() / delta.norm().clamp(min=1e-12))
            changes = []
            for lr in (0.05, 0.02, 0.01):
                fixed = rb.repair(
                    model, rb.post_defence("ibau", clean, seed, args, lr=lr, ibau_eps=eps), seed
                )
                changes.append(f"{100 * (rb.accuracy(fixed, select.x, select.y) - base):+.1f}")
            ibau_t.add_row(
                str(seed),
                f"{eps}",
                f"{100 * float((pred == clean.y).float().mean()):.1f} %",
                f"{int(counts.argmax())} ({100 * float(counts.max()) / len(pred):.0f} %)",
                f"{100 * share:.1f} %",
                *changes,
            )
        for eps in a.anp_eps:
            anp = rb.post_defence("anp", clean, seed, args, anp_eps=eps)[0]
            xt, yt, _, _ = anp.data()
            masks = anp.masks(model, xt, yt, generator(seed, anp.stream, 0))
            cells = []
            for t in (0.05, 0.2):
                probe = copy.deepcopy(model)
                n = sum(len(v) for v in prune_(probe, masks, t).values())
                cells += [str(n), f"{100 * (rb.accuracy(probe, select.x, select.y) - base):+.1f}"]
            anp_t.add_row(str(seed), f"{eps}", *cells)
    console.print(ibau_t)
    console.print(anp_t)


if __name__ == "__main__":
    main()
