"""FedMD: heterogeneous federated learning via model distillation.

Li & Wang, "FedMD: Heterogenous Federated Learning via Model Distillation", NeurIPS 2019 workshop.
Every party keeps its own model (any architecture). Each round the server draws a subset of the public
data; every party sends its class scores (logits) on it; the server averages them into the consensus;
each party *digests* the consensus (trains its model to match it, L1 on logits) and then *revisits* its
private data for a few epochs. No weights are ever exchanged.

In the one-message-per-round protocol the two halves are pipelined: round ``r``'s instruction carries the
consensus of round ``r - 1`` (and its subset) plus the indices of round ``r``'s subset; the client digests,
revisits (its local epochs), and replies with logits on the new subset. Public inputs are shared, so only
indices travel, never the samples. The initial transfer-learning phase of the paper (training on the
labelled public set first) is not part of this strategy.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fed.data.public import PublicData
from lightning_fed.protocol import Instruction, Payload, PayloadSpec, Reply, TensorSpec
from lightning_fed.strategies.digest import ConsensusDigest
from lightning_fed.strategies.tiers import ModelTiers, OwnModels, predict_logits

log = logging.getLogger("lightning_fed")


def _seeded(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**62)
    return torch.Generator().manual_seed(seed)


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
    """

    def __init__(self, *, public: PublicData | None = None, tiers: ModelTiers | None = None,
                 public_per_round: int = 500, digest_epochs: int = 1, digest_batch_size: int = 64,
                 digest_lr: float | None = 1e-3, eval_clients: int = 5, seed: int = 0) -> None:
        name = type(self).__name__
        if public_per_round < 1:
            raise ValueError(f"{name}: public_per_round={public_per_round} is not allowed; it must be >= 1")
        super().__init__(tiers=tiers, eval_clients=eval_clients)
        self.public = public if public is not None else PublicData()
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

    def round_subset(self, server_round: int) -> Tensor:
        """The public indices of ``server_round`` (seeded by (seed, round))."""
        return self.public.sample_indices(self.public_per_round, _seeded(self.seed, server_round))

    def configure_round(self, server_round: int, clients: list[int]) -> list[Instruction]:
        """One shared payload: this round's subset, and the previous consensus with its subset."""
        self._subset = self.round_subset(server_round)
        payload: Payload = {"subset": self._subset}
        if self.consensus is not None and self.consensus_subset is not None:
            payload["consensus"] = self.consensus
            payload["consensus_subset"] = self.consensus_subset
        return [Instruction(cid, payload) for cid in clients]

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
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.consensus = state.get("consensus")
        self.consensus_subset = state.get("consensus_subset")


__all__ = ["FedMD"]
