"""The Flower ``ServerApp`` and ``ClientApp`` of a recipe: our server side and our client side on Flower's runtime.

The ServerApp's main loop is :meth:`FedLoop.fit <lightning_fed.loop.FedLoop.fit>` itself, with a
:class:`~lightning_fed.flower.runner.FlowerRunner` as its client runner: sampling, ``configure_round``, downlink
encoding, decode, validation, the callbacks' say, aggregation, evaluation, checkpoints, logs and plots are the
loop's, unchanged. The ClientApp builds the same recipe's client side (:meth:`FedLoop.client_side
<lightning_fed.loop.FedLoop.client_side>`: the user's LightningModule and callbacks, the strategy's client half,
the codec and a client store on the node's disk) and runs each task it receives as the sequential runner does.

The recipe travels in the Flower run config (``recipe``: the resolved YAML ``lightning-fed flower`` wrote), so
the same app serves every recipe and no code is generated per recipe. Each node reads, from its node config:

``partition-id``     the client it is (0 .. num_clients - 1); Flower's simulation sets it for every node.
``num-partitions``   must equal the recipe's ``loop.num_clients``.
``recipe-args``      optional extra recipe arguments for this node only, e.g. where this machine keeps the
                     data: ``--data.init_args.cache_dir /data/fed``.
``state-dir``        optional folder of the node's client store (default: a folder under the system's temp dir).

Run config keys: ``recipe`` (YAML text), ``round-timeout`` (seconds a round waits for replies),
``connect-timeout`` (seconds to wait for every client's node at the start), ``client-mods`` (optional, Flower
client mods, comma-separated names from :data:`CLIENT_MODS`, wrapped around the plain Flower training messages
that Flower's own strategies send, e.g. ``fixedclipping_mod`` for Flower's
``DifferentialPrivacyClientSideFixedClipping``).
"""

from __future__ import annotations

import logging
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod.utils import make_ffn
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, arrays_size_mod, fixedclipping_mod, message_size_mod
from flwr.clientapp.typing import Mod
from flwr.serverapp import Grid, ServerApp

from lightning_fed.cli import Recipe, load_recipe
from lightning_fed.codecs.base import Identity
from lightning_fed.flower.runner import FlowerRunner
from lightning_fed.flower.wire import ACTION, read_task, reply_record
from lightning_fed.loop import FedLoop, FitResult
from lightning_fed.protocol import ClientTask, spec_of
from lightning_fed.runner import ClientWork, SequentialRunner

log = logging.getLogger("lightning_fed")

DEFAULT_ROUND_TIMEOUT_S = 600.0
DEFAULT_CONNECT_TIMEOUT_S = 120.0

# the Flower client mods a run config may name (``client-mods``): they wrap plain Flower training messages
CLIENT_MODS: dict[str, Mod] = {
    "fixedclipping_mod": fixedclipping_mod,
    "adaptiveclipping_mod": adaptiveclipping_mod,
    "arrays_size_mod": arrays_size_mod,
    "message_size_mod": message_size_mod,
}


def client_mods(run_config: dict[str, Any]) -> list[Mod]:
    """The Flower mods the run config's ``client-mods`` names (comma-separated, applied outermost first).

    Raises:
        ValueError: a name that is not in :data:`CLIENT_MODS`, naming the key, the value and what is allowed.
    """
    value = run_config.get("client-mods", "")
    names = [n.strip() for n in str(value).split(",") if n.strip()]
    for name in names:
        if name not in CLIENT_MODS:
            raise ValueError(
                f"Flower run config client-mods={value!r}: unknown mod {name!r}; allowed: comma-separated "
                f"names from {sorted(CLIENT_MODS)}"
            )
    return [CLIENT_MODS[n] for n in names]


def check_loop(loop: FedLoop) -> None:
    """Refuse what a Flower deployment cannot honour, naming the key and what is allowed."""
    unsupported = {
        "devices": (
            loop.devices * loop.num_nodes != 1,
            "1 (each SuperNode is one client; scale with more nodes)",
        ),
        "clock": (loop.clock is not None, "null (Flower's runtime has real clocks and real stragglers)"),
        "personal_eval": (loop.personal_eval is not None, "null (the clients' models stay on their nodes)"),
        "calibration": (
            loop.calibration is not None,
            "null (CCVR's statistics are computed from the clients' shards, which stay on their nodes)",
        ),
        "downlink_codec": (
            not isinstance(loop.downlink_codec, Identity) and not loop.downlink_codec.per_receiver,
            "Identity or a per-receiver codec (each node decodes only its own messages)",
        ),
    }
    for key, (bad, allowed) in unsupported.items():
        if bad:
            raise ValueError(
                f"lightning-fed flower: loop.{key}={getattr(loop, key)!r} is not supported; use {allowed}"
            )


def recipe_from(run_config: dict[str, Any], extra: str = "") -> Recipe:
    """The recipe of a Flower run (its ``recipe`` run config key, YAML text) plus ``extra`` arguments."""
    text = run_config.get("recipe")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            "the Flower run config has no 'recipe' (the YAML text `lightning-fed flower` writes)"
        )
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return load_recipe(["fit", "--config", f.name, *shlex.split(extra)])
    finally:
        Path(f.name).unlink(missing_ok=True)


def serve(grid: Grid, run_config: dict[str, Any]) -> FitResult:
    """The ServerApp's main: the recipe's :meth:`FedLoop.fit` with a :class:`FlowerRunner` over ``grid``."""
    recipe = recipe_from(run_config)
    check_loop(recipe.loop)
    client_mods(run_config)  # a bad name fails here, at the start, not on the nodes
    recipe.loop.runner = FlowerRunner(
        grid,
        recipe.loop.num_clients,
        float(run_config.get("round-timeout", DEFAULT_ROUND_TIMEOUT_S)),
        float(run_config.get("connect-timeout", DEFAULT_CONNECT_TIMEOUT_S)),
    )
    return recipe.loop.fit(recipe.model, recipe.data, resume=recipe.resume, run_config=recipe.config_text)


