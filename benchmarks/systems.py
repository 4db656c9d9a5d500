"""Devices, networks and time: simulated time to 90 % test accuracy on MNIST-1D with a heterogeneous fleet.

Every run is the FedAvg recipe's model and split (``recipes/mnist1d/fedavg.yaml``: 20 clients, Dirichlet(0.5), 10
per round, 5 local epochs, MNIST1DCNN, batch 16, cosine client-LR decay) on the ``"heterogeneous"`` device preset
(30 % low-end phones, 40 % mid-range, 20 % flagship, 10 % edge boxes: the slowest clients compute ~65x and upload
~20x slower than the fastest; docs/systems.md), through the recipes ``stragglers_deadline.yaml`` and
``overselect.yaml`` with overrides. The test set is evaluated every round; the table has, per method, the final test
accuracy, the first round reaching 90 % and the simulated seconds until then, the total simulated time, the bytes,
and how many sampled clients were late (dropped, or with no step that fits), did partial work or dropped out.

Methods (``--methods``):

* ``sync``: synchronous FedAvg that waits for every client (no deadline);
* ``drop`` / ``partial``: a 0.1 s deadline; stragglers are dropped, or do only the local steps that fit;
  ``drop-0.2s`` / ``partial-0.2s``: the same with a 0.2 s deadline;
* ``overselect``: 13 clients sampled, the first 10 to arrive aggregated;
* ``sync-codecs`` / ``partial-codecs``: ``sync`` / ``partial`` with the 109x uplink codec of
  ``codec_tcs.yaml`` and an 8-bit downlink (``Blockwise8bit``);
* ``down-int8`` / ``down-4bit`` / ``down-delta4``: ``sync`` with a downlink codec only: 8-bit or 4-bit blockwise
  weights, or the 4-bit delta to the model each client last received (``DownlinkDelta(Blockwise4bit())``): the
  accuracy cost of downlink compression;
* ``fedbuff``: asynchronous buffered aggregation (``recipes/mnist1d/fedbuff.yaml``: 10 clients in flight, a server
  version every 5 arrivals, staleness weight ``1/sqrt(1+tau)``, server lr 1); ``fedbuff-k3`` / ``fedbuff-k10``:
  a version every 3 / 10 arrivals; ``fedbuff-c15``: 15 in flight; ``fedbuff-lr2``: server lr 2;
  ``fedbuff-const``: no staleness weight; ``fedbuff-diff``: with ``codec_differential.yaml``'s 103x uplink codec;
  ``fedbuff-pruned``: ``fedavg_pruning.yaml``'s structured pruning (3 steps of 36 %) at versions 10, 20, 30;
  ``fedbuff-diff-pruned``: both; ``fedbuff-diff-delta4``: the 103x uplink and the 4-bit downlink delta; ``fedbuff-k3-diff`` / ``fedbuff-k3-pruned``: the same with a version every 3
  arrivals. They run ``--versions`` server versions (default 200) instead of ``--rounds``.

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/systems.py                       # every method, 100 rounds
    OMP_NUM_THREADS=1 python benchmarks/systems.py --methods sync partial --rounds 30 --out runs/systems.json
    python benchmarks/systems.py --rounds 30 --load runs/a.json runs/b.json     # one table of several --out files
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lightning_fed.cli import run

ROOT = Path(__file__).parents[1] / "recipes" / "mnist1d"
TCS = json.dumps(
    {
        "class_path": "lightning_fed.codecs.TimeCorrelatedTopK",
        "init_args": {
            "ratio": 0.005,
            "mask_ratio": 0.18,
            "values": {
                "class_path": "lightning_fed.codecs.Sign",
                "init_args": {"block": 64, "scale_dtype": "float16"},
            },
        },
    }
)
INT8 = json.dumps({"class_path": "lightning_fed.codecs.Blockwise8bit"})
FOUR = json.dumps({"class_path": "lightning_fed.codecs.Blockwise4bit"})
DELTA4 = json.dumps(
    {
        "class_path": "lightning_fed.codecs.DownlinkDelta",
        "init_args": {"inner": {"class_path": "lightning_fed.codecs.Blockwise4bit"}},
    }
)
DIFF = json.dumps(  # codec_differential.yaml's codec: 103x, the best >= 100x codec over 48 seeds (RESULTS.md)
    {
        "class_path": "lightning_fed.codecs.Differential",
        "init_args": {
            "smoothing": 0.5,
            "inner": {
                "class_path": "lightning_fed.codecs.TopK",
                "init_args": {
                    "ratio": 0.031,
                    "error_feedback": True,
                    "warmup_rounds": 10,
                    "warmup_start": 0.1,
                    "values": {
                        "class_path": "lightning_fed.codecs.Sign",
                        "init_args": {"block": 32, "scale_dtype": "float16"},
                    },
                },
            },
        },
    }
)
PRUNE = json.dumps(  # fedavg_pruning.yaml's pruning (3 steps of 36 %), early in the run
    {
        "class_path": "lightning_fed.callbacks.StructuredPruning",
        "init_args": {
            "ratio": 0.36,
            "importance": "magnitude",
            "at": [10, 20, 30],
            "example_input_shape": [1, 40],
        },
    }
)
FEDBUFF: list[str] = []  # the recipe as it is
K3 = ["--loop.strategy.init_args.buffer_size", "3"]
SYNC = ["--loop.clock.init_args.deadline", "null", "--loop.clock.init_args.straggler", "drop"]
METHODS: dict[str, tuple[str, list[str]]] = {  # name: (recipe, overrides)
    "sync": ("stragglers_deadline", SYNC),
    "drop": (
        "stragglers_deadline",
        ["--loop.clock.init_args.straggler", "drop", "--loop.clock.init_args.deadline", "0.1"],
    ),
    "partial": ("stragglers_deadline", ["--loop.clock.init_args.deadline", "0.1"]),
    "drop-0.2s": (
        "stragglers_deadline",
        ["--loop.clock.init_args.straggler", "drop", "--loop.clock.init_args.deadline", "0.2"],
    ),
    "partial-0.2s": ("stragglers_deadline", ["--loop.clock.init_args.deadline", "0.2"]),
    "overselect": ("overselect", []),
    "sync-codecs": ("stragglers_deadline", [*SYNC, "--loop.codec", TCS, "--loop.downlink_codec", INT8]),
    "partial-codecs": (
        "stragglers_deadline",
        ["--loop.clock.init_args.deadline", "0.1", "--loop.codec", TCS, "--loop.downlink_codec", INT8],
    ),
    "down-int8": ("stragglers_deadline", [*SYNC, "--loop.downlink_codec", INT8]),
    "down-4bit": ("stragglers_deadline", [*SYNC, "--loop.downlink_codec", FOUR]),
    "down-delta4": ("stragglers_deadline", [*SYNC, "--loop.downlink_codec", DELTA4]),
    "fedbuff": ("fedbuff", []),
    "fedbuff-k3": ("fedbuff", [*FEDBUFF, "--loop.strategy.init_args.buffer_size", "3"]),
    "fedbuff-k10": ("fedbuff", [*FEDBUFF, "--loop.strategy.init_args.buffer_size", "10"]),
    "fedbuff-c15": ("fedbuff", [*FEDBUFF, "--loop.strategy.init_args.concurrency", "15"]),
    "fedbuff-lr2": ("fedbuff", [*FEDBUFF, "--loop.strategy.init_args.server_lr", "2.0"]),
    "fedbuff-const": ("fedbuff", [*FEDBUFF, "--loop.strategy.init_args.staleness", "constant"]),
    "fedbuff-diff": ("fedbuff", [*FEDBUFF, "--loop.codec", DIFF]),
    "fedbuff-pruned": ("fedbuff", [*FEDBUFF, "--loop.callbacks+", PRUNE]),
    "fedbuff-diff-pruned": ("fedbuff", [*FEDBUFF, "--loop.codec", DIFF, "--loop.callbacks+", PRUNE]),
    "fedbuff-diff-delta4": ("fedbuff", [*FEDBUFF, "--loop.codec", DIFF, "--loop.downlink_codec", DELTA4]),
    "fedbuff-k3-diff": ("fedbuff", [*FEDBUFF, *K3, "--loop.codec", DIFF]),
    "fedbuff-k3-pruned": ("fedbuff", [*FEDBUFF, *K3, "--loop.callbacks+", PRUNE]),
}
TARGET = 0.90
SECOND = 0.85


def one_run(name: str, rounds: int, seed: int, out: Path, versions: int = 200) -> dict[str, object]:
    """One method: per-round test accuracy and simulated time, bytes, the clock's counts and the wall time
    (asynchronous methods run ``versions`` server versions instead of ``rounds`` rounds)."""
    t0 = time.perf_counter()
    recipe, extra = METHODS[name]
    if recipe == "fedbuff":
        rounds = versions
    res = run(
        [
            "fit",
            "--config",
            str(ROOT / f"{recipe}.yaml"),
            *extra,
            "--loop.rounds",
            str(rounds),
            "--loop.seed",
            str(seed),
            "--loop.test_every",
            "1",
            "--loop.checkpoint_every",
            "0",
            "--loop.verbose",
            "false",
            "--loop.plot",
            "false",
            "--loop.loggers",
            "[]",
            "--loop.output_dir",
            str(out / name),
        ]
    )
    h = res.history
    return {
        "method": name,
        "acc": [float(x.get("test_acc", float("nan"))) for x in h],
        "sim_time_s": [float(x["sim_time_s"]) for x in h],
        "up_mb": sum(x["bytes_up"] for x in h) / 1e6,
        "down_mb": sum(x["bytes_down"] for x in h) / 1e6,
        **{
            k: int(sum(x.get(k, 0) for x in h))
            for k in ("sim_late", "sim_partial", "sim_dropouts", "sim_extra", "sim_stale", "rejected")
        },
        "staleness_mean": sum(x.get("staleness_mean", 0.0) for x in h) / len(h),
        "staleness_max": max(x.get("staleness_max", 0.0) for x in h),
        "rounds": len(h),
        "wall_s": time.perf_counter() - t0,
    }


def to_target(r: dict[str, object], target: float = TARGET) -> tuple[int | None, float | None]:
    """The first round (1-based) whose test accuracy reaches ``target``, and the simulated seconds until then."""
    i = next((i for i, a in enumerate(r["acc"]) if a >= target), None)  # type: ignore[arg-type]
    return (None, None) if i is None else (i + 1, r["sim_time_s"][i])  # type: ignore[index]


def table(results: list[dict[str, object]], rounds: int, seed: int) -> Table:
    """The rich table of every method ("vs sync": sync's simulated time to the target over the method's)."""
    t = Table(
        title=f"MNIST-1D, heterogeneous fleet: simulated time to {TARGET:.0%} (and {SECOND:.0%}) test accuracy "
        f"({rounds} rounds; asynchronous methods: the versions in 'rounds to 90%''s run, seed {seed})"
    )
    for col in (
        "method",
        "final test acc",
        "rounds to 90%",
        "sim s to 90%",
        "vs sync",
        "sim s to 85%",
        "vs sync ",
        "sim s total",
        "up MB",
        "down MB",
        "late",
        "partial",
        "dropouts",
        "discarded",
        "stale",
        "staleness mean/max",
        "wall s",
    ):
        t.add_column(col, justify="left" if col == "method" else "right")
    sync = next((r for r in results if r["method"] == "sync"), None)
    base = {g: to_target(sync, g)[1] if sync else None for g in (TARGET, SECOND)}
    for r in results:
        n, s = to_target(r)
        s2 = to_target(r, SECOND)[1]
        t.add_row(
            r["method"],
            f"{r['acc'][-1]:.2%}",
            "-" if n is None else str(n),
            "-" if s is None else f"{s:.2f}",
            f"{base[TARGET] / s:.2f}x" if base[TARGET] and s else "-",
            "-" if s2 is None else f"{s2:.2f}",
            f"{base[SECOND] / s2:.2f}x" if base[SECOND] and s2 else "-",
            f"{r['sim_time_s'][-1]:.2f}",
            f"{r['up_mb']:.3f}",
            f"{r['down_mb']:.3f}",
            str(r["sim_late"]),
            str(r["sim_partial"]),
            str(r["sim_dropouts"]),
            str(r["sim_extra"]),
            str(r.get("sim_stale", 0)),
            f"{r.get('staleness_mean', 0.0):.2f}/{r.get('staleness_max', 0.0):.0f}",
            f"{r['wall_s']:.0f}",
        )
    return t


def main(argv: list[str] | None = None) -> None:
    """Run the methods and print the table (and write the results as JSON with ``--out``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument(
        "--versions", type=int, default=200, help="server versions of the asynchronous (fedbuff) methods"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=Path, default=Path("runs/systems"), help="where the runs are written")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument(
        "--load",
        type=Path,
        nargs="+",
        default=None,
        help="print the table of earlier --out files (e.g. methods run in parallel) instead of running",
    )
    args = ap.parse_args(argv)
    if args.load is not None:
        merged = [r for path in args.load for r in json.loads(path.read_text())]
        Console(width=200).print(table(merged, args.rounds, args.seed))
        return
    results = []
    for name in args.methods:
        results.append(one_run(name, args.rounds, args.seed, args.runs, args.versions))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results))
    Console(width=200).print(table(results, args.rounds, args.seed))


if __name__ == "__main__":
    main()
