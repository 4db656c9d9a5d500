"""Memory at scale: 10,000 clients versus 100 clients, every client taking part.

Both federations run 10,000 client-rounds at 100 clients per round: 100 clients over 100 rounds, and 10,000
clients over 100 rounds with cyclic sampling (each of the 10,000 clients exactly once). The training set is the
same, so a client of the 100 holds 500 samples and a client of the 10,000 holds 5 (the seconds differ for that
reason). Every client that trained
keeps state: its optimizer state (``keep_optimizer_state=True``: SGD momentum), its codec state and the server's
state about it. The codec is ``Differential(TopK)``, which keeps one update-sized reference per client on both
sides: on the client in the client store, on the server in the sender store. A third run puts all 10,000 clients in
one round, twice: it measures what a round holds (every decoded reply of the round, 21 KB each, until it is
aggregated). Each configuration runs in its own fresh process (so peak RSS is not shared). Reported: peak resident
memory of the process (``ru_maxrss``), its growth during ``fit`` (peak minus the RSS just before ``fit``), and the
store files on disk. Data: MNIST-1D with 62,500 samples (50,000 train: 5 per client at 10,000 clients).

    python benchmarks/scale.py
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

clients, per_round, rounds, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dm = MNIST1DDataModule(batch_size=32, num_samples=62_500)
dm.prepare_data(); dm.setup()
L.seed_everything(0, verbose=False)
model = MNIST1DCNN()
codec = Differential(TopK(0.031, values=Sign(block=32, scale_dtype="float16")), smoothing=0.5)
loop = FedLoop(num_clients=clients, clients_per_round=per_round, rounds=rounds, local_epochs=1, sampling="cyclic",
               partition=IID(min_samples=1), codec=codec, keep_optimizer_state=True, eval_every=rounds,
               checkpoint_every=rounds, output_dir=out, verbose=False, plot=False, loggers=[])
before = rss_mb()
res = loop.fit(model, dm)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
files = list((res.run_dir / "clients").glob("client-*.pt"))
senders = list((res.run_dir / "senders").glob("client-*.pt"))
print(json.dumps(dict(clients=clients, before_mb=before, peak_mb=peak, growth_mb=peak - before,
                      per_round=per_round, rounds=rounds,
                      trained=len({c for r in range(rounds) for c in loop.sample_clients(r)}),
                      failed=sum(h["failed"] + h["rejected"] for h in res.history),
                      store_files=len(files), store_kb=sum(f.stat().st_size for f in files) / 1024,
                      sender_files=len(senders), sender_kb=sum(f.stat().st_size for f in senders) / 1024,
                      acc=res.final_metrics.get("test_acc"), seconds=sum(h["seconds"] for h in res.history))))
"""


def main() -> None:
    """Run both configurations in fresh processes and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=100, help="rounds of the two 100-per-round federations")
    ap.add_argument("--output_dir", default="runs/bench-scale")
    args = ap.parse_args()
    from lightning_fed.data import make_mnist1d

    make_mnist1d(62_500)  # generate and cache once, outside the measured processes
    rows = []
    for clients, per_round, rounds in ((100, 100, args.rounds), (10_000, 100, args.rounds), (10_000, 10_000, 2)):
        out = subprocess.run([sys.executable, "-c", CHILD, str(clients), str(per_round), str(rounds),
                              f"{args.output_dir}/{clients}-{per_round}"], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = Table(title="peak memory, Differential(TopK) codec, keep_optimizer_state=True, cyclic sampling")
    for col in ("clients", "per round", "rounds", "clients that trained", "dropped", "RSS before fit MB",
                "peak RSS MB", "growth during fit MB", "client store files / KB", "sender store files / KB", "fit s"):
        table.add_column(col)
    for r in rows:
        table.add_row(f"{r['clients']:,}", f"{r['per_round']:,}", str(r["rounds"]), f"{r['trained']:,}",
                      str(r["failed"]), f"{r['before_mb']:.0f}", f"{r['peak_mb']:.0f}", f"{r['growth_mb']:.1f}",
                      f"{r['store_files']:,} / {r['store_kb']:,.0f}", f"{r['sender_files']:,} / {r['sender_kb']:,.0f}",
                      f"{r['seconds']:.1f}")
    console = Console(width=160)
    console.print(table)
    a, b, c = rows
    console.print(f"peak RSS, 10,000 clients / 100 clients at 100 per round = [bold]{b['peak_mb'] / a['peak_mb']:.2f}x"
                  f"[/bold]; growth during fit {a['growth_mb']:.1f} MB vs {b['growth_mb']:.1f} MB; all 10,000 in one "
                  f"round: {c['peak_mb'] / a['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
