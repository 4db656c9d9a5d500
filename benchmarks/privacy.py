"""Differential privacy on MNIST-1D: test accuracy against epsilon for central DP-FedAvg (fixed and adaptive clipping),
local DP and record-level DP-SGD, next to non-private FedAvg on the same setting.

Setting (defaults): an MNIST-1D training set of ``--train`` (100,000) samples over ``--clients`` (2,000) clients,
IID (50 samples each), ``--per_round`` (100) clients per round with Poisson sampling, ``--rounds`` (50) rounds of
``--local_epochs`` (3) local epochs, MNIST1DCNN with SGD (lr 0.05, momentum 0.9, batch 16), update bound ``--clip``
(2.0) and server momentum ``--server_momentum`` (0.5) at server learning rate ``--server_lr`` (1.0) (FedAvgM;
``--server_opt adam`` for FedAdam; the noised update is post-processed, at no privacy cost). For each method and
each epsilon (``inf``: clipping only, no noise) the noise multiplier is calibrated with Opacus'
``get_noise_multiplier`` (RDP accountant) so that the planned run spends that epsilon at ``delta = 1 / N^1.1``:

* central (``DPFedAvg``), fixed and adaptive clipping: user-level, sample rate ``per_round / clients``, one step per
  round, ``N`` = clients;
* local (``LocalDP``): per client, noise multiplier ``z / 2`` per release, no amplification, over the expected number
  of participations ``ceil(rounds * per_round / clients)``, ``N`` = clients;
* DP-SGD (``DPSGD``): per record, sample rate ``1 / batches``, ``batches * local_epochs`` steps per participation,
  over the expected participations, ``N`` = training records.

The table shows the epsilon the run itself reported (central: ``dp_epsilon`` after the last round; local and DP-SGD:
the mean over the last round's clients, who may have taken part more or less often than expected) and the final
test accuracy; ``--merge`` of runs with several ``--seed`` values adds the mean and standard deviation of each cell
over its seeds. Run from the repository root::

    python benchmarks/privacy.py                        # everything, the full setting (hours on 2 cores)
    python benchmarks/privacy.py --methods central --epsilons 8 --out central-8.json   # one cell
    python benchmarks/privacy.py --merge fedavg.json central-8.json     # one table from several --out files
    python benchmarks/privacy.py --methods fedavg --seed 1 --out fedavg-s1.json      # another seed of a cell
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from opacus.accountants.utils import get_noise_multiplier
from rich.console import Console
from rich.table import Table

from lightning_fed import FedLoop, MNIST1DDataModule
from lightning_fed.callbacks import DPSGD, LocalDP
from lightning_fed.data import IID
from lightning_fed.models import MNIST1DCNN
from lightning_fed.strategies import DPFedAvg, FedAvg, ServerAdam, ServerMomentum

METHODS = ["fedavg", "central", "adaptive", "local", "dpsgd"]
EPSILONS = [1.0, 2.0, 4.0, 8.0, math.inf]


def noise_for(eps: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier that spends ``eps`` at ``delta`` over ``steps`` (0 for ``inf``)."""
    if math.isinf(eps):
        return 0.0
    return float(
        get_noise_multiplier(
            target_epsilon=eps,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=0.01,
        )
    )


