"""Deployment through Flower: our messages inside Flower records, the refusals, the generated app, and Flower's
simulation runtime giving the same global weights as ``lightning-fed fit`` (FedAvg, a codec with per-client
state, a tiered distillation strategy), nodes following the server's pruning, sparsity masks and QAT, plus Flower's
own FedAvg, FedAdam and client-side DP clipping driving lightning_fed clients.

The simulation tests start Ray (tens of seconds each on a small CPU): one per recipe, the FedAvg one shared with
the interop check."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import tomllib
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from safetensors.torch import load_file

from lightning_fed import FedLoop
from lightning_fed.calibration import CCVR
from lightning_fed.cli import load_recipe, run
from lightning_fed.flower.apps import check_loop, client_side, flower_apps, serve
from lightning_fed.flower.command import main as flower_main
from lightning_fed.flower.command import run_config_of, simulate
from lightning_fed.flower.wire import MalformedFlowerMessage, read_reply, read_task, reply_record, task_record
from lightning_fed.protocol import ClientMessage, ClientTask, TensorSpec
from lightning_fed.systems import SimulatedClock

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
RECIPES = Path(__file__).parents[1] / "recipes" / "mnist1d"
TINY = [
    "--loop.num_clients",
    "3",
    "--loop.clients_per_round",
    "2",
    "--loop.rounds",
    "3",
    "--loop.local_epochs",
    "1",
    "--loop.eval_every",
    "3",
    "--loop.checkpoint_every",
    "0",
    "--loop.verbose",
    "false",
    "--loop.plot",
    "false",
    "--loop.loggers",
    "[]",
    "--data.init_args.num_samples",
    "1000",
]


def _task() -> ClientTask:
    spec = {
        "w": TensorSpec((2, 3), torch.float32),
        "b": TensorSpec((-1,), torch.bfloat16, optional=True, max_numel=8),
    }
    return ClientTask(
        round=4,
        client_id=2,
        message=b"\x00codec-bytes\xff",
        spec=spec,
        config={"local_epochs": 2, "max_steps": None},
        share=0.75,
        broadcast=b"",
    )


def test_task_and_reply_cross_flower_records_unchanged():
    task = _task()
    assert read_task(task_record(task)) == task
    msg = ClientMessage(2, b"\x01\x02reply", 17, {"train_loss": 0.5}, None, 40, 0.01, 0.02, 3)
    assert read_reply(reply_record(msg), 2) == msg
    failed = ClientMessage(1, failure="ValueError: bad shard")
    assert read_reply(reply_record(failed), 1) == failed
    assert read_reply(reply_record(msg), 0).client_id == 0  # the sender is the node it came from, not a field


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda r: RecordDict({}), "no 'lightning_fed' ConfigRecord"),
        (lambda r: RecordDict({"lightning_fed": ConfigRecord({"head": "{", "message": b""})}), "not JSON"),
        (lambda r: RecordDict({"lightning_fed": ConfigRecord({"head": 3})}), "needs a JSON 'head'"),
        (lambda r: RecordDict({"lightning_fed": ConfigRecord({"head": '{"round": 1}'})}), "needs the fields"),
    ],
)
def test_malformed_task_records_are_refused(edit, match):
    with pytest.raises(MalformedFlowerMessage, match=match):
        read_task(edit(task_record(_task())))


def test_unknown_dtype_and_non_finite_metrics_are_refused():
    rec = task_record(_task())
    head = rec.config_records["lightning_fed"]["head"].replace("torch.float32", "os.system")
    rec.config_records["lightning_fed"]["head"] = head
    with pytest.raises(MalformedFlowerMessage, match="unknown dtype 'os.system'"):
        read_task(rec)
    reply = reply_record(ClientMessage(0, b"x", 3, {"loss": 1.0}))
    reply.config_records["lightning_fed"]["head"] = reply.config_records["lightning_fed"]["head"].replace(
        "1.0", "1e999"
    )
    with pytest.raises(MalformedFlowerMessage, match="finite numbers"):
        read_reply(reply, 0)


def test_header_values_must_be_json():
    task = _task()
    task.config["bad"] = math.nan
    with pytest.raises(TypeError, match="ClientTask: only JSON values"):
        task_record(task)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"devices": 2}, "loop.devices=2 is not supported"),
        ({"clock": SimulatedClock()}, "loop.clock=.* is not supported"),
        ({"calibration": CCVR()}, "loop.calibration=CCVR.* is not supported"),
    ],
)
def test_what_flower_cannot_honour_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        check_loop(FedLoop(num_clients=4, clients_per_round=2, **kw))


def test_node_needs_its_partition_in_the_node_config(tmp_path):
    run_config = run_config_of(["--config", str(RECIPES / "fedavg.yaml"), *TINY], 60.0, 60.0)
    with pytest.raises(ValueError, match="--node-config 'partition-id=<id> num-partitions=<clients>'"):
        client_side(Context(1, 1, {}, RecordDict(), {}), run_config)
    node = {"partition-id": 0, "num-partitions": 5, "state-dir": str(tmp_path)}
    with pytest.raises(ValueError, match="num-partitions must equal the recipe's loop.num_clients=3"):
        client_side(Context(1, 1, node, RecordDict(), {}), run_config)


def test_app_folder_holds_only_a_pyproject_naming_our_apps_and_the_recipe(tmp_path):
    run(  # what `lightning-fed flower ...` runs
        [
            "flower",
            "--config",
            str(RECIPES / "fedavg.yaml"),
            *TINY,
            "--loop.output_dir",
            "rel/out",
            "--app-dir",
            str(tmp_path / "app"),
            "--round-timeout",
            "30",
            "--client-mods",
            "fixedclipping_mod",
        ]
    )
    assert [p.name for p in (tmp_path / "app").iterdir()] == ["pyproject.toml"]
    toml = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    flwr = toml["tool"]["flwr"]["app"]
    assert flwr["components"] == {
        "serverapp": "lightning_fed.flower.apps:server_app",
        "clientapp": "lightning_fed.flower.apps:client_app",
    }
    assert flwr["config"]["round-timeout"] == 30.0
    assert flwr["config"]["client-mods"] == "fixedclipping_mod"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(flwr["config"]["recipe"])
    loop = load_recipe(["fit", "--config", str(recipe)]).loop
    assert (loop.num_clients, loop.rounds, Path(loop.output_dir)) == (
        3,
        3,
        (Path.cwd() / "rel/out").resolve(),
    )
    with pytest.raises(SystemExit):
        flower_main(["--config", str(RECIPES / "fedavg.yaml")])  # neither --app-dir nor --simulate


def _fit_weights(args: list[str], out: Path) -> dict[str, torch.Tensor]:
    res = run(["fit", *args, "--loop.output_dir", str(out)])
    return load_file(res.run_dir / "final.safetensors")


def _final(out: Path) -> dict[str, torch.Tensor]:
    (run_dir,) = sorted(out.glob("version_*"))
    return load_file(run_dir / "final.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fedavg_through_flower_simulation_equals_fit_and_flower_fedavg_drives_our_clients(tmp_path):
    args = ["--config", str(RECIPES / "fedavg.yaml"), *TINY]
    run_config = run_config_of([*args, "--loop.output_dir", str(tmp_path / "flower")], 300.0, 300.0)
    initial = {k: v.clone() for k, v in load_recipe(["fit", *args]).model.state_dict().items()}
    _, client = flower_apps(run_config)
    server, got = ServerApp(), {}

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        got["history"] = serve(grid, run_config).history  # our loop on Flower
        plain = FlowerFedAvg(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3
        )
        got["flower"] = plain.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=1).arrays

    from flwr.simulation import run_simulation

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=3,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    assert _same(_final(tmp_path / "flower"), _fit_weights(args, tmp_path / "fit"))
    last = got["history"][-1]
    assert (
        last["bytes_up"] > 0 and last["flower_bytes_up"] > last["bytes_up"]
    )  # the codec's bytes plus the header
    # Flower's FedAvg over every client for one round = our FedAvg over the same clients (float sums differ in order)
    ours = _fit_weights([*args, "--loop.rounds", "1", "--loop.clients_per_round", "3"], tmp_path / "fit1")
    theirs = got["flower"].to_torch_state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-6) for k in ours)
    assert not all(torch.equal(ours[k], initial[k]) for k in ours)


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [
        (
            "codec_differential.yaml",
            [],
        ),  # per-client codec state on the nodes and per-sender state on the server
        (
            "feddf.yaml",
            ["--loop.strategy.init_args.distill_steps", "3", "--loop.strategy.init_args.proxy_size", "100"],
        ),
        ("defence_fltrust.yaml", []),  # the server update on the root data, in the ServerApp
    ],
)
def test_recipe_through_flower_simulation_equals_fit(tmp_path, recipe, extra):
    args = ["--config", str(RECIPES / recipe), *TINY, *extra]
    simulate(
        run_config_of([*args, "--loop.output_dir", str(tmp_path / "flower")], 300.0, 300.0), 3, num_cpus=2
    )
    assert _same(_final(tmp_path / "flower"), _fit_weights(args, tmp_path / "fit"))


def test_runner_and_local_deployment_refuse_bad_settings(tmp_path):
    from lightning_fed.flower import FlowerRunner
    from lightning_fed.flower.local import LocalDeployment

    with pytest.raises(ValueError, match="timeout_s=0"):
        FlowerRunner(grid=None, num_clients=3, timeout_s=0)
    with pytest.raises(ValueError, match="num_nodes=0"):
        LocalDeployment(num_nodes=0, workdir=tmp_path)


def test_docs_example_of_a_flower_strategy_builds(monkeypatch):
    doc = (RECIPES.parents[1] / "docs" / "deployment.md").read_text()
    code = doc.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(RECIPES.parents[1])
    scope: dict = {}
    exec(compile(code, "docs/deployment.md", "exec"), scope)  # noqa: S102 - the documented example itself
    assert isinstance(scope["server_app"], ServerApp) and len(scope["initial"]) > 0


def test_a_node_reads_its_own_data_arguments_from_its_node_config(tmp_path):
    run_config = run_config_of(["--config", str(RECIPES / "fedavg.yaml"), *TINY], 60.0, 60.0)
    node = {"partition-id": 1, "num-partitions": 3, "state-dir": str(tmp_path / "a")}
    default = client_side(Context(1, 1, node, RecordDict(), {}), run_config)
    own = {**node, "state-dir": str(tmp_path / "b"), "recipe-args": "--data.init_args.num_samples 600"}
    local = client_side(Context(1, 2, own, RecordDict(), {}), run_config)
    assert (default.partition_id, local.partition_id) == (1, 1)
    assert (len(default.work.dataset), len(local.work.dataset)) == (800, 480)  # 80 % of the samples train
    assert (tmp_path / "b" / "clients").is_dir()  # the node's client store lives in its state-dir


class _Grid:
    """Flower's ``Grid`` in this process: each message goes straight to the ClientApp of its node (no Ray, no
    network); the nodes in ``dead`` never answer, a node in ``broken`` answers with an error."""

    def __init__(self, client, nodes: dict[int, dict], dead=(), broken=()) -> None:
        self.client, self.nodes, self.dead, self.broken = client, nodes, set(dead), set(broken)
        self.timeouts: list[float | None] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        self.timeouts.append(timeout)
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.dead and msg.metadata.message_type.startswith("train"):
                continue
            if node in self.broken and msg.metadata.message_type.startswith("train"):
                out.append(Message(Error(code=0, reason="ClientApp crashed"), reply_to=msg))
                continue
            out.append(self.client(msg, Context(1, node, self.nodes[node], RecordDict(), {})))
        return out


@pytest.fixture
def task_identity(monkeypatch):
    """What Flower's runtime sets in each process before messages are built."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def test_in_process_grid_equals_fit_and_lost_nodes_become_logged_failures(tmp_path, task_identity, caplog):
    args = ["--config", str(RECIPES / "codec_differential.yaml"), *TINY]
    run_config = run_config_of([*args, "--loop.output_dir", str(tmp_path / "grid")], 5.0, 5.0)
    _, client = flower_apps(run_config)
    nodes = {
        100 + i: {"partition-id": i, "num-partitions": 3, "state-dir": str(tmp_path / "nodes")}
        for i in range(3)
    }
    grid = _Grid(client, nodes)
    serve(grid, run_config)
    assert _same(_final(tmp_path / "grid"), _fit_weights(args, tmp_path / "fit"))
    assert set(grid.timeouts[1:]) == {5.0}  # every round waits round-timeout at most

    one_round = ["--loop.rounds", "1", "--loop.clients_per_round", "3", "--loop.eval_every", "1"]
    run_config = run_config_of([*args, *one_round, "--loop.output_dir", str(tmp_path / "lost")], 5.0, 5.0)
    _, client = flower_apps(run_config)
    nodes = {100 + i: {**n, "state-dir": str(tmp_path / "nodes2")} for i, n in enumerate(nodes.values())}
    history = serve(_Grid(client, nodes, dead=[101], broken=[102]), run_config).history
    assert (history[0]["good"], history[0]["failed"]) == (1, 2)
    assert "client 1: no reply from node 101 within timeout_s=5.0" in caplog.text
    assert "Flower error: ClientApp crashed" in caplog.text


