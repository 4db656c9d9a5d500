"""A deterministic simulated clock for synchronous rounds: client round times, deadlines, stragglers, dropouts and
over-selection.

A client's round takes, in simulated seconds,

    down_s    = 8 * downlink bytes / down_bps          (the encoded instruction and the codec's broadcast)
    compute_s = MACs per sample x samples processed x FORWARD_BACKWARD x FLOPS_PER_MAC / flops_per_s
    up_s      = 8 * uplink bytes / up_bps              (the encoded reply)
    finish_s  = down_s + compute_s + up_s

with the bytes the real encoded messages' sizes (so every codec changes the time), the MACs of one sample's forward
pass through the client's current model counted by torch-pruning (so pruning and capacity tiers change it),
``FORWARD_BACKWARD = 3`` (a backward pass costs about twice a forward: Kaplan et al. 2020, "Scaling Laws for Neural
Language Models", section 2.1) and ``FLOPS_PER_MAC = 2`` (a multiply-accumulate is a multiply and an add). Nothing is
measured: wall time is noisy and would break resume-exactness. The clients of a round start together; the round
ends when the server stops waiting:

* ``keep_first=K`` (over-selection, as in Bonawitz et al., MLSys 2019): at the K-th finish; later replies are
  discarded;
* ``deadline``: at the deadline if anyone sampled has not reported by then (a dropout, a straggler), else at the
  last finish;
* otherwise at the last finish (a dropout is assumed to be noticed at once).

A straggler that would finish after ``deadline`` is dropped (``straggler="drop"``) or, with ``"partial"``, does only
the local optimizer steps that fit: ``Instruction.config["max_steps"]`` caps its steps (honoured by
:class:`~lightning_fed.client.LocalTrainer`), sized before it trains from its downlink time, its step time and an
estimate of its uplink time (the size of its previous reply, else of the instruction's uncompressed payload); a
client still late after that is dropped. Dropouts draw from ``(seed, round, client)`` only. A dropped or
over-selected reply is still decoded by the server (so a stateful codec's state about its sender stays in step)
and left out of the aggregate.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_fed.callbacks._compress import ModelInputs, torch_pruning
from lightning_fed.callbacks.footprint import float_copy
from lightning_fed.protocol import ClientMessage, ClientTask
from lightning_fed.seeding import Stream, generator, rng_untouched
from lightning_fed.systems.profiles import ClientProfiles, Profile
from lightning_fed.validation import CheckedArguments, need

OWNER = "SimulatedClock"
FORWARD_BACKWARD = 3.0
"""Training FLOPs of a sample relative to its forward pass (forward 1 + backward 2)."""
FLOPS_PER_MAC = 2.0
"""A multiply-accumulate counts as two floating-point operations."""
STRAGGLER_POLICIES = ("drop", "partial")
STATUSES = ("ok", "partial", "late", "dropout", "no_step", "extra", "failed", "stale")
"""What happened to a sampled client: reported in time (``ok``; ``partial`` with capped steps), ``late`` (past the
deadline, dropped), ``dropout`` (the profile's dropout), ``no_step`` (not one step fits before the deadline),
``extra`` (over-selected and not among the first ``keep_first``), ``failed`` (the client's own failure), ``stale``
(asynchronous: more versions old than ``max_staleness``, dropped)."""


@dataclass
class Workload:
    """What the clock knows about a client's local work (the loop builds it from the data and the model).

    Attributes:
        examples: training examples of every client, by id.
        batch_size: the training loader's batch size.
        drop_last: whether the loader drops the last partial batch.
        accumulate_grad_batches: batches per optimizer step.
        local_epochs: local epochs unless an instruction's ``local_epochs`` says otherwise.
        macs_per_sample: a client id in, MACs of one sample's forward pass through its current model out.
    """

    examples: list[int]
    batch_size: int
    drop_last: bool
    accumulate_grad_batches: int
    local_epochs: int
    macs_per_sample: Callable[[int], float]


def epoch_shape(n: int, batch_size: int, drop_last: bool, accumulate: int) -> tuple[int, int, int]:
    """``(batches, optimizer steps, samples)`` of one local epoch over ``n`` examples (an optimizer step every
    ``accumulate`` batches and on the epoch's last batch, as Lightning does)."""
    batches = n // batch_size if drop_last else -(-n // batch_size)
    samples = batches * batch_size if drop_last else n
    return batches, -(-batches // accumulate), samples


def samples_processed(
    n: int,
    epochs: int,
    batch_size: int,
    drop_last: bool = False,
    accumulate: int = 1,
    max_steps: int | None = None,
) -> int:
    """Samples a client trains on in ``epochs`` local epochs over ``n`` examples, stopping after ``max_steps``
    optimizer steps (``None``: no cap).

    Example::

        samples_processed(100, epochs=2, batch_size=16)               # 200
        samples_processed(100, epochs=2, batch_size=16, max_steps=9)  # 100 + 2 * 16 = 132
    """
    _, steps, per_epoch = epoch_shape(n, batch_size, drop_last, accumulate)
    if max_steps is None or max_steps >= epochs * steps or steps == 0:
        return epochs * per_epoch
    full, rest = divmod(max_steps, steps)
    return full * per_epoch + min(rest * accumulate * batch_size, per_epoch)


def transfer_seconds(num_bytes: int, bps: float) -> float:
    """Seconds to move ``num_bytes`` at ``bps`` bits per second."""
    return 8.0 * num_bytes / bps


def compute_seconds(
    macs_per_sample: float, samples: int, flops_per_s: float, forward_backward: float = FORWARD_BACKWARD
) -> float:
    """Seconds of local training: ``macs_per_sample * samples * forward_backward * FLOPS_PER_MAC / flops_per_s``."""
    return macs_per_sample * samples * forward_backward * FLOPS_PER_MAC / flops_per_s


class MacCounter:
    """MACs of one sample's forward pass through a module, counted by torch-pruning (the footprint counter) and
    cached per module until its structure changes (pruning, a new tier)."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[list[Any], float]] = {}

    def __call__(self, module: nn.Module, inputs: ModelInputs) -> float:
        """MACs of ``module`` on the first row of ``inputs``."""
        sig = [(n, tuple(t.shape), t.dtype) for n, t in [*module.named_parameters(), *module.named_buffers()]]
        known = self._cache.get(id(module))
        if known is not None and known[0] == sig:
            return known[1]
        with rng_untouched():  # tracing runs a forward pass: the training's random state must not move
            macs, _ = torch_pruning().utils.count_ops_and_params(
                float_copy(module), inputs.to("cpu").rows(1).for_tracing()
            )
        self._cache[id(module)] = (sig, float(macs))
        return float(macs)


@dataclass
class ClientTime:
    """One sampled client's simulated round (a row of ``clock.csv``)."""

    round: int
    client_id: int
    device: str
    status: str
    bytes_down: int = 0
    bytes_up: int = 0
    samples: int = 0
    max_steps: int = -1  # -1: no cap
    down_s: float = 0.0
    compute_s: float = 0.0
    up_s: float = 0.0
    finish_s: float = 0.0
    start_s: float = 0.0  # the simulated time the client was sent its instruction (finish_s counts from it)
    staleness: int = 0  # asynchronous rounds: versions the global model advanced while the client worked


class SimulatedClock(CheckedArguments):
    """Simulated time of synchronous rounds, with optional deadline, straggler policy, over-selection and dropouts.

    Example::

        clock = SimulatedClock(profiles=ClientProfiles(preset="heterogeneous"), deadline=30.0, straggler="partial")
        loop = FedLoop(num_clients=20, clients_per_round=10, clock=clock)

    Per round the history gets ``sim_round_s``, ``sim_time_s`` (cumulative), ``sim_late``, ``sim_dropouts``,
    ``sim_partial``, ``sim_extra``; every sampled client's row goes to ``clock.csv`` in the run folder.

    Args:
        profiles: the clients' devices and networks; default the ``"heterogeneous"`` preset.
        deadline: simulated seconds after the round starts after which the server stops waiting; ``None``: none.
        straggler: what a client that would finish after ``deadline`` does: ``"drop"`` (its reply is discarded) or
            ``"partial"`` (it runs only the local optimizer steps that fit before the deadline).
        keep_first: over-selection: aggregate only the first this many replies to arrive (sample more with
            ``clients_per_round``); ``None``: everyone who reports in time.
        dropouts: let clients drop out with their profile's dropout probability.
        forward_backward: training cost of a sample relative to its forward pass (3: backward = 2 forwards).
    """

    def __init__(
        self,
        *,
        profiles: ClientProfiles | None = None,
        deadline: float | None = None,
        straggler: str = "drop",
        keep_first: int | None = None,
        dropouts: bool = True,
        forward_backward: float = FORWARD_BACKWARD,
    ) -> None:
        need(
            OWNER,
            deadline is None or (math.isfinite(deadline) and deadline > 0),
            "deadline",
            deadline,
            "a number of simulated seconds > 0, or None",
        )
        need(OWNER, straggler in STRAGGLER_POLICIES, "straggler", straggler, f"one of {STRAGGLER_POLICIES}")
        need(
            OWNER,
            straggler == "drop" or deadline is not None,
            "straggler",
            straggler,
            "'drop' unless a deadline is set (partial work fits the steps before the deadline)",
        )
        need(OWNER, keep_first is None or keep_first >= 1, "keep_first", keep_first, ">= 1 or None")
        need(
            OWNER,
            math.isfinite(forward_backward) and forward_backward > 0,
            "forward_backward",
            forward_backward,
            "> 0",
        )
        self.profiles = profiles if profiles is not None else ClientProfiles()
        self.deadline = deadline
        self.straggler = straggler
        self.keep_first = keep_first
        self.dropouts = dropouts
        self.forward_backward = forward_backward
        self.table: list[Profile] = []
        self.seed = 0
        self.time_s = 0.0
        self.rows: list[ClientTime] = []
        self._last_up: dict[
            int, int
        ] = {}  # each client's previous reply size: the partial policy's uplink estimate
        self._pending: dict[int, ClientTime] = {}

    def bind(self, num_clients: int, clients_per_round: int, seed: int) -> None:
        """Resolve the profiles for the run's clients and start at simulated time 0 (FedLoop calls it at
        construction, so a bad profile fails before anything runs, and again when a run starts)."""
        need(
            OWNER,
            self.keep_first is None or self.keep_first <= clients_per_round,
            "keep_first",
            self.keep_first,
            f"at most clients_per_round={clients_per_round} (over-selection samples more than it keeps)",
        )
        self.table = self.profiles.resolve(num_clients, seed)
        self.seed = seed
        self.time_s, self.rows, self._last_up, self._pending = 0.0, [], {}, {}

    def drops_out(self, server_round: int, client_id: int) -> bool:
        """Whether ``client_id`` drops out of ``server_round`` (seeded by (seed, round, client) only)."""
        p = self.table[client_id].dropout
        if not self.dropouts or p <= 0:
            return False
        return (
            float(
                torch.rand(1, generator=generator(self.seed, Stream.SYSTEMS_DROPOUT, server_round, client_id))
            )
            < p
        )

    def admit(
        self, server_round: int, tasks: list[ClientTask], work: Workload
    ) -> tuple[list[ClientTask], list[ClientMessage]]:
        """Before the clients run: drop the round's dropouts and, with ``straggler="partial"``, cap each task's
        ``max_steps`` to what fits before the deadline. Returns the tasks to run and the failure messages of the
        clients that will not (dropouts, and those for which not one step fits)."""
        self._pending = {}
        run, failed = [], []
        for task in tasks:
            cid = task.client_id
            prof = self.table[cid]
            t = ClientTime(
                server_round, cid, prof.device, "ok", bytes_down=len(task.message) + len(task.broadcast)
            )
            t.down_s = transfer_seconds(t.bytes_down, prof.down_bps)
            self._pending[cid] = t
            if self.drops_out(server_round, cid):
                t.status = "dropout"
                failed.append(
                    ClientMessage(
                        cid, failure=f"dropped out (its profile's dropout probability is {prof.dropout:.3g})"
                    )
                )
                continue
            epochs = int(task.config.get("local_epochs", work.local_epochs))
            n, macs = work.examples[cid], work.macs_per_sample(cid)
            cap = task.config.get("max_steps")
            if self.straggler == "partial":
                step_s = compute_seconds(
                    macs,
                    work.batch_size * work.accumulate_grad_batches,
                    prof.flops_per_s,
                    self.forward_backward,
                )
                up_guess = self._last_up.get(
                    cid, sum(math.prod(s.shape) * s.dtype.itemsize for s in task.spec.values())
                )
                budget = self.deadline - t.down_s - transfer_seconds(up_guess, prof.up_bps)
                fits = math.floor(budget / step_s) if step_s > 0 else None
                steps = (
                    epochs * epoch_shape(n, work.batch_size, work.drop_last, work.accumulate_grad_batches)[1]
                )
                if fits is not None and fits < steps:
                    cap = fits if cap is None else min(int(cap), fits)
                if cap is not None and cap < 1:
                    t.status = "no_step"
                    failed.append(
                        ClientMessage(
                            cid,
                            failure=f"not one local step fits before the deadline "
                            f"({self.deadline:g} simulated s)",
                        )
                    )
                    continue
                if cap is not None:
                    task.config["max_steps"] = int(cap)
                    t.max_steps, t.status = int(cap), "partial"
            t.samples = samples_processed(
                n,
                epochs,
                work.batch_size,
                work.drop_last,
                work.accumulate_grad_batches,
                None if cap is None else int(cap),
            )
            t.compute_s = compute_seconds(macs, t.samples, prof.flops_per_s, self.forward_backward)
            run.append(task)
        return run, failed

    def take_dispatched(self) -> dict[int, ClientTime]:
        """The rows :meth:`admit` started (downlink and compute times, dropouts), for a caller that times the
        replies itself (asynchronous rounds); :meth:`finish` is then not called."""
        pending, self._pending = self._pending, {}
        return pending

    @property
    def discards(self) -> bool:
        """Whether replies may arrive and be discarded (a deadline or over-selection): the server then decodes
        every reply (keeping each sender's codec state in step) before the clock's discards are removed."""
        return self.deadline is not None or self.keep_first is not None

    def finish(
        self, server_round: int, messages: list[ClientMessage]
    ) -> tuple[dict[int, str], dict[str, float]]:
        """After the clients ran: time every reply, find the late ones and, with ``keep_first``, all but the first
        arrivals. Returns the replies to discard after decoding (client id -> reason) and the round's clock
        metrics. The server still decodes a discarded reply: a stateful codec's state about its sender must
        advance as the sender's own did."""
        times = self._pending
        for msg in messages:
            t = times[msg.client_id]
            if msg.failure is not None:
                t.status = "failed" if t.status in ("ok", "partial") else t.status
                continue
            prof = self.table[msg.client_id]
            t.bytes_up = len(msg.message)
            t.up_s = transfer_seconds(t.bytes_up, prof.up_bps)
            t.finish_s = t.down_s + t.compute_s + t.up_s
            self._last_up[msg.client_id] = t.bytes_up
            if self.deadline is not None and t.finish_s > self.deadline:
                t.status = "late"
        arrived = sorted(
            (t for t in times.values() if t.status in ("ok", "partial")),
            key=lambda t: (t.finish_s, t.client_id),
        )
        missing = any(t.status not in ("ok", "partial") for t in times.values())
        if self.keep_first is not None and len(arrived) >= self.keep_first:
            round_s = arrived[self.keep_first - 1].finish_s
            for t in arrived[self.keep_first :]:
                t.status = "extra"
        elif self.deadline is not None and missing:
            round_s = self.deadline
        else:
            round_s = max((t.finish_s for t in arrived), default=0.0)
        discard = {}
        for t in times.values():
            if t.status == "late":
                discard[t.client_id] = (
                    f"client {t.client_id} past the deadline: it finished at {t.finish_s:.4g} simulated s > "
                    f"{self.deadline:g}"
                )
            elif t.status == "extra":
                discard[t.client_id] = f"client {t.client_id} not among the first {self.keep_first} to arrive"
        rows = sorted(times.values(), key=lambda t: t.client_id)
        for t in rows:
            t.start_s = self.time_s
        self.time_s += round_s
        self.rows.extend(rows)
        self._pending = {}
        count = {s: sum(t.status == s for t in rows) for s in STATUSES}
        metrics = {
            "sim_round_s": round_s,
            "sim_time_s": self.time_s,
            "sim_late": count["late"] + count["no_step"],
            "sim_dropouts": count["dropout"],
            "sim_partial": count["partial"],
            "sim_extra": count["extra"],
        }
        return discard, metrics

    def write_csv(self, path: str | Path) -> None:
        """Write every sampled client's simulated round (:class:`ClientTime` rows) to ``path`` atomically."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([f.name for f in fields(ClientTime)])
        for t in self.rows:
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in asdict(t).values()])
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def state_dict(self) -> dict[str, Any]:
        """Cumulative simulated time, every client row so far and the clients' previous reply sizes."""
        return {
            "time_s": self.time_s,
            "rows": [asdict(t) for t in self.rows],
            "last_up": [[c, b] for c, b in sorted(self._last_up.items())],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.time_s = float(state["time_s"])
        self.rows = [ClientTime(**r) for r in state["rows"]]
        self._last_up = {int(c): int(b) for c, b in state["last_up"]}


__all__ = [
    "FLOPS_PER_MAC",
    "FORWARD_BACKWARD",
    "STATUSES",
    "STRAGGLER_POLICIES",
    "ClientTime",
    "MacCounter",
    "SimulatedClock",
    "Workload",
    "compute_seconds",
    "epoch_shape",
    "samples_processed",
    "transfer_seconds",
]
