"""Poisoned clients, simulated: a seeded fraction of the clients is malicious and changes its data or its reply.

An attack is a :class:`~lightning_fed.FedCallback` that a recipe adds to ``loop.callbacks``. It acts only inside
FedLoop (under ``lightning.Trainer`` it does nothing) and only for the clients it chose as malicious; those go
through the same codec and validation as every other client, because their data is changed before training
(``on_client_data``) or their reply before it is encoded (``on_client_end``).

Which clients are malicious depends only on the attack's ``seed``, the number of clients and (``mode="round"``)
the round, never on what ran before, so a resumed run attacks the same clients. The server side records the
sampled malicious clients of each round: the ``malicious`` round metric and ``malicious_clients.csv`` in the
run folder (``round,client,attack``), to compute a defence's detection precision and recall.

Attacks here: :class:`LabelFlip` (data), :class:`SignFlip`, :class:`GaussianUpdate` and :class:`LittleIsEnough`
(byzantine replies; they assume the reply is an update, a weight delta as FedAvg sends). The backdoor is in
:mod:`lightning_fed.callbacks.backdoor`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.context import FedContext, fed_context
from lightning_fed.protocol import Instruction, Reply
from lightning_fed.seeding import Stream, generator
from lightning_fed.validation import need

MODES = ("fixed", "round")
CSV_NAME = "malicious_clients.csv"
FIXED_SET = -1
"""The key of the fixed set's stream, ``(seed, Stream.ATTACK_CLIENTS, -1)``: no round index is negative, so the set
is drawn apart from every per-round set, and its three parts never equal the client sampler's two-part
``(seed, round)`` seed (which the fixed set's former key-less stream, ``(seed, 12)``, did: round 13 then sampled the
malicious clients first)."""


def malicious_clients(fraction: float, num_clients: int, seed: int, server_round: int | None = None) -> list[int]:
    """The ``round(fraction * num_clients)`` malicious clients, sorted: a seeded draw without replacement, the same
    for every round when ``server_round`` is ``None``, a fresh one per round otherwise."""
    count = int(fraction * num_clients + 0.5)
    keys = (FIXED_SET,) if server_round is None else (server_round,)
    perm = torch.randperm(num_clients, generator=generator(seed, Stream.ATTACK_CLIENTS, *keys))
    return sorted(perm[:count].tolist())


def shard_tensors(shard: Dataset) -> tuple[Tensor, Tensor]:
    """A client's records as two stacked tensors ``(x, y)``: read through the indices of a ``Subset`` of a two-tensor
    ``TensorDataset`` (no per-record work), otherwise record by record.

    Raises:
        ValueError: a record is not an ``(input, label)`` pair.
    """
    if isinstance(shard, Subset) and isinstance(shard.dataset, TensorDataset) and len(shard.dataset.tensors) == 2:
        idx = torch.as_tensor(shard.indices, dtype=torch.long)
        x, y = shard.dataset.tensors
        return x[idx], y[idx]
    xs, ys = [], []
    for i in range(len(shard)):  # type: ignore[arg-type]
        item = shard[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise ValueError(f"a poisoning attack needs (input, label) records; record {i} is {type(item).__name__}")
        xs.append(torch.as_tensor(item[0]))
        ys.append(torch.as_tensor(item[1]))
    return torch.stack(xs), torch.stack(ys)


class Attack(FedCallback):
    """Base of the simulated attacks: chooses the malicious clients and records them each round.

    Subclasses act in ``on_client_data`` or ``on_client_end`` when :meth:`malicious_context` returns a context.

    Example::

        class Silent(Attack):  # malicious clients send a zero update
            def on_client_end(self, trainer, pl_module, reply):
                if self.malicious_context(trainer) is not None:
                    for v in reply.payload.values():
                        v.zero_()

    Args:
        fraction: share of all clients that is malicious, in ``[0, 1]`` (rounded to a client count).
        mode: ``"fixed"``: one set of malicious clients for the whole run; ``"round"``: a fresh set every round.
        seed: seed of the choice of clients and of the attack's own randomness.
        start_round: the attack starts at this round (0-based); earlier rounds are benign.
    """

    def __init__(self, fraction: float = 0.2, mode: str = "fixed", seed: int = 0, start_round: int = 0) -> None:
        owner = type(self).__name__
        need(owner, 0 <= fraction <= 1, "fraction", fraction, "in [0, 1]")
        need(owner, mode in MODES, "mode", mode, f"one of {MODES}")
        need(owner, start_round >= 0, "start_round", start_round, "an integer >= 0")
        self.fraction = float(fraction)
        self.mode = mode
        self.seed = seed
        self.start_round = start_round
        self._round_malicious: list[int] = []

    def malicious(self, server_round: int, num_clients: int) -> list[int]:
        """The malicious clients at ``server_round`` (none before ``start_round``)."""
        if server_round < self.start_round:
            return []
        return malicious_clients(self.fraction, num_clients, self.seed, server_round if self.mode == "round" else None)

    def malicious_context(self, trainer: Any) -> FedContext | None:
        """The federated context when a malicious client's work is running, else ``None``."""
        fed = fed_context(trainer)
        if fed is None or fed.client_id is None:
            return None
        return fed if fed.client_id in self.malicious(fed.round, fed.num_clients) else None

    def on_round_start(self, trainer: Any, pl_module: Any, instructions: list[Instruction]) -> None:
        """Server: note the round's sampled malicious clients and write them to ``malicious_clients.csv``."""
        fed = fed_context(trainer)
        if fed is None:
            return
        bad = set(self.malicious(fed.round, fed.num_clients))
        self._round_malicious = sorted({i.client_id for i in instructions} & bad)
        if getattr(trainer, "is_global_zero", True):  # every rank replays the server; rank 0 writes
            _write_rows(Path(fed.run_dir) / CSV_NAME, type(self).__name__, fed.round + 1, self._round_malicious)

    def on_round_end(self, trainer: Any, pl_module: Any, metrics: dict[str, float]) -> None:
        """Server: the ``malicious`` metric, the number of malicious clients sampled this round."""
        if fed_context(trainer) is not None:
            metrics["malicious"] = float(len(self._round_malicious))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fraction={self.fraction}, mode={self.mode!r}, seed={self.seed})"