@dataclass
class ClientSide:
    """A node's built client side: the recipe's loop, its client work and the node's partition id."""

    loop: FedLoop
    work: ClientWork
    partition_id: int


# one per recipe, node arguments and node folder, for the process's lifetime
_SIDES: dict[tuple[str, str, str], ClientSide] = {}


def client_side(context: Context, run_config: dict[str, Any]) -> ClientSide:
    """This node's client side for the run's ``run_config``, built once per process (a ClientApp process serves
    many rounds; in simulation, many nodes)."""
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError("the SuperNode needs --node-config 'partition-id=<id> num-partitions=<clients>'")
    pid, parts = int(node["partition-id"]), int(node["num-partitions"])
    extra = str(node.get("recipe-args", ""))
    state_dir = str(
        node.get("state-dir")
        or Path(tempfile.gettempdir()) / "lightning_fed-flower" / f"run-{context.run_id}"
    )
    key = (str(run_config.get("recipe")), extra, state_dir)
    if key not in _SIDES:
        recipe = recipe_from(run_config, extra)
        check_loop(recipe.loop)
        work = recipe.loop.client_side(recipe.model, recipe.data, state_dir)
        _SIDES[key] = ClientSide(recipe.loop, work, pid)
    side = _SIDES[key]
    clients = side.loop.num_clients
    if parts != clients or not 0 <= pid < parts:
        raise ValueError(
            f"node config partition-id={pid} num-partitions={parts}: num-partitions must equal the "
            f"recipe's loop.num_clients={clients} and partition-id be in 0..{clients - 1}"
        )
    side.partition_id = pid  # simulated nodes of one process share the built side
    return side


def run_task(side: ClientSide, task: ClientTask) -> Any:
    """One task on this node, as the sequential runner runs it (the downlink decoded here, then local work)."""
    work = side.work
    if task.client_id != side.partition_id:
        raise ValueError(
            f"a task for client {task.client_id} reached the node of partition {side.partition_id}"
        )
    work.context.round = task.round
    work.hook(
        "on_client_follow", dict(task.config)
    )  # e.g. replay the server's pruning before its weights load
    work.modules.round_start([work.view.lightning_module])
    return SequentialRunner().run([task], work)[0]


def flower_apps(run_config: dict[str, Any] | None = None) -> tuple[ServerApp, ClientApp]:
    """A ServerApp and a ClientApp for a recipe. ``run_config`` (``recipe``, ``round-timeout``…) is laid over the
    Flower run's own config: ``flwr.simulation.run_simulation`` has none, a deployment gets it from the app's
    ``pyproject.toml`` (``[tool.flwr.app.config]``)."""
    fixed = dict(run_config or {})
    client_mods(fixed)
    server, client = ServerApp(), ClientApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, {**context.run_config, **fixed})

    @client.query(ACTION)
    def _partition(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"config": ConfigRecord({"partition-id": pid})}), reply_to=msg)

    @client.train(ACTION)
    def _train(msg: Message, context: Context) -> Message:
        side = client_side(context, {**context.run_config, **fixed})
        return Message(reply_record(run_task(side, read_task(msg.content))), reply_to=msg)

    @client.train()
    def _train_plain(msg: Message, context: Context) -> Message:
        config = {**context.run_config, **fixed}

        def inner(m: Message, c: Context) -> Message:
            return train_plain(client_side(c, config), m)

        return make_ffn(inner, client_mods(config))(msg, context)

    return server, client


def train_plain(side: ClientSide, msg: Message) -> Message:
    """A plain Flower training message (``arrays``: the global weights, ``config``): Flower's own strategies
    (FedAvg, FedAdam…) drive the client, with the run config's ``client-mods`` around it; the reply is the trained weights (``arrays``) and ``metrics`` with
    ``num-examples``, as Flower's strategies expect. Needs the Identity codec."""
    if not isinstance(side.loop.codec, Identity):
        raise ValueError(
            f"plain Flower training messages need the Identity codec, the recipe has "
            f"{type(side.loop.codec).__name__} (use the lightning_fed ServerApp for codecs)"
        )
    config = msg.content["config"] if "config" in msg.content else ConfigRecord({})
    payload = msg.content["arrays"].to_torch_state_dict()
    cid = side.partition_id
    task = ClientTask(
        round=int(config.get("server-round", 1)) - 1,
        client_id=cid,
        message=b"",
        spec=spec_of(payload),
        config={k: v for k, v in config.items() if k in ("local_epochs", "max_steps")},
    )
    work = side.work
    work.context.round = task.round
    work.modules.round_start([work.view.lightning_module])
    out = work(task, payload)
    if out.failure is not None:
        raise RuntimeError(f"client {cid}: {out.failure}")
    module = work.strategy.client_module(cid, work.view.lightning_module)
    state = module.state_dict()
    trained = {
        k: state[k].detach().cpu() for k in payload
    }  # the order sent (Flower's clipping mods check it)
    metrics = MetricRecord({"num-examples": out.num_examples, **out.metrics})
    return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": metrics}), reply_to=msg)


server_app, client_app = (
    flower_apps()
)  # what a Flower app's pyproject.toml names (``lightning_fed.flower.apps:…``)


__all__ = [
    "CLIENT_MODS",
    "ClientSide",
    "check_loop",
    "client_app",
    "client_mods",
    "client_side",
    "flower_apps",
    "recipe_from",
    "run_task",
    "serve",
    "server_app",
    "train_plain",
]
