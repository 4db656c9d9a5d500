"""Memory at scale: 10,000 clients versus 100 clients, 10 per round, same data, same model.

Each configuration runs in its own fresh process (so peak RSS is not shared), with per-client optimizer
state kept (``keep_optimizer_state=True``: SGD momentum for every client that ever trained) to exercise the
client store. Reported: peak resident memory of the process (``ru_maxrss``), its growth during ``fit``
(peak minus the RSS just before ``fit``, i.e. what the federation itself costs), and the client-store files on
disk. Data: MNIST-1D with 62,500 samples (50,000 train: 5 per client at 10,000 clients).

    python benchmarks/scale.py --rounds 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from rich.console import Console
from rich.table import Table

CHILD = r"""
import json, os, resource, sys
import torch
torch.set_num_threads(1)
import lightning as L
from lightning_fed import FedLoop, MNIST1DDataModule
from lightning_fed.data import IID
from lightning_fed.models import MNIST1DCNN

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

clients, rounds, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dm = MNIST1DDataModule(batch_size=32, num_samples=62_500)
dm.prepare_data(); dm.setup()
L.seed_everything(0, verbose=False)
model = MNIST1DCNN()
loop = FedLoop(num_clients=clients, clients_per_round=10, rounds=rounds, local_epochs=1, partition=IID(min_samples=1),
               keep_optimizer_state=True, eval_every=rounds, checkpoint_every=rounds, output_dir=out,
               verbose=False, plot=False, loggers=[])
before = rss_mb()
res = loop.fit(model, dm)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
files = list((res.run_dir / "clients").glob("client-*.pt"))
print(json.dumps(dict(clients=clients, before_mb=before, peak_mb=peak, growth_mb=peak - before,
                      store_files=len(files), store_kb=sum(f.stat().st_size for f in files) / 1024,
                      acc=res.final_metrics.get("test_acc"), seconds=sum(h["seconds"] for h in res.history))))
"""


def main() -> None:
    """Run both configurations in fresh processes and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--output_dir", default="runs/bench-scale")
    args = ap.parse_args()
    from lightning_fed.data import make_mnist1d

    make_mnist1d(62_500)  # generate and cache once, outside the measured processes
    rows = []
    for clients in (100, 10_000):
        out = subprocess.run([sys.executable, "-c", CHILD, str(clients), str(args.rounds), f"{args.output_dir}/{clients}"],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = Table(title=f"peak memory, 10 clients per round, {args.rounds} rounds, keep_optimizer_state=True")
    for col in ("clients", "RSS before fit MB", "peak RSS MB", "growth during fit MB", "store files", "store KB", "fit s"):
        table.add_column(col)
    for r in rows:
        table.add_row(f"{r['clients']:,}", f"{r['before_mb']:.0f}", f"{r['peak_mb']:.0f}", f"{r['growth_mb']:.1f}",
                      str(r["store_files"]), f"{r['store_kb']:.0f}", f"{r['seconds']:.1f}")
    Console().print(table)
    a, b = rows
    Console().print(f"peak RSS 10,000 / 100 clients = [bold]{b['peak_mb'] / a['peak_mb']:.2f}x[/bold] (target <= 1.5x); "
                    f"growth during fit: {a['growth_mb']:.1f} MB vs {b['growth_mb']:.1f} MB")


if __name__ == "__main__":
    main()
