"""A filter on what each reply does to the loss on clean records the server holds: a reply is dropped when its step,
taken alone from the global model, raises the server's clean loss and its client's record of such steps is not
positive either.

Filters on the geometry of the round's replies (multi-Krum, the reference and reputation filters) judge a reply by
its distance or angle to the others. With many small non-IID clients honest updates are nearly orthogonal to each
other, and a reply flipped at its own length (``-u`` for the honest ``u``) looks like one of them. Its *effect* does
not: to first order the step ``gamma * u`` changes the clean loss by ``gamma * <g, u>`` (``g`` the clean gradient),
and the flipped step by the opposite amount. The score is Zeno's descent score (Xie, Koyejo and Gupta, "Zeno:
Distributed Stochastic Gradient Descent with Suspicion-based Fault-tolerance", ICML 2019; the loss test of Fang et
al., "Local Model Poisoning Attacks to Byzantine-Robust Federated Learning", USENIX Security 2020), used as a filter
with a fixed threshold rather than as a ranking that drops a fixed number of replies every round. Every round:

1. **score**: for each reply ``u_i`` with example share ``w_i`` of the round, the decrease of the cross-entropy on
   the clean records (eval mode) from the global weights ``w`` to ``w + gamma_i * u_i``, ``gamma_i = step`` (or
   ``w_i``, the reply's own share of the mean, when ``step`` is ``None``).
2. **record**: each client's mean score over the rounds it was sampled and aggregated, this round's included.
   A non-IID client's honest step sometimes raises the loss on the server's balanced records (about a quarter of
   honest replies on MNIST-1D with Dirichlet(0.5) labels); its record stays positive. A client that sends flipped
   or random steps raises the loss round after round.
3. **keep** a reply unless its score is at most ``min_gain`` *and* (with ``record``) its client's mean score is at
   most ``min_gain`` too; a reply longer than ``max_norm_ratio`` times the round's median norm is always dropped
   (the reference filter's length test).
4. the example-weighted mean of the kept replies (the strategy's ``aggregator``, given only the kept replies), then
   the server optimizer's step, as FedAvg.

A round where no reply is kept is refused (:class:`~lightning_fed.errors.AggregationRefused`) and changes nothing.
The records (per client: the sum of its scores and their count) are the strategy's state
(:meth:`LossFilter.state_dict`), updated only when a round aggregates. Cost: one forward pass over the clean records
per reply, plus one for the global model (``loss_s`` in the round metrics); memory: one copy of the model on the CPU.

Assumption, as FLTrust's: the server holds a small labelled clean set of the task (``clean``); its label mix need not
match any client's. The model's ``forward`` must return class logits.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fed.callbacks._defence import model_copy
from lightning_fed.data.public import PublicData
from lightning_fed.errors import AggregationRefused
from lightning_fed.protocol import Reply
from lightning_fed.strategies.aggregate import example_weights, flat_norm
from lightning_fed.strategies.aggregators import Aggregator
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.reference_filter import check_max_norm_ratio
from lightning_fed.strategies.robust import AggregationReport
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.validation import need
from lightning_fed.weights import float_state

log = logging.getLogger("lightning_fed")


@torch.no_grad()
def clean_loss(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Mean cross-entropy of ``model`` on ``(x, y)`` in eval mode (the mode is restored), summed in float64."""
    was = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(0, len(x), batch_size):
            logits = model(x[i:i + batch_size])
            total += float(F.cross_entropy(logits.double(), y[i:i + batch_size], reduction="sum"))
    finally:
        model.train(was)
    return total / len(x)


