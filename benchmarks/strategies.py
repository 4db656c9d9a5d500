"""Strategies on non-IID MNIST-1D: FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, SCAFFOLD, FedProx, FedExP and FedDyn
(the last two not run by default), FedNTD with CCVR's calibration of the global model (``fedntd_ccvr``, judged on the
calibrated model), and personalization (FedAvg-FT, FedPer, Ditto, isolated local training).

Each strategy runs its recipe (``recipes/mnist1d/<name>.yaml``: 20 clients, 10 per round, MNIST1DCNN, batch 16, cosine
client LR decay) through the CLI, with the number of clients, the Dirichlet concentration, the number of rounds and of
local epochs overridden, and the test set evaluated every round (personalized evaluation after the last round only).
``fedprox`` is fedavg.yaml with ``FedProx(mu=0.01)`` (fedprox.yaml adds stragglers); ``fedper`` warms up for half the
rounds (``warmup_rounds=rounds // 2``, as fedper.yaml's 25 of 50). The table has the final test accuracy (the mean
of the last ``--window`` evaluations, default 3: one evaluation swings by a point or two) and the best, the first
round whose trailing ``--window``-evaluation mean reaches FedAvg's final accuracy at the same alpha ("rounds to
FedAvg"), the kilobytes per round up and down and the wall time, and a line per alpha checks the target "the best
server-side strategy (FedAvgM, FedAdam, FedYogi, FedAdagrad, SCAFFOLD, FedProx, FedExP, FedDyn, FedNTD + CCVR) reaches FedAvg's final global
accuracy in at most half the rounds". The recipes' client optimizers differ where the algorithm asks for it: SCAFFOLD runs plain SGD
(its option II assumes it), the others fedavg.yaml's SGD with momentum; ``fedavg_sgd`` is FedAvg with SCAFFOLD's
client optimizer, to tell the effect of the control variates from that of the optimizer.

Every run also has personalized evaluation (``PersonalEval``: each client's 100-example slice of the test set with its
label proportions, the same slices for every strategy): "global on clients" is the global model's mean and 10th
percentile accuracy over the 20 clients' slices after the last round; "personal" the personal models' (FedAvg-FT: the
global model fine-tuned on the client's shard; FedPer: shared convolutions + the client's own head; Ditto: the
client's own model). ``isolated`` is Ditto with ``lam=0`` and ``personal_init="initial"``: each client's personal
model trains on its own data only, from the initial weights, the same epochs on the same rounds as Ditto's (its
global model is FedAvg's and is not shown). ``--num_samples`` sets how much MNIST-1D is generated (80 % train): 25,000
give 100 clients the 200 training examples each on average that 5,000 give 20.

Run from the repository root::

    python benchmarks/strategies.py                                  # alpha 0.1 and 0.5, 30 rounds, 5 local epochs
    python benchmarks/strategies.py --num_clients 100 --num_samples 25000 --rounds 40   # 100 clients, 10 per round
    python benchmarks/strategies.py --alphas 0.1 --rounds 20 --local_epochs 2 --out runs/strategies-0.1.json
    python benchmarks/strategies.py --alphas 0.1 --strategies fedavg_ft fedper ditto isolated   # personalization
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lightning_fed.cli import run

DEFAULT = ["fedavg", "fedavgm", "fedadam", "fedyogi", "scaffold", "fedprox", "fedntd_ccvr", "fedavg_ft", "fedper", "ditto",
           "isolated"]
STRATEGIES = [*DEFAULT, "fedadagrad", "fedavg_sgd", "fedexp", "feddyn"]
SERVER_SIDE = ("fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fedprox", "fedexp", "feddyn", "fedntd_ccvr")
PERSONAL = ("fedavg_ft", "fedper", "ditto", "isolated")  # rows with personal models
NO_GLOBAL = ("fedper", "isolated")  # FedPer has no global model; isolated training's is FedAvg's
# fedavg_sgd: fedavg.yaml with SCAFFOLD's client optimizer (plain SGD, lr 0.2), to separate the two changes
VARIANTS = {"fedavg_sgd": ("fedavg", ["--model.init_args.momentum", "0.0", "--model.init_args.lr", "0.2"]),
            "isolated": ("ditto", ["--loop.strategy.init_args.lam", "0.0",
                                   "--loop.strategy.init_args.personal_init", "initial"]),
            "fedprox": ("fedavg", ["--loop.strategy", "lightning_fed.strategies.FedProx",
                                   "--loop.strategy.init_args.mu", "0.01"])}
PERSONAL_EVAL = ["--loop.personal_eval", "lightning_fed.PersonalEval", "--loop.personal_eval.init_args.holdout", "test",
                 "--loop.personal_eval.init_args.size", "100"]
ROOT = Path(__file__).parents[1] / "recipes" / "mnist1d"
WINDOW = 3  # "final accuracy": the mean of the last 3 evaluations (every round here), for every strategy


def one_run(name: str, alpha: float, rounds: int, local_epochs: int, seed: int, out: Path,
            num_clients: int = 20, min_samples: int = 10, num_samples: int = 5000, more: Sequence[str] = (),
            label: str | None = None) -> dict[str, object]:
    """One recipe at one alpha: the per-round test accuracy, the last round's personalized accuracies, the bytes
    per round and the wall time. ``more``: further CLI arguments (a tuning grid's); ``label``: the row's name and
    run folder (default ``name``)."""
    t0 = time.perf_counter()
    recipe, extra = VARIANTS.get(name, (name, []))
    extra = [*extra, *more]
    if name == "fedper":  # FedAvg on the whole model for the first half of the rounds, then personal heads
        extra = [*extra, "--loop.strategy.init_args.warmup_rounds", str(rounds // 2)]
    res = run(["fit", "--config", str(ROOT / f"{recipe}.yaml"), *extra, *PERSONAL_EVAL, "--loop.rounds", str(rounds),
               "--loop.local_epochs", str(local_epochs), "--loop.partition.init_args.alpha", str(alpha),
               "--loop.seed", str(seed), "--loop.test_every", "1", "--loop.eval_every", str(rounds),
               "--loop.num_clients", str(num_clients), "--loop.partition.init_args.min_samples", str(min_samples),
               "--data.init_args.num_samples", str(num_samples),
               "--loop.checkpoint_every", "0", "--loop.verbose", "false",
               "--loop.plot", "false", "--loop.output_dir", str(out / f"{(label or name).replace(' ', '_')}-{alpha}-{num_clients}")])
    accs = [float(h["test_acc"]) for h in res.history if "test_acc" in h]
    calibrated = [float(h["ccvr/test_acc"]) for h in res.history if "ccvr/test_acc" in h]  # FedLoop(calibration=)
    calibration_bytes = [float(h["ccvr/bytes_up"]) for h in res.history if "ccvr/bytes_up" in h]
    last = res.history[-1]
    personal = {k: float(last[f"personal/{k}"]) for k in ("global_acc_mean", "global_acc_p10", "acc_mean", "acc_p10")
                if f"personal/{k}" in last}
    n = len(res.history)
    return {"strategy": label or name, "alpha": alpha, "clients": num_clients, "acc": accs,
            "uplink_mb": sum(h["bytes_up"] for h in res.history) / 1e6,
            "kb_up_per_round": sum(h["bytes_up"] for h in res.history) / n / 1e3,
            "kb_down_per_round": sum(h["bytes_down"] for h in res.history) / n / 1e3,
            "wall_s": time.perf_counter() - t0, "personal": personal,
            **({"acc_calibrated": calibrated, "kb_up_per_calibration": calibration_bytes[-1] / 1e3}
               if calibrated else {})}


def pct(row: dict, key: str) -> str:
    """A personalized accuracy of ``row`` as a percentage, ``-`` where the row has none."""
    v = row["personal"].get(key)
    return "-" if v is None else f"{v:.2%}"


def scored(row: dict) -> list[float]:
    """The test accuracies a row is judged on: the calibrated global model's where the run calibrated it
    (``FedLoop(calibration=CCVR())``: ``fedntd_ccvr``), else the global model's."""
    return row.get("acc_calibrated") or row["acc"]


def trailing_mean(accs: Sequence[float], window: int = WINDOW) -> list[float]:
    """The mean of each round's accuracy and the ``window - 1`` before it (fewer in the first rounds)."""
    return [sum(accs[max(0, i + 1 - window) : i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(accs))]


def final_acc(accs: Sequence[float], window: int = WINDOW) -> float:
    """A run's final accuracy: the mean of its last ``window`` evaluations (one evaluation swings by a point or two)."""
    return trailing_mean(accs, window)[-1]


def rounds_to(accs: Sequence[float], target: float, window: int = WINDOW) -> int | None:
    """The first round (1-based, at least ``window``) whose trailing ``window``-evaluation mean reaches ``target``;
    ``None`` if none does. With ``target = final_acc(fedavg)`` both sides are measured the same way."""
    smooth = trailing_mean(accs, window)
    return next((i + 1 for i, a in enumerate(smooth) if i + 1 >= window and a >= target), None)


def main(argv: list[str] | None = None) -> None:
    """Run every strategy at every alpha and print the table (and write it as JSON with ``--out``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--strategies", nargs="+", default=DEFAULT, choices=STRATEGIES)
    ap.add_argument("--num_clients", type=int, default=20)
    ap.add_argument("--min_samples", type=int, default=10,
                    help="the partition's minimum examples per client (the recipes' 10)")
    ap.add_argument("--num_samples", type=int, default=5000,
                    help="MNIST-1D samples generated, 80 %% train (5000: 200 per client at 20 clients)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--local_epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=int, default=WINDOW,
                    help="evaluations averaged into a final accuracy and into the rounds-to-FedAvg measure (1: last)")
    ap.add_argument("--output_dir", type=Path, default=Path("runs/bench-strategies"))
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON (after every run)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out (same strategy and alpha) and run only the missing ones")
    args = ap.parse_args(argv)
    names = ["fedavg", *[s for s in args.strategies if s != "fedavg"]]  # FedAvg first: the others' target
    done = json.loads(args.out.read_text())["rows"] if args.resume and args.out and args.out.exists() else []
    rows = []
    for a in args.alphas:
        for n in names:
            old = next((r for r in done if r["strategy"] == n and r["alpha"] == a), None)
            rows.append(old or one_run(n, a, args.rounds, args.local_epochs, args.seed, args.output_dir,
                                       args.num_clients, args.min_samples, args.num_samples))
            if args.out is not None:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                               indent=1))
    table = Table(title=f"MNIST-1D, {args.num_clients} clients, 10 per round, {args.rounds} rounds, "
                        f"{args.local_epochs} local epochs, seed {args.seed} (test accuracy)")
    for col in ("strategy", "alpha", f"final acc (last {args.window})", "best acc", "rounds to FedAvg", "global on clients mean / p10",
                "personal mean / p10", "beats FedAvg and isolated", "KB up / round", "KB down / round", "wall s"):
        table.add_column(col)
    for row in rows:
        base = next(r for r in rows if r["strategy"] == "fedavg" and r["alpha"] == row["alpha"])
        accs, target = scored(row), final_acc(base["acc"], args.window)
        reach = rounds_to(accs, target, args.window)
        row["rounds_to_fedavg"] = reach
        beats = "-"
        iso = next((r for r in rows if r["strategy"] == "isolated" and r["alpha"] == row["alpha"]), None)
        if row["strategy"] in PERSONAL and row["strategy"] != "isolated" and iso is not None:
            mine = row["personal"]["acc_mean"]
            beats = "yes" if mine > base["personal"]["global_acc_mean"] and mine > iso["personal"]["acc_mean"] else "no"
            row["beats_fedavg_and_isolated"] = beats == "yes"
        no_global = row["strategy"] in NO_GLOBAL
        table.add_row(str(row["strategy"]), str(row["alpha"]), "-" if no_global else f"{final_acc(accs, args.window):.2%}",
                      "-" if no_global else f"{max(accs):.2%}",
                      "-" if reach is None or no_global else str(reach),
                      "-" if no_global else f"{pct(row, 'global_acc_mean')} / {pct(row, 'global_acc_p10')}",
                      f"{pct(row, 'acc_mean')} / {pct(row, 'acc_p10')}", beats, f"{row['kb_up_per_round']:.1f}",
                      f"{row['kb_down_per_round']:.1f}", f"{row['wall_s']:.0f}")
    console = Console(width=200)
    console.print(table)
    for alpha in args.alphas:
        server = [r for r in rows if r["alpha"] == alpha and r["strategy"] in SERVER_SIDE]
        if not server:
            continue
        best = min(server, key=lambda r: (r["rounds_to_fedavg"] or args.rounds + 1, -final_acc(scored(r), args.window)))
        reach = best["rounds_to_fedavg"]
        verdict = "met" if reach is not None and reach <= args.rounds / 2 else "not met"
        console.print(f"alpha {alpha}: fastest server-side strategy {best['strategy']} reaches FedAvg's final accuracy "
                      f"at round {reach if reach is not None else '-'} of {args.rounds}; target (at most "
                      f"{args.rounds / 2:g} rounds) {verdict}")
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
