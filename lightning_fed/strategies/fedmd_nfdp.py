"""FedMD-NFDP: FedMD where each party trains on only ``k`` of its ``n`` private records.

Sun & Lyu, "Federated Model Distillation with Noise-Free Differential Privacy", IJCAI 2021. Sampling ``k``
of ``n`` records without replacement, once, and training only on them makes everything the party releases
(its logits on public data) ``(epsilon, delta)``-differentially private with no added noise::

    epsilon = ln((n + 1) / (n + 1 - k)),    delta = k / n

:class:`RecordSubset` is the client side (it drops the other records from every training batch; it also
works under a plain ``lightning.Trainer``); :class:`FedMDNFDP` is FedMD with that callback installed and
the guarantee of every party computed from its ``n`` and reported as ``nfdp/epsilon`` and ``nfdp/delta``
(the worst case over the parties seen so far).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.callbacks.step_hook import TrainingStepHook
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


def _row_key(row: Tensor) -> bytes:
    return row.detach().cpu().contiguous().numpy().tobytes()


class RecordSubset(FedCallback):
    """Train on a fixed random subset of ``k`` of the ``n`` local records (drops the rest from each batch).

    The subset is drawn once per client from ``(seed, client_id)`` (under ``lightning.Trainer``: from
    ``seed`` over the whole training set) and does not change across rounds. Records are recognised by
    their input tensor, so batches must be ``(x, y, ...)`` tuples/lists.

    Example::

        L.Trainer(callbacks=[RecordSubset(k=64)], max_epochs=5).fit(model, dm)   # trains on 64 records

    Args:
        k: records to keep per client (all of them when a client has fewer).
        seed: seed of the draw.
    """

    def __init__(self, k: int, seed: int = 0) -> None:
        if k < 1:
            raise ValueError(f"RecordSubset: k={k} is not allowed; k must be >= 1")
        self.k = k
        self.seed = seed
        self._allowed: set[bytes] = set()
        self._hook = TrainingStepHook(self._step)
        self.kept = 0
        self.dropped = 0

    def chosen(self, n: int, client_id: int) -> Tensor:
        """Positions (into the client's ``n`` records) of the kept records."""
        return torch.randperm(n, generator=generator(self.seed, Stream.NFDP_SUBSET, client_id))[: min(self.k, n)]

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Find the client's records, draw the subset, and wrap ``training_step``."""
        loop = getattr(trainer, "fed_loop", None)
        if loop is not None:
            dataset, indices, cid = loop.train_template.dataset, loop.shards[trainer.client_id], trainer.client_id
        else:
            dataset = trainer.train_dataloader.dataset
            indices, cid = torch.arange(len(dataset)), 0
        keep = indices[self.chosen(len(indices), cid)]
        if isinstance(dataset, TensorDataset):
            rows = dataset.tensors[0][keep]
        else:
            rows = torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in keep])
        self._allowed = {_row_key(r) for r in rows}
        self.kept = self.dropped = 0
        self._hook.install(pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Unwrap ``training_step``."""
        self._hook.remove()

    def _step(self, original: Any, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(batch, (tuple, list)) or not batch or not isinstance(batch[0], Tensor):
            raise ValueError("RecordSubset: batches must be (x, y, ...) tuples or lists of tensors")
        mask = torch.tensor([_row_key(r) in self._allowed for r in batch[0]], device=batch[0].device)
        self.kept += int(mask.sum())
        self.dropped += int((~mask).sum())
        if not bool(mask.any()):
            return None  # no kept record in this batch: skip the step
        sub = type(batch)(t[mask] if isinstance(t, Tensor) and len(t) == len(mask) else t for t in batch)
        return original(sub, batch_idx, *args, **kwargs)


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
    """

    def __init__(self, *, records_per_party: int = 64, public: PublicData | None = None,
                 tiers: ModelTiers | None = None, public_per_round: int = 500, digest_epochs: int = 1,
                 digest_batch_size: int = 64, digest_lr: float | None = 1e-3, eval_clients: int = 5,
                 seed: int = 0, transfer_epochs: int = 0, transfer_lr: float = 1e-3,
                 transfer_batch_size: int = 32) -> None:
        if records_per_party < 1:
            raise ValueError(f"FedMDNFDP: records_per_party={records_per_party} is not allowed; it must be >= 1")
        super().__init__(public=public, tiers=tiers, public_per_round=public_per_round,
                         digest_epochs=digest_epochs, digest_batch_size=digest_batch_size,
                         digest_lr=digest_lr, eval_clients=eval_clients, seed=seed, transfer_epochs=transfer_epochs,
                         transfer_lr=transfer_lr, transfer_batch_size=transfer_batch_size)
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


__all__ = ["FedMDNFDP", "RecordSubset", "nfdp_delta", "nfdp_epsilon"]
