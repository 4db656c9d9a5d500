"""``lightning-fed flower``: a recipe as a Flower app (a folder for ``flwr run``) or a run in Flower's simulation.

Example::

    lightning-fed flower --config recipes/mnist1d/fedavg.yaml --app-dir flower-app          # then: flwr run flower-app
    lightning-fed flower --config recipes/mnist1d/fedavg.yaml --loop.rounds 5 --simulate    # Flower's simulation

Every argument it does not know is a recipe argument, as for ``lightning-fed fit``. The app folder holds only a
``pyproject.toml``: its components are :mod:`lightning_fed.flower.apps` and its run config carries the resolved
recipe, so nothing is generated per recipe but that file (see docs/deployment.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from lightning_fed.cli import _fail, load_recipe
from lightning_fed.flower.apps import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_ROUND_TIMEOUT_S,
    check_loop,
    client_mods,
    flower_apps,
)

log = logging.getLogger("lightning_fed")

FLWR_RANGE = ">=1.42,<1.43"


def app_pyproject(run_config: dict[str, Any], name: str = "lightning-fed-app") -> str:
    """The ``pyproject.toml`` of a Flower app that runs ``run_config``'s recipe with lightning_fed's apps."""
    # JSON's strings and numbers are TOML's basic strings and numbers (the same escapes)
    config = "\n".join(f"{k} = {json.dumps(v)}" for k, v in run_config.items())
    return f"""# A Flower app running a lightning_fed recipe (written by `lightning-fed flower`; docs/deployment.md).
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "A lightning_fed recipe on Flower"
license = "Apache-2.0"
dependencies = ["lightning_fed[flower]", "flwr[simulation]{FLWR_RANGE}"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "lightning_fed"

[tool.flwr.app.components]
serverapp = "lightning_fed.flower.apps:server_app"
clientapp = "lightning_fed.flower.apps:client_app"

[tool.flwr.app.config]
{config}
"""


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The command's own options and the recipe arguments (everything else)."""
    p = argparse.ArgumentParser(prog="lightning-fed flower", description=__doc__.splitlines()[0])
    p.add_argument("--app-dir", default=None, help="write the Flower app (pyproject.toml) to this folder")
    p.add_argument(
        "--simulate", action="store_true", help="run the recipe in Flower's simulation runtime now"
    )
    p.add_argument(
        "--round-timeout",
        type=float,
        default=DEFAULT_ROUND_TIMEOUT_S,
        help="seconds a round waits for replies before it aggregates the ones that came",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT_S,
        help="seconds to wait at the start for a node of every client",
    )
    p.add_argument(
        "--client-mods",
        default="",
        help="Flower client mods around plain Flower training messages, comma-separated (e.g. fixedclipping_mod)",
    )
    p.add_argument("--num-cpus", type=int, default=None, help="simulation: CPUs Ray may use (default: all)")
    p.add_argument("--cpus-per-client", type=float, default=1.0, help="simulation: CPUs per ClientApp actor")
    return p.parse_known_args(argv)


def run_config_of(
    recipe_args: list[str], round_timeout: float, connect_timeout: float, mods: str = ""
) -> dict[str, Any]:
    """The Flower run config of a recipe: its resolved YAML (``output_dir`` made absolute), the timeouts and, if
    given, the ``client-mods`` (Flower mods around plain Flower training messages, comma-separated)."""
    recipe = load_recipe(["fit", *recipe_args])
    check_loop(recipe.loop)
    resolved = yaml.safe_load(recipe.config_text)
    resolved["loop"]["output_dir"] = str(
        Path(recipe.loop.output_dir).resolve()
    )  # the server's cwd may differ
    text = yaml.safe_dump(resolved, sort_keys=False)
    config = {
        "recipe": text,
        "round-timeout": float(round_timeout),
        "connect-timeout": float(connect_timeout),
    }
    if mods:
        config["client-mods"] = mods
        client_mods(config)
    return config


def simulate(
    run_config: dict[str, Any], num_clients: int, num_cpus: int | None = None, cpus_per_client: float = 1.0
) -> None:
    """Run the recipe with ``flwr.simulation.run_simulation``: one simulated SuperNode per client."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    server, client = flower_apps(run_config)
    init: dict[str, Any] = {"include_dashboard": False}
    if num_cpus is not None:
        init["num_cpus"] = num_cpus
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=num_clients,
        backend_config={
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
            "init_args": init,
        },
    )


def main(argv: list[str]) -> None:
    """Entry point of ``lightning-fed flower``."""
    args, recipe_args = parse(argv)
    if not args.app_dir and not args.simulate:
        _fail(
            "lightning-fed flower: give --app-dir DIR (write a Flower app for `flwr run`), --simulate, or both"
        )
    try:
        run_config = run_config_of(recipe_args, args.round_timeout, args.connect_timeout, args.client_mods)
    except ValueError as err:
        _fail(str(err))
    if args.app_dir:
        folder = Path(args.app_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pyproject.toml").write_text(app_pyproject(run_config))
        log.info("wrote the Flower app %s; run it with `flwr run %s <superlink-connection>`", folder, folder)
    if args.simulate:
        num_clients = int(yaml.safe_load(run_config["recipe"])["loop"]["num_clients"])
        simulate(run_config, num_clients, args.num_cpus, args.cpus_per_client)


__all__ = ["app_pyproject", "main", "run_config_of", "simulate"]
