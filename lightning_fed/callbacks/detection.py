"""Detection precision and recall of a robust aggregator against a simulated attack's malicious clients.

A robust rule that filters (multi-Krum, FLAME) drops some replies; a norm bound scales some down. Both are a
detection: the rule names the replies it distrusts, and a simulation knows which clients were malicious.
:class:`Detection` compares the two every round: the aggregator's :attr:`~.RobustAggregator.last` report gives the
positions it dropped (or clipped) in the round's reply list, the loop's ``on_aggregate_start`` gives the client of
each position, and the attack's :meth:`~lightning_fed.callbacks.Attack.malicious` gives the malicious set.
"""

from __future__ import annotations

from typing import Any

from lightning_fed.callbacks.attacks import Attack
from lightning_fed.callbacks.base import FedCallback
from lightning_fed.context import fed_context
from lightning_fed.protocol import Reply
from lightning_fed.strategies.base import Strategy
from lightning_fed.strategies.robust import AggregationReport, RobustAggregator
from lightning_fed.validation import need

FLAGS = ("dropped", "clipped")


def precision_recall(flagged: set[int], malicious: set[int]) -> tuple[float, float]:
    """``(precision, recall)`` of ``flagged`` against ``malicious``; ``nan`` where the denominator is zero (nothing
    flagged; no malicious client present)."""
    hits = len(flagged & malicious)
    precision = hits / len(flagged) if flagged else float("nan")
    recall = hits / len(malicious) if malicious else float("nan")
    return precision, recall


class Detection(FedCallback):
    """Counts, every aggregated round, the malicious and honest replies ``aggregator`` dropped (or clipped) and the
    malicious ones it kept. FedLoop only; the aggregator must be the one the strategy uses (FedAvg: positions are
    in the order of the round's replies).

    Round metrics: ``det_tp`` (malicious replies flagged), ``det_fp`` (honest replies flagged), ``det_fn``
    (malicious replies not flagged), and ``det_precision`` / ``det_recall`` of the round (``nan`` when undefined).
    The run's totals are :attr:`tp`, :attr:`fp`, :attr:`fn` and :meth:`totals`; they are checkpointed. A round
    whose aggregation was refused or skipped counts nothing.

    Example::

        attack, krum = SignFlip(fraction=0.2, scale=4.0), Krum(byzantine=2)
        detection = Detection(attack, krum)
        loop = FedLoop(..., strategy=FedAvg(aggregator=krum), callbacks=[attack, detection])
        loop.fit(model, dm)
        detection.totals()  # {"precision": ..., "recall": ..., "tp": ..., "fp": ..., "fn": ...}

    Args:
        attack: the simulated attack whose malicious clients are the truth.
        aggregator: the robust rule whose reports are read (or a strategy that keeps one as ``last``:
            :class:`~lightning_fed.strategies.FoolsGold`).
        flag: ``"dropped"`` (filters: Krum, FLAME) or ``"clipped"`` (norm bounds: ``NormBound``, ``WeakDP``).
    """

    def __init__(
        self, attack: Attack, aggregator: RobustAggregator | Strategy, flag: str = "dropped"
    ) -> None:
        need(
            "Detection",
            isinstance(aggregator, RobustAggregator)
            or (
                isinstance(aggregator, Strategy)
                and isinstance(getattr(aggregator, "last", 0), AggregationReport | None)
            ),
            "aggregator",
            aggregator,
            "a RobustAggregator (CoordinateMedian, TrimmedMean, Krum, NormBound, WeakDP, FLAME, ReferenceFilter) or "
            "a strategy that records an AggregationReport as `last` (FoolsGold)",
        )
        need("Detection", flag in FLAGS, "flag", flag, f"one of {FLAGS}")
        self.attack = attack
        self.aggregator = aggregator
        self.flag = flag
        self.tp = self.fp = self.fn = 0
        self._clients: list[int] = []
        self._before: object = None

    def on_aggregate_start(self, trainer: Any, pl_module: Any, replies: list[Reply]) -> None:
        """Server: note the client of each position and the aggregator's report before this round's call."""
        self._clients = [r.client_id for r in replies]
        self._before = self.aggregator.last

    def on_round_end(self, trainer: Any, pl_module: Any, metrics: dict[str, float]) -> None:
        """Server: compare this round's flagged replies with the malicious clients among the round's replies."""
        fed = fed_context(trainer)
        last = self.aggregator.last
        if fed is None or last is None or last is self._before or metrics.get("skipped"):
            return
        flagged = {self._clients[i] for i in getattr(last, self.flag)}
        bad = set(self.attack.malicious(fed.round, fed.num_clients)) & set(self._clients)
        tp, fp, fn = len(flagged & bad), len(flagged - bad), len(bad - flagged)
        self.tp, self.fp, self.fn = self.tp + tp, self.fp + fp, self.fn + fn
        precision, recall = precision_recall(flagged, bad)
        metrics.update(
            {
                "det_tp": float(tp),
                "det_fp": float(fp),
                "det_fn": float(fn),
                "det_precision": precision,
                "det_recall": recall,
            }
        )

    def totals(self) -> dict[str, float]:
        """The run's counts and its precision ``tp / (tp + fp)`` and recall ``tp / (tp + fn)`` (``nan`` when
        undefined)."""
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")
        return {
            "precision": precision,
            "recall": recall,
            "tp": float(self.tp),
            "fp": float(self.fp),
            "fn": float(self.fn),
        }

    def state_dict(self) -> dict[str, Any]:
        """The run's counts."""
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the run's counts."""
        self.tp, self.fp, self.fn = int(state["tp"]), int(state["fp"]), int(state["fn"])

    def __repr__(self) -> str:
        return f"Detection({self.attack!r}, {self.aggregator!r}, flag={self.flag!r})"


__all__ = ["Detection", "precision_recall"]
