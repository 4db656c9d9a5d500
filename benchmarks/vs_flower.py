"""FedLoop versus Flower's simulation on the same FedAvg work.

The work, identical for both frameworks:
    FedAvg, 100 clients, 10 sampled per round, 1 local epoch, MNIST1DCNN (lightning_fed.models), MNIST-1D
    (lightning_fed.data.make_mnist1d: 4,000 train / 1,000 test), the same client shards
    (``IID().split(labels, 100, seed)`` or ``Dirichlet(alpha).split(...)``), batch 32, SGD lr 0.05 momentum 0.9
    (a fresh optimizer each round), the same initial weights (``torch.manual_seed(seed)``), N rounds.
    Client *sampling* is each framework's own (FedLoop: seeded per round; Flower: its strategy's random
    sampler, Python's ``random`` seeded once), so the two runs visit different clients.

(a) FedLoop: ``FedLoop(..., verbose=False, plot=False, loggers=[], checkpoint_every=0, eval_every=rounds)``.
(b) Flower: ``flwr.simulation.run_simulation`` (Ray backend) with a ClientApp whose client trains the same
    MNIST1DCNN for one local epoch with a plain torch loop, and Flower's FedAvg with 10 % of 100 clients per
    round. ``--flower-api numpy`` (default) uses the classic NumPyClient + ``flwr.server.strategy.FedAvg``
    (``fraction_fit=0.1``); ``--flower-api message`` uses Flower's newer Message API
    (``@app.train()`` + ``flwr.serverapp.strategy.FedAvg(fraction_train=0.1)``); ``both`` runs both.
    Ray gets ``--ray-cpus`` (all cores) and each ClientApp actor ``--cpus-per-client`` (1: two actors here).
(c) Reference: a bare torch loop, no framework (the Flower client's training function in a for-loop with an
    example-weighted mean; FedLoop's client sampling): the floor that any framework's round time sits on.
Then FedLoop runs once more, so the table shows how much the (shared) machine's load drifted meanwhile.
The driver uses ``--threads`` torch threads (1): for a 5k-parameter model, more intra-op threads only contend
for the cores.

What is timed (``time.perf_counter`` in the driver process; both run in ONE process invocation, one after
the other, on the same machine):
    total      the whole call: ``loop.fit(model, datamodule)`` for FedLoop (Fabric set-up, data split, rounds,
               final evaluation, writing final.safetensors/history.json), ``run_simulation(...)`` for Flower
               (Ray start, actor pool, ServerApp thread, rounds, Ray shutdown).
    startup    from the call to the moment the first client's local work begins (FedLoop: the first
               ``on_train_start``; Flower: ``time.time()`` at the top of the first client's fit in a Ray
               actor, sent back in the fit metrics). For Flower this is mostly Ray and actor-pool start-up.
    rounds     from that moment to the end of round N (each round: sample, send, local training of 10 clients,
               aggregate; after round N, one evaluation of the global model on the test split).
    teardown   total - startup - rounds (FedLoop: writing outputs; Flower: stopping the actors and Ray).
    round 1    the first round's part of ``rounds`` (it carries one-time warm-up, e.g. the Ray actors
               importing lightning_fed and loading the data on their first client).
    steady     the mean of rounds 2..N: the per-round cost once everything is warm.
    ratio      each row's time / FedLoop's (first row) time, for total, rounds and steady: Flower/FedLoop.
    The reported test accuracy is computed after each run from the final global weights by the same function
    (``test_accuracy`` below) for both frameworks.

Install (Flower goes into a SEPARATE venv; it is not a dependency of lightning_fed; torch stays 2.13.0 CPU)::

    python3 -m venv /work/flwr-venv
    echo "torch==2.13.0+cpu" > /tmp/flwr-constraints.txt
    /work/flwr-venv/bin/pip install "torch==2.13.0+cpu"       # the CPU wheel (here from the local wheel dir)
    /work/flwr-venv/bin/pip install -c /tmp/flwr-constraints.txt -e /work/main
    /work/flwr-venv/bin/pip install -c /tmp/flwr-constraints.txt "flwr[simulation]"   # flwr + ray

Run (2-core CPU; Flower's telemetry is switched off by the script)::

    cd /work/main && /work/flwr-venv/bin/python benchmarks/vs_flower.py --rounds 20
    /work/flwr-venv/bin/python benchmarks/vs_flower.py --rounds 20 --flower-api both --json /tmp/vs_flower.json
    /work/venv/bin/python benchmarks/vs_flower.py --rounds 20 --skip-flower   # FedLoop only, no flwr needed
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network calls from Flower's telemetry
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10

# ---------------------------------------------------------------------------------------------------- shared
# Everything here is used by both frameworks (and, for Flower, inside the Ray actors: this module is imported
# there by name, so the caches below live once per actor process).
_CACHE: dict[str, Any] = {}


def make_partition(kind: str, alpha: float):
    """The lightning_fed partition object for ``kind`` ("iid" or "dirichlet")."""
    from lightning_fed.data import IID, Dirichlet

    return IID() if kind == "iid" else Dirichlet(alpha=alpha, min_samples=10)


def data_and_shards(num_clients: int, seed: int, kind: str, alpha: float) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """MNIST-1D tensors (cached on disk by make_mnist1d) and the client shards, memoised per process."""
    key = f"{num_clients}/{seed}/{kind}/{alpha}"
    if key not in _CACHE:
        from lightning_fed.data import make_mnist1d

        data = make_mnist1d()
        shards = make_partition(kind, alpha).split(data["y"], num_clients, seed)
        _CACHE[key] = (data, shards)
    return _CACHE[key]


def new_model(seed: int | None = None) -> torch.nn.Module:
    """MNIST1DCNN with the benchmark's hyper-parameters (lr 0.05, SGD momentum 0.9)."""
    from lightning_fed.models import MNIST1DCNN

    if seed is not None:
        torch.manual_seed(seed)
    return MNIST1DCNN(channels=25, lr=0.05, optimizer="sgd", momentum=0.9)


