"""The reference filter with a memory: a per-client beta reputation built from the filter's verdicts over the rounds
a client is sampled, and a reply kept only when its client's record is good as well as this round's update.

:class:`~lightning_fed.strategies.ReferenceFilter` judges every reply on its own round. With many small clients
(e.g. 40 records each) honest updates disagree more, and some of a sign-flipping client's replies happen to pass
the round's direction and length tests; the attacker is the same client round after round, so its record tells what
one round cannot. Every round:

1. **verdict**: the reference filter's test of every reply (:func:`~.reference_filter.filter_mask`: cosine to the
   round's median or multi-Krum mean above ``min_cosine`` and norm at most ``max_norm_ratio`` times the round's
   median norm): *pass* or *fail*. With ``norm_memory`` (the default) the length test's reference is the smaller
   of the round's median norm and the median norm of the replies kept in the last aggregated round: the round's
   own median is set by its majority, and in a round where most sampled clients are malicious (which happens by
   chance with many clients and few per round) that majority is the attackers'; the last kept replies' is not.
2. **reputation**: each client holds the counts of its passes ``a`` and fails ``b`` over the rounds it was sampled,
   this round's verdict included; its reputation is the mean of the Beta(``a + 1``, ``b + 1``) posterior,
   ``(a + 1) / (a + b + 2)`` (the beta reputation system of Josang and Ismail, "The Beta Reputation System", Bled
   eConference 2002, with a uniform prior: a client never seen before starts at 1/2).
3. **keep** a reply when it passes this round *and* its client's reputation is above ``min_reputation`` (1/2 by
   default: more passes than fails). A client with a clean record is still dropped in a round it fails (as by the
   reference filter: a client that turns malicious is caught in every round the filter catches it); a client whose
   replies mostly fail is dropped also in the rounds it passes.
4. the example-weighted mean of the kept replies (the strategy's ``aggregator``, given only the kept replies).

The counts and the remembered norm are the strategy's state (:meth:`ReputationFilter.state_dict`), updated only
when a round aggregates: a refused round (no reply kept, or fewer replies than the reference needs) changes
nothing. Memory: two integers per client ever seen. No clean data, no knowledge of the attack; the thresholds are
fixed, not tuned.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from lightning_fed.errors import AggregationRefused
from lightning_fed.protocol import Reply
from lightning_fed.strategies.aggregate import example_weights, flat_norm
from lightning_fed.strategies.aggregators import Aggregator
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.reference_filter import check_filter_settings, filter_mask, reference_
from lightning_fed.strategies.robust import AggregationReport
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.validation import need

log = logging.getLogger("lightning_fed")


def beta_reputation(passes: int, fails: int) -> float:
    """The mean of the Beta(``passes + 1``, ``fails + 1``) posterior: ``(passes + 1) / (passes + fails + 2)``."""
    return (passes + 1) / (passes + fails + 2)


class ReputationFilter(FedAvg):
    """FedAvg on the replies that pass the round's reference filter and whose client's beta reputation over the
    rounds it was sampled is above ``min_reputation`` (module docstring).

    :attr:`last` records the latest aggregation as an :class:`~lightning_fed.strategies.robust.AggregationReport`
    (positions in the round's reply list): ``dropped`` the replies left out, ``scores`` every reply's client
    reputation after this round's verdict, ``bound`` the norm bound; :class:`~lightning_fed.callbacks.Detection`
    reads it. Round metrics add ``rep_dropped`` (replies left out), ``rep_vetoed`` (of them, replies that passed
    the filter but whose client's reputation did not) and ``rep_s`` (seconds).

    Example::

        loop = FedLoop(num_clients=100, clients_per_round=10, rounds=150,
                       strategy=ReputationFilter(reference="krum", byzantine=3))

    Args:
        reference: the filter's reference, ``"median"`` or ``"krum"`` (as
            :class:`~lightning_fed.strategies.ReferenceFilter`).
        byzantine: Krum's ``f`` for ``reference="krum"`` (>= 0; a round needs ``2 f + 3`` replies).
        min_cosine: the filter's cosine threshold, in ``[-1, 1)``.
        max_norm_ratio: the filter's norm bound, times the round's median norm (> 1).
        min_reputation: a reply is kept only if its client's reputation is above this, in ``[0, 1)`` (1/2: more
            passes than fails).
        norm_memory: the length test's reference norm is the smaller of the round's median norm and the median
            norm of the last aggregated round's kept replies (``False``: the round's median alone, as
            :class:`~lightning_fed.strategies.ReferenceFilter`).
        server_lr: as :class:`~lightning_fed.strategies.FedAvg`.
        aggregator: the rule over the kept replies (``None``: their example-weighted mean).
        server_optimizer: as :class:`~lightning_fed.strategies.FedAvg`.
    """

    def __init__(
        self,
        *,
        reference: str = "krum",
        byzantine: int = 1,
        min_cosine: float = 0.0,
        max_norm_ratio: float = 3.0,
        min_reputation: float = 0.5,
        norm_memory: bool = True,
        server_lr: float = 1.0,
        aggregator: Aggregator | None = None,
        server_optimizer: ServerOptimizer | None = None,
    ) -> None:
        name = "ReputationFilter"
        check_filter_settings(name, reference, byzantine, min_cosine, max_norm_ratio)
        need(
            name,
            0 <= min_reputation < 1,
            "min_reputation",
            min_reputation,
            "in [0, 1)",
        )
        super().__init__(server_lr=server_lr, aggregator=aggregator, server_optimizer=server_optimizer)
        self.reference = reference
        self.byzantine = byzantine
        self.min_cosine = float(min_cosine)
        self.max_norm_ratio = float(max_norm_ratio)
        self.min_reputation = float(min_reputation)
        self.norm_memory = norm_memory
        self.kept_norm: float | None = None
        """The median norm of the replies kept in the last aggregated round (``None`` before the first)."""
        self.counts: dict[int, tuple[int, int]] = {}
        """Per client id, ``(passes, fails)`` of the filter over the rounds it was sampled and aggregated."""
        self.last: AggregationReport | None = None

    def required(self) -> int:
        """The fewest replies a round needs: Krum's ``2 * byzantine + 3`` with the Krum reference, else 1."""
        return 2 * self.byzantine + 3 if self.reference == "krum" else 1

    def reputation(self, client_id: int) -> float:
        """The client's current reputation (1/2 for a client never seen)."""
        return beta_reputation(*self.counts.get(client_id, (0, 0)))

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """The filter's verdicts, the clients' updated reputations, then FedAvg's aggregation and server step over
        the kept replies (module docstring).

        Raises:
            AggregationRefused: fewer replies than the reference needs, or none kept (nothing is changed).
        """
        spec, flat = self._require_setup()
        assert self._acc is not None and self._tmp is not None
        t0 = time.perf_counter()
        if len(replies) < self.required():
            raise AggregationRefused(f"{self!r} needs at least {self.required()} replies, got {len(replies)}")
        x = torch.stack([spec.as_flat(r.payload).float() for r in replies])
        ref = reference_(torch.empty_like(x[0]), x, self.reference, self.byzantine)
        passed, _, bound = filter_mask(x, ref, self.min_cosine, self.max_norm_ratio)
        norms = torch.linalg.vector_norm(x.double(), dim=1)
        if self.norm_memory and self.kept_norm is not None and self.max_norm_ratio * self.kept_norm < bound:
            bound = self.max_norm_ratio * self.kept_norm
            passed &= norms <= bound
        updated: dict[int, tuple[int, int]] = {}
        for r, ok in zip(replies, passed.tolist(), strict=True):
            a, b = updated.get(r.client_id, self.counts.get(r.client_id, (0, 0)))
            updated[r.client_id] = (a + 1, b) if ok else (a, b + 1)
        scores = [beta_reputation(*updated[r.client_id]) for r in replies]
        keep = [i for i, ok in enumerate(passed.tolist()) if ok and scores[i] > self.min_reputation]
        if not keep:
            raise AggregationRefused(
                f"{self!r}: none of the {len(replies)} replies passes the filter and the record"
            )
        kept = [replies[i] for i in keep]
        update = self.aggregator.aggregate_payloads(
            self._acc,
            spec,
            (r.payload for r in kept),
            example_weights([r.num_examples for r in kept]),
            self._tmp,
        )
        self.server_optimizer.step(flat, update)
        self.counts.update(updated)  # only once the round aggregated: a refused round changes nothing
        self.kept_norm = float(norms[keep].median())
        dropped = [i for i in range(len(replies)) if i not in set(keep)]
        vetoed = [i for i in dropped if bool(passed[i])]
        self.last = AggregationReport(
            count=len(replies), seconds=time.perf_counter() - t0, dropped=dropped, scores=scores, bound=bound
        )
        log.info(
            "round %d: ReputationFilter dropped clients %s (of them, for their record: %s)",
            server_round + 1,
            [replies[i].client_id for i in dropped],
            [replies[i].client_id for i in vetoed],
        )
        return {
            "update_norm": flat_norm(update),
            **self.aggregator.report(),
            "rep_dropped": float(len(dropped)),
            "rep_vetoed": float(len(vetoed)),
            "rep_s": self.last.seconds,
        }

    def state_dict(self) -> dict[str, Any]:
        """FedAvg's state plus the counts (the client ids, ascending, and one ``[clients, 2]`` tensor of
        ``(passes, fails)``) and the remembered norm (``nan`` before the first aggregated round)."""
        ids = sorted(self.counts)
        counts = torch.tensor([list(self.counts[i]) for i in ids], dtype=torch.long).reshape(len(ids), 2)
        return {
            **super().state_dict(),
            "reputation": {
                "clients": torch.tensor(ids, dtype=torch.long),
                "counts": counts,
                "kept_norm": torch.tensor(
                    math.nan if self.kept_norm is None else self.kept_norm, dtype=torch.float64
                ),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore FedAvg's state, the counts and the remembered norm (a checkpoint without them starts with
        none)."""
        super().load_state_dict(state)
        saved = state.get("reputation")
        kept = math.nan if saved is None else float(saved.get("kept_norm", math.nan))
        self.kept_norm = None if math.isnan(kept) else kept
        self.counts = (
            {}
            if saved is None
            else {
                int(c): (int(a), int(b))
                for c, (a, b) in zip(saved["clients"].tolist(), saved["counts"].tolist(), strict=True)
            }
        )

    def __repr__(self) -> str:
        return (
            f"ReputationFilter(reference={self.reference!r}, byzantine={self.byzantine}, min_cosine={self.min_cosine}, "
            f"max_norm_ratio={self.max_norm_ratio}, min_reputation={self.min_reputation}, norm_memory={self.norm_memory})"
        )


__all__ = ["ReputationFilter", "beta_reputation"]
