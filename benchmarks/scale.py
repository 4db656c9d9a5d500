"""Memory at scale: 10,000 clients versus 100 clients, every client in every round, same data, same model.

Every client trains in every round (``clients_per_round = num_clients``), so every client has state by the end
of the first round: its optimizer state (``keep_optimizer_state=True``: SGD momentum), its codec state and the
server's state about it. The codec is ``Differential(TopK)``, which keeps one update-sized reference per client
on both sides: on the client in the client store, on the server in the sender store. Each configuration runs
in its own fresh process (so peak RSS is not shared). Reported: peak resident memory of the process
(``ru_maxrss``), its growth during ``fit`` (peak minus the RSS just before ``fit``), and the store files on disk.
Data: MNIST-1D with 62,500 samples (50,000 train: 5 per client at 10,000 clients).

    python benchmarks/scale.py --rounds 2
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
from lightning_fed.codecs import Differential, Sign, TopK
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
codec = Differential(TopK(0.031, values=Sign(block=32, scale_dtype="float16")), smoothing=0.5)
loop = FedLoop(num_clients=clients, clients_per_round=clients, rounds=rounds, local_epochs=1,
               partition=IID(min_samples=1), codec=codec, keep_optimizer_state=True, eval_every=rounds,
               checkpoint_every=rounds, output_dir=out, verbose=False, plot=False, loggers=[])
before = rss_mb()
res = loop.fit(model, dm)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
files = list((res.run_dir / "clients").glob("client-*.pt"))
senders = list((res.run_dir / "senders").glob("client-*.pt"))
print(json.dumps(dict(clients=clients, before_mb=before, peak_mb=peak, growth_mb=peak - before,
                      all_trained=all(h["good"] == clients for h in res.history),
                      store_files=len(files), store_kb=sum(f.stat().st_size for f in files) / 1024,
                      sender_files=len(senders), sender_kb=sum(f.stat().st_size for f in senders) / 1024,
                      acc=res.final_metrics.get("test_acc"), seconds=sum(h["seconds"] for h in res.history))))
"""


def main() -> None:
    """Run both configurations in fresh processes and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--output_dir", default="runs/bench-scale")
    args = ap.parse_args()
    from lightning_fed.data import make_mnist1d

    make_mnist1d(62_500)  # generate and cache once, outside the measured processes
    rows = []
    for clients in (100, 10_000):
        out = subprocess.run([sys.executable, "-c", CHILD, str(clients), str(args.rounds), f"{args.output_dir}/{clients}"],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = Table(title=f"peak memory, every client in each of {args.rounds} rounds, Differential(TopK) codec, "
                        "keep_optimizer_state=True")
    for col in ("clients", "every client replied", "RSS before fit MB", "peak RSS MB", "growth during fit MB",
                "client store files / KB", "sender store files / KB", "fit s"):
        table.add_column(col)
    for r in rows:
        table.add_row(f"{r['clients']:,}", str(r["all_trained"]), f"{r['before_mb']:.0f}", f"{r['peak_mb']:.0f}",
                      f"{r['growth_mb']:.1f}", f"{r['store_files']} / {r['store_kb']:.0f}",
                      f"{r['sender_files']} / {r['sender_kb']:.0f}", f"{r['seconds']:.1f}")
    Console().print(table)
    a, b = rows
    Console().print(f"peak RSS 10,000 / 100 clients = [bold]{b['peak_mb'] / a['peak_mb']:.2f}x[/bold] (target <= 1.5x); "
                    f"growth during fit: {a['growth_mb']:.1f} MB vs {b['growth_mb']:.1f} MB")


if __name__ == "__main__":
    main()
