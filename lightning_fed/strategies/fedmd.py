"""FedMD: heterogeneous federated learning via model distillation.

Li & Wang, "FedMD: Heterogenous Federated Learning via Model Distillation", NeurIPS 2019 workshop.
Every party keeps its own model (any architecture). Each round the server draws a subset of the public
data; every party sends its class scores (logits) on it; the server averages them into the consensus;
each party *digests* the consensus (trains its model to match it, L1 on logits) and then *revisits* its
private data for a few epochs. No weights are ever exchanged.

In the one-message-per-round protocol the two halves are pipelined: round ``r``'s instruction carries the
consensus of round ``r - 1`` (and its subset) plus the indices of round ``r``'s subset; the client digests,
revisits (its local epochs), and replies with logits on the new subset. Public inputs are shared, so only
indices travel, never the samples.

Transfer learning (``transfer_epochs > 0``, needs a labelled public set): before the first round every
architecture is trained on the labelled public data, as the paper's parties do before collaborating; each
party then starts from its tier's transferred weights and trains on its private data in its first round
(the revisit step). Parties of one tier would all compute the same transfer from the same initial weights,
so it is done once per tier, on the server, when the strategy is set up.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fed.data.public import PublicData
from lightning_fed.protocol import Instruction, Payload, PayloadSpec, Reply, TensorSpec
from lightning_fed.seeding import Stream, generator
from lightning_fed.strategies.assistants import AssistantChain
from lightning_fed.strategies.digest import ConsensusDigest
from lightning_fed.strategies.tiers import (
    ModelTiers,
    OwnModels,
    predict_logits,
    snapshot,
    tier_names,
    tier_of,
)

log = logging.getLogger("lightning_fed")


class FedMD(OwnModels):
    """Logit consensus on a public subset; digest, then revisit private data; no weights exchanged.

    Example::

        strategy = FedMD(public=PublicData(num_samples=1000, seed=7), public_per_round=500,
                         tiers=ModelTiers(models=[MNIST1DCNN(channels=16), MNIST1DCNN(channels=32)]))
        FedLoop(strategy=strategy, num_clients=20, clients_per_round=10).fit(MNIST1DCNN(channels=8), dm)

    Args:
        public: the public data every party holds (default: 1,000 MNIST-1D samples made with seed 7).
        tiers: client architectures (``None``: all clients train the loop's model architecture).
        public_per_round: size of the public subset drawn each round (FedMD used 5,000 on CIFAR).
        digest_epochs: passes over the consensus before the private epochs (0: no digest, i.e. every party
            trains alone).
        digest_batch_size: batch size of the digest step.
        digest_lr: Adam learning rate of the digest step (``None``: the module's own optimizer).
        eval_clients: stored client models evaluated per tier at evaluation rounds.
        seed: seed of the public subsets.
        transfer_epochs: epochs of supervised training on the labelled public set before round 0 (FedMD's
            transfer-learning phase); 0 skips it. Needs ``PublicData(labeled=True)``.
        transfer_lr: Adam learning rate of the transfer phase.
        transfer_batch_size: batch size of the transfer phase.
        assistant_chain: teaching order of tiers by name, largest first (``None``: every party digests the
            consensus). Parties of the chain's first tier and of tiers outside it digest the consensus; a party
            of a later tier digests instead the mean logits of the previous tier's parties (of the previous
            round, on the same subset), e.g. consensus -> large -> medium -> small; it falls back to the
            consensus when that tier sent nothing yet. Names as :class:`ModelTiers` ``names``; no name twice,
            parameter counts strictly decreasing; needs ``digest_epochs >= 1``.
    """

    def __init__(self, *, public: PublicData | None = None, tiers: ModelTiers | None = None,
                 public_per_round: int = 500, digest_epochs: int = 1, digest_batch_size: int = 64,
                 digest_lr: float | None = 1e-3, eval_clients: int = 5, seed: int = 0, transfer_epochs: int = 0,
                 transfer_lr: float = 1e-3, transfer_batch_size: int = 32,
                 assistant_chain: list[str] | None = None) -> None:
        name = type(self).__name__
        if assistant_chain is not None and digest_epochs < 1:
            raise ValueError(f"{name}: assistant_chain={assistant_chain} is not allowed with digest_epochs="
                             f"{digest_epochs}; a chain routes the digest targets, so digest_epochs must be >= 1")
        self.chain = None if assistant_chain is None else AssistantChain(name, assistant_chain, tiers)
        self.tier_consensus: dict[int, Tensor] = {}
        """Mean logits of each tier's parties in the last round (kept only with ``assistant_chain``)."""
        self.last_routes: dict[int, str] = {}
        """Whose logits each tier's parties were sent to digest in the last configured round, by tier."""
        if public_per_round < 1:
            raise ValueError(f"{name}: public_per_round={public_per_round} is not allowed; it must be >= 1")
        if transfer_epochs < 0:
            raise ValueError(f"{name}: transfer_epochs={transfer_epochs} is not allowed; it must be >= 0")
        if not transfer_lr > 0 or transfer_batch_size < 1:
            raise ValueError(f"{name}: transfer_lr={transfer_lr}, transfer_batch_size={transfer_batch_size} are not "
                             "allowed; transfer_lr must be > 0 and transfer_batch_size >= 1")
        if transfer_epochs and public is not None and not public.labeled:
            raise ValueError(f"{name}: transfer_epochs={transfer_epochs} needs labelled public data; pass "
                             "PublicData(labeled=True) (or PublicData.from_tensors(x, y))")
        self.transfer_epochs, self.transfer_lr, self.transfer_batch_size = transfer_epochs, transfer_lr, transfer_batch_size
        self.transfer_acc: list[float] = []
        super().__init__(tiers=tiers, eval_clients=eval_clients)
        self.public = public if public is not None else PublicData(labeled=transfer_epochs > 0)
        self.public_per_round = public_per_round
        self.seed = seed
        self.digest = ConsensusDigest(loss="l1", epochs=digest_epochs, batch_size=digest_batch_size, seed=seed,
                                      lr=digest_lr)
        self.num_classes = 0
        self.consensus: Tensor | None = None
        self.consensus_subset: Tensor | None = None
        self._subset: Tensor | None = None

    def setup(self, model: nn.Module) -> None:
        """Tier initial weights; the number of classes from the models' outputs on two public samples."""
        super().setup(model)
        sizes = {predict_logits(m, self.public.x[:2]).shape[-1] for m in self.tier_modules()}
        if len(sizes) != 1:
            raise ValueError(f"{type(self).__name__}: the tiers' models output different numbers of classes {sorted(sizes)}")
        self.num_classes = sizes.pop()
        self.consensus = self.consensus_subset = self._subset = None
        self.tier_consensus, self.last_routes = {}, {}
        if self.chain is not None:
            self.chain.check_sizes(model)
        if self.transfer_epochs:
            self.transfer_acc = [self._transfer(t, m) for t, m in enumerate(self.tier_modules())]
            self._init = [snapshot(m) for m in self.tier_modules()]
            log.info("%s transfer learning: public-set accuracy per tier %s", type(self).__name__,
                     [round(a, 4) for a in self.transfer_acc])

    def _transfer(self, tier: int, module: nn.Module) -> float:
        """Train ``module`` from its tier's initial weights on the labelled public set; its training accuracy."""
        x, y = self.public.x, self.public.y
        if y is None:
            raise ValueError(f"{type(self).__name__}: transfer_epochs={self.transfer_epochs} needs labelled public data")
        module.load_state_dict(self._init[tier], strict=False)
        device = next(module.parameters()).device
        opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=self.transfer_lr)
        g = generator(self.seed, Stream.FEDMD_TRANSFER, tier)
        was_training = module.training
        module.train()
        for _ in range(self.transfer_epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), self.transfer_batch_size):
                idx = order[i : i + self.transfer_batch_size]
                loss = F.cross_entropy(module(x[idx].to(device)), y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        module.train(was_training)
        return float((predict_logits(module, x).argmax(-1) == y).float().mean())

    def round_subset(self, server_round: int) -> Tensor:
        """The public indices of ``server_round`` (seeded by (seed, round))."""
        return self.public.sample_indices(self.public_per_round, generator(self.seed, Stream.FEDMD_SUBSET, server_round))

    def configure_round(self, server_round: int, clients: list[int]) -> list[Instruction]:
        """One shared payload: this round's subset, and the previous consensus with its subset."""
        self._subset = self.round_subset(server_round)
        payload: Payload = {"subset": self._subset}
        if self.consensus is not None and self.consensus_subset is not None:
            payload["consensus"] = self.consensus
            payload["consensus_subset"] = self.consensus_subset
        if self.chain is None or "consensus" not in payload:
            return [Instruction(cid, payload) for cid in clients]
        per_tier: dict[int, Payload] = {}
        self.last_routes = {}
        for t, name in enumerate(tier_names(self.tiers)):
            teacher = self.chain.chain[self.chain.chain.index(name) - 1] if name in self.chain.chain[1:] else None
            tt = None if teacher is None else self.chain.tier_index(teacher)
            if tt is not None and tt in self.tier_consensus:
                per_tier[t] = {**payload, "consensus": self.tier_consensus[tt]}
                self.last_routes[t] = teacher
            else:
                per_tier[t] = payload
                self.last_routes[t] = "consensus"
        return [Instruction(cid, per_tier[tier_of(self.tiers, cid)]) for cid in clients]

    def client_receive(self, model: nn.Module, instruction: Instruction) -> None:
        """Set the digest target (consensus on the previous subset); weights come from the client's store."""
        p = instruction.payload
        if "consensus" in p:
            self.digest.set_target(self.public.x[p["consensus_subset"].long()], p["consensus"].float())
        else:
            self.digest.set_target(None, None)

    def client_reply(self, model: nn.Module, instruction: Instruction) -> Payload:
        """Logits of the client's model on this round's public subset, ``[subset, classes]``."""
        return {"logits": predict_logits(model, self.public.x[instruction.payload["subset"].long()])}

    def reply_spec(self, instruction: Instruction) -> PayloadSpec:
        """Exactly ``[len(subset), num_classes]`` float32 logits."""
        return {"logits": TensorSpec((len(instruction.payload["subset"]), self.num_classes), torch.float32)}

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """The consensus: the mean of the parties' logits (every party counts equally, as in FedMD)."""
        stacked = torch.stack([r.payload["logits"].float() for r in replies])
        self.consensus = stacked.mean(0)
        self.consensus_subset = self._subset
        if self.chain is not None:
            tiers = torch.tensor([tier_of(self.tiers, r.client_id) for r in replies])
            self.tier_consensus = {int(t): stacked[tiers == t].mean(0) for t in tiers.unique()}
        agree = (stacked.argmax(-1) == self.consensus.argmax(-1)).float().mean()
        return {"consensus_agreement": float(agree)}

    def client_callbacks(self) -> list[Any]:
        """Per-client models, then the digest step."""
        return [self.client_models, self.digest]

    def state_dict(self) -> dict[str, Any]:
        """Tier initial weights and the current consensus."""
        state = super().state_dict()
        if self.consensus is not None and self.consensus_subset is not None:
            state.update(consensus=self.consensus.clone(), consensus_subset=self.consensus_subset.clone())
        if self.chain is not None:
            state["tier_consensus"] = {t: v.clone() for t, v in self.tier_consensus.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.consensus = state.get("consensus")
        self.consensus_subset = state.get("consensus_subset")
        self.tier_consensus = {int(t): v for t, v in state.get("tier_consensus", {}).items()}


__all__ = ["FedMD"]
