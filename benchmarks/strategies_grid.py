"""Tuning grid behind the target "at Dirichlet 0.1 the best server-side strategy reaches FedAvg's final global
accuracy in at most half the rounds" (MNIST-1D, 20 clients, 10 per round, 5 local epochs, seed 0; 100 clients with
``--num_clients 100 --num_samples 25000``).

Every configuration is a recipe of ``benchmarks/strategies.py`` with some CLI arguments changed: FedAvg's client
learning rate, FedAvgM's server learning rate and momentum (and the client learning rate), FedAdam's and FedYogi's
server learning rate and ``tau`` (the grid of Reddi et al. 2021, Section 5, narrowed to this model), SCAFFOLD's
client learning rate with plain SGD and with momentum 0.9, FedExP's client learning rate and its averaging of the
last two iterates, FedDyn's ``alpha`` (the paper's 0.1, 0.01, 0.001), client learning rate and evaluated model
(``mean``: the mean of the round's client models), and FedDF with one architecture (``feddf_fedavg.yaml``: server-side
ensemble distillation on unlabeled proxy records; its distillation steps and learning rate, the client learning rate,
FedAvgM's server momentum), which counts as a server-side strategy in the verdicts, and FedRS (``fedrs.yaml``: the
restricted softmax on the clients; its ``alpha`` and the client learning rate), counted like SCAFFOLD and FedDyn, and
FedACG (``fedacg.yaml``: the server's Nesterov momentum ``lambda`` and the clients' proximal pull ``beta``).
"final": the mean test accuracy of the last 3 evaluations (one per round); FedAvg's target is the best FedAvg
configuration's final accuracy; "rounds to FedAvg" is the first round whose trailing 3-evaluation mean reaches it.
Results go to ``--out`` after every run, and ``--resume`` keeps the rows already there.

Two readings of the target besides the default one: ``--constant_lr`` drops the recipes' client learning-rate decay
(``RoundLRDecay``) from every run, so that no method is judged mid-schedule; ``--target_from`` takes the target from
an earlier grid's JSON (its best FedAvg row) and judges runs of their own length against it: a server-side run of at
most half that grid's rounds, each with its schedule spanning its own rounds, whose final accuracy reaches the target.

Run from the repository root::

    python benchmarks/strategies_grid.py --out runs/grid-0.1.json --resume
    python benchmarks/strategies_grid.py --only fedavg fedavgm --out runs/grid-0.1.json --resume
    python benchmarks/strategies_grid.py --constant_lr --labels "fedavg lr0.1" "fedavgm s1 m0.7" --out runs/c.json
    python benchmarks/strategies_grid.py --rounds 15 --only fedavgm fedadam --target_from runs/grid-0.1.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table
from strategies import SERVER_SIDE, final_acc, one_run, rounds_to

CLIENT_LR = "--model.init_args.lr"
MOMENTUM = "--model.init_args.momentum"
FEDEXP = "--loop.strategy.init_args."
LAST = [FEDEXP + "average_last", "false"]
# the recipes' only callback is RoundLRDecay: without it the client learning rate is constant
NO_DECAY = ["--loop.callbacks", "[]"]
SERVER_OPT = "--loop.strategy.init_args.server_optimizer.init_args."
DYN_ALPHA = "--loop.strategy.init_args.alpha"
DYN_MEAN = ["--loop.strategy.init_args.evaluate_mean", "true"]
DYN_THETA = ["--loop.strategy.init_args.evaluate_mean", "false"]  # feddyn.yaml evaluates the mean
DF = "--loop.strategy.init_args."
RS_ALPHA = "--loop.strategy.init_args.alpha"
ACG_BETA = "--loop.strategy.init_args.mu"  # FedACG's beta: FedProx's mu
NTD = "--loop.strategy.init_args."
MOMENTUM_OPT = "lightning_fed.strategies.ServerMomentum"  # fedavgm.yaml's server optimizer (lr 1)
# FedDF only changes the server's aggregation (the clients train as in FedAvg): a server-side strategy here; FedRS
# changes the clients' loss, as SCAFFOLD and FedDyn (in SERVER_SIDE) do
GRID_SERVER_SIDE = (*SERVER_SIDE, "feddf", "fedrs", "fedacg", "fedntd", "ccvr")
# CCVR (FedLoop(calibration=CCVR())): the rows "ccvr <strategy row>" train as that row and are judged on the
# calibrated global model's accuracy (the plain model's stays in "acc_plain"); a family of its own, so that a
# calibrated FedAvg never sets FedAvg's target
CCVR_ON = ["--loop.calibration", "lightning_fed.calibration.CCVR"]


def server(**kw: float) -> list[str]:
    """CLI arguments setting the recipe's server optimizer's ``kw``."""
    return [a for k, v in kw.items() for a in (SERVER_OPT + k, str(v))]


# (label, recipe, CLI arguments): the recipes' own settings first in each family
GRID: list[tuple[str, str, list[str]]] = [
    ("fedavg lr0.05", "fedavg", []),
    ("fedavg lr0.02", "fedavg", [CLIENT_LR, "0.02"]),
    ("fedavg lr0.1", "fedavg", [CLIENT_LR, "0.1"]),
    ("fedavgm s1 m0.7", "fedavgm", []),
    ("fedavgm s1 m0.9", "fedavgm", server(momentum=0.9)),
    ("fedavgm s1 m0.8", "fedavgm", server(momentum=0.8)),
    ("fedavgm s0.5 m0.9", "fedavgm", server(lr=0.5, momentum=0.9)),
    ("fedavgm s1 m0.7 lr0.1", "fedavgm", [CLIENT_LR, "0.1"]),
    ("fedadam s0.1 t1e-3", "fedadam", server(lr=0.1)),
    ("fedadam s0.03 t1e-2", "fedadam", server(tau=0.01)),
    ("fedadam s0.1 t1e-2", "fedadam", server(lr=0.1, tau=0.01)),
    ("fedadam s0.3 t1e-2", "fedadam", server(lr=0.3, tau=0.01)),
    ("fedadam s0.3 t1e-1", "fedadam", server(lr=0.3, tau=0.1)),
    ("fedyogi s0.1 t1e-2", "fedyogi", server(lr=0.1, tau=0.01)),
    ("fedyogi s0.3 t1e-1", "fedyogi", server(lr=0.3, tau=0.1)),
    # 100 clients (--num_clients 100 --num_samples 25000): the recipes' values and their neighbours
    ("fedavgm s1 m0.5", "fedavgm", server(momentum=0.5)),
    ("fedavgm s0.5 m0.7", "fedavgm", server(lr=0.5)),
    ("fedadam s0.03 t1e-3", "fedadam", []),
    ("fedadam s0.01 t1e-3", "fedadam", server(lr=0.01)),
    ("fedadam s0.03 t1e-4", "fedadam", server(tau=0.0001)),
    ("fedyogi s0.03 t1e-3", "fedyogi", []),
    ("fedyogi s0.1 t1e-3", "fedyogi", server(lr=0.1)),
    ("fedyogi s0.03 t1e-2", "fedyogi", server(tau=0.01)),
    # SCAFFOLD: plain SGD (the recipe, lr 0.2) and SGD with fedavg.yaml's momentum 0.9 (exact option II estimate)
    ("scaffold lr0.1", "scaffold", [CLIENT_LR, "0.1"]),
    ("scaffold lr0.2", "scaffold", []),
    ("scaffold lr0.5", "scaffold", [CLIENT_LR, "0.5"]),
    ("scaffold lr0.02 m0.9", "scaffold", [CLIENT_LR, "0.02", MOMENTUM, "0.9"]),
    ("scaffold lr0.05 m0.9", "scaffold", [CLIENT_LR, "0.05", MOMENTUM, "0.9"]),
    ("scaffold lr0.1 m0.9", "scaffold", [CLIENT_LR, "0.1", MOMENTUM, "0.9"]),
    # FedExP: fedavg.yaml's clients, the server step max(1, sum ||d_i||^2 / (2 M (||d||^2 + eps)))
    # (without "avg": evaluated at the last iterate; fedexp.yaml itself evaluates the average of the last two)
    ("fedexp lr0.05", "fedexp", LAST),
    ("fedexp lr0.1", "fedexp", [CLIENT_LR, "0.1", *LAST]),
    ("fedexp lr0.02", "fedexp", [CLIENT_LR, "0.02", *LAST]),
    ("fedexp lr0.05 avg", "fedexp", [FEDEXP + "average_last", "true"]),
    ("fedexp lr0.05 uniform", "fedexp", [FEDEXP + "aggregator", "lightning_fed.strategies.UniformMean", *LAST]),
    # FedAvg evaluated as FedExP with average_last: FedExP with a huge eps always steps 1 (FedAvg's update)
    ("fedavg lr0.05 avg", "fedexp", [FEDEXP + "eps", "1e9", FEDEXP + "average_last", "true"]),
    ("fedavg lr0.1 avg", "fedexp", [CLIENT_LR, "0.1", FEDEXP + "eps", "1e9", FEDEXP + "average_last", "true"]),
    # plain SGD on the clients (FedExP's and SCAFFOLD's setting), FedAvg alike
    ("fedavg lr0.2 sgd", "fedavg", [CLIENT_LR, "0.2", MOMENTUM, "0.0"]),
    ("fedavg lr0.5 sgd", "fedavg", [CLIENT_LR, "0.5", MOMENTUM, "0.0"]),
    ("fedexp lr0.2 sgd", "fedexp", [CLIENT_LR, "0.2", MOMENTUM, "0.0", *LAST]),
    ("fedexp lr0.5 sgd", "fedexp", [CLIENT_LR, "0.5", MOMENTUM, "0.0", *LAST]),
    ("fedexp lr0.2 sgd avg", "fedexp", [CLIENT_LR, "0.2", MOMENTUM, "0.0", FEDEXP + "average_last", "true"]),
    ("fedexp lr0.5 sgd avg", "fedexp", [CLIENT_LR, "0.5", MOMENTUM, "0.0", FEDEXP + "average_last", "true"]),
    # FedDyn: fedavg.yaml's clients with the dynamic regularizer, the paper's alpha grid, client lr 0.05 and 0.1,
    # evaluated at the server model theta (these rows ran before feddyn.yaml set evaluate_mean: true)
    *[
        (f"feddyn a{a} lr{lr}", "feddyn", [DYN_ALPHA, a, *([] if lr == "0.05" else [CLIENT_LR, lr]), *DYN_THETA])
        for lr in ("0.05", "0.1")
        for a in ("0.1", "0.01", "0.001")
    ],
    # ... evaluated at the mean of the round's client models (FedDyn(evaluate_mean=True), what the paper reports)
    *[
        (f"feddyn a{a} lr{lr} mean", "feddyn", [DYN_ALPHA, a, *([] if lr == "0.05" else [CLIENT_LR, lr]), *DYN_MEAN])
        for lr in ("0.05", "0.1")
        for a in ("0.01", "0.001")
    ],
    # FedDF with one architecture (feddf_fedavg.yaml: fedavg.yaml's clients, 1,000 unlabeled proxy records, T=1):
    # d distillation steps per round, dlr its Adam learning rate, lr the client learning rate, m0.7 FedAvgM's server
    # momentum (fedavgm.yaml's ServerMomentum, lr 1) applied to the average before the distillation
    ("feddf d100 dlr1e-3", "feddf_fedavg", []),
    ("feddf d300 dlr1e-3", "feddf_fedavg", [DF + "distill_steps", "300"]),
    ("feddf d100 dlr1e-3 lr0.1", "feddf_fedavg", [CLIENT_LR, "0.1"]),
    ("feddf d300 dlr1e-3 lr0.1", "feddf_fedavg", [CLIENT_LR, "0.1", DF + "distill_steps", "300"]),
    ("feddf d100 dlr1e-4", "feddf_fedavg", [DF + "distill_lr", "0.0001"]),
    ("feddf d100 dlr1e-3 m0.7", "feddf_fedavg", [DF + "server_optimizer", MOMENTUM_OPT, *server(momentum=0.7)]),
    # FedRS (fedrs.yaml: fedavg.yaml's clients with the missing classes' logits scaled by alpha in local training)
    ("fedrs a0.5 lr0.05", "fedrs", []),
    ("fedrs a0.5 lr0.1", "fedrs", [CLIENT_LR, "0.1"]),
    ("fedrs a0.1 lr0.05", "fedrs", [RS_ALPHA, "0.1"]),
    ("fedrs a0.9 lr0.05", "fedrs", [RS_ALPHA, "0.9"]),
    # FedACG (fedacg.yaml: fedavg.yaml's clients with FedProx's pull beta to the point sent, the server's Nesterov
    # momentum lambda): the paper's lambda 0.85 and beta 0.001, their neighbours, and client lr 0.1; beta is always
    # given (the recipe's own is the best of these rows, 0.1)
    ("fedacg l0.85 b0.001", "fedacg", [ACG_BETA, "0.001"]),
    ("fedacg l0.85 b0.01", "fedacg", [ACG_BETA, "0.01"]),
    ("fedacg l0.7 b0.001", "fedacg", [ACG_BETA, "0.001", *server(momentum=0.7)]),
    ("fedacg l0.85 b0.001 lr0.1", "fedacg", [ACG_BETA, "0.001", CLIENT_LR, "0.1"]),
    ("fedacg l0.85 b0.1", "fedacg", [ACG_BETA, "0.1"]),
    ("fedacg l0.85 b0.3", "fedacg", [ACG_BETA, "0.3"]),
    ("fedacg l0.85 b1", "fedacg", [ACG_BETA, "1.0"]),
    ("fedacg l0.7 b0.1", "fedacg", [ACG_BETA, "0.1", *server(momentum=0.7)]),
    # FedNTD (fedntd.yaml: fedavg.yaml's clients with not-true distillation from the received model, weight beta,
    # temperature t): the paper's beta 1 and t 1, their neighbours, and client lr 0.1
    ("fedntd b1 t1", "fedntd", []),
    ("fedntd b0.3 t1", "fedntd", [NTD + "beta", "0.3"]),
    ("fedntd b3 t1", "fedntd", [NTD + "beta", "3.0"]),
    ("fedntd b1 t3", "fedntd", [NTD + "temperature", "3.0"]),
    ("fedntd b1 t1 lr0.1", "fedntd", [CLIENT_LR, "0.1"]),
    # CCVR on the global model at every evaluation (the head retrained on virtual features drawn from all clients'
    # per-class feature statistics; training unchanged): FedAvg's two best client learning rates and FedNTD
    ("ccvr fedavg lr0.05", "fedavg", CCVR_ON),
    ("ccvr fedavg lr0.1", "fedavg", [CLIENT_LR, "0.1", *CCVR_ON]),
    ("ccvr fedntd b1 t1", "fedntd", CCVR_ON),
]


def judged(label: str, row: dict) -> dict:
    """``row`` as the grid judges it: a ``ccvr`` row's accuracy is the calibrated model's (the plain model's is
    kept as ``acc_plain``); other rows as run."""
    if family(label) == "ccvr":
        if "acc_calibrated" not in row:
            raise SystemExit(f"{label}: the run logged no ccvr/test_acc (was FedLoop(calibration=) set?)")
        row = {**row, "acc_plain": row["acc"], "acc": row["acc_calibrated"]}
    return row


def family(label: str) -> str:
    """The strategy a grid label belongs to (its first word)."""
    return label.split()[0]


def selected(label: str, only: list[str] | None, labels: list[str] | None) -> bool:
    """Whether the grid configuration ``label`` runs under ``--only`` (families) and ``--labels`` (exact labels)."""
    return (only is None or family(label) in only) and (labels is None or label in labels)


def reference(rows: list[dict]) -> dict:
    """The best FedAvg row of ``rows`` (highest final accuracy): its final accuracy is the target."""
    fedavg = [r for r in rows if family(r["strategy"]) == "fedavg"]
    if not fedavg:
        raise SystemExit("no FedAvg row: run the fedavg family first")
    return max(fedavg, key=lambda r: final_acc(r["acc"]))


def budget_verdict(rows: list[dict], target: float, ref_rounds: int) -> tuple[dict | None, bool]:
    """The best server-side row by final accuracy, and whether it meets "reaches the target in at most half the
    rounds" as a budget: its run had at most ``ref_rounds / 2`` rounds and its final accuracy is at least ``target``."""
    server_rows = [r for r in rows if family(r["strategy"]) in GRID_SERVER_SIDE]
    if not server_rows:
        return None, False
    best = max(server_rows, key=lambda r: final_acc(r["acc"]))
    return best, len(best["acc"]) <= ref_rounds / 2 and final_acc(best["acc"]) >= target


