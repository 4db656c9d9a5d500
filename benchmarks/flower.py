"""Deployment through Flower on localhost against FedLoop in one process: seconds and bytes per round, side by
side in one run.

The work, identical for both: ``recipes/mnist1d/fedavg.yaml`` with ``--loop.num_clients N --loop.clients_per_round
N`` (every client every round), ``--loop.local_epochs 1``, R rounds, the recipe's MNIST-1D data and seed.

(a) FedLoop: ``lightning-fed fit`` in this process.
(b) Flower: a SuperLink and N SuperNodes on localhost, separate processes (``lightning_fed.flower.local``), the app
    written by ``lightning-fed flower --app-dir`` and started with ``flwr run``; Flower starts one ``flwr-clientapp``
    process per message, which imports lightning_fed and builds the recipe's client side every round.

Per round, from each run's history.json (the server's own timing: plan, the clients' work, collect, aggregate,
evaluate): ``seconds``; ``bytes_up``/``bytes_down``, the codec's bytes (the same in both runtimes); and, for Flower,
``flower_bytes_up``/``flower_bytes_down``, the same messages as Flower counts them (``count_bytes``: the codec's
bytes, our JSON header and the record keys). Round 1 carries one-off costs (Flower: connecting the nodes is done
before it, but the first ClientApp processes load the data cache); the steady state is the mean of rounds 2..R.
The final weights are compared (``torch.equal``).

    python benchmarks/flower.py --rounds 3 --clients 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def recipe_args(rounds: int, clients: int) -> list[str]:
    """The benchmark's recipe arguments."""
    return [
        "--config",
        str(ROOT / "recipes" / "mnist1d" / "fedavg.yaml"),
        "--loop.num_clients",
        str(clients),
        "--loop.clients_per_round",
        str(clients),
        "--loop.rounds",
        str(rounds),
        "--loop.local_epochs",
        "1",
        "--loop.eval_every",
        str(rounds),
        "--loop.checkpoint_every",
        "0",
        "--loop.verbose",
        "false",
        "--loop.plot",
        "false",
        "--loop.loggers",
        "[]",
    ]


def run_fedloop(args: list[str], out: Path) -> tuple[Path, float]:
    """FedLoop in this process; the run folder and the wall seconds."""
    from lightning_fed.cli import run

    t = time.perf_counter()
    res = run(["fit", *args, "--loop.output_dir", str(out)])
    return res.run_dir, time.perf_counter() - t


def run_flower(args: list[str], clients: int, work: Path) -> tuple[Path, float]:
    """The same recipe on a localhost Flower deployment; the run folder and the wall seconds of ``flwr run``."""
    from lightning_fed.flower.command import main as flower_main
    from lightning_fed.flower.local import LocalDeployment

    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    flower_main(
        [
            *args,
            "--loop.output_dir",
            str(work / "runs"),
            "--app-dir",
            str(work / "app"),
            "--round-timeout",
            "900",
            "--connect-timeout",
            "600",
        ]
    )
    with LocalDeployment(num_nodes=clients, workdir=work / "deploy") as dep:
        t = time.perf_counter()
        dep.run_app(work / "app", timeout_s=1800)
        wall = time.perf_counter() - t
    (run_dir,) = sorted((work / "runs").glob("version_*"))
    return run_dir, wall


def summary(run_dir: Path) -> dict[str, float]:
    """Per-round numbers of a run: round 1 seconds, mean seconds of rounds 2..R, bytes per round."""
    h = json.loads((run_dir / "history.json").read_text())
    rest = [r["seconds"] for r in h[1:]] or [h[0]["seconds"]]
    out = {"round1_s": h[0]["seconds"], "steady_s": statistics.mean(rest), "rounds": len(h)}
    for key in ("bytes_up", "bytes_down", "flower_bytes_up", "flower_bytes_down"):
        if key in h[-1]:
            out[key] = statistics.mean(r[key] for r in h)
    return out


def main(argv: list[str] | None = None) -> None:
    """Run both and print the table (and ``--json``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    torch.set_num_threads(1)
    args = recipe_args(a.rounds, a.clients)
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        fed_dir, fed_wall = run_fedloop(args, Path(tmp) / "fedloop")
        fl_dir, fl_wall = run_flower(args, a.clients, Path(tmp) / "flower")
        fed, fl = summary(fed_dir), summary(fl_dir)
        a_w, b_w = load_file(fed_dir / "final.safetensors"), load_file(fl_dir / "final.safetensors")
        same = a_w.keys() == b_w.keys() and all(torch.equal(a_w[k], b_w[k]) for k in a_w)
    table = Table(
        title=f"FedAvg recipe, {a.clients} clients (all each round), {a.rounds} rounds, 1 local epoch"
    )
    for col in (
        "runtime",
        "wall s",
        "round 1 s",
        "s / round (2..R)",
        "codec bytes up / round",
        "Flower bytes up / round",
        "codec bytes down / round",
        "Flower bytes down / round",
    ):
        table.add_column(col, justify="right")

    def row(name: str, wall: float, s: dict[str, float]) -> list[str]:
        fmt = lambda k: f"{s[k]:,.0f}" if k in s else "-"
        return [
            name,
            f"{wall:.1f}",
            f"{s['round1_s']:.2f}",
            f"{s['steady_s']:.2f}",
            fmt("bytes_up"),
            fmt("flower_bytes_up"),
            fmt("bytes_down"),
            fmt("flower_bytes_down"),
        ]

    table.add_row(*row("FedLoop (1 process)", fed_wall, fed))
    table.add_row(*row("Flower, localhost SuperLink + SuperNodes", fl_wall, fl))
    console = Console(width=160)
    console.print(table)
    console.print(
        f"overhead per round (steady): {fl['steady_s'] - fed['steady_s']:.2f} s "
        f"({fl['steady_s'] / fed['steady_s']:.1f}x); final weights bit-identical: {same}"
    )
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "fedloop": {**fed, "wall_s": fed_wall},
                    "flower": {**fl, "wall_s": fl_wall},
                    "same_weights": same,
                },
                indent=1,
            )
        )
    if not same:
        sys.exit("the final weights differ")


if __name__ == "__main__":
    main()