class _Recorder(_Grid):
    """The in-process grid, keeping each training round's global weights sent and the replies (weights, examples)."""

    def __init__(self, client, nodes: dict[int, dict]) -> None:
        super().__init__(client, nodes)
        self.rounds: list[tuple[dict, list[tuple[dict, int]]]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if messages and messages[0].metadata.message_type == "train":
            sent = messages[0].content["arrays"].to_torch_state_dict()
            got = [
                (r.content["arrays"].to_torch_state_dict(), int(r.content["metrics"]["num-examples"]))
                for r in replies
            ]
            self.rounds.append((sent, got))
        return replies


def _mean(replies: list[tuple[dict, int]]) -> dict[str, torch.Tensor]:
    total = sum(n for _, n in replies)
    return {k: sum(w[k].double() * n for w, n in replies) / total for k in replies[0][0]}


def test_flower_fedadam_and_client_side_dp_clipping_drive_our_clients(tmp_path, task_identity):
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAdam

    args = ["--config", str(RECIPES / "fedavg.yaml"), *TINY]
    initial = {k: v.clone() for k, v in load_recipe(["fit", *args]).model.state_dict().items()}
    every = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 3, "min_available_nodes": 3}

    def nodes(folder: str) -> dict[int, dict]:
        return {
            100 + i: {"partition-id": i, "num-partitions": 3, "state-dir": str(tmp_path / folder)}
            for i in range(3)
        }

    # Flower's FedAdam, two rounds, against the same update computed by hand from the clients' replies
    _, client = flower_apps(run_config_of(args, 5.0, 5.0))
    grid = _Recorder(client, nodes("adam"))
    eta, tau, b1, b2 = 0.03, 1e-3, 0.9, 0.99
    adam = FedAdam(**every, eta=eta, tau=tau, beta_1=b1, beta_2=b2)
    flower = adam.start(
        grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=2
    ).arrays.to_torch_state_dict()
    x = {k: v.double() for k, v in initial.items()}
    m = {k: torch.zeros_like(v) for k, v in x.items()}
    v2 = {k: torch.zeros_like(v) for k, v in x.items()}
    for t, (sent, replies) in enumerate(grid.rounds, start=1):
        assert all(torch.allclose(sent[k].double(), x[k], rtol=0, atol=1e-6) for k in x)
        delta = {k: a - x[k] for k, a in _mean(replies).items()}
        m = {k: b1 * m[k] + (1 - b1) * d for k, d in delta.items()}
        v2 = {k: b2 * v2[k] + (1 - b2) * d**2 for k, d in delta.items()}
        step = eta * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))  # Flower's bias correction
        x = {k: x[k] + step * m[k] / (v2[k].sqrt() + tau) for k in x}
    assert len(grid.rounds) == 2 and flower.keys() == x.keys()
    assert all(torch.allclose(flower[k].double(), x[k], rtol=0, atol=1e-5) for k in x)
    assert max((flower[k].double() - initial[k].double()).abs().max().item() for k in x) > 0.01

    # Flower's client-side fixed clipping around its FedAvg, with Flower's fixedclipping_mod on our ClientApp
    clip = 0.05
    _, dp_client = flower_apps(run_config_of(args, 5.0, 5.0, "fixedclipping_mod"))
    dp_grid = _Recorder(dp_client, nodes("dp"))
    dp = DifferentialPrivacyClientSideFixedClipping(
        FlowerFedAvg(**every), noise_multiplier=0.0, clipping_norm=clip, num_sampled_clients=3
    )
    final = dp.start(
        grid=dp_grid, initial_arrays=ArrayRecord(initial), num_rounds=1
    ).arrays.to_torch_state_dict()
    (_, clipped), (_, raw) = dp_grid.rounds[0], grid.rounds[0]  # round 1 of both runs starts from `initial`
    for (w, n), (u, n_raw) in zip(clipped, raw, strict=True):
        update = {k: u[k].double() - initial[k].double() for k in u}
        norm = math.sqrt(sum((d**2).sum().item() for d in update.values()))
        assert n == n_raw and norm > 2 * clip  # the unclipped update would pass unchanged otherwise
        want = {k: initial[k].double() + d * (clip / norm) for k, d in update.items()}
        assert all(torch.allclose(w[k].double(), want[k], rtol=0, atol=1e-6) for k in w)
    assert all(torch.allclose(final[k].double(), a, rtol=0, atol=1e-6) for k, a in _mean(clipped).items())