@torch.no_grad()
def test_accuracy(state: dict[str, torch.Tensor]) -> float:
    """Accuracy of ``state`` (MNIST1DCNN weights) on the MNIST-1D test split; same code for both frameworks."""
    from lightning_fed.data import make_mnist1d

    data = make_mnist1d()
    model = new_model()
    model.load_state_dict(state)
    model.eval()
    pred = model(data["x_test"]).argmax(1)
    return float((pred == data["y_test"]).float().mean())


def train_one_client(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
                     lr: float, momentum: float, generator: torch.Generator) -> None:
    """Plain torch local training (what the Flower client runs): shuffled mini-batches, SGD with momentum."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    n = len(y)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def client_fit(partition_id: int, weights: list[np.ndarray], cfg: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
    """One Flower client's round: load the global weights, train locally; return the new weights, the number
    of examples and timing metrics: ``began`` (``time.time()`` when this client's work began) and ``warmup``
    (seconds this actor spent on its first call importing lightning_fed, loading the data and building the
    model; 0 on later calls)."""
    began = time.time()
    first_call = "model" not in _CACHE
    if first_call:
        torch.set_num_threads(int(cfg["threads"]))
    data, shards = data_and_shards(int(cfg["num_clients"]), int(cfg["seed"]), str(cfg["partition"]), float(cfg["alpha"]))
    model = _CACHE.get("model") or _CACHE.setdefault("model", new_model())
    from lightning_fed.seeding import derive_seed

    warmup = time.time() - began if first_call else 0.0
    keys = list(model.state_dict())
    model.load_state_dict({k: torch.from_numpy(np.asarray(w)) for k, w in zip(keys, weights, strict=True)})
    idx = shards[partition_id]
    g = torch.Generator().manual_seed(derive_seed(int(cfg["seed"]), int(cfg["round"]), partition_id, 1))
    train_one_client(model, data["x"][idx], data["y"][idx], epochs=int(cfg["local_epochs"]),
                     batch_size=int(cfg["batch_size"]), lr=float(cfg["lr"]), momentum=float(cfg["momentum"]), generator=g)
    new_weights = [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]
    return new_weights, len(idx), {"began": began, "warmup": warmup}


# ---------------------------------------------------------------------------------------------------- FedLoop
def run_fedloop(args: argparse.Namespace, init_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """FedAvg through lightning_fed's FedLoop; returns timings and the final weights' test accuracy."""
    from lightning_fed import FedLoop
    from lightning_fed.callbacks import FedCallback
    from lightning_fed.data import MNIST1DDataModule
    from lightning_fed.strategies import FedAvg

    class FirstLocalStep(FedCallback):
        """Records when the first client's local training starts (end of FedLoop's start-up)."""

        def __init__(self) -> None:
            self.at: float | None = None
            self.round_start: float | None = None

        def on_round_start(self, trainer: Any, pl_module: Any, instructions: Any) -> None:
            if self.round_start is None:
                self.round_start = time.perf_counter()

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if self.at is None:
                self.at = time.perf_counter()

    first = FirstLocalStep()
    model = new_model()
    model.load_state_dict(init_state)
    dm = MNIST1DDataModule(batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="vs_flower_fedloop_") as out:
        loop = FedLoop(num_clients=args.clients, clients_per_round=args.per_round, rounds=args.rounds, local_epochs=1,
                       partition=make_partition(args.partition, args.alpha), strategy=FedAvg(), seed=args.seed,
                       eval_every=args.rounds, checkpoint_every=0, output_dir=out, verbose=False, plot=False, loggers=[],
                       callbacks=[first])
        t0 = time.perf_counter()
        result = loop.fit(model, dm)
        total = time.perf_counter() - t0
        from safetensors.torch import load_file

        final = load_file(str(result.run_dir / "final.safetensors"))
    per_round = [float(m["seconds"]) for m in result.history]
    per_round[0] = result.history[0]["seconds"] - (first.at - first.round_start)  # round 1 from the first local step
    return {
        "framework": "FedLoop (lightning_fed)",
        "total_s": total,
        "rounds_s": sum(per_round),
        "per_round_s": per_round,
        "startup_s": first.at - t0,  # set-up and round 1 until the first client's on_train_start
        "test_acc": test_accuracy(final),
        "own_test_acc": result.final_metrics.get("test_acc"),
        "notes": f"1 process, torch threads={torch.get_num_threads()}, clients run one after another",
    }


# ---------------------------------------------------------------------------------------------------- bare torch
def run_bare_torch(args: argparse.Namespace, init_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Reference, no framework: FedAvg as a plain loop in this process around the Flower client's own
    ``client_fit`` (same clients per round as FedLoop), example-weighted mean of the returned weights."""
    from lightning_fed.seeding import derive_seed

    t0 = time.perf_counter()
    weights = [v.numpy().copy() for v in init_state.values()]
    per_round = []
    for r in range(args.rounds):
        t = time.perf_counter()
        g = torch.Generator().manual_seed(derive_seed(args.seed, r))
        clients = sorted(torch.randperm(args.clients, generator=g)[: args.per_round].tolist())
        cfg = _fit_config(args, r + 1) | {"threads": args.threads}
        results = [client_fit(cid, weights, cfg)[:2] for cid in clients]
        total_n = sum(n for _, n in results)
        weights = [sum(w[i] * (n / total_n) for w, n in results) for i in range(len(weights))]
        per_round.append(time.perf_counter() - t)
    final = {k: torch.from_numpy(np.asarray(w, dtype=np.float32)) for k, w in zip(init_state, weights, strict=True)}
    acc = test_accuracy(final)
    per_round[-1] = time.perf_counter() - t  # the last round includes the final evaluation, as in the others
    total = time.perf_counter() - t0
    return {"framework": "bare torch loop (reference)", "total_s": total, "rounds_s": sum(per_round),
            "per_round_s": per_round, "startup_s": 0.0, "test_acc": acc, "own_test_acc": None,
            "notes": "no framework: client_fit (the Flower clients' code) in a for-loop, numpy weighted mean, "
                     f"torch threads={torch.get_num_threads()}"}


