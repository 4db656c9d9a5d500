"""Clients in parallel: 1 process against 2 (or more) processes on the same work, side by side in one run.

Workloads:

- ``fedavg``: the FedAvg recipe (recipes/mnist1d/fedavg.yaml: MNIST-1D CNN, 20 clients, 10 per round, 5 local
  epochs), run by ``lightning-fed fit ... --loop.devices N``.
- ``transformer``: a heavier model, a 2-layer transformer encoder (d_model 128, 4 heads) classifying synthetic
  token sequences (generated here, seeded), 20 clients, 10 per round, 2 local epochs.

Each configuration is ``processes x torch threads per process``. ``1 x 1`` against ``2 x 1`` is the like-for-like
comparison (same threads per process, so the final weights must be bit-identical, which the table checks);
``1 x 2`` is one process given both cores through intra-op threads. Timed: the wall time of the whole command
(start-up included) and the rounds alone (the sum of the per-round ``seconds`` in history.json: plan, clients,
exchange, aggregation, evaluation). Configurations alternate, and the median of ``--repeats`` runs is kept.

    python benchmarks/parallel.py --rounds 10 --repeats 1
    python benchmarks/parallel.py --workloads transformer --processes 1 2 4 8 --accelerator cuda   # a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the transformer workload
def _transformer_parts(accelerator: str, devices: int, processes_per_device: int, rounds: int, out: str,
                       precision: str = "32-true"):
    import lightning as L
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_fed import FedLoop
    from lightning_fed.data import Dirichlet

    class SeqData(L.LightningDataModule):
        """Token sequences whose class is which of 4 marker tokens occurs most often (seeded, generated here)."""

        def __init__(self, n: int = 6000, length: int = 64, vocab: int = 64) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(7)
            x = torch.randint(4, vocab, (n + 1000, length), generator=g)
            marks = torch.randint(0, 4, (n + 1000, length), generator=g)
            put = torch.rand(n + 1000, length, generator=g) < 0.15
            x = torch.where(put, marks, x)
            y = torch.stack([(x == k).sum(1) for k in range(4)], 1).argmax(1)
            self.train = TensorDataset(x[:n], y[:n])
            self.test = TensorDataset(x[n:], y[n:])

        def train_dataloader(self):
            return DataLoader(self.train, batch_size=32, shuffle=True)

        def test_dataloader(self):
            return DataLoader(self.test, batch_size=256)

    class TinyTransformer(L.LightningModule):
        def __init__(self, vocab: int = 64, d: int = 128, layers: int = 2) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(torch.randn(64, d) * 0.02)
            layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(d, 4)

        def forward(self, x):
            return self.head(self.enc(self.emb(x) + self.pos[: x.shape[1]]).mean(1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_acc", (self(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    L.seed_everything(0, verbose=False)
    model, data = TinyTransformer(), SeqData()
    loop = FedLoop(num_clients=20, clients_per_round=10, rounds=rounds, local_epochs=2,
                   partition=Dirichlet(alpha=0.5, min_samples=10), eval_every=rounds, checkpoint_every=0,
                   output_dir=out, verbose=False, plot=False, loggers=[], accelerator=accelerator, devices=devices,
                   processes_per_device=processes_per_device, precision=precision, seed=0)
    return loop, model, data


# --------------------------------------------------------------------------- one configuration
def _command(workload: str, processes: int, rounds: int, out: str, accelerator: str, per_device: int,
             precision: str = "32-true") -> list[str]:
    """The command line that runs one configuration."""
    if workload == "fedavg":
        return [sys.executable, "-m", "lightning_fed.cli", "fit", "--config", str(ROOT / "recipes/mnist1d/fedavg.yaml"),
                "--loop.rounds", str(rounds), "--loop.devices", str(processes), "--loop.output_dir", out,
                "--loop.verbose", "false", "--loop.plot", "false", "--loop.checkpoint_every", "0",
                "--loop.loggers", "[]", "--loop.accelerator", accelerator,
                "--loop.processes_per_device", str(per_device), "--loop.precision", precision]
    return [sys.executable, str(Path(__file__).resolve()), "--worker", "--rounds", str(rounds), "--out", out,
            "--processes", str(processes), "--accelerator", accelerator, "--per-device", str(per_device),
            "--precision", precision]


def run_once(workload: str, processes: int, threads: int, rounds: int, accelerator: str, per_device: int,
             precision: str = "32-true") -> dict:
    """Run one configuration in a fresh process tree; wall seconds, rounds seconds and the final weights."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as out:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}
        t0 = time.perf_counter()
        proc = subprocess.run(_command(workload, processes, rounds, out, accelerator, per_device, precision), env=env,
                              capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{workload} {processes}x{threads} failed:\n{proc.stderr[-3000:]}")
        (run_dir,) = Path(out).glob("version_*")
        history = json.loads((run_dir / "history.json").read_text())
        weights = load_file(str(run_dir / "final.safetensors"))
    busy = [h.get("rank0_busy_s", 0.0) for h in history]
    return {"wall": wall, "rounds": sum(h["seconds"] for h in history), "weights": weights,
            "acc": history[-1].get("test_acc", float("nan")), "busy0": sum(busy)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workloads", nargs="+", default=["fedavg", "transformer"], choices=["fedavg", "transformer"])
    p.add_argument("--processes", nargs="+", type=int, default=[2], help="process counts compared with 1")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--per-device", type=int, default=1, help="processes per GPU (accelerator cuda)")
    p.add_argument("--precision", default="32-true", help="Fabric precision of every configuration (e.g. bf16-mixed)")
    p.add_argument("--json", type=str, default=None, help="also write the table here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        loop, model, data = _transformer_parts(args.accelerator, args.processes[0], args.per_device, args.rounds,
                                               args.out, args.precision)
        loop.fit(model, data)
        return
    cores = os.cpu_count() or 1
    configs = [(1, 1)] + ([(1, min(cores, max(args.processes)))] if args.accelerator == "cpu" and cores > 1 else [])
    configs += [(n, 1) for n in args.processes if n > 1]
    per_device = args.per_device if args.accelerator == "cpu" else max(args.processes)
    where = torch.cuda.get_device_name(0) if args.accelerator == "cuda" and torch.cuda.is_available() else "cpu"
    console = Console()
    rows = []
    for workload in args.workloads:
        results: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
        for _ in range(args.repeats):
            for c in configs:  # alternate configurations within each repeat
                console.print(f"[dim]{workload}: {c[0]} process(es) x {c[1]} thread(s)…[/dim]")
                results[c].append(run_once(workload, c[0], c[1], args.rounds, args.accelerator,
                                           1 if c[0] == 1 else per_device, args.precision))
        base = results[(1, 1)]
        base_rounds = statistics.median(r["rounds"] for r in base)
        base_wall = statistics.median(r["wall"] for r in base)
        for c in configs:
            rs = results[c]
            r_med, w_med = statistics.median(r["rounds"] for r in rs), statistics.median(r["wall"] for r in rs)
            same = all(torch.equal(rs[0]["weights"][k], base[0]["weights"][k]) for k in base[0]["weights"])
            rows.append({"workload": workload, "processes": c[0], "threads": c[1], "rounds_s": r_med, "wall_s": w_med,
                         "speedup_rounds": base_rounds / r_med, "speedup_wall": base_wall / w_med,
                         "clients_per_s": 10 * args.rounds / r_med, "identical_to_1x1": same,
                         "test_acc": rs[0]["acc"], "precision": args.precision, "device": where})
    table = Table(title=f"Clients in parallel ({args.rounds} rounds, {where}, {args.precision}, {cores} cores, "
                        f"median of {args.repeats})")
    for col in ("workload", "processes x threads", "rounds s", "wall s", "speed-up (rounds)", "speed-up (wall)",
                "clients/s", "weights = 1x1", "test acc"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["workload"], f"{r['processes']} x {r['threads']}", f"{r['rounds_s']:.1f}", f"{r['wall_s']:.1f}",
                      f"{r['speedup_rounds']:.2f}x", f"{r['speedup_wall']:.2f}x", f"{r['clients_per_s']:.1f}",
                      "yes" if r["identical_to_1x1"] else ("n/a" if r["threads"] > 1 else "NO"),
                      f"{r['test_acc']:.3f}")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
