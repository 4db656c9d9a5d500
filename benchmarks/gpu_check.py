"""FedLoop on a CUDA device: the same federated run on the GPU (fp32, bf16-mixed, 16-mixed with a gradient
scaler) and on the CPU, side by side in one invocation, plus the pipeline's guarantees on the GPU: a client that
changes its model's structure is dropped alone, and the differential codec's two references stay in step.

    python benchmarks/gpu_check.py --rounds 20 --json gpu.json

Prints a table (final test accuracy, seconds per round, and the ratio to the CPU run); exits non-zero if a check
fails. Without CUDA it says so and exits 0 having run nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

from lightning_fed import FedLoop, MNIST1DDataModule
from lightning_fed.callbacks import FedCallback, RoundLRDecay
from lightning_fed.codecs import Differential, Sign, TopK
from lightning_fed.data import Dirichlet
from lightning_fed.models import MNIST1DCNN

CHANCE = 0.1  # ten classes


class ChangesShape(FedCallback):
    """Client 0 replaces its first parameter by one of another shape (a client bug the loop must contain)."""

    def on_client_start(self, trainer, pl_module, instruction):
        """Client 0 breaks its model."""
        if trainer.fed.client_id == 0:
            module = trainer.lightning_module
            name = next(iter(module.named_parameters()))[0]
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            setattr(owner, name.rsplit(".", 1)[-1], torch.nn.Parameter(torch.zeros(3, 3, device=module.device)))


def run(accelerator: str, precision: str, rounds: int, out: str, **kw) -> dict[str, float]:
    """One seeded FedAvg run of the fedavg recipe's setting; returns accuracy, seconds per round and counters."""
    L.seed_everything(0, verbose=False)
    model = MNIST1DCNN(channels=25, lr=0.05, optimizer="sgd", momentum=0.9)
    kw.setdefault("callbacks", [RoundLRDecay(schedule="cosine", min_scale=0.1)])
    loop = FedLoop(num_clients=20, clients_per_round=10, rounds=rounds, local_epochs=5,
                   partition=Dirichlet(alpha=0.5, min_samples=10), eval_every=rounds, checkpoint_every=0,
                   output_dir=out, accelerator=accelerator, precision=precision, verbose=False, plot=False,
                   loggers=[], **kw)
    t = time.perf_counter()
    res = loop.fit(model, MNIST1DDataModule(batch_size=16))
    seconds = time.perf_counter() - t
    return {"acc": res.final_metrics["test_acc"], "s_per_round": seconds / rounds,
            "failed": sum(h["failed"] for h in res.history), "rejected": sum(h["rejected"] for h in res.history),
            "good": sum(h["good"] for h in res.history),
            "client0_rounds": sum(0 in loop.sample_clients(r) for r in range(rounds))}


def main() -> None:
    """Run the checks and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    console = Console(width=140)
    if not torch.cuda.is_available():
        console.print("no CUDA device: nothing to check")
        return
    torch.set_num_threads(1)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows["cpu 32-true"] = run("cpu", "32-true", args.rounds, f"{tmp}/cpu")
        for precision in ("32-true", "bf16-mixed", "16-mixed"):
            rows[f"cuda {precision}"] = run("cuda", precision, args.rounds, f"{tmp}/{precision}")
        rows["cuda 32-true, client 0 changes its model"] = run(
            "cuda", "32-true", 3, f"{tmp}/shape", callbacks=[ChangesShape()])
        codec = Differential(TopK(0.031, values=Sign(block=32, scale_dtype="float16")), smoothing=0.5)
        rows["cuda 32-true, Differential(TopK)"] = run("cuda", "32-true", args.rounds, f"{tmp}/diff", codec=codec)
    cpu = rows["cpu 32-true"]["s_per_round"]
    shape = rows["cuda 32-true, client 0 changes its model"]
    table = Table(title=f"FedLoop on {torch.cuda.get_device_name(0)}, fedavg recipe setting, {args.rounds} rounds")
    for col in ("run", "test acc", "s / round", "vs cpu", "good", "failed", "rejected"):
        table.add_column(col)
    for name, r in rows.items():
        table.add_row(name, f"{r['acc']:.3f}", f"{r['s_per_round']:.3f}", f"{r['s_per_round'] / cpu:.2f}x",
                      str(r["good"]), str(r["failed"]), str(r["rejected"]))
    console.print(table)
    checks = {
        "every run learns (acc > 3x chance)": all(r["acc"] > 3 * CHANCE for n, r in rows.items() if "changes" not in n),
        "no client failed or was rejected in the clean runs": all(
            r["failed"] == 0 and r["rejected"] == 0 for n, r in rows.items() if "changes" not in n),
        "the structure-changing client, and only it, is lost in each round it is sampled": (
            shape["failed"] + shape["rejected"] == shape["client0_rounds"] > 0
            and shape["good"] == 3 * 10 - shape["client0_rounds"]),
        "cuda fp32 within 3 points of cpu fp32": abs(rows["cuda 32-true"]["acc"] - cpu_acc(rows)) <= 0.03,
    }
    for name, ok in checks.items():
        console.print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "checks": checks, "device": torch.cuda.get_device_name(0),
                       "torch": torch.__version__}, f, indent=1)
    if not all(checks.values()):
        sys.exit(1)


def cpu_acc(rows: dict[str, dict[str, float]]) -> float:
    """The CPU run's accuracy."""
    return rows["cpu 32-true"]["acc"]


if __name__ == "__main__":
    main()