def one_run(method: str, eps: float, a: argparse.Namespace, out: Path) -> dict[str, object]:
    """One method at one epsilon: the reported epsilon, the final test accuracy, the noise multiplier, the time."""
    q = a.per_round / a.clients
    participations = math.ceil(a.rounds * q)
    user_delta, record_delta = 1.0 / a.clients**1.1, 1.0 / a.train**1.1
    server = (
        ServerAdam(lr=a.server_lr, beta1=a.server_momentum, tau=a.server_tau)
        if a.server_opt == "adam"
        else ServerMomentum(lr=a.server_lr, momentum=a.server_momentum)
        if a.server_momentum or a.server_lr != 1.0
        else None
    )
    strategy, callbacks, z = FedAvg(server_optimizer=server), [], 0.0
    if method in ("central", "adaptive"):
        z = noise_for(eps, user_delta, q, a.rounds)
        count_std = (
            max(a.per_round / 20, z) if method == "adaptive" else None
        )  # > z / 2, as the paper's m / 20
        strategy = DPFedAvg(
            strategy=strategy,
            clip_norm=a.clip,
            noise_multiplier=z,
            adaptive=method == "adaptive",
            delta=user_delta,
            count_std=count_std,
            target_quantile=0.5,
        )
    elif method == "local":
        z = 2 * noise_for(
            eps, user_delta, 1.0, participations
        )  # a release is a Gaussian mechanism with z / 2
        callbacks = [LocalDP(clip_norm=a.clip, noise_multiplier=z, delta=user_delta)]
    elif method == "dpsgd":
        batches = math.ceil(a.train / a.clients / a.batch_size)
        z = noise_for(eps, record_delta, 1.0 / batches, participations * batches * a.local_epochs)
        callbacks = [DPSGD(noise_multiplier=z, max_grad_norm=a.grad_clip, delta=record_delta)]
    t0 = time.perf_counter()
    L.seed_everything(a.seed, verbose=False)
    loop = FedLoop(
        num_clients=a.clients,
        clients_per_round=a.per_round,
        rounds=a.rounds,
        local_epochs=a.local_epochs,
        partition=IID(),
        strategy=strategy,
        callbacks=callbacks,
        sampling="poisson",
        seed=a.seed,
        output_dir=str(out / f"{method}-{eps}"),
        verbose=False,
        plot=False,
        loggers=[],
        checkpoint_every=0,
        eval_every=a.rounds,  # the table reads the final test accuracy only
    )
    dm = MNIST1DDataModule(batch_size=a.batch_size, num_samples=round(a.train / 0.8))
    res = loop.fit(MNIST1DCNN(channels=a.channels, lr=a.lr, optimizer="sgd", momentum=a.momentum), dm)
    last = res.history[-1]
    key = {
        "central": "dp_epsilon",
        "adaptive": "dp_epsilon",
        "local": "ldp_epsilon",
        "dpsgd": "dpsgd_epsilon",
    }
    reported = float(last.get(key[method], math.inf)) if method in key else math.inf
    return {
        "method": method,
        "seed": a.seed,
        "target_eps": eps,
        "eps": reported,
        "noise_multiplier": z,
        "test_acc": float(res.final_metrics["test_acc"]),
        "clip": float(last.get("dp_clip", a.clip)),
        "clipped": float(last.get("dp_clipped", last.get("ldp_clipped", math.nan))),
        "wall_s": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """Run non-private FedAvg and every method at every epsilon; print the table (and write JSON with ``--out``).

    Returns the rows (with ``--merge``: the rows of the merged files).
    """
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument(
        "--train", type=int, default=100000, help="training samples (MNIST-1D keeps 20 %% more as test)"
    )
    ap.add_argument("--per_round", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--local_epochs", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9, help="client SGD momentum")
    ap.add_argument(
        "--server_momentum", type=float, default=0.5, help="server momentum (FedAvgM; 0: plain FedAvg)"
    )
    ap.add_argument("--server_lr", type=float, default=1.0, help="server learning rate")
    ap.add_argument(
        "--server_opt",
        choices=["momentum", "adam"],
        default="momentum",
        help="server optimizer (FedAvgM, FedAdam)",
    )
    ap.add_argument("--server_tau", type=float, default=1e-3, help="FedAdam's tau (adaptivity)")
    ap.add_argument("--channels", type=int, default=25)
    ap.add_argument(
        "--clip", type=float, default=2.0, help="update L2 bound (central, local; adaptive: initial)"
    )
    ap.add_argument("--grad_clip", type=float, default=1.0, help="DP-SGD per-example gradient bound")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--epsilons", type=float, nargs="+", default=EPSILONS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--runs", type=Path, default=Path("runs/privacy"))
    ap.add_argument(
        "--merge", type=Path, nargs="+", default=None, help="only print the rows of these --out files"
    )
    a = ap.parse_args(argv)
    if a.merge:
        files = [json.loads(f.read_text()) for f in a.merge]
        rows = [{"seed": int(f["args"]["seed"]), **r} for f in files for r in f["rows"]]
        print_table(rows, files[0]["args"])
        return rows
    torch.set_num_threads(1)
    rows = [one_run("fedavg", math.inf, a, a.runs)] if "fedavg" in a.methods else []
    rows += [one_run(m, e, a, a.runs) for m in a.methods if m != "fedavg" for e in a.epsilons]
    args = {k: str(v) for k, v in vars(a).items()}
    print_table(rows, args)
    if a.out is not None:
        a.out.write_text(json.dumps({"args": args, "rows": rows}, indent=1))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Each cell (method, target epsilon) over its seeds: ``n``, mean and sample standard deviation of the test
    accuracy (sd 0 for one seed) and the seeds, in the order the cells first appear."""
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["target_eps"]), []).append(r)
    out = []
    for (method, eps), rs in cells.items():
        accs = [r["test_acc"] for r in rs]
        out.append(
            {
                "method": method,
                "target_eps": eps,
                "n": len(accs),
                "mean": statistics.fmean(accs),
                "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "seeds": sorted(r["seed"] for r in rs),
            }
        )
    return out


def print_table(rows: list[dict], args: dict[str, str]) -> None:
    """The rows as a rich table, then each cell's mean +- sd over seeds when a cell has several; "vs FedAvg" is
    against the non-private row of the same seed (its mean over seeds in the summary) when there is one."""
    base = {r["seed"]: r["test_acc"] for r in rows if r["method"] == "fedavg"}
    table = Table(
        title=f"MNIST-1D, {args['clients']} clients, {args['train']} samples, {args['per_round']} per round "
        f"(Poisson), {args['rounds']} rounds, {args['local_epochs']} local epoch(s), server "
        f"{args.get('server_opt', 'momentum')} lr {args.get('server_lr', '1.0')}, clip {args['clip']}"
    )
    for col in (
        "method",
        "seed",
        "target eps",
        "reported eps",
        "noise mult.",
        "test acc",
        "vs FedAvg",
        "final clip",
        "s",
    ):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        b = base.get(r["seed"])
        table.add_row(
            str(r["method"]),
            str(r["seed"]),
            f"{r['target_eps']:g}",
            f"{r['eps']:.3g}",
            f"{r['noise_multiplier']:.3f}",
            f"{r['test_acc']:.2%}",
            f"{(r['test_acc'] - b) * 100:+.1f} pt" if b is not None else "n/a",
            f"{r['clip']:.3g}",
            f"{r['wall_s']:.0f}",
        )
    console = Console(width=120)
    console.print(table)
    cells = summarize(rows)
    if all(c["n"] == 1 for c in cells):
        return
    fed = next((c for c in cells if c["method"] == "fedavg"), None)
    summary = Table(title="mean +- sd over seeds")
    for col in ("method", "target eps", "seeds", "test acc", "vs FedAvg"):
        summary.add_column(col, justify="left" if col == "method" else "right")
    for c in cells:
        summary.add_row(
            c["method"],
            f"{c['target_eps']:g}",
            " ".join(map(str, c["seeds"])),
            f"{c['mean']:.2%} +- {c['sd']:.2%}",
            f"{(c['mean'] - fed['mean']) * 100:+.1f} pt" if fed is not None else "n/a",
        )
    console.print(summary)


if __name__ == "__main__":
    main()