def _write_rows(path: Path, attack: str, round_no: int, clients: list[int]) -> None:
    """Replace ``attack``'s rows from ``round_no`` on (a resumed run repeats rounds) by this round's clients."""
    lines = path.read_text().splitlines()[1:] if path.exists() else []
    kept = [ln for ln in lines if not (ln.split(",")[2] == attack and int(ln.split(",")[0]) >= round_no)]
    kept += [f"{round_no},{cid},{attack}" for cid in clients]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(["round,client,attack", *kept]) + "\n")
    tmp.replace(path)  # atomic: a run killed while writing keeps the previous file


def float_items(reply: Reply) -> list[tuple[str, Tensor]]:
    """The floating-point entries of a reply's payload, in payload order."""
    return [(k, v) for k, v in reply.payload.items() if v.is_floating_point()]


class LabelFlip(Attack):
    """Label flipping: malicious clients train on their shard with every label ``y`` replaced by
    ``num_classes - 1 - y`` (or by ``target`` when it is set).

    Example::

        loop = FedLoop(..., callbacks=[LabelFlip(fraction=0.3, num_classes=10)])

    Args:
        fraction: share of malicious clients, in ``[0, 1]``.
        mode: ``"fixed"`` or ``"round"`` (see :class:`Attack`).
        seed: seed of the choice of clients.
        start_round: first attacked round (0-based).
        num_classes: number of classes (>= 2).
        target: every label becomes this class; ``None``: ``y -> num_classes - 1 - y``.
    """

    def __init__(self, fraction: float = 0.2, mode: str = "fixed", seed: int = 0, start_round: int = 0,
                 num_classes: int = 10, target: int | None = None) -> None:
        super().__init__(fraction, mode, seed, start_round)
        need("LabelFlip", num_classes >= 2, "num_classes", num_classes, "an integer >= 2")
        need("LabelFlip", target is None or 0 <= target < num_classes, "target", target,
             f"None or a class in [0, {num_classes})")
        self.num_classes = num_classes
        self.target = target

    def on_client_data(self, trainer: Any, pl_module: Any, shard: Dataset) -> Dataset:
        """Malicious clients: the shard with flipped labels."""
        if self.malicious_context(trainer) is None:
            return shard
        x, y = shard_tensors(shard)
        flipped = torch.full_like(y, self.target) if self.target is not None else self.num_classes - 1 - y
        return TensorDataset(x, flipped)


