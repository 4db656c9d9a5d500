"""FLTrust: Cao, Fang, Liu and Gong, "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping",
NDSS 2021.

The server holds a small clean *root* dataset and, every round, trains its own copy of the global model on it: the
server update ``g0``. Each reply ``g_i`` gets the trust score ``TS_i = ReLU(cos(g_i, g0))`` (a reply pointing away
from the server's direction, e.g. a flipped sign, gets 0), is rescaled to the server update's norm (a boosted
reply gains nothing from its length) and the aggregate is ``sum_i TS_i * |g0| / |g_i| * g_i / sum_i TS_i``. A round
whose trust scores are all zero is refused (:class:`~lightning_fed.errors.AggregationRefused`, logged by the loop).
Example weights are ignored: trust comes from the direction, not from a claimed count.

Two parts, both on the server: :class:`FLTrust`, the aggregator (pure math on the flat buffers), and
:class:`FLTrustRoot`, the server callback that computes ``g0`` at the start of every round from the global model and
the root data and hands it to the aggregator. The aggregator installs its callback itself
(:meth:`~lightning_fed.strategies.Aggregator.callbacks`, which :class:`~lightning_fed.strategies.FedAvg` adds to its
callbacks), so a recipe names the aggregator only.

The server update is SGD with cross-entropy on the root data (the model's ``forward`` must return class logits, as
for the other clean-data defences), ``epochs`` passes, batches shuffled by a generator keyed by (seed, round) and
torch's global generator seeded the same way and restored: the same round gives the same ``g0`` after a resume and
on every rank. ``lr_decay`` (the clients' :class:`~lightning_fed.callbacks.RoundLRDecay`) scales the server's
learning rate as the clients' is scaled, so ``g0``'s norm follows theirs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fed.callbacks._defence import finetune, model_copy
from lightning_fed.callbacks.base import FedCallback
from lightning_fed.callbacks.lr_schedule import RoundLRDecay
from lightning_fed.context import fed_context
from lightning_fed.data.public import PublicData
from lightning_fed.errors import AggregationRefused
from lightning_fed.flat import FlatSpec
from lightning_fed.protocol import Instruction, Payload
from lightning_fed.seeding import Stream, derive_seed, generator
from lightning_fed.strategies.robust import AggregationReport, RobustAggregator
from lightning_fed.validation import need
from lightning_fed.weights import float_state

log = logging.getLogger("lightning_fed")


def trust_scores(x: Tensor, ref: Tensor) -> Tensor:
    """``ReLU(cos(x_i, ref))`` for every row of ``x`` (float64; a zero row or a zero ``ref`` scores 0)."""
    xd, rd = x.double(), ref.double()
    norms = torch.linalg.vector_norm(xd, dim=1)
    cos = (xd @ rd) / (norms * torch.linalg.vector_norm(rd)).clamp(min=1e-30)
    return cos.clamp_(min=0.0)


def fltrust_(out: Tensor, x: Tensor, ref: Tensor, scores: Tensor) -> Tensor:
    """``out = sum_i scores_i * |ref| / |x_i| * x_i / sum_i scores_i`` (``scores`` not all zero); returns ``out``."""
    norms = torch.linalg.vector_norm(x.double(), dim=1).clamp(min=1e-30)
    coef = scores * torch.linalg.vector_norm(ref.double()) / norms / scores.sum()
    return torch.mv(x.T, coef.to(x.dtype), out=out)


class FLTrust(RobustAggregator):
    """FLTrust's trust-weighted aggregate (module docstring); its :class:`FLTrustRoot` callback computes the server
    update on ``clean`` every round. :attr:`last` holds the trust scores (``scores``) and, as ``dropped``, the replies
    whose score is 0.

    A round without a server update for this layout (the strategy does not install aggregator callbacks, or the
    aggregator serves several architectures) is refused with that reason.

    Example::

        root = PublicData(num_samples=100, seed=7, labeled=True)
        strategy = FedAvg(aggregator=FLTrust(clean=root, epochs=5, lr=0.05, momentum=0.9, batch_size=16,
                                             lr_decay=RoundLRDecay(schedule="cosine", min_scale=0.1)))

    Args:
        clean: the server's root data: a labelled :class:`~lightning_fed.data.PublicData` (the paper: 100 records).
        epochs: passes over the root data per round (>= 1; as the clients' local epochs).
        lr: SGD learning rate of the server update (> 0; as the clients').
        momentum: SGD momentum, in ``[0, 1)``.
        batch_size: root batch size (>= 1).
        lr_decay: the clients' round schedule, applied to ``lr`` too (``None``: constant ``lr``).
        seed: seed of the root batches.
    """

    def __init__(
        self,
        clean: PublicData,
        epochs: int = 1,
        lr: float = 0.05,
        momentum: float = 0.0,
        batch_size: int = 16,
        lr_decay: RoundLRDecay | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        need(
            "FLTrust",
            bool(clean.labeled),
            "clean",
            clean,
            "a labelled PublicData (PublicData(labeled=True, ...) or PublicData.from_tensors(x, y)): the root data",
        )
        need(
            "FLTrust",
            epochs >= 1,
            "epochs",
            epochs,
            "an integer >= 1",
        )
        need("FLTrust", lr > 0, "lr", lr, "> 0")
        need(
            "FLTrust",
            0 <= momentum < 1,
            "momentum",
            momentum,
            "in [0, 1)",
        )
        need(
            "FLTrust",
            batch_size >= 1,
            "batch_size",
            batch_size,
            "an integer >= 1",
        )
        self.clean = clean
        self.epochs = epochs
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.batch_size = batch_size
        self.lr_decay = lr_decay
        self.seed = seed
        self.reference: Payload | Tensor | None = None
        """The server update of the coming aggregation (a payload set by :class:`FLTrustRoot`, or a flat tensor),
        used once."""
        self._root = FLTrustRoot(self)

    def callbacks(self) -> list[Any]:
        """The :class:`FLTrustRoot` that computes the server update every round."""
        return [self._root]

    def aggregate_payloads(
        self,
        out: Tensor,
        spec: FlatSpec,
        payloads: Iterable[Payload],
        weights: Sequence[float],
        scratch: Tensor | None = None,
    ) -> Tensor:
        """Flatten the server update (a payload) in ``spec``'s layout, then aggregate; a missing update, or one of
        another layout, refuses the round."""
        ref = self.reference
        if isinstance(ref, dict):
            if sorted(ref) != sorted(spec.names):
                self.reference = None
            else:
                self.reference = spec.flatten({k: v.float() for k, v in ref.items()})
        return super().aggregate_payloads(out, spec, payloads, weights, scratch)

    def take_reference(self, size: int) -> Tensor:
        """The server update as one flat tensor of ``size`` entries, used once (the next call needs a new one).

        Raises:
            AggregationRefused: there is none, or it has another size.
        """
        ref, self.reference = self.reference, None
        if not isinstance(ref, Tensor) or ref.numel() != size:
            raise AggregationRefused(
                f"{self!r} has no server update for these replies (the strategy must install "
                "the aggregator's callbacks, as FedAvg does; one architecture only)"
            )
        return ref

    def combine(self, out: Tensor, x: Tensor, w: Tensor, report: AggregationReport) -> None:
        """Trust scores against the server update, rescale, trust-weighted mean; all-zero scores refuse."""
        ref = self.take_reference(x.shape[1]).to(x.dtype)
        scores = trust_scores(x, ref)
        report.scores = scores.tolist()
        report.dropped = [i for i, s in enumerate(report.scores) if s == 0.0]
        report.bound = float(torch.linalg.vector_norm(ref.double()))
        if not float(scores.sum()) > 0:
            raise AggregationRefused(
                f"{self!r}: every one of the {x.shape[0]} replies has trust score 0 (no reply "
                "points within 90 degrees of the server update)"
            )
        fltrust_(out, x, ref, scores)

    def __repr__(self) -> str:
        return (
            f"FLTrust(clean={len(self.clean)} records, epochs={self.epochs}, lr={self.lr}, "
            f"momentum={self.momentum}, batch_size={self.batch_size}, seed={self.seed})"
        )


class FLTrustRoot(FedCallback):
    """Server: at the start of every round, train a copy of the global model on the root data and give the update
    (trained - global, every float state entry) to its :class:`FLTrust` aggregator. Installed by the aggregator;
    holds no state across rounds (the update is recomputed from the global model, so a resumed run repeats it)."""

    def __init__(self, owner: FLTrust) -> None:
        self.owner = owner

    def on_round_start(self, trainer: Any, pl_module: Any, instructions: list[Instruction]) -> None:
        """Compute the round's server update from ``pl_module`` (the global weights before local training)."""
        fed = fed_context(trainer)
        if fed is None or not fed.on_server:
            return
        self.owner.reference = root_update(self.owner, pl_module, fed.round, fed.num_rounds)

    def state_dict(self) -> dict[str, Any]:
        """Nothing to keep: the update is a function of the global model and the round."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


def root_update(agg: FLTrust, model: nn.Module, server_round: int, num_rounds: int) -> Payload:
    """The server update of ``server_round``: ``agg``'s SGD on its root data from a copy of ``model``, as a payload of
    float32 deltas (``trained - model`` per float state entry)."""
    scale = agg.lr_decay.scale(server_round, num_rounds) if agg.lr_decay is not None else 1.0
    start = {k: v.detach().clone() for k, v in float_state(model).items()}
    work = model_copy(model)
    x, y = agg.clean.x, agg.clean.y
    assert y is not None
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(derive_seed(agg.seed, int(Stream.FLTRUST_ROOT), server_round, 1))
        finetune(
            work,
            x,
            y,
            agg.epochs,
            agg.lr * scale,
            agg.momentum,
            agg.batch_size,
            generator(agg.seed, Stream.FLTRUST_ROOT, server_round),
        )
    trained = float_state(work)
    return {k: (trained[k].detach().float().cpu() - v.float().cpu()) for k, v in start.items()}


__all__ = ["FLTrust", "FLTrustRoot", "fltrust_", "root_update", "trust_scores"]
