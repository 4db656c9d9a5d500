"""What FedDF's ensemble teacher says under the robustness benchmark's backdoors: a diagnostic, not a defence.

FedDF (``benchmarks/robustness.py``'s ``feddf`` column) averages the client updates as FedAvg does, then distills
the average on 1,000 unlabelled proxy records towards the *ensemble teacher*: the mean logits of every received
client model. For the requested seeds and attacks (``clean``: no attack), in the benchmark's setting, this trains
FedDF with the test accuracy measured every 5 rounds and records, every round, on the round's proxy records:

* ``teacher -> target``: the share the ensemble teacher labels as the backdoor's target class (clean records: the
  trigger is never written into the proxy data);
* ``teacher |logits|``: the mean L2 norm of the teacher's logit vectors;
* ``average -> target`` and ``distilled -> target``: the share the averaged model labels as the target, before and
  after the round's distillation.

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/feddf_probe.py --rounds 30 --local-epochs 5 --seeds 0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
import robustness as rb

from lightning_fed.strategies import FedDF
from lightning_fed.strategies.tiers import predict_logits

BUILT: list[RecordingFedDF] = []


class RecordingFedDF(FedDF):
    """FedDF that records, at every distillation, what the teacher and the student say on the proxy records; every
    instance is appended to :data:`BUILT` (``benchmarks/robustness.py``'s ``train`` builds it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.records: list[dict[str, float]] = []
        BUILT.append(self)

    def _distill(self, module: nn.Module, x: Tensor, teacher: Tensor, g: torch.Generator) -> float:
        """Record the shares labelled as the target before and after the parent's distillation."""
        before = float((predict_logits(module, x).argmax(1) == rb.TARGET).float().mean())
        loss = super()._distill(module, x, teacher, g)
        self.records.append(
            {
                "teacher_target": float((teacher.argmax(1) == rb.TARGET).float().mean()),
                "teacher_norm": float(teacher.norm(dim=1).mean()),
                "average_target": before,
                "distilled_target": float((predict_logits(module, x).argmax(1) == rb.TARGET).float().mean()),
            }
        )
        return loss


def main(argv: list[str] | None = None) -> None:
    """Train FedDF per requested seed and attack and print, every 5 rounds, the teacher's and the student's
    target shares and the test accuracy."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--attacks", nargs="+", default=["clean", *rb.BACKDOORS], choices=["clean", *rb.BACKDOORS])
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--local-epochs", type=int, default=5)
    p.add_argument("--clients", type=int, default=20)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    args = rb.parse(["--rounds", str(a.rounds), "--local-epochs", str(a.local_epochs)])
    every = 5 if a.rounds >= 5 else 1
    table = Table(
        title=f"FedDF's ensemble teacher on the proxy records ({a.clients} clients, target class {rb.TARGET})"
    )
    for h in (
        "seed",
        "attack",
        "round",
        "teacher -> target",
        "teacher |logits|",
        "average -> target",
        "distilled -> target",
        "test acc",
    ):
        table.add_column(h, justify="left" if h == "attack" else "right")
    original = rb.FedDF
    rb.FedDF = RecordingFedDF  # train() builds the benchmark's FedDF by this name: the same run, recorded
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for seed in a.seeds:
                for name in a.attacks:
                    attack = None if name == "clean" else rb.make_attack(name, a.fraction, seed, args.boost)
                    _, rec, _ = rb.train(
                        args, a.clients, seed, attack, "feddf", Path(tmp) / f"{name}{seed}", test_every=every
                    )
                    accs = dict(rec.get("curve", []))
                    for r, got in enumerate(BUILT[-1].records):
                        if (r + 1) % every == 0 or r == 0:
                            table.add_row(
                                str(seed),
                                rb.LABELS[name],
                                str(r + 1),
                                f"{100 * got['teacher_target']:.1f} %",
                                f"{got['teacher_norm']:.1f}",
                                f"{100 * got['average_target']:.1f} %",
                                f"{100 * got['distilled_target']:.1f} %",
                                f"{100 * accs[r + 1]:.1f} %" if r + 1 in accs else "",
                            )
    finally:
        rb.FedDF = original
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