class SignFlip(Attack):
    """Sign flipping: malicious clients send ``-scale`` times their honest update.

    Example::

        loop = FedLoop(..., callbacks=[SignFlip(fraction=0.2, scale=4.0)])

    Args:
        fraction: share of malicious clients, in ``[0, 1]``.
        mode: ``"fixed"`` or ``"round"`` (see :class:`Attack`).
        seed: seed of the choice of clients.
        start_round: first attacked round (0-based).
        scale: the flipped update's scale (> 0).
    """

    def __init__(self, fraction: float = 0.2, mode: str = "fixed", seed: int = 0, start_round: int = 0,
                 scale: float = 1.0) -> None:
        super().__init__(fraction, mode, seed, start_round)
        need("SignFlip", scale > 0, "scale", scale, "> 0")
        self.scale = float(scale)

    def on_client_end(self, trainer: Any, pl_module: Any, reply: Reply) -> None:
        """Malicious clients: every float entry of the reply times ``-scale``."""
        if self.malicious_context(trainer) is not None:
            for _, v in float_items(reply):
                v.mul_(-self.scale)


class GaussianUpdate(Attack):
    """Gaussian byzantine clients: the reply's float entries are replaced by ``N(0, std^2)`` noise, seeded by
    (seed, round, client).

    Example::

        loop = FedLoop(..., callbacks=[GaussianUpdate(fraction=0.2, std=1.0)])

    Args:
        fraction: share of malicious clients, in ``[0, 1]``.
        mode: ``"fixed"`` or ``"round"`` (see :class:`Attack`).
        seed: seed of the choice of clients and of the noise.
        start_round: first attacked round (0-based).
        std: the noise's standard deviation (> 0).
    """

    def __init__(self, fraction: float = 0.2, mode: str = "fixed", seed: int = 0, start_round: int = 0,
                 std: float = 1.0) -> None:
        super().__init__(fraction, mode, seed, start_round)
        need("GaussianUpdate", std > 0, "std", std, "> 0")
        self.std = float(std)

    def on_client_end(self, trainer: Any, pl_module: Any, reply: Reply) -> None:
        """Malicious clients: noise instead of the update."""
        fed = self.malicious_context(trainer)
        if fed is None:
            return
        gen = generator(self.seed, Stream.ATTACK_NOISE, fed.round, reply.client_id)
        for k, v in float_items(reply):
            reply.payload[k] = (torch.randn(v.shape, generator=gen) * self.std).to(v.dtype)


class LittleIsEnough(Attack):
    """"A little is enough" (Baruch et al., NeurIPS 2019): small, coordinated shifts that stay inside the spread
    of the benign updates, so that median- and distance-based rules keep them.

    The paper's attackers see the benign updates and send ``mean - z * std`` per coordinate. A simulated client
    sees only its own update, so this attack takes a documented shortcut: every malicious client of a round adds
    ``z * rms(u_k) * s_k`` to each entry ``u_k`` of its honest update, where ``s`` is a random ``{-1, +1}``
    direction shared by all the malicious clients of the round (seeded by (seed, round): they collude), and the
    entry's root mean square ``rms(u_k)`` stands for the benign per-coordinate standard deviation. The shifts of
    the malicious clients point the same way and add up in any aggregate.

    Example::

        loop = FedLoop(..., callbacks=[LittleIsEnough(fraction=0.2, z=1.0)])

    Args:
        fraction: share of malicious clients, in ``[0, 1]``.
        mode: ``"fixed"`` or ``"round"`` (see :class:`Attack`).
        seed: seed of the choice of clients and of the shared direction.
        start_round: first attacked round (0-based).
        z: the shift in units of the estimated standard deviation (> 0).
    """

    def __init__(self, fraction: float = 0.2, mode: str = "fixed", seed: int = 0, start_round: int = 0,
                 z: float = 1.0) -> None:
        super().__init__(fraction, mode, seed, start_round)
        need("LittleIsEnough", z > 0, "z", z, "> 0")
        self.z = float(z)

    def on_client_end(self, trainer: Any, pl_module: Any, reply: Reply) -> None:
        """Malicious clients: the honest update shifted along the round's shared direction."""
        fed = self.malicious_context(trainer)
        if fed is None:
            return
        gen = generator(self.seed, Stream.ATTACK_DIRECTION, fed.round)
        for _, v in float_items(reply):
            sign = torch.randint(0, 2, v.shape, generator=gen).mul_(2).sub_(1).to(v.dtype)
            rms = v.float().pow(2).mean().sqrt()
            v.add_(sign * (self.z * rms).to(v.dtype))


__all__ = ["Attack", "GaussianUpdate", "LabelFlip", "LittleIsEnough", "SignFlip", "malicious_clients",
           "shard_tensors"]
