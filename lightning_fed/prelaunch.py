"""Starting a multi-process run's extra ranks at the very start of the ``lightning-fed`` command.

A run with ``devices: N`` is N processes; without torchrun or SLURM the first one re-runs its own command line for
the others (:func:`lightning_fed.ranks.launch`). Started from :class:`~lightning_fed.loop.FedLoop`, the other
ranks would only begin importing torch and Lightning and building the recipe's objects once the first has done
all of that (a few seconds each on a small CPU, which is the whole run time of a short recipe). The command line
therefore reads ``loop.devices`` and ``loop.num_nodes`` from the recipe files and the overrides *before* the heavy
imports, with the standard library and PyYAML only, and starts the other local ranks right away; they do their
start-up beside the first one, and :func:`~lightning_fed.ranks.launch` adopts them later.

Whatever this early reading cannot settle (an override it does not understand, several nodes, a launcher already
present) leaves the launch to :func:`~lightning_fed.ranks.launch`, as before. When the recipe finally asks for a
different number of processes, :func:`~lightning_fed.ranks.launch` stops the early ranks and says so; when the
command fails before the run starts (a bad recipe), :func:`stop_unadopted` stops them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

LAUNCHER_VARIABLES = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_ID")
"""Any of these in the environment means the processes are started by someone else (or this is one of them)."""

_children: list[subprocess.Popen] = []


def launch_command() -> list[str]:
    """The command that started this process, for the extra ranks (as Fabric's subprocess launcher builds it).

    Raises:
        RuntimeError: an interactive session (there is no command to re-run) or pytest (which would re-run the
            tests).
    """
    import __main__

    spec = getattr(__main__, "__spec__", None)
    main_file = getattr(__main__, "__file__", None)
    name = spec.name if spec is not None else os.path.basename(main_file or "")
    # pytest's own process, or one of pytest-xdist's workers (which run under `python -c`, like an interactive session)
    xdist_worker = main_file is None and spec is None and "PYTEST_XDIST_WORKER" in os.environ
    if xdist_worker or name.split(".")[0] in ("pytest", "_pytest", "py") or os.path.basename(
            main_file or "").startswith("pytest"):
        raise RuntimeError(
            "FedLoop(devices>1) re-runs the command that started this process for the extra ranks, which would "
            "re-run pytest: run the multi-process run in a subprocess (a script or `python -m lightning_fed.cli`)")
    if main_file is None and spec is None:
        raise RuntimeError(
            "FedLoop(devices>1) starts the extra ranks by re-running the command that started this process, and "
            "an interactive session has none: run a script or `lightning-fed fit ... --loop.devices N`, or start "
            "the processes with torchrun")
    if spec is None:
        return [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]]
    return [sys.executable, "-m", spec.name, *sys.argv[1:]]


def planned_processes(argv: list[str]) -> int | None:
    """``loop.devices`` of a ``fit`` command line on one node (recipe files, then overrides, the last one winning),
    or ``None`` when it cannot be read this early (no ``fit``, several nodes, an override or file it does not
    understand): the loop's own launch then decides."""
    if not argv or argv[0] != "fit":
        return None
    settings: dict[str, Any] = {"devices": 1, "num_nodes": 1}
    args = argv[1:]
    i = 0
    while i < len(args):
        arg = args[i]
        key, value = (arg.split("=", 1) + [None])[:2] if arg.startswith("--") else (arg, None)
        if key in ("--config", "--loop.devices", "--loop.num_nodes", "--loop"):
            if value is None:
                if i + 1 >= len(args):
                    return None
                value, i = args[i + 1], i + 1
            if key == "--loop":
                return None  # a whole loop section on the command line: leave it to the parser
            if key == "--config":
                loop = _recipe_loop(value)
                if loop is None:
                    return None
                settings.update({k: loop[k] for k in ("devices", "num_nodes") if k in loop})
            else:
                settings[key.removeprefix("--loop.")] = _int(value)
        i += 1
    devices, nodes = settings["devices"], settings["num_nodes"]
    if not (isinstance(devices, int) and isinstance(nodes, int)) or devices < 1 or nodes != 1:
        return None
    return devices


def start(argv: list[str]) -> int:
    """Start the other local ranks now when the command line plans several processes on this machine and no
    launcher started them; return how many were started (0 otherwise). The environment this process then carries
    (``LOCAL_RANK=0``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``) makes :func:`~lightning_fed.ranks.launch`
    join them instead of starting its own."""
    if any(v in os.environ for v in LAUNCHER_VARIABLES):
        return 0
    devices = planned_processes(argv)
    if devices is None or devices == 1:
        return 0
    try:
        cmd = launch_command()
    except RuntimeError:
        return 0  # ranks.launch raises it with the same message when the run starts
    _children.extend(spawn_local_ranks(cmd, devices, devices))
    return devices - 1


def spawn_local_ranks(cmd: list[str], devices: int, world_size: int) -> list[subprocess.Popen]:
    """Make this process local rank 0 of ``world_size`` (``LOCAL_RANK``, ``WORLD_SIZE``, and ``MASTER_ADDR``,
    ``MASTER_PORT``, ``NODE_RANK`` unless set) and start local ranks ``1 .. devices - 1`` running ``cmd``, as
    Fabric's subprocess launcher does."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("NODE_RANK", "0")
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = "0"
    return [subprocess.Popen(cmd, env={**os.environ, "LOCAL_RANK": str(r)}) for r in range(1, devices)]


def adopt() -> list[subprocess.Popen]:
    """The processes :func:`start` started, handed over to the run (which waits for them or stops them)."""
    taken = list(_children)
    _children.clear()
    return taken


def stop_unadopted() -> None:
    """Stop the ranks :func:`start` started if the run never adopted them (the command failed before the run
    began: they would otherwise wait for this process until their timeout)."""
    for proc in _children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in _children:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _children.clear()


def main() -> None:
    """Entry point of the ``lightning-fed`` console script: start the other ranks, then run the command."""
    start(sys.argv[1:])
    try:
        from lightning_fed.cli import main as cli_main

        cli_main()
    finally:
        stop_unadopted()


def _recipe_loop(path: str) -> dict[str, Any] | None:
    """The ``loop`` section of a recipe file ({} when it has none), or ``None`` when it cannot be read as one."""
    try:
        import yaml

        data = yaml.safe_load(Path(path).read_text())
    except Exception:  # noqa: BLE001 - the real parser reports an unreadable recipe; here it only means "unknown"
        return None
    if data is None:
        return {}
    if not isinstance(data, dict):
        return None
    loop = data.get("loop", {})
    return loop if isinstance(loop, dict) else None


def _int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["adopt", "launch_command", "main", "planned_processes", "spawn_local_ranks", "start", "stop_unadopted"]
