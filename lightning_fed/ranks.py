"""The processes of a run: launching them, knowing each one's rank, and moving bytes between them.

A multi-process run (``FedLoop(devices=N, num_nodes=M)``) is N x M processes (ranks) that each replay the whole
server (sampling, instructions, decoding, aggregation, evaluation) and split the work of the round's clients
among themselves; the only things they exchange are the clients' reply messages (the codec's bytes) and a few
decisions of rank 0 (the run folder). See docs/scale-out.md for what lives where and why.

The processes are started the way Lightning starts them, and found the way Fabric finds them
(``lightning.fabric.plugins.environments``):

- ``torchrun`` (``TorchElasticEnvironment``) or SLURM's ``srun`` (``SLURMEnvironment``): every process is
  already running; this one reads its rank from the environment.
- otherwise, like Fabric's subprocess launcher, the first process re-runs its own command line once per extra
  local rank with ``LOCAL_RANK``/``NODE_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set (several nodes:
  the same command on every node with ``NODE_RANK`` set, as with Lightning).

The process group uses the gloo backend whatever the accelerator: ranks exchange CPU bytes, never gradients
(each rank trains different clients, so DDP's gradient all-reduce is exactly what must not happen), and gloo
lets several processes share one GPU.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from lightning_fed.prelaunch import adopt, launch_command, spawn_local_ranks

log = logging.getLogger("lightning_fed")

DEFAULT_TIMEOUT_S = 1800
"""How long a rank waits for the others at an exchange (the slowest rank's local training of one round)."""


class RankFailed(RuntimeError):
    """A rank of a multi-process run died (or could not take part); the message names it and how to go on."""


@dataclass
class Ranks:
    """This process's place in the run, and the exchanges between ranks.

    A one-process run is ``Ranks()``: every exchange returns its input.

    Attributes:
        rank: this process's global rank (0 writes the run's outputs).
        world_size: number of processes.
        local_rank: rank on this node (chooses the GPU).
        local_world_size: processes on this node.
        children: the processes this one started (local ranks 1.. when no external launcher is used).
        peers: ``(host, pid)`` of every rank, known after :meth:`introduce`.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    children: list[subprocess.Popen] = field(default_factory=list)
    peers: list[tuple[str, int]] = field(default_factory=list)
    activity: str = "start-up"
    """What the ranks are doing (``"round 3"``), for the message when one of them dies."""
    resume_hint: str = (
        "Start it again, or continue it from its last checkpoint with `--resume last` (FedLoop.fit(resume='last')), "
        "with any number of processes.")
    """How to go on, for the message when a rank dies; the loop says whether this run has a checkpoint yet."""

    @property
    def is_zero(self) -> bool:
        """Whether this process is rank 0 (the one that writes checkpoints, logs and outputs)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether the run has more than one process."""
        return self.world_size > 1

    # ------------------------------------------------------------------ exchanges
    def gather(self, blob: bytes) -> list[bytes]:
        """Every rank's ``blob``, indexed by rank, on every rank (an all-gather of variable-length bytes)."""
        if not self.distributed:
            return [blob]
        try:
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
            dist.all_gather(sizes, torch.tensor([len(blob)], dtype=torch.int64))
            longest = max(int(s) for s in sizes)
            buf = torch.zeros(max(longest, 1), dtype=torch.uint8)
            if blob:
                buf[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            out = [torch.empty_like(buf) for _ in range(self.world_size)]
            dist.all_gather(out, buf)
        except RuntimeError as err:
            raise self.failure(err) from err
        return [out[i][: int(sizes[i])].numpy().tobytes() for i in range(self.world_size)]

    def broadcast(self, blob: bytes | None) -> bytes:
        """Rank 0's ``blob`` on every rank (other ranks pass ``None``)."""
        if not self.distributed:
            return blob or b""
        parts = self.gather((blob or b"") if self.is_zero else b"")
        return parts[0]

    def agree(self, value: Any) -> Any:
        """Rank 0's JSON-serialisable ``value`` on every rank."""
        if not self.distributed:
            return value
        text = self.broadcast(json.dumps(value).encode() if self.is_zero else None)
        return json.loads(text.decode())

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        self.gather(b"")

    def introduce(self) -> None:
        """Exchange every rank's host name and process id (named in the message when a rank dies)."""
        me = json.dumps([socket.gethostname(), os.getpid()]).encode()
        self.peers = [tuple(json.loads(b.decode())) for b in self.gather(me)]  # type: ignore[misc]

    # ------------------------------------------------------------------ failures
    def failure(self, err: BaseException) -> RankFailed:
        """A :class:`RankFailed` naming the rank(s) that died, when this process can tell which."""
        dead = self._dead()
        who = ", ".join(dead) if dead else "another rank (its own output says why)"
        return RankFailed(
            f"rank {self.rank}: {who} died during {self.activity}; the run stops ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). {self.resume_hint}")

    def _dead(self) -> list[str]:
        """The ranks on this machine seen dead: this process's children by their exit status, the other ranks by
        their process id. A killed process closes its connections before it is a zombie, so the look is repeated
        for a few seconds until one is seen."""
        deadline = time.monotonic() + 5.0  # a dying process is gone within moments of its closed connection
        host = socket.gethostname()
        others = [(r, pid) for r, (peer_host, pid) in enumerate(self.peers)
                  if r != self.rank and peer_host == host and pid not in {p.pid for p in self.children}]
        while True:
            found = []
            for i, proc in enumerate(self.children):
                code = proc.poll()
                if code is not None and code != 0:
                    rank = self.rank + i + 1
                    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                    found.append(f"rank {rank} (pid {proc.pid}, {how})")
            found += [f"rank {r} (pid {pid})" for r, pid in others if not _alive(pid)]
            if found or not (self.children or others) or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def close(self, ok: bool) -> None:
        """Leave the process group; the launching process waits for its children (or stops them on failure)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
        for proc in self.children:
            if not ok and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.children:
            try:
                proc.wait(timeout=None if ok else 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` on this machine still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True  # no /proc (not Linux): it answered the signal, so it exists
    return state not in ("Z", "X")


def launch(devices: int, num_nodes: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """Start (or join) the run's processes and their gloo process group; ``Ranks()`` for one process.

    Raises:
        ValueError: the processes an external launcher started are not ``devices * num_nodes``.
        RuntimeError: extra ranks would have to be started from an interactive session or from pytest.
    """
    total = devices * num_nodes
    if total == 1:
        return Ranks()
    children: list[subprocess.Popen] = []
    if TorchElasticEnvironment.detect():
        env: Any = TorchElasticEnvironment()
        rank, world, local = env.global_rank(), env.world_size(), env.local_rank()
        address, port = env.main_address, env.main_port
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", devices))
    elif SLURMEnvironment.detect():
        env = SLURMEnvironment()
        rank, world, local = env.global_rank(), env.world_size(), env.local_rank()
        address, port = env.main_address, env.main_port
        local_world = int(os.environ.get("SLURM_NTASKS_PER_NODE", str(devices)).split("(")[0])
    else:
        children = adopt()  # started by the command line before its heavy imports (lightning_fed.prelaunch)
        if "LOCAL_RANK" not in os.environ:  # this process starts the other local ranks
            children += spawn_local_ranks(launch_command(), devices, total)
        local = int(os.environ["LOCAL_RANK"])
        node = int(os.environ.get("NODE_RANK", "0"))
        rank, world, local_world = node * devices + local, int(os.environ.get("WORLD_SIZE", total)), devices
        address, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
    if world != total:
        for proc in children:
            proc.kill()
            proc.wait()
        raise ValueError(f"FedLoop: devices={devices} x num_nodes={num_nodes} = {total} processes, but the launcher "
                         f"started {world}: make them agree (e.g. torchrun --nproc-per-node={devices} "
                         f"--nnodes={num_nodes})")
    if "OMP_NUM_THREADS" not in os.environ:  # as Fabric: share the cores among the processes of this node
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    ranks = Ranks(rank=rank, world_size=world, local_rank=local, local_world_size=local_world, children=children)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        ranks.introduce()
    except BaseException:
        ranks.close(ok=False)
        raise
    if rank == 0:
        log.info("%d processes (%d on this node), %d torch thread(s) each: the same weights as one process run with "
                 "OMP_NUM_THREADS=%d", world, local_world, torch.get_num_threads(), torch.get_num_threads())
    if rank != 0:  # one voice: rank 0 logs the run (every rank replays the server, so it would repeat it)
        logging.getLogger("lightning_fed").setLevel(logging.ERROR)
    return ranks


__all__ = ["DEFAULT_TIMEOUT_S", "RankFailed", "Ranks", "launch"]