# ---------------------------------------------------------------------------------------------------- Flower
def _fit_config(args: argparse.Namespace, server_round: int) -> dict[str, Any]:
    return {"round": server_round - 1, "seed": args.seed, "num_clients": args.clients, "partition": args.partition,
            "alpha": args.alpha, "batch_size": args.batch_size, "lr": 0.05, "momentum": 0.9, "local_epochs": 1,
            "threads": args.threads_per_client}


def numpy_apps(args: argparse.Namespace, init_state: dict[str, torch.Tensor], clock: dict[str, Any]):
    """ServerApp + ClientApp with Flower's classic API: NumPyClient and flwr.server.strategy.FedAvg."""
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg

    class MNIST1DClient(NumPyClient):
        def __init__(self, partition_id: int) -> None:
            self.partition_id = partition_id

        def fit(self, parameters, config):
            weights, n, times = client_fit(self.partition_id, parameters, config)
            return weights, n, times

    def client_fn(context: Context):
        return MNIST1DClient(int(context.node_config["partition-id"])).to_client()

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            clock["start"].setdefault(server_round, time.perf_counter())
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            if server_round == 1 and results:
                clock["first_client"] = min(float(res.metrics["began"]) for _, res in results)
            clock["warmup"].extend(float(res.metrics["warmup"]) for _, res in results if res.metrics["warmup"] > 0)
            return super().aggregate_fit(server_round, results, failures)

    def evaluate_fn(server_round, parameters, config):
        if server_round == args.rounds:  # the final global model: evaluate once, like FedLoop's eval_every=rounds
            keys = list(init_state)
            clock["final"] = {k: torch.from_numpy(np.asarray(w).copy()) for k, w in zip(keys, parameters, strict=True)}
            acc = test_accuracy(clock["final"])
            clock["end"] = time.perf_counter()
            return 0.0, {"acc": acc}
        return None

    strategy = TimedFedAvg(
        fraction_fit=args.per_round / args.clients, fraction_evaluate=0.0, min_fit_clients=args.per_round,
        min_evaluate_clients=0, min_available_clients=args.clients, evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda r: _fit_config(args, r),
        initial_parameters=ndarrays_to_parameters([v.numpy() for v in init_state.values()]),
    )

    def server_fn(context: Context):
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    return ServerApp(server_fn=server_fn), ClientApp(client_fn=client_fn)


