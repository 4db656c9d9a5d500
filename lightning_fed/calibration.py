"""CCVR: the global model's classifier calibrated with virtual representations (docs/strategies.md, "CCVR").

Luo et al., "No Fear of Heterogeneity: Classifier Calibration for Federated Learning with Non-IID Data", NeurIPS
2021. Under label skew the body of a federated model learns usable features long before its last linear layer (the
head) stops favouring each round's classes. CCVR fixes the head after training, on the server, without data:

1. every client passes its training shard through the global model and sends, for each class it holds, the count,
   the mean and the (unbiased) covariance of the head's input features;
2. the server pools them into each class's mean and covariance over all clients (the paper's Eq. 4-5; exact, not
   an approximation);
3. it draws ``per_class`` virtual features per class from ``N(mean, covariance)`` and trains the head alone on them
   with cross-entropy (SGD), starting from the global head.

Here it is a loop option, ``FedLoop(calibration=CCVR())``, applied at every evaluation round to the strategy's
global model, as if the run stopped there: the calibrated model is evaluated beside the plain one
(``ccvr/test_acc``, ``ccvr/val_acc``, ...) and the last one is written as ``calibrated.safetensors`` in the run
folder. Training is unchanged (the clients keep training the uncalibrated model, as in the paper), so a run with
CCVR trains bit-identically to one without it. The statistics are computed in the simulation from every client's
shard (all clients, as the paper's one calibration after training); ``ccvr/bytes_up`` counts what the clients
would send (float32 count, mean and the covariance's upper triangle for each class a client holds), and the
server holds one ``classes x d x d`` float64 sum (``d``: the head's input size).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_fed.data.loaders import index_batches
from lightning_fed.seeding import Stream, generator, rng_untouched
from lightning_fed.validation import CheckedArguments, need

log = logging.getLogger("lightning_fed")
OWNER = "CCVR"


@dataclass
class CalibrationRun:
    """What a bound :class:`CCVR` reads from the run (set by FedLoop once the run is built).

    Attributes:
        shards: every client's training indices into ``data``.
        data: the training dataset.
        collate: the collate function of the training loader.
    """

    shards: list[Tensor]
    data: Dataset
    collate: Callable[[list[Any]], Any] | None


@dataclass
class ClassStats:
    """Pooled per-class feature statistics: ``counts`` ``[C]`` (int64), ``means`` ``[C, d]`` and ``covs``
    ``[C, d, d]`` (float64; zeros for a class with fewer than 2 records)."""

    counts: Tensor
    means: Tensor
    covs: Tensor


def client_class_stats(features: Tensor, labels: Tensor, num_classes: int) -> ClassStats:
    """One client's message: for each class, the count, the mean and the unbiased covariance of ``features``
    (``[n, d]``) among the records labelled with it (float64; zeros where the class has no record, a zero
    covariance where it has one)."""
    f = features.double()
    d = f.shape[1]
    counts = torch.bincount(labels, minlength=num_classes)
    means = torch.zeros(num_classes, d, dtype=torch.float64)
    covs = torch.zeros(num_classes, d, d, dtype=torch.float64)
    for c in counts.nonzero().flatten().tolist():
        fc = f[labels == c]
        means[c] = fc.mean(0)
        if len(fc) > 1:
            centred = fc - means[c]
            covs[c] = centred.T @ centred / (len(fc) - 1)
    return ClassStats(counts, means, covs)


class StatsPool:
    """The server's pooling of the clients' :class:`ClassStats` (Luo et al. 2021, Eq. 4-5), one client at a time:
    it keeps the sums ``N_c``, ``sum_k N_k mu_k`` and ``sum_k (N_k - 1) Sigma_k + N_k mu_k mu_k^T`` only."""

    def __init__(self, num_classes: int, dim: int) -> None:
        self.counts = torch.zeros(num_classes, dtype=torch.int64)
        self._sum = torch.zeros(num_classes, dim, dtype=torch.float64)
        self._second = torch.zeros(num_classes, dim, dim, dtype=torch.float64)

    def add(self, stats: ClassStats) -> None:
        """Fold one client's statistics in."""
        n = stats.counts.double()
        self.counts += stats.counts
        self._sum += n[:, None] * stats.means
        self._second += (n - 1).clamp(min=0)[:, None, None] * stats.covs
        self._second += n[:, None, None] * stats.means[:, :, None] * stats.means[:, None, :]

    def result(self) -> ClassStats:
        """Each class's mean and unbiased covariance over all the clients' records (zero covariance below 2)."""
        n = self.counts.double()
        means = self._sum / n.clamp(min=1)[:, None]
        covs = self._second - n[:, None, None] * means[:, :, None] * means[:, None, :]
        covs = covs / (n - 1).clamp(min=1)[:, None, None]
        covs[self.counts < 2] = 0
        return ClassStats(self.counts.clone(), means, covs)