class LossFilter(FedAvg):
    """FedAvg on the replies whose step lowers the loss on the server's clean records, or whose client's record of
    such steps is positive (module docstring).

    :attr:`last` records the latest aggregation as an :class:`~lightning_fed.strategies.robust.AggregationReport`
    (positions in the round's reply list): ``dropped`` the replies left out, ``scores`` every reply's score (the
    clean-loss decrease of its step), ``bound`` the norm bound; :class:`~lightning_fed.callbacks.Detection` reads it.
    Round metrics add ``loss_dropped`` (replies left out), ``loss_kept_by_record`` (replies whose own score failed,
    kept for their client's record) and ``loss_s`` (seconds).

    Example::

        clean = PublicData(num_samples=200, seed=7, labeled=True)
        loop = FedLoop(num_clients=100, clients_per_round=10, rounds=150, strategy=LossFilter(clean=clean))

    Args:
        clean: the server's clean records: a labelled :class:`~lightning_fed.data.PublicData`.
        step: each reply is scored at ``w + step * u`` (a finite number > 0); ``None``: at its example share of the
            round (its weight in the mean).
        min_gain: a reply is kept when its score, or (with ``record``) its client's mean score, is above this
            (finite; 0 by default: the step does not raise the clean loss).
        record: forgive a failed score when the client's mean score over its rounds is above ``min_gain``
            (``False``: judge every reply on its own round).
        max_norm_ratio: a reply longer than this times the round's median norm is dropped (> 1).
        server_lr: as :class:`~lightning_fed.strategies.FedAvg`.
        aggregator: the rule over the kept replies (``None``: their example-weighted mean).
        server_optimizer: as :class:`~lightning_fed.strategies.FedAvg`.
    """

    def __init__(
        self,
        clean: PublicData,
        *,
        step: float | None = None,
        min_gain: float = 0.0,
        record: bool = True,
        max_norm_ratio: float = 3.0,
        server_lr: float = 1.0,
        aggregator: Aggregator | None = None,
        server_optimizer: ServerOptimizer | None = None,
    ) -> None:
        name = "LossFilter"
        need(
            name,
            bool(clean.labeled),
            "clean",
            clean,
            "a labelled PublicData (PublicData(labeled=True, ...) or PublicData.from_tensors(x, y))",
        )
        need(
            name,
            step is None or 0 < step < math.inf,
            "step",
            step,
            "a finite number > 0, or None (each reply's share of the mean)",
        )
        need(
            name,
            math.isfinite(min_gain),
            "min_gain",
            min_gain,
            "a finite number",
        )
        check_max_norm_ratio(name, max_norm_ratio)
        super().__init__(server_lr=server_lr, aggregator=aggregator, server_optimizer=server_optimizer)
        self.clean = clean
        self.step = None if step is None else float(step)
        self.min_gain = float(min_gain)
        self.record = record
        self.max_norm_ratio = float(max_norm_ratio)
        self.records: dict[int, tuple[float, int]] = {}
        """Per client id, ``(sum of scores, count)`` over the rounds it was sampled and aggregated."""
        self.last: AggregationReport | None = None
        self._scorer: nn.Module | None = None

    def setup(self, model: nn.Module) -> None:
        """FedAvg's set-up, and a copy of ``model`` on the CPU to score the replies with (made again after a
        structural change)."""
        super().setup(model)
        self._scorer = model_copy(model).cpu()

    def mean_score(self, client_id: int) -> float:
        """The client's mean score over the rounds it was aggregated (``nan`` for a client never seen)."""
        total, count = self.records.get(client_id, (0.0, 0))
        return total / count if count else math.nan

    def scores(self, replies: list[Reply], shares: list[float]) -> list[float]:
        """Every reply's clean-loss decrease at its step (``step``, or its share in ``shares``) from the global
        weights; ``-inf`` where the loss (at the step or at the global weights) is not finite."""
        assert self._scorer is not None
        start = self.global_payload()
        live = float_state(self._scorer)
        if sorted(live) != sorted(start):
            raise RuntimeError(f"{self!r}: the scoring copy's weights are not the federated ones")
        xc, yc = self.clean.x, self.clean.y
        assert yc is not None
        for k, v in start.items():
            live[k].copy_(v)
        base = clean_loss(self._scorer, xc, yc)
        out = []
        for r, share in zip(replies, shares, strict=True):
            gamma = self.step if self.step is not None else share
            for k, v in start.items():
                live[k].copy_(v + gamma * r.payload[k].to(v.dtype))
            gain = base - clean_loss(self._scorer, xc, yc)
            out.append(gain if math.isfinite(gain) else -math.inf)  # a step to a non-finite loss: the worst score
        return out

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """Score the replies, update the records, then FedAvg's aggregation and server step over the kept replies
        (module docstring).

        Raises:
            AggregationRefused: no reply kept (nothing is changed).
        """
        spec, flat = self._require_setup()
        assert self._acc is not None and self._tmp is not None
        t0 = time.perf_counter()
        shares = example_weights([r.num_examples for r in replies])
        gains = self.scores(replies, shares)
        norms = [float(torch.linalg.vector_norm(spec.as_flat(r.payload, self._tmp).double())) for r in replies]
        bound = self.max_norm_ratio * float(torch.tensor(norms).median())
        updated: dict[int, tuple[float, int]] = {}
        for r, g in zip(replies, gains, strict=True):
            total, count = updated.get(r.client_id, self.records.get(r.client_id, (0.0, 0)))
            updated[r.client_id] = (total + g, count + 1)
        keep, forgiven = [], []
        for i, (r, g) in enumerate(zip(replies, gains, strict=True)):
            if norms[i] > bound:
                continue
            if g > self.min_gain:
                keep.append(i)
            elif self.record and updated[r.client_id][0] / updated[r.client_id][1] > self.min_gain:
                keep.append(i)
                forgiven.append(i)
        if not keep:
            raise AggregationRefused(f"{self!r}: none of the {len(replies)} replies lowers the clean loss")
        kept = [replies[i] for i in keep]
        update = self.aggregator.aggregate_payloads(
            self._acc,
            spec,
            (r.payload for r in kept),
            example_weights([r.num_examples for r in kept]),
            self._tmp,
        )
        self.server_optimizer.step(flat, update)
        self.records.update(updated)  # only once the round aggregated: a refused round changes nothing
        dropped = [i for i in range(len(replies)) if i not in set(keep)]
        self.last = AggregationReport(
            count=len(replies), seconds=time.perf_counter() - t0, dropped=dropped, scores=gains, bound=bound
        )
        log.info(
            "round %d: LossFilter dropped clients %s (kept for their record: %s)",
            server_round + 1,
            [replies[i].client_id for i in dropped],
            [replies[i].client_id for i in forgiven],
        )
        return {
            "update_norm": flat_norm(update),
            **self.aggregator.report(),
            "loss_dropped": float(len(dropped)),
            "loss_kept_by_record": float(len(forgiven)),
            "loss_s": self.last.seconds,
        }

    def state_dict(self) -> dict[str, Any]:
        """FedAvg's state plus the records (the client ids, ascending, their score sums in float64 and counts)."""
        ids = sorted(self.records)
        return {
            **super().state_dict(),
            "loss_records": {
                "clients": torch.tensor(ids, dtype=torch.long),
                "sums": torch.tensor([self.records[i][0] for i in ids], dtype=torch.float64),
                "counts": torch.tensor([self.records[i][1] for i in ids], dtype=torch.long),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore FedAvg's state and the records (a checkpoint without them starts with none)."""
        super().load_state_dict(state)
        saved = state.get("loss_records")
        self.records = (
            {}
            if saved is None
            else {
                int(c): (float(s), int(n))
                for c, s, n in zip(
                    saved["clients"].tolist(), saved["sums"].tolist(), saved["counts"].tolist(), strict=True
                )
            }
        )

    def __repr__(self) -> str:
        return (
            f"LossFilter(clean={len(self.clean)} records, step={self.step}, min_gain={self.min_gain}, "
            f"record={self.record}, max_norm_ratio={self.max_norm_ratio})"
        )


__all__ = ["LossFilter", "clean_loss"]
