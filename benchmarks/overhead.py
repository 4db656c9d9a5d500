"""FedLoop overhead versus a bare PyTorch FedAvg loop doing the same work, side by side in one process.

The work: MNIST-1D, MNIST1DCNN, 100 clients (IID split, the same shards for both), 10 clients per round
(the same clients each round, from FedLoop's seeded sampler), 1 local epoch, batch 32, SGD lr 0.05 momentum 0.9,
example-weighted averaging of deltas, evaluation of the global model on the test split every 10 rounds.
FedLoop additionally serialises every message (identity codec, safetensors), validates every reply, calls
Lightning hooks and logs; the bare loop does none of that. Runs alternate (bare, FedLoop, bare, ...), and the
median of each is compared.

    python benchmarks/overhead.py --rounds 50 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from lightning_fed import FedLoop, MNIST1DDataModule
from lightning_fed.data import IID
from lightning_fed.models import MNIST1DCNN
from lightning_fed.seeding import derive_seed, seed_rngs

NUM_CLIENTS, PER_ROUND, BATCH, LR, MOMENTUM, SEED, EVAL_EVERY = 100, 10, 32, 0.05, 0.9, 0, 10


def bare_fedavg(rounds: int, loop_for_sampling: FedLoop, data: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """A plain PyTorch FedAvg loop; returns (wall seconds, CPU seconds, final test accuracy)."""
    x, y, xt, yt = data["x"], data["y"], data["x_test"], data["y_test"]
    shards = IID().split(y, NUM_CLIENTS, SEED)
    L.seed_everything(SEED, verbose=False)
    model = MNIST1DCNN()
    t0, c0 = time.perf_counter(), time.process_time()
    params = [p for p in model.parameters()]
    global_w = [p.detach().clone() for p in params]
    acc = 0.0
    for r in range(rounds):
        clients = loop_for_sampling.sample_clients(r)
        total = sum(len(shards[c]) for c in clients)
        update = [torch.zeros_like(g) for g in global_w]
        for c in clients:
            with torch.no_grad():
                for p, g in zip(params, global_w):
                    p.copy_(g)
            seed_rngs(derive_seed(SEED, r, c))
            opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
            gen = torch.Generator().manual_seed(derive_seed(SEED, r, c, 1))
            idx = shards[c][torch.randperm(len(shards[c]), generator=gen)]
            for i in range(0, len(idx), BATCH):
                b = idx[i : i + BATCH]
                loss = F.cross_entropy(model(x[b]), y[b])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            w = len(shards[c]) / total
            with torch.no_grad():
                for u, p, g in zip(update, params, global_w):
                    u.add_(p - g, alpha=w)
        for g, u in zip(global_w, update):
            g.add_(u)
        if (r + 1) % EVAL_EVERY == 0 or r + 1 == rounds:
            with torch.no_grad():
                for p, g in zip(params, global_w):
                    p.copy_(g)
                model.eval()
                acc = float((model(xt).argmax(1) == yt).float().mean())
                model.train()
    return time.perf_counter() - t0, time.process_time() - c0, acc


def fedloop_fedavg(rounds: int, dm: MNIST1DDataModule, out: str) -> tuple[float, float, float]:
    """The same work through FedLoop; returns (wall seconds of fit, CPU seconds, final test accuracy)."""
    L.seed_everything(SEED, verbose=False)
    model = MNIST1DCNN()
    loop = FedLoop(num_clients=NUM_CLIENTS, clients_per_round=PER_ROUND, rounds=rounds, local_epochs=1,
                   partition=IID(), eval_every=EVAL_EVERY, checkpoint_every=0, output_dir=out, seed=SEED,
                   verbose=False, plot=False, loggers=[])
    t0, c0 = time.perf_counter(), time.process_time()
    res = loop.fit(model, dm)
    return time.perf_counter() - t0, time.process_time() - c0, res.final_metrics["test_acc"]


def main() -> None:
    """Alternate bare and FedLoop runs, print medians and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both loops")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dm = MNIST1DDataModule(batch_size=BATCH)
    dm.prepare_data()
    dm.setup()
    from lightning_fed.data import make_mnist1d

    data = make_mnist1d()
    sampler = FedLoop(num_clients=NUM_CLIENTS, clients_per_round=PER_ROUND, seed=SEED, verbose=False)
    fedloop_fedavg(2, dm, "runs/bench-overhead/warmup")  # import / first-call costs out of the timings
    bare_fedavg(2, sampler, data)
    bare, fed = [], []
    for i in range(args.repeats):
        bare.append(bare_fedavg(args.rounds, sampler, data))
        fed.append(fedloop_fedavg(args.rounds, dm, f"runs/bench-overhead/run{i}"))
    med = statistics.median
    tb, tf = med(r[0] for r in bare), med(r[0] for r in fed)
    cb, cf = med(r[1] for r in bare), med(r[1] for r in fed)
    table = Table(title=f"FedAvg, {NUM_CLIENTS} clients, {PER_ROUND}/round, 1 local epoch, {args.rounds} rounds, "
                        f"{args.repeats} alternating repeats, {args.threads} thread(s)")
    for col in ("loop", "median wall s", "wall s / round", "all runs wall (s)", "median CPU s", "final test acc"):
        table.add_column(col)
    for name, runs, t, c in (("bare PyTorch", bare, tb, cb), ("FedLoop", fed, tf, cf)):
        table.add_row(name, f"{t:.2f}", f"{t / args.rounds:.4f}", " ".join(f"{r[0]:.2f}" for r in runs), f"{c:.2f}",
                      f"{runs[-1][2]:.2%}")
    Console().print(table)
    Console().print(f"FedLoop / bare: wall [bold]{tf / tb:.2f}x[/bold], CPU time [bold]{cf / cb:.2f}x[/bold] (target <= 1.30x)")

if __name__ == "__main__":
    main()