def virtual_features(stats: ClassStats, per_class: int, ridge: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``per_class`` draws from ``N(mean_c, cov_c + ridge * I)`` for every class with at least 2 records (float64
    features ``[m, d]`` and int64 labels ``[m]``); the ridge is doubled until the Cholesky factor exists.

    Raises:
        ValueError: a class's mean or covariance is not finite (features that overflowed or were NaN).
    """
    xs, ys = [], []
    d = stats.means.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    for c in (stats.counts >= 2).nonzero().flatten().tolist():
        if not (torch.isfinite(stats.means[c]).all() and torch.isfinite(stats.covs[c]).all()):
            raise ValueError(f"{OWNER}: the features of class {c} are not all finite; nothing to sample from")
        r = ridge
        for _ in range(200):  # a finite symmetric matrix plus a large enough ridge is positive definite
            chol, info = torch.linalg.cholesky_ex(stats.covs[c] + r * eye)
            if int(info) == 0:
                break
            r = max(2 * r, 1e-12)
        else:
            raise ValueError(f"{OWNER}: no Cholesky factor of class {c}'s covariance up to a ridge of {r:.3g}")
        z = torch.randn(per_class, d, generator=g, dtype=torch.float64)
        xs.append(stats.means[c] + z @ chol.T)
        ys.append(torch.full((per_class,), c, dtype=torch.int64))
    return torch.cat(xs), torch.cat(ys)


def fit_head(head: nn.Linear, x: Tensor, y: Tensor, *, epochs: int, lr: float, momentum: float, batch_size: int,
             g: torch.Generator) -> dict[str, Tensor]:
    """A copy of ``head`` (on the CPU, float32) trained with SGD and cross-entropy on ``(x, y)`` for ``epochs``
    shuffled passes; its ``weight`` (and ``bias``) as a state dict. ``head`` itself is not changed."""
    new = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    new.load_state_dict({k: v.detach().float().cpu() for k, v in head.state_dict().items()})
    opt = torch.optim.SGD(new.parameters(), lr=lr, momentum=momentum)
    x = x.float()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), batch_size):
                part = order[i : i + batch_size]
                opt.zero_grad()
                nn.functional.cross_entropy(new(x[part]), y[part]).backward()
                opt.step()
    return {k: v.detach().clone() for k, v in new.state_dict().items()}


class CCVR(CheckedArguments):
    """Classifier calibration with virtual representations at evaluation rounds (``FedLoop(calibration=CCVR())``).

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=30, partition=Dirichlet(alpha=0.1),
                       strategy=FedNTD(), calibration=CCVR(head="head"), test_every=1)
        result = loop.fit(MNIST1DCNN(), MNIST1DDataModule())
        result.history[-1]["ccvr/test_acc"]       # the calibrated global model's test accuracy
        # result.run_dir / "calibrated.safetensors": the last calibrated model

    Args:
        head: the name of the model's last ``nn.Linear`` (its input are the features; its outputs one logit per
            class), as in ``model.get_submodule(head)``.
        per_class: virtual features drawn per class (the paper: 100 to 2,000).
        epochs: passes of SGD over the virtual features.
        lr: the head's SGD learning rate.
        momentum: its SGD momentum.
        batch_size: its batch size.
        ridge: added to each covariance's diagonal before sampling (a class with fewer records than features has a
            singular covariance).
        seed: seed of the virtual features and batches (with the round).
        feature_batch_size: records per forward pass when the clients compute their statistics.
    """

    def __init__(
        self,
        *,
        head: str = "head",
        per_class: int = 2000,
        epochs: int = 10,
        lr: float = 0.01,
        momentum: float = 0.9,
        batch_size: int = 64,
        ridge: float = 1e-4,
        seed: int = 0,
        feature_batch_size: int = 256,
    ) -> None:
        need(OWNER, bool(head), "head", head, "the name of the model's last nn.Linear")
        for key, value in (("per_class", per_class), ("epochs", epochs), ("batch_size", batch_size),
                           ("feature_batch_size", feature_batch_size)):
            need(OWNER, value >= 1, key, value, "an integer >= 1")
        need(OWNER, lr > 0, "lr", lr, "> 0")
        need(OWNER, 0 <= momentum < 1, "momentum", momentum, "in [0, 1)")
        need(OWNER, ridge >= 0, "ridge", ridge, ">= 0")
        self.head, self.per_class, self.epochs, self.lr, self.momentum = head, per_class, epochs, float(lr), momentum
        self.batch_size, self.ridge, self.seed, self.feature_batch_size = batch_size, float(ridge), seed, feature_batch_size
        self.run: CalibrationRun | None = None

    def head_module(self, model: nn.Module) -> nn.Linear:
        """The model's head; ``ValueError`` when ``head`` names no ``nn.Linear`` of ``model``."""
        try:
            module = model.get_submodule(self.head)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(f"{OWNER}: head={self.head!r} is not an nn.Linear of {type(model).__name__}; its "
                             f"nn.Linear modules: {linears} (CCVR calibrates the last one, the classifier)")
        return module

    def bind(self, run: CalibrationRun) -> None:
        """Attach the run whose clients' shards it reads (FedLoop does, once per fit)."""
        self.run = run

    @torch.no_grad()
    def _client_stats(self, model: nn.Module, head: nn.Linear, cid: int) -> ClassStats:
        run = self.run
        assert run is not None
        captured: list[Tensor] = []

        def grab(module: nn.Module, args: tuple[Any, ...]) -> None:
            captured.append(args[0].detach())

        p = next(model.parameters())
        feats, labels = [], []
        handle = head.register_forward_pre_hook(grab)
        try:
            for x, y in index_batches(run.data, run.shards[cid], self.feature_batch_size, run.collate):
                x = x.to(p.device, dtype=p.dtype) if x.is_floating_point() else x.to(p.device)
                captured.clear()
                model(x)
                if len(captured) != 1 or captured[0].dim() != 2:
                    shapes = [tuple(t.shape) for t in captured]
                    raise ValueError(f"{OWNER}: the head {self.head!r} must run once per forward on a [batch, "
                                     f"features] input; it ran {len(captured)} time(s) with inputs {shapes}")
                feats.append(captured[0].double().cpu())
                labels.append(torch.as_tensor(y).long().cpu())
        finally:
            handle.remove()
        y_all = torch.cat(labels)
        if len(y_all) and (int(y_all.min()) < 0 or int(y_all.max()) >= head.out_features):
            raise ValueError(f"{OWNER}: client {cid} has labels in [{int(y_all.min())}, {int(y_all.max())}] but the "
                             f"head {self.head!r} has {head.out_features} outputs (one per class)")
        return client_class_stats(torch.cat(feats), y_all, head.out_features)

    def calibrate(self, model: nn.Module, server_round: int) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The calibrated head's state for ``model`` (the global model) after ``server_round`` and the metrics
        ``ccvr/classes`` (classes calibrated) and ``ccvr/bytes_up`` (what the clients would send). The model's
        weights, its train/eval mode and the global RNG state are the same afterwards.

        Raises:
            RuntimeError: not bound to a run.
            ValueError: the head is not a linear layer, does not run once per forward on ``[batch, features]``,
                a label is out of its range, or the features are not finite.
        """
        if self.run is None:
            raise RuntimeError("CCVR.bind(run) must be called before calibrate (FedLoop does)")
        head = self.head_module(model)
        was_training = model.training
        model.eval()
        pool = StatsPool(head.out_features, head.in_features)
        d = head.in_features
        sent = 0
        try:
            with rng_untouched():
                for cid in range(len(self.run.shards)):
                    if len(self.run.shards[cid]) == 0:
                        continue
                    stats = self._client_stats(model, head, cid)
                    sent += int((stats.counts > 0).sum()) * (1 + d + d * (d + 1) // 2) * 4
                    pool.add(stats)
        finally:
            model.train(was_training)
        pooled = pool.result()
        calibrated = int((pooled.counts >= 2).sum())
        missing = (pooled.counts < 2).nonzero().flatten().tolist()
        if not calibrated:
            raise ValueError(f"{OWNER}: no class has 2 or more training records; nothing to calibrate")
        if missing:
            log.warning("%s: classes %s have fewer than 2 training records: no virtual features for them", OWNER,
                        missing)
        g = generator(self.seed, Stream.CCVR, server_round)
        x, y = virtual_features(pooled, self.per_class, self.ridge, g)
        state = fit_head(head, x, y, epochs=self.epochs, lr=self.lr, momentum=self.momentum,
                         batch_size=self.batch_size, g=g)
        return state, {"ccvr/classes": float(calibrated), "ccvr/bytes_up": float(sent)}

    @contextmanager
    def applied(self, model: nn.Module, state: dict[str, Tensor]) -> Iterator[nn.Module]:
        """``model`` with its head's weights replaced by ``state`` (:meth:`calibrate`'s) inside the block, restored
        after it."""
        head = self.head_module(model)
        saved = {k: v.detach().clone() for k, v in head.state_dict().items()}
        with torch.no_grad():
            for k, v in head.state_dict().items():
                v.copy_(state[k])
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in head.state_dict().items():
                    v.copy_(saved[k])

    def __repr__(self) -> str:
        return (f"CCVR(head={self.head!r}, per_class={self.per_class}, epochs={self.epochs}, lr={self.lr}, "
                f"momentum={self.momentum}, batch_size={self.batch_size}, ridge={self.ridge}, seed={self.seed})")


__all__ = ["CCVR", "CalibrationRun", "ClassStats", "StatsPool", "client_class_stats", "fit_head",
           "virtual_features"]