def main(argv: list[str] | None = None) -> None:
    """Run the grid (or the families in ``--only``) at one alpha and print the table and the verdict."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--local_epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num_clients", type=int, default=20)
    ap.add_argument(
        "--num_samples", type=int, default=5000, help="MNIST-1D samples generated (25000 with 100 clients)"
    )
    ap.add_argument("--only", nargs="+", default=None, help="run only these families (fedavg, fedavgm, ...)")
    ap.add_argument(
        "--labels", nargs="+", default=None, help="run only these grid configurations (exact labels)"
    )
    ap.add_argument("--constant_lr", action="store_true", help="no client learning-rate decay in any run")
    ap.add_argument(
        "--target_from",
        type=Path,
        default=None,
        help="an earlier grid's --out JSON: its best FedAvg final accuracy is the target (budget reading)",
    )
    ap.add_argument("--output_dir", type=Path, default=Path("runs/bench-strategies-grid"))
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON after every run")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.labels or ()) - {g[0] for g in GRID})
    if unknown:
        ap.error(f"--labels: {unknown} not in the grid; allowed: {[g[0] for g in GRID]}")
    rows = json.loads(args.out.read_text())["rows"] if args.resume and args.out and args.out.exists() else []
    for label, recipe, more in GRID:
        if not selected(label, args.only, args.labels) or any(r["strategy"] == label for r in rows):
            continue
        rows.append(
            judged(label, one_run(
                recipe,
                args.alpha,
                args.rounds,
                args.local_epochs,
                args.seed,
                args.output_dir,
                num_clients=args.num_clients,
                num_samples=args.num_samples,
                more=[*more, *(NO_DECAY if args.constant_lr else [])],
                label=label,
            ))
        )
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
            )
    ref_rows = json.loads(args.target_from.read_text())["rows"] if args.target_from else rows
    base = reference(ref_rows)
    target = final_acc(base["acc"])
    recipe = next((r for r in ref_rows if r["strategy"] == GRID[0][0]), base)  # fedavg.yaml as written
    schedule = "constant client lr" if args.constant_lr else "cosine client-lr decay over the run"
    source = f" over {len(base['acc'])} rounds, from {args.target_from}" if args.target_from else ""
    table = Table(
        title=f"MNIST-1D, {args.num_clients} clients, Dirichlet {args.alpha}, {args.rounds} rounds, {schedule}, seed {args.seed}: "
        f"target {target:.2%} (best FedAvg, {base['strategy']}{source}, mean of its last 3 evaluations)"
    )
    for col in (
        "configuration",
        "round 10",
        "round 15",
        "round 20",
        "final (last 3)",
        "best",
        "rounds to FedAvg",
        "rounds to fedavg.yaml's final",
    ):
        table.add_column(col)
    for r in rows:
        accs = r["acc"]
        reach = rounds_to(accs, target)
        r["rounds_to_fedavg"] = reach
        at = [f"{accs[i - 1]:.1%}" if len(accs) >= i else "-" for i in (10, 15, 20)]
        to_recipe = rounds_to(accs, final_acc(recipe["acc"]))
        table.add_row(
            r["strategy"],
            *at,
            f"{final_acc(accs):.2%}",
            f"{max(accs):.2%}",
            str(reach or "-"),
            str(to_recipe or "-"),
        )
    console = Console(width=200)
    console.print(table)
    if args.target_from:
        best, met = budget_verdict(rows, target, len(base["acc"]))
        if best is not None:
            console.print(
                f"best server-side configuration in {args.rounds} rounds: {best['strategy']}, final "
                f"{final_acc(best['acc']):.2%} against FedAvg's {target:.2%} in {len(base['acc'])} rounds; "
                f"target (its final accuracy in at most half the rounds) {'met' if met else 'not met'}"
            )
        return
    server = [r for r in rows if family(r["strategy"]) in GRID_SERVER_SIDE]
    if server:
        best = min(server, key=lambda r: (r["rounds_to_fedavg"] or args.rounds + 1, -final_acc(r["acc"])))
        reach = best["rounds_to_fedavg"]
        verdict = "met" if reach is not None and reach <= args.rounds / 2 else "not met"
        console.print(
            f"fastest server-side configuration: {best['strategy']}, round {reach or '-'} of {args.rounds}; "
            f"target (at most {args.rounds / 2:g} rounds) {verdict}"
        )


if __name__ == "__main__":
    main()
