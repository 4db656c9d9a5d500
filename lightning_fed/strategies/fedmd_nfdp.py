"""FedMD-NFDP: FedMD where each party trains on only ``k`` of its ``n`` private records.

Sun & Lyu, "Federated Model Distillation with Noise-Free Differential Privacy", IJCAI 2021. Sampling ``k``
of ``n`` records without replacement, once, and training only on them makes everything the party releases
(its logits on public data) ``(epsilon, delta)``-differentially private with no added noise::

    epsilon = ln((n + 1) / (n + 1 - k)),    delta = k / n

:class:`RecordSubset` is the client side (it narrows each party's training data to its ``k`` records before
the data loader is built; under a plain ``lightning.Trainer`` the dataset is wrapped with
:meth:`RecordSubset.subset`); :class:`FedMDNFDP` is FedMD with that callback installed and
the guarantee of every party computed from its ``n`` and reported as ``nfdp/epsilon`` and ``nfdp/delta``
(the worst case over the parties seen so far).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.context import fed_context
from lightning_fed.data.public import PublicData
from lightning_fed.protocol import Reply
from lightning_fed.seeding import Stream, generator
from lightning_fed.strategies.fedmd import FedMD
from lightning_fed.strategies.tiers import ModelTiers

log = logging.getLogger("lightning_fed")


def nfdp_epsilon(k: int, n: int) -> float:
    """``ln((n + 1) / (n + 1 - k))`` for ``1 <= k <= n`` (sampling ``k`` of ``n`` without replacement)."""
    if not 1 <= k <= n:
        raise ValueError(f"nfdp_epsilon: need 1 <= k <= n, got k={k}, n={n}")
    return math.log((n + 1) / (n + 1 - k))


def nfdp_delta(k: int, n: int) -> float:
    """``k / n``."""
    if not 1 <= k <= n:
        raise ValueError(f"nfdp_delta: need 1 <= k <= n, got k={k}, n={n}")
    return k / n


class KeptRecords(Subset):
    """The records a :class:`RecordSubset` keeps of a dataset (a ``Subset`` that remembers ``k`` and ``seed``)."""

    def __init__(self, dataset: Dataset, indices: list[int], k: int, seed: int) -> None:
        super().__init__(dataset, indices)
        self.k = k
        self.seed = seed


class RecordSubset(FedCallback):
    """Train on a fixed random subset of ``k`` of the ``n`` local records, taken at the data loader.

    The records are chosen by position, drawn once per client from ``(seed, client_id)``, and do not change
    across rounds; equal records (duplicates) are distinct records, so exactly ``min(k, n)`` records are trained
    on. In FedLoop, :meth:`on_client_data` narrows each client's shard (``trainer.fed.shard``) before its loader
    is built. Under a plain ``lightning.Trainer`` a callback cannot replace the training data, so wrap the
    training dataset with :meth:`subset` (the draw of client 0 over the whole set); the callback refuses to
    train on data that is not such a subset, rather than silently train on every record.

    Example::

        rs = RecordSubset(k=64)
        FedLoop(..., callbacks=[rs])                                   # each client trains on 64 of its records

        train = DataLoader(rs.subset(train_set), batch_size=32, shuffle=True)
        L.Trainer(callbacks=[rs], max_epochs=5).fit(model, train)      # trains on 64 records

    Args:
        k: records to keep per client (all of them when a client has fewer).
        seed: seed of the draw.
    """

    def __init__(self, k: int, seed: int = 0) -> None:
        if k < 1:
            raise ValueError(f"RecordSubset: k={k} is not allowed; k must be >= 1")
        self.k = k
        self.seed = seed

    def chosen(self, n: int, client_id: int) -> Tensor:
        """Positions (into the client's ``n`` records) of the kept records."""
        return torch.randperm(n, generator=generator(self.seed, Stream.NFDP_SUBSET, client_id))[: min(self.k, n)]

    def subset(self, dataset: Dataset, client_id: int = 0) -> KeptRecords:
        """The kept records of ``dataset`` (the records of ``client_id``), for training under ``lightning.Trainer``
        (or anywhere the loader is built by hand)."""
        return KeptRecords(dataset, self.chosen(len(dataset), client_id).tolist(), self.k, self.seed)

    def on_client_data(self, trainer: Any, pl_module: Any, shard: Dataset) -> Dataset:
        """FedLoop: the kept records of the client's shard."""
        return self.subset(shard, trainer.fed.client_id)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """``lightning.Trainer``: refuse to train unless the training data is this callback's :meth:`subset`.

        Raises:
            ValueError: the training dataset is not a :meth:`subset` with this ``k`` and ``seed``.
        """
        if fed_context(trainer) is not None:
            return  # FedLoop: the shard was narrowed by on_client_data
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        if not (isinstance(dataset, KeptRecords) and (dataset.k, dataset.seed) == (self.k, self.seed)):
            raise ValueError(
                f"RecordSubset(k={self.k}, seed={self.seed}): under lightning.Trainer the training data must be "
                f"this callback's subset, got {type(dataset).__name__}; build the training loader on "
                "record_subset.subset(train_dataset) (a callback cannot replace the Trainer's data)")


class FedMDNFDP(FedMD):
    """FedMD with noise-free differential privacy: every party trains on ``k`` of its ``n`` records.

    Example::

        strategy = FedMDNFDP(records_per_party=64, public=PublicData(seed=7))
        # after a round: history has nfdp/epsilon = max over parties of ln((n+1)/(n+1-64)), nfdp/delta

    Args:
        records_per_party: ``k``, the private records each party trains on.
        public: the public data (see :class:`FedMD`).
        tiers: client architectures.
        public_per_round: public subset size per round.
        digest_epochs: passes over the consensus before the private epochs.
        digest_batch_size: digest batch size.
        digest_lr: Adam learning rate of the digest step (``None``: the module's own optimizer).
        eval_clients: stored client models evaluated per tier.
        seed: seed of the public subsets and of the record draws.
        transfer_epochs: FedMD's transfer-learning epochs on the labelled public set (see :class:`FedMD`).
        transfer_lr: Adam learning rate of the transfer phase.
        transfer_batch_size: batch size of the transfer phase.
        assistant_chain: teaching order of tiers by name, largest first, as in :class:`FedMD` (``None``: every
            party digests the consensus): a party of a later tier in the chain digests the previous tier's
            mean logits.
    """

    def __init__(self, *, records_per_party: int = 64, public: PublicData | None = None,
                 tiers: ModelTiers | None = None, public_per_round: int = 500, digest_epochs: int = 1,
                 digest_batch_size: int = 64, digest_lr: float | None = 1e-3, eval_clients: int = 5,
                 seed: int = 0, transfer_epochs: int = 0, transfer_lr: float = 1e-3,
                 transfer_batch_size: int = 32, assistant_chain: list[str] | None = None) -> None:
        if records_per_party < 1:
            raise ValueError(f"FedMDNFDP: records_per_party={records_per_party} is not allowed; it must be >= 1")
        super().__init__(public=public, tiers=tiers, public_per_round=public_per_round,
                         digest_epochs=digest_epochs, digest_batch_size=digest_batch_size,
                         digest_lr=digest_lr, eval_clients=eval_clients, seed=seed, transfer_epochs=transfer_epochs,
                         transfer_lr=transfer_lr, transfer_batch_size=transfer_batch_size,
                         assistant_chain=assistant_chain)
        self.records_per_party = records_per_party
        self.subset = RecordSubset(records_per_party, seed=seed)
        self.guarantees: dict[int, tuple[float, float]] = {}

    def client_callbacks(self) -> list[Any]:
        """FedMD's callbacks plus :class:`RecordSubset`."""
        return [*super().client_callbacks(), self.subset]

    def guarantee(self, n: int) -> tuple[float, float]:
        """``(epsilon, delta)`` of a party with ``n`` private records."""
        k = min(self.records_per_party, n)
        return nfdp_epsilon(k, n), nfdp_delta(k, n)

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """FedMD's consensus, plus the worst ``(epsilon, delta)`` over the parties seen so far."""
        metrics = super().aggregate(server_round, replies)
        for r in replies:
            if r.client_id not in self.guarantees:
                eps, delta = self.guarantee(r.num_examples)
                self.guarantees[r.client_id] = (eps, delta)
                if delta >= 1.0:
                    log.warning("FedMD-NFDP: party %d has n=%d <= k=%d records: delta=1, no privacy guarantee",
                                r.client_id, r.num_examples, self.records_per_party)
                else:
                    log.info("FedMD-NFDP: party %d trains on %d of %d records: (epsilon=%.4f, delta=%.4f)-DP",
                             r.client_id, min(self.records_per_party, r.num_examples), r.num_examples, eps, delta)
        metrics["nfdp/epsilon"] = max(e for e, _ in self.guarantees.values())
        metrics["nfdp/delta"] = max(d for _, d in self.guarantees.values())
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """FedMD's state and the guarantees computed so far."""
        state = super().state_dict()
        state["guarantees"] = {int(c): [e, d] for c, (e, d) in self.guarantees.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.guarantees = {int(c): (float(v[0]), float(v[1])) for c, v in state.get("guarantees", {}).items()}


__all__ = ["FedMDNFDP", "KeptRecords", "RecordSubset", "nfdp_delta", "nfdp_epsilon"]
