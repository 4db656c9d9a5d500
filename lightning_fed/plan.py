"""Plan (server side of a round's start): sample the clients, build their instructions, encode the downlink.

What leaves the server here is one :class:`~lightning_fed.protocol.ClientTask` per sampled client: the
encoded instruction payload (bytes), its plain config, the client's share of the uplink budget and the uplink
codec's broadcast. Each distinct payload is encoded once; its bytes are counted once per receiving client.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_fed.codecs.base import Codec, EncodeArgs
from lightning_fed.protocol import ClientMessage, ClientTask, Instruction, PayloadSpec, payload_bytes, spec_of
from lightning_fed.seeding import derive_seed
from lightning_fed.store import ClientStore
from lightning_fed.strategies.base import Strategy

UPLINK_ALLOCATIONS = ("uniform", "examples")
SAMPLINGS = ("random", "cyclic", "poisson")
CYCLE_STREAM = 0x6379  # the (seed, "cy", cycle) stream orders a cycle of cyclic sampling


def uplink_shares(allocation: str, examples: list[int]) -> list[float]:
    """Each client's share of the uplink budget (mean 1 over all clients): all 1 for ``"uniform"``; for
    ``"examples"`` proportional to the client's number of training examples (an empty shard counts as 1).

    Example::

        uplink_shares("examples", [100, 300])   # [0.5, 1.5]
    """
    if allocation not in UPLINK_ALLOCATIONS:
        raise ValueError(f"uplink_allocation={allocation!r} is not allowed; use one of {UPLINK_ALLOCATIONS}")
    if allocation == "uniform" or not examples:
        return [1.0] * len(examples)
    n = [max(int(x), 1) for x in examples]
    total = sum(n)
    return [x * len(n) / total for x in n]


def sample_clients(seed: int, server_round: int, num_clients: int, per_round: int, sampling: str = "random") -> list[int]:
    """The clients of ``server_round``, sorted.

    ``"random"``: a sample without replacement seeded by ``(seed, round)`` (rounds are independent).
    ``"cyclic"``: a seeded permutation of all clients is walked ``per_round`` at a time, so every client takes part
    once in each cycle of ``ceil(num_clients / per_round)`` rounds; the last round of a cycle is topped up with
    clients drawn from the rest, so every round has ``per_round`` clients.
    ``"poisson"``: each client takes part independently with probability ``per_round / num_clients``, seeded by
    ``(seed, round)`` (``per_round`` clients on average; the sampling that DP accounting assumes).
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling={sampling!r} is not allowed; use one of {SAMPLINGS}")
    if sampling == "random":
        g = torch.Generator().manual_seed(derive_seed(seed, server_round))
        return sorted(torch.randperm(num_clients, generator=g)[:per_round].tolist())
    if sampling == "poisson":
        g = torch.Generator().manual_seed(derive_seed(seed, server_round))
        return torch.nonzero(torch.rand(num_clients, generator=g) < per_round / num_clients).flatten().tolist()
    per_cycle = -(-num_clients // per_round)
    cycle, step = divmod(server_round, per_cycle)
    order = torch.randperm(num_clients, generator=torch.Generator().manual_seed(derive_seed(seed, CYCLE_STREAM, cycle)))
    chosen = order[step * per_round : (step + 1) * per_round].tolist()
    if len(chosen) < per_round:  # the cycle's last round: top up from the clients already seen this cycle
        g = torch.Generator().manual_seed(derive_seed(seed, CYCLE_STREAM, cycle, server_round))
        rest = order[: step * per_round]
        chosen += rest[torch.randperm(len(rest), generator=g)[: per_round - len(chosen)]].tolist()
    return sorted(chosen)


@dataclass
class RoundPlan:
    """What the server decided at the start of a round.

    Attributes:
        round: the server round (0-based).
        clients: the sampled clients, sorted.
        instructions: the instructions as the server made them (it checks each reply against its own).
        tasks: one task per client that is sent one (a callback may have removed instructions).
        stats: downlink counters (``bytes_down``, ``raw_bytes_down``, ``encode_s``).
    """

    round: int
    clients: list[int]
    instructions: list[Instruction]
    tasks: list[ClientTask]
    stats: dict[str, float] = field(default_factory=dict)


def plan_round(
    server_round: int,
    clients: list[int],
    strategy: Strategy,
    downlink_codec: Codec,
    downlink_state: dict[str, Any],
    uplink_codec: Codec,
    shares: list[float],
    on_round_start: Callable[[list[Instruction]], None],
    receivers: ClientStore | None = None,
) -> RoundPlan:
    """Build the round's tasks.

    Args:
        server_round: the round (0-based).
        clients: the sampled clients.
        strategy: gives each client its instruction (``configure_round``).
        downlink_codec: encodes each distinct instruction payload once (server half).
        downlink_state: the downlink encoder's state, updated in place.
        uplink_codec: its ``broadcast(round)`` goes to every sampled client.
        shares: every client's share of the uplink budget, by client id.
        on_round_start: the callbacks' hook; it may edit the list of instructions.
        receivers: the server's per-client downlink state, for a ``per_receiver`` downlink codec (one message per
            client, coded against the state the client last acknowledged; see :func:`acknowledge_downlink`).
    """
    instructions = strategy.configure_round(server_round, clients)
    on_round_start(instructions)
    broadcast = uplink_codec.broadcast(server_round)
    stats = {"bytes_down": 0, "raw_bytes_down": 0, "encode_s": 0.0}
    encoded: dict[int, tuple[bytes, int, PayloadSpec]] = {}
    tasks = []
    for instr in instructions:
        key = (id(instr.payload), instr.client_id) if downlink_codec.per_receiver else id(instr.payload)
        if downlink_codec.per_receiver and key not in encoded:
            if receivers is None:
                raise ValueError(f"{type(downlink_codec).__name__} codes per receiver: plan_round needs receivers=")
            stored = receivers.load(instr.client_id)
            state = copy.deepcopy(stored.get("acked", {}))
            t = time.perf_counter()
            message = downlink_codec.encode(instr.payload, state, EncodeArgs(round=server_round))
            stats["encode_s"] += time.perf_counter() - t
            receivers.save(instr.client_id, {**stored, "pending": state})
            encoded[key] = (message, payload_bytes(instr.payload), spec_of(instr.payload))
        if key not in encoded:
            t = time.perf_counter()
            message = downlink_codec.encode(instr.payload, downlink_state, EncodeArgs(round=server_round))
            stats["encode_s"] += time.perf_counter() - t
            encoded[key] = (message, payload_bytes(instr.payload), spec_of(instr.payload))
        message, raw, spec = encoded[key]
        stats["bytes_down"] += len(message) + len(broadcast)
        stats["raw_bytes_down"] += raw
        tasks.append(ClientTask(server_round, instr.client_id, message, spec, dict(instr.config),
                                shares[instr.client_id], broadcast))
    return RoundPlan(server_round, clients, instructions, tasks, stats)


def acknowledge_downlink(receivers: ClientStore, messages: list[ClientMessage]) -> None:
    """A ``per_receiver`` downlink codec's state about each client that replied (it decoded its message and saved
    its state) becomes the state the next message is coded against; a client that dropped out or failed keeps
    the one before, as it does itself."""
    for msg in messages:
        if msg.failure is None:
            stored = receivers.load(msg.client_id)
            if "pending" in stored:
                stored["acked"] = stored.pop("pending")
                receivers.save(msg.client_id, stored)


__all__ = ["SAMPLINGS", "UPLINK_ALLOCATIONS", "RoundPlan", "acknowledge_downlink", "plan_round", "sample_clients", "uplink_shares"]
