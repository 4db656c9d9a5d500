"""Decentralized distillation: clients on a graph exchange soft labels on a reference set with neighbours.

After Bistritz, Mann & Bambos, "Distributed Distillation for On-Device Learning", NeurIPS 2020. There is
no server model and no aggregation of weights: each client keeps its own model (any tier), and the only
thing it learns from others is its neighbours' soft labels (class probabilities at temperature ``T``) on
a shared reference set. The simulation's "server" is only a relay: it keeps each client's latest soft
labels and hands each sampled client the mean over its graph neighbours, which the client digests
(``T^2 * KL``) before its local epochs; the client replies with its own soft labels.

With ``assistant_chain`` (teacher-assistant distillation, Mirzadeh et al. 2020) knowledge passes along a chain
of tiers, e.g. large -> medium -> small: a client of a tier after the chain's first digests only its neighbours of
the previous tier in the chain (all its neighbours when none of them has sent soft labels yet); clients of the
chain's first tier and of tiers outside it digest all their neighbours, as without a chain.

Graphs: a ring lattice (each client linked to ``degree / 2`` clients on each side) or a random
``degree``-regular graph (seeded).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fed.callbacks.kd_losses import soft_targets
from lightning_fed.data.public import PublicData
from lightning_fed.protocol import Instruction, Payload, PayloadSpec, Reply, TensorSpec
from lightning_fed.seeding import Stream, generator
from lightning_fed.strategies.assistants import AssistantChain
from lightning_fed.strategies.digest import ConsensusDigest
from lightning_fed.strategies.tiers import ModelTiers, OwnModels, predict_logits, tier_names, tier_of

log = logging.getLogger("lightning_fed")

GRAPHS = ("ring", "random_regular")
PROB_SUM_ATOL = 1e-3
"""How far a reply's soft labels may sum from 1 (float32 softmax rounding) before the reply is refused."""


def ring_graph(n: int, degree: int) -> list[list[int]]:
    """Ring lattice: client ``i`` is linked to ``i ± 1, …, i ± degree/2`` (mod ``n``)."""
    half = degree // 2
    return [sorted({(i + d) % n for d in range(-half, half + 1) if d != 0}) for i in range(n)]


def random_regular_graph(n: int, degree: int, seed: int, tries: int = 1000) -> list[list[int]]:
    """A uniformly drawn simple ``degree``-regular graph (pairing model with rejection), seeded."""
    g = generator(seed, Stream.DDIST_GRAPH, n, degree)
    for _ in range(tries):
        stubs = torch.arange(n).repeat_interleave(degree)[torch.randperm(n * degree, generator=g)].view(-1, 2)
        a, b = stubs[:, 0], stubs[:, 1]
        if bool((a == b).any()):
            continue
        pairs = {(min(int(x), int(y)), max(int(x), int(y))) for x, y in zip(a, b)}
        if len(pairs) != len(stubs):
            continue
        adj: list[set[int]] = [set() for _ in range(n)]
        for x, y in pairs:
            adj[x].add(y)
            adj[y].add(x)
        return [sorted(s) for s in adj]
    raise ValueError(f"random_regular_graph: no simple {degree}-regular graph on {n} nodes found in {tries} tries")


