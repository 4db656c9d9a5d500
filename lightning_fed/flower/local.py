"""A Flower deployment on this machine: a SuperLink and one SuperNode per client as separate processes (insecure,
free ports), and ``flwr run`` of an app folder; for trying a deployment, its test and its benchmark.

Example::

    with LocalDeployment(num_nodes=3, workdir="flower-local") as dep:
        dep.run_app("fedavg-app")        # written by `lightning-fed flower --app-dir fedavg-app ...`

Every process is started in its own process group and stopped with it (Flower's SuperExec and ClientApp
children too), also when the block raises.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from lightning_fed.validation import need

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

OWNER = "LocalDeployment"


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes (partition ids ``0 .. num_nodes - 1``) on localhost.

    Args:
        num_nodes: SuperNodes to start, one per client of the recipe.
        workdir: folder for the processes' logs (``superlink.log``, ``node<i>.log``, ``flwr.log``), Flower's
            configuration (``flwr-home``) and each node's client store (``node<i>``).
        start_timeout_s: how long to wait for the SuperLink to listen.
    """

    def __init__(self, num_nodes: int, workdir: str | Path, start_timeout_s: float = 120.0) -> None:
        need(OWNER, num_nodes >= 1, "num_nodes", num_nodes, ">= 1")
        need(OWNER, start_timeout_s > 0, "start_timeout_s", start_timeout_s, "> 0")
        self.num_nodes = num_nodes
        self.workdir = Path(workdir)
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.nodes: list[subprocess.Popen] = []
        bin_dir = Path(sys.executable).parent  # the commands come with the flwr package
        self.bin = {
            name: str(bin_dir / name) if (bin_dir / name).exists() else name
            for name in ("flower-superlink", "flower-supernode", "flwr")
        }
        home = self.workdir / "flwr-home"
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}

    def log(self, name: str) -> Path:
        """The log file of a process: ``"superlink"``, ``"node0"``…, ``"flwr"``."""
        return self.workdir / f"{name}.log"

    def _start(self, cmd: list[str], name: str) -> subprocess.Popen:
        with self.log(name).open("w") as out:
            p = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
                start_new_session=True,
            )
        self.procs.append(p)
        return p

    def __enter__(self) -> Self:
        home = self.workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        try:
            link = self._start(
                [
                    self.bin["flower-superlink"],
                    "--insecure",
                    "--disable-runtime-dependency-installation",
                    "--port",
                    str(self.port),
                ],
                "superlink",
            )
            self._wait_listening(link)
            for i in range(self.num_nodes):
                config = f'partition-id={i} num-partitions={self.num_nodes} state-dir="{self.workdir / f"node{i}"}"'
                self.nodes.append(
                    self._start(
                        [
                            self.bin["flower-supernode"],
                            "--insecure",
                            "--superlink",
                            f"127.0.0.1:{self.port}",
                            "--port",
                            str(free_port()),
                            "--node-config",
                            config,
                        ],
                        f"node{i}",
                    )
                )
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _wait_listening(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the SuperLink exited at start-up: {self.log('superlink').read_text()[-2000:]}"
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.5)
        raise TimeoutError(
            f"the SuperLink does not listen on port {self.port} after {self.start_timeout_s} s"
        )

    def start_run(self, app_dir: str | Path) -> subprocess.Popen:
        """Start ``flwr run <app_dir> local --stream`` (its output in ``flwr.log``); returns the process."""
        return self._start(
            [self.bin["flwr"], "run", str(Path(app_dir).resolve()), "local", "--stream"], "flwr"
        )

    def run_app(self, app_dir: str | Path, timeout_s: float = 3600.0) -> str:
        """Run the app to its end; its streamed log. Raises ``RuntimeError`` if ``flwr run`` fails."""
        proc = self.start_run(app_dir)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill(proc)
        text = self.log("flwr").read_text()
        if proc.returncode != 0:
            raise RuntimeError(f"flwr run exited with {proc.returncode}: {text[-3000:]}")
        return text

    @staticmethod
    def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a process this deployment started and to its group (its Flower children)."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            proc.wait()

    def stop(self) -> None:
        """Stop every process group this deployment started: SIGTERM, then SIGKILL after 20 s."""
        for p in self.procs:
            if p.poll() is None:
                self.kill(p, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            self.kill(p, signal.SIGKILL)  # also what a finished process left running in its group
        self.procs.clear()


__all__ = ["LocalDeployment", "free_port"]
