"""Test helper: the ranks of a multi-process run forked from a process that has already done the imports.

A rank started by ``lightning-fed fit --loop.devices N`` spends about 9 s of CPU importing torch, Lightning and
lightning_fed on CI's 2 cores, far longer than the 3 tiny rounds it then runs; the parity tests start about 60
such processes. ``RankForks`` instead keeps one server process per pytest worker that has imported
``lightning_fed.cli`` and never runs anything; each request forks N children from it, and each child is one rank:
it gets the environment a rank started by the command line gets (``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``, the path :func:`lightning_fed.ranks.launch` takes for ranks started by
:func:`lightning_fed.prelaunch.spawn_local_ranks`) and runs the command line as ``python -m lightning_fed.cli``
does. Everything after the imports (the process group, the recipe, the run) is the rank's own, in a fresh copy of a
process that has run no torch operation. Starting the processes themselves is tested with real launches
(``test_parallel.py``: the FedAvg parity cases, torchrun, SLURM, the killed and failing ranks).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import traceback
from pathlib import Path

TIMEOUT_S = 300
"""How long one forked run may take before the server is killed and the request fails."""


class RankForks:
    """A server process that forks the ranks of ``lightning-fed fit`` command lines (see the module docstring).

    Args:
        env: the server's environment (and so every rank's, before its rank variables).
    """

    def __init__(self, env: dict[str, str]) -> None:
        self._proc = subprocess.Popen([sys.executable, __file__], env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, start_new_session=True)

    def run(self, argv: list[str], devices: int, log_dir: Path) -> list[int]:
        """Run ``argv`` (``["fit", ...]``) as ``devices`` ranks; return their exit codes (rank order). Each rank's
        output goes to ``log_dir/rank-<r>.log``."""
        log_dir.mkdir(parents=True, exist_ok=True)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"argv": argv, "devices": devices, "log_dir": str(log_dir)}) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], TIMEOUT_S)
        line = self._proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise RuntimeError(f"the forked ranks of {argv} gave no answer within {TIMEOUT_S} s (server killed)")
        return json.loads(line)["returncodes"]

    def close(self) -> None:
        """Stop the server and anything it forked."""
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._proc.wait()


def _rank(argv: list[str], rank: int, devices: int, port: int, log_dir: str) -> int:
    """In a forked child: become rank ``rank`` and run the command line; the exit code a process would have."""
    fd = os.open(os.path.join(log_dir, f"rank-{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(devices), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    sys.argv = [sys.argv[0], *argv]
    from lightning_fed.cli import main

    try:
        main(argv)
        return 0
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except BaseException:  # noqa: BLE001 - printed as an uncaught exception of a process would be
        traceback.print_exc()
        return 1


def _serve() -> None:
    """The server: import the CLI once, then fork the ranks of each request read from stdin."""
    import lightning_fed.cli  # noqa: F401 - the imports every forked rank shares
    from lightning_fed.prelaunch import _free_port

    answers = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray output never reaches the answers
    for line in sys.stdin:
        request = json.loads(line)
        devices, port = request["devices"], _free_port()
        pids = []
        for rank in range(devices):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _rank(request["argv"], rank, devices, port, request["log_dir"])
                finally:
                    logging.shutdown()
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        answers.write(json.dumps({"returncodes": codes}) + "\n")
        answers.flush()


if __name__ == "__main__":
    _serve()