class DecentralizedDistillation(OwnModels):
    """Clients on a graph exchange soft labels on a reference set with their neighbours; no weight averaging.

    Example::

        strategy = DecentralizedDistillation(num_clients=20, graph="ring", degree=2,
                                             public=PublicData(num_samples=500, seed=7))
        FedLoop(num_clients=20, clients_per_round=10, strategy=strategy, ...).fit(model, dm)

    Args:
        num_clients: clients on the graph (must equal the loop's ``num_clients``).
        graph: ``"ring"`` or ``"random_regular"``.
        degree: neighbours per client (even for ``"ring"``).
        public: the reference data (default: 1,000 MNIST-1D samples made with seed 7).
        reference_size: reference samples used (the first ``reference_size`` of ``public``).
        temperature: soft-label temperature.
        digest_epochs: passes over the neighbours' soft labels before the local epochs.
        digest_batch_size: digest batch size.
        digest_lr: Adam learning rate of the digest step (``None``: the module's own optimizer).
        tiers: client architectures.
        eval_clients: stored client models evaluated per tier.
        seed: seed of the random graph.
        assistant_chain: teaching order of tiers by name, largest first (``None``: every client digests all its
            neighbours): a client of ``assistant_chain[i]``, ``i >= 1``, digests the mean soft labels of its
            neighbours of tier ``assistant_chain[i - 1]`` (all its neighbours when none of those has sent any).
            Names as :class:`ModelTiers` ``names``; no name twice, parameter counts strictly decreasing; needs
            ``digest_epochs >= 1``.
    """

    def __init__(self, *, num_clients: int, graph: str = "ring", degree: int = 2, public: PublicData | None = None,
                 reference_size: int = 500, temperature: float = 2.0, digest_epochs: int = 1,
                 digest_batch_size: int = 64, digest_lr: float | None = 1e-3, tiers: ModelTiers | None = None,
                 eval_clients: int = 5, seed: int = 0, assistant_chain: list[str] | None = None) -> None:
        name = "DecentralizedDistillation"
        if assistant_chain is not None and digest_epochs < 1:
            raise ValueError(f"{name}: assistant_chain={assistant_chain} is not allowed with digest_epochs="
                             f"{digest_epochs}; a chain routes the digest targets, so digest_epochs must be >= 1")
        self.chain = None if assistant_chain is None else AssistantChain(name, assistant_chain, tiers)
        self.last_routes: dict[int, str] = {}
        """Whose soft labels each client of the last configured round digests: a tier name, or ``"neighbors"``."""
        if num_clients < 2:
            raise ValueError(f"{name}: num_clients={num_clients} is not allowed; num_clients must be >= 2")
        if graph not in GRAPHS:
            raise ValueError(f"{name}: graph={graph!r} is not allowed; graph must be one of {GRAPHS}")
        if not 1 <= degree < num_clients:
            raise ValueError(f"{name}: degree={degree} is not allowed; degree must be between 1 and num_clients - 1")
        if graph == "ring" and degree % 2:
            raise ValueError(f"{name}: degree={degree} is not allowed for graph='ring'; it must be even")
        if graph == "random_regular" and (num_clients * degree) % 2:
            raise ValueError(f"{name}: degree={degree} is not allowed with num_clients={num_clients}; "
                             "num_clients * degree must be even for a regular graph")
        if reference_size < 1:
            raise ValueError(f"{name}: reference_size={reference_size} is not allowed; it must be >= 1")
        super().__init__(tiers=tiers, eval_clients=eval_clients)
        self.num_clients, self.graph, self.degree, self.seed = num_clients, graph, degree, seed
        self.neighbors = ring_graph(num_clients, degree) if graph == "ring" else \
            random_regular_graph(num_clients, degree, seed)
        self.public = public if public is not None else PublicData()
        self.reference_size = reference_size
        self.temperature = temperature
        self.digest = ConsensusDigest(loss="kl", epochs=digest_epochs, batch_size=digest_batch_size,
                                      temperature=temperature, seed=seed, lr=digest_lr)
        self.num_classes = 0
        self.soft: dict[int, Tensor] = {}
        self._ref: Tensor | None = None

    @property
    def reference(self) -> Tensor:
        """The reference inputs."""
        if self._ref is None:
            self._ref = self.public.x[: self.reference_size]
        return self._ref

    def setup(self, model: nn.Module) -> None:
        """Tier initial weights; the number of classes."""
        super().setup(model)
        sizes = {predict_logits(m, self.reference[:2]).shape[-1] for m in self.tier_modules()}
        if len(sizes) != 1:
            raise ValueError(f"DecentralizedDistillation: the tiers' models output different numbers of classes {sorted(sizes)}")
        self.num_classes = sizes.pop()
        self.soft = {}
        self.last_routes = {}
        if self.chain is not None:
            self.chain.check_sizes(model)

    def teacher_tier(self, client_id: int) -> int | None:
        """The tier whose neighbours teach ``client_id`` along ``assistant_chain`` (``None``: all neighbours)."""
        if self.chain is None:
            return None
        name = tier_names(self.tiers)[tier_of(self.tiers, client_id)]
        if name not in self.chain.chain[1:]:
            return None
        return self.chain.tier_index(self.chain.chain[self.chain.chain.index(name) - 1])

    def configure_round(self, server_round: int, clients: list[int]) -> list[Instruction]:
        """Each client gets the mean soft labels of its neighbours that have sent any (relay only); along
        ``assistant_chain``, of its neighbours of the teaching tier when any of them has."""
        out = []
        self.last_routes = {}
        for cid in clients:
            if cid >= self.num_clients:
                raise ValueError(f"DecentralizedDistillation: client {cid} is not on the graph of num_clients="
                                 f"{self.num_clients}; set num_clients to the loop's num_clients")
            senders = [j for j in self.neighbors[cid] if j in self.soft]
            teacher = self.teacher_tier(cid)
            taught = [] if teacher is None else [j for j in senders if tier_of(self.tiers, j) == teacher]
            self.last_routes[cid] = "neighbors"
            if teacher is not None and taught:
                senders, self.last_routes[cid] = taught, tier_names(self.tiers)[teacher]
            have = [self.soft[j] for j in senders]
            payload = {"neighbor_soft": torch.stack(have).mean(0)} if have else {}
            out.append(Instruction(cid, payload, {"neighbors": len(have)}))
        return out

    def client_receive(self, model: nn.Module, instruction: Instruction) -> None:
        """Set the digest target (the neighbours' mean soft labels)."""
        soft = instruction.payload.get("neighbor_soft")
        if soft is not None and soft.shape == (len(self.reference), self.num_classes):
            self.digest.set_target(self.reference, soft.float())
        else:
            self.digest.set_target(None, None)

    def client_reply(self, model: nn.Module, instruction: Instruction) -> Payload:
        """This client's soft labels on the reference set."""
        return {"soft": soft_targets(predict_logits(model, self.reference), self.temperature)}

    def reply_spec(self, instruction: Instruction) -> PayloadSpec:
        """``[reference_size, classes]`` float32."""
        return {"soft": TensorSpec((len(self.reference), self.num_classes), torch.float32)}

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """Relay: keep each client's latest soft labels (rows must be probability vectors)."""
        rejected = 0
        for r in replies:
            soft = r.payload["soft"]
            if bool((soft < 0).any()) or not torch.allclose(soft.sum(-1), torch.ones(len(soft)), atol=PROB_SUM_ATOL):
                log.warning("round %d: soft labels of client %d rejected: rows are not probability vectors",
                            server_round + 1, r.client_id)
                rejected += 1
                continue
            self.soft[r.client_id] = soft.clone()
        return {"soft_rejected": float(rejected), "clients_with_soft_labels": float(len(self.soft))}

    def client_callbacks(self) -> list[Any]:
        """Per-client models, then the digest step."""
        return [self.client_models, self.digest]

    def state_dict(self) -> dict[str, Any]:
        """Tier initial weights and every client's latest soft labels."""
        state = super().state_dict()
        state["soft"] = {int(c): v.clone() for c, v in self.soft.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.soft = {int(c): v for c, v in state["soft"].items()}


__all__ = ["DecentralizedDistillation", "random_regular_graph", "ring_graph"]