def message_apps(args: argparse.Namespace, init_state: dict[str, torch.Tensor], clock: dict[str, Any]):
    """ServerApp + ClientApp with Flower's Message API: @app.train() and flwr.serverapp.strategy.FedAvg."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        weights, n, times = client_fit(int(context.node_config["partition-id"]), arrays, dict(msg.content["config"]))
        content = RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord({"num-examples": n, **times})})
        return Message(content=content, reply_to=msg)

    class TimedFedAvg(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            clock["start"].setdefault(server_round, time.perf_counter())
            config = ConfigRecord(_fit_config(args, server_round))
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            metrics = [m.content["metrics"] for m in replies if m.has_content()]
            if server_round == 1 and metrics:
                clock["first_client"] = min(float(m["began"]) for m in metrics)
            clock["warmup"].extend(float(m["warmup"]) for m in metrics if m["warmup"] > 0)
            return super().aggregate_train(server_round, replies)

    def evaluate_fn(server_round: int, arrays: ArrayRecord):
        if server_round == args.rounds:
            keys = list(init_state)
            clock["final"] = {k: torch.from_numpy(w.copy()) for k, w in zip(keys, arrays.to_numpy_ndarrays(), strict=True)}
            acc = test_accuracy(clock["final"])
            clock["end"] = time.perf_counter()
            return MetricRecord({"acc": acc})
        return None

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = TimedFedAvg(fraction_train=args.per_round / args.clients, fraction_evaluate=0.0,
                               min_train_nodes=args.per_round, min_evaluate_nodes=0,
                               min_available_nodes=args.clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord([v.numpy() for v in init_state.values()]),
                       num_rounds=args.rounds, evaluate_fn=evaluate_fn)

    return server_app, client_app


def run_flower(args: argparse.Namespace, init_state: dict[str, torch.Tensor], api: str) -> dict[str, Any]:
    """The same FedAvg work under flwr.simulation.run_simulation (Ray backend)."""
    import flwr
    import ray
    from flwr.simulation import run_simulation

    this = sys.modules[__name__]
    clock: dict[str, Any] = {"start": {}, "warmup": []}
    build = this.numpy_apps if api == "numpy" else this.message_apps
    server_app, client_app = build(args, init_state, clock)
    backend_config = {"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
                      "init_args": {"num_cpus": args.ray_cpus}}
    random.seed(args.seed)
    t0, t0_wall = time.perf_counter(), time.time()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.clients,
                   backend_config=backend_config)
    total = time.perf_counter() - t0
    if "final" not in clock or len(clock["start"]) != args.rounds or "first_client" not in clock:
        raise RuntimeError(f"Flower ({api}) did not finish {args.rounds} rounds: started {sorted(clock['start'])}")
    # Round 1 is counted from the first client's local work (the ServerApp thread starts sampling at once,
    # while the Ray backend is still booting in the main thread: that wait is start-up, not round time).
    first_client = t0 + (clock["first_client"] - t0_wall)
    starts = [first_client] + [clock["start"][r] for r in range(2, args.rounds + 1)] + [clock["end"]]
    per_round = [b - a for a, b in itertools.pairwise(starts)]
    actors = int(args.ray_cpus // args.cpus_per_client)
    return {
        "framework": f"Flower {flwr.__version__} ({api} API)",
        "total_s": total,
        "rounds_s": sum(per_round),
        "per_round_s": per_round,
        "startup_s": first_client - t0,
        "test_acc": test_accuracy(clock["final"]),
        "own_test_acc": None,
        "notes": f"Ray {ray.__version__}, {actors} actors x {args.cpus_per_client} cpu, "
                 f"torch threads/actor={args.threads_per_client}; actors' first-call warm-up (import lightning_fed, "
                 f"load data, build model; inside the rounds, in parallel across actors): "
                 f"{', '.join(f'{w:.2f}' for w in clock['warmup'])} s",
    }


# ---------------------------------------------------------------------------------------------------- report
def table(rows: list[dict[str, Any]], rounds: int) -> str:
    """The results as a Markdown table; ratios are each row's time over FedLoop's (row 0)."""
    for r in rows:
        r["teardown_s"] = r["total_s"] - r["startup_s"] - r["rounds_s"]
        r["steady_s"] = float(np.mean(r["per_round_s"][1:])) if rounds > 1 else r["per_round_s"][0]
    base = rows[0]
    head = ("| framework | rounds | total s | startup s | rounds s | teardown s | round 1 s | s/round | "
            "steady s/round (2..N) | test acc | ratio total | ratio rounds | ratio steady |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['framework']} | {rounds} | {r['total_s']:.2f} | {r['startup_s']:.2f} | {r['rounds_s']:.2f} "
            f"| {r['teardown_s']:.2f} | {r['per_round_s'][0]:.3f} | {r['rounds_s'] / rounds:.3f} | {r['steady_s']:.3f} "
            f"| {100 * r['test_acc']:.1f} % | {r['total_s'] / base['total_s']:.1f}x "
            f"| {r['rounds_s'] / base['rounds_s']:.1f}x | {r['steady_s'] / base['steady_s']:.1f}x |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--partition", choices=("iid", "dirichlet"), default="iid")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (with --partition dirichlet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flower-api", choices=("numpy", "message", "both"), default="numpy")
    p.add_argument("--ray-cpus", type=float, default=float(os.cpu_count() or 1), help="CPUs Ray may use")
    p.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray num_cpus per ClientApp actor")
    p.add_argument("--threads-per-client", type=int, default=1, help="torch threads inside each Ray actor")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the driver process (FedLoop, Flower server)")
    p.add_argument("--skip-flower", action="store_true", help="run FedLoop only (no flwr needed)")
    p.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run FedLoop, then Flower, then FedLoop again, on the same work; print the table."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    init_state = {k: v.detach().clone() for k, v in new_model(args.seed).state_dict().items()}
    data_and_shards(args.clients, args.seed, args.partition, args.alpha)  # generate/cache MNIST-1D before timing
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"python {platform.python_version()}", flush=True)
    rows = [run_fedloop(args, init_state)]
    print(f"FedLoop done: {rows[0]['total_s']:.2f} s, acc {rows[0]['test_acc']:.4f} "
          f"(loop's own test_acc {rows[0]['own_test_acc']})", flush=True)
    rows.append(run_bare_torch(args, init_state))
    if not args.skip_flower:
        for api in (("numpy", "message") if args.flower_api == "both" else (args.flower_api,)):
            rows.append(run_flower(args, init_state, api))
            print(f"Flower ({api}) done: {rows[-1]['total_s']:.2f} s, acc {rows[-1]['test_acc']:.4f}", flush=True)
        # FedLoop once more after Flower: the machine is shared, so this row shows how much the load drifted.
        rows.append(run_fedloop(args, init_state))
        rows[-1]["framework"] += " again, after Flower"
    print()
    print(f"FedAvg, {args.clients} clients, {args.per_round}/round, 1 local epoch, MNIST1DCNN, MNIST-1D "
          f"{args.partition} split, batch {args.batch_size}, SGD 0.05/0.9, seed {args.seed}")
    print(table(rows, args.rounds))
    for r in rows:
        print(f"- {r['framework']}: {r['notes']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    # Re-import this file as the module ``vs_flower`` so that Ray pickles the client code by reference (Flower
    # puts the driver's sys.path, which holds this folder, on the actors' PYTHONPATH) instead of by value.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import vs_flower

    vs_flower.main()