def test_unknown_client_mod_is_refused_naming_the_allowed_ones():
    args = ["--config", str(RECIPES / "fedavg.yaml"), *TINY]
    with pytest.raises(ValueError, match=r"client-mods='secaggplus_mod': unknown mod .*fixedclipping_mod"):
        run_config_of(args, 5.0, 5.0, "secaggplus_mod")
    with pytest.raises(ValueError, match="client-mods='fixedclipping_mod,localdp'"):
        flower_apps({"client-mods": "fixedclipping_mod,localdp"})


class _FreshGrid(_Grid):
    """The in-process grid where, as on a deployed SuperNode, every message meets a freshly built client side
    (a new ClientApp process) that only has the node's disk and the message."""

    def send_and_receive(self, messages, *, timeout=None):
        from lightning_fed.flower import apps

        apps._SIDES.clear()
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("recipe", ["fedavg_pruning.yaml", "fedavg_sparsity.yaml", "fedavg_qat.yaml"])
def test_nodes_follow_the_servers_pruning_masks_and_qat_and_equal_fit(tmp_path, task_identity, recipe):
    import yaml

    cfg = yaml.safe_load((RECIPES / recipe).read_text())
    first = cfg["loop"]["callbacks"][0][
        "init_args"
    ]  # shrunk: the server changes the model within three rounds
    first.update({"at": [1, 2]} if "at" in first else {"start": 1})
    (tmp_path / recipe).write_text(yaml.safe_dump(cfg))
    args = ["--config", str(tmp_path / recipe), *TINY]
    run_config = run_config_of([*args, "--loop.output_dir", str(tmp_path / "grid")], 5.0, 5.0)
    _, client = flower_apps(run_config)
    nodes = {
        100 + i: {"partition-id": i, "num-partitions": 3, "state-dir": str(tmp_path / f"n{i}")}
        for i in range(3)
    }
    history = serve(_FreshGrid(client, nodes), run_config).history
    assert [h["failed"] for h in history] == [0, 0, 0] and all(h["good"] == 2 for h in history)
    fit = _fit_weights(args, tmp_path / "fit")
    assert _same(_final(tmp_path / "grid"), fit)
    if recipe == "fedavg_pruning.yaml":
        assert fit["conv1.weight"].shape[0] < cfg["model"]["init_args"]["channels"]
    if recipe == "fedavg_sparsity.yaml":
        assert (fit["conv2.weight"] == 0).float().mean() > 0.4
    # QAT changes no shape: a node that trained without fake quantization would differ only in the values
