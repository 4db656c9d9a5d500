"""Personalized evaluation: every client judged on held-out data from its own distribution (docs/evaluation.md).

Each client gets a held-out split, seeded by ``(seed, client)``, in one of two ways (``PersonalEval(holdout=)``):

* ``"test"`` (the default): a per-client slice of the test set with the client's label proportions. ``size``
  examples are allotted to the labels by the largest remainder of the shard's label shares and drawn without
  replacement among the test examples of each label (fewer when the test set has fewer of a label). Clients train
  on their whole shards, so a run trains exactly as without personalized evaluation, and a client with a few
  examples is still judged on ``size`` of them. Slices of different clients may share test examples.
* ``"shard"``: a train/test split of the client's own shard: ``fraction`` of it (rounded up; at least one example of
  a shard of two or more, never the whole shard) is held out and never trained on. Small shards get tiny splits,
  and every client trains on less data; it needs no test set.

At every evaluation round (``FedLoop(eval_every=)``), for every client: the global model's accuracy on the
client's split (strategies with a global model) and the client's personal model's (strategies that keep one:
:meth:`~lightning_fed.strategies.Strategy.personal_model`, e.g. fine-tuned, FedPer, Ditto, FedMD's own models).
Logged as ``personal/global_acc_mean``, ``personal/global_acc_p10``, ``personal/acc_mean``, ``personal/acc_p10``
(the unweighted mean over clients and the 10th percentile, linear interpolation as ``numpy.percentile``), and
written by rank 0, atomically, as ``personalized/round_<NNNN>.csv`` in the run folder, one row per client.
A personal model is read from the client store one client at a time: 1,000 clients cost one working model.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_fed.data.loaders import LabelsNotFound, dataset_labels, index_batches
from lightning_fed.seeding import Stream, derive_seed, generator, rng_untouched, seed_rngs
from lightning_fed.validation import CheckedArguments, need
from lightning_fed.weights import load_into

HOLDOUTS = ("test", "shard")
COLUMNS = ("client", "examples", "global_correct", "global_acc", "personal_correct", "personal_acc")


def largest_remainder(shares: Tensor, total: int) -> Tensor:
    """Integer counts summing to ``total`` in proportion to ``shares`` (Hamilton's method; ties to the lower index).

    Example::

        largest_remainder(torch.tensor([3.0, 1.0]), 10)   # tensor([8, 2]) (7.5 -> 8, 2.5 -> 2)
    """
    quota = shares.double() / shares.double().sum() * total
    counts = quota.floor().long()
    rest = total - int(counts.sum())
    if rest > 0:
        order = sorted(range(len(quota)), key=lambda i: (-(float(quota[i]) - int(counts[i])), i))
        for i in order[:rest]:
            counts[i] += 1
    return counts


def client_test_slice(shard_labels: Tensor, test_labels: Tensor, size: int, g: torch.Generator) -> Tensor:
    """Indices into the test set: ``size`` examples with the label proportions of ``shard_labels`` (sorted)."""
    if len(shard_labels) == 0:
        return torch.zeros(0, dtype=torch.long)
    classes = int(max(int(shard_labels.max()), int(test_labels.max()))) + 1
    counts = largest_remainder(torch.bincount(shard_labels, minlength=classes).double(), size)
    picked = []
    for label in counts.nonzero().flatten().tolist():
        pool = (test_labels == label).nonzero().flatten()
        take = min(int(counts[label]), len(pool))
        picked.append(pool[torch.randperm(len(pool), generator=g)[:take]])
    return torch.cat(picked).sort().values if picked else torch.zeros(0, dtype=torch.long)


def shard_split(shard: Tensor, fraction: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(train, held_out)`` parts of ``shard`` (each in the shard's order): ``ceil(fraction * n)`` held out, at
    least one of a shard of two or more, never all of it."""
    n = len(shard)
    k = 0 if n < 2 else min(max(math.ceil(fraction * n), 1), n - 1)
    held = torch.zeros(n, dtype=torch.bool)
    held[torch.randperm(n, generator=g)[:k]] = True
    return shard[~held], shard[held]


def percentile10(values: list[float]) -> float:
    """The 10th percentile of ``values`` with linear interpolation (``numpy.percentile``'s default)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), 10))


@dataclass
class PersonalRun:
    """What a bound :class:`PersonalEval` reads from the run (set by FedLoop once the run is built).

    Attributes:
        strategy: gives personal models (``personal_model``) and writes the global one back (``load_global``).
        model: the loop's working model, holding the global weights at evaluation.
        prepare: puts a strategy-provided module (a tier's) on the device, once.
        load_state: a client's state from the client store.
        train: trains a module on data with its own Lightning hooks (:meth:`~lightning_fed.context.FedContext.train`).
        shards: every client's training indices.
        data: the dataset the held-out indices point into (the test set or the training set).
        collate: the collate function of ``data``'s loader.
        holdouts: every client's held-out indices into ``data``.
        seed: the run's seed.
        run_dir: the run folder.
        write: whether this process writes the CSV (rank 0).
    """

    strategy: Any
    model: nn.Module
    prepare: Callable[[nn.Module], nn.Module]
    load_state: Callable[[int], dict[str, Any]]
    train: Callable[..., int]
    shards: list[Tensor]
    data: Dataset
    collate: Callable[[list[Any]], Any] | None
    holdouts: list[Tensor]
    seed: int
    run_dir: Path
    write: bool


class PersonalEval(CheckedArguments):
    """Personalized evaluation of every client at evaluation rounds (``FedLoop(personal_eval=PersonalEval())``).

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=50, partition=Dirichlet(alpha=0.1),
                       strategy=Ditto(lam=0.1), personal_eval=PersonalEval(holdout="test", size=100))
        result = loop.fit(MNIST1DCNN(), MNIST1DDataModule())
        result.history[-1]["personal/acc_mean"]            # the personal models' mean accuracy
        # per client: result.run_dir / "personalized" / "round_0050.csv"

    Args:
        holdout: ``"test"``: a slice of the test set with the client's label proportions (needs a
            ``test_dataloader()``); ``"shard"``: a split of the client's shard, held out of its training.
        size: examples in a client's ``"test"`` slice.
        fraction: the share of a shard held out by ``"shard"``, in (0, 1).
        seed: seed of the splits (with the client id) and of fine-tuning batches (with round and client).
        batch_size: evaluation batch size.
    """

    def __init__(
        self,
        *,
        holdout: str = "test",
        size: int = 100,
        fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 256,
    ) -> None:
        owner = type(self).__name__
        need(owner, holdout in HOLDOUTS, "holdout", holdout, f"one of {HOLDOUTS}")
        need(owner, size >= 1, "size", size, "an integer >= 1")
        need(owner, 0 < fraction < 1, "fraction", fraction, "in (0, 1)")
        need(
            owner,
            batch_size >= 1,
            "batch_size",
            batch_size,
            "an integer >= 1",
        )
        self.holdout, self.size, self.fraction, self.seed, self.batch_size = (
            holdout,
            size,
            fraction,
            seed,
            batch_size,
        )
        self.run: PersonalRun | None = None

    def split(
        self, shards: list[Tensor], train_labels: Tensor | None, test_data: Dataset | None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Every client's ``(training shard, held-out indices)``: into the test set for ``"test"`` (the shards
        unchanged), into the training set for ``"shard"`` (the shards without the held-out part).

        Raises:
            ValueError: ``"test"`` without a test set, or without integer class labels to match proportions.
        """
        owner = type(self).__name__
        if self.holdout == "shard":
            parts = [
                shard_split(s, self.fraction, generator(self.seed, Stream.PERSONAL_SPLIT, c))
                for c, s in enumerate(shards)
            ]
            return [p[0] for p in parts], [p[1] for p in parts]
        need(
            owner,
            test_data is not None,
            "holdout",
            self.holdout,
            "'shard' when the data module has no test_dataloader() ('test' slices the test set)",
        )
        try:
            test_labels = dataset_labels(test_data)
        except LabelsNotFound as err:
            raise ValueError(
                f"{owner}: holdout='test' matches label proportions, but the test set has no integer "
                f"class labels ({err}); use holdout='shard'"
            ) from err
        need(
            owner,
            train_labels is not None,
            "holdout",
            self.holdout,
            "'shard' when the training set has no integer class labels",
        )
        assert train_labels is not None
        held = [
            client_test_slice(
                train_labels[s], test_labels, self.size, generator(self.seed, Stream.PERSONAL_SPLIT, c)
            )
            for c, s in enumerate(shards)
        ]
        return list(shards), held

    def bind(self, run: PersonalRun) -> None:
        """Attach the run it evaluates (FedLoop does, once per fit)."""
        self.run = run

    def _batches(self, cid: int) -> Iterator[tuple[Tensor, Tensor]]:
        run = self.run
        assert run is not None
        yield from index_batches(run.data, run.holdouts[cid], self.batch_size, run.collate)

    @torch.no_grad()
    def correct(self, module: nn.Module, cid: int) -> int:
        """How many of client ``cid``'s held-out examples ``module`` classifies right (eval mode, restored)."""
        was_training = module.training
        module.eval()
        p = next(module.parameters())
        hits = 0
        for x, y in self._batches(cid):
            x = x.to(p.device, dtype=p.dtype) if x.is_floating_point() else x.to(p.device)
            hits += int((module(x).argmax(-1).cpu() == y).sum())
        module.train(was_training)
        return hits

    def evaluate(self, server_round: int) -> dict[str, float]:
        """Evaluate every client after ``server_round``; write the CSV (rank 0); return the mean and p10 metrics.
        The global RNG state and the working model's weights are the same afterwards."""
        run = self.run
        if run is None:
            raise RuntimeError("PersonalEval.bind(run) must be called before evaluate (FedLoop does)")
        rows = []
        keep = {k: v.detach().clone() for k, v in run.model.state_dict().items()}  # integer buffers too
        with rng_untouched():
            for cid in range(len(run.holdouts)):
                n = len(run.holdouts[cid])
                if n == 0:
                    continue
                row: dict[str, Any] = {"client": cid, "examples": n}
                if run.strategy.has_global_model:
                    row["global_correct"] = self.correct(run.model, cid)
                module = run.prepare(run.strategy.client_module(cid, run.model))
                seed_rngs(
                    derive_seed(self.seed, Stream.PERSONAL_FT, server_round, cid)
                )  # dropout while fine-tuning
                personal = run.strategy.personal_model(
                    cid, run.load_state(cid), module, self._trainer(server_round, cid)
                )
                if personal is not None:
                    row["personal_correct"] = self.correct(personal, cid)
                    load_into(run.model, keep)  # the next client starts from the global weights again
                rows.append(row)
        metrics: dict[str, float] = {"personal/clients": float(len(rows))}
        for col, name in (("global_correct", "personal/global_acc"), ("personal_correct", "personal/acc")):
            accs = [r[col] / r["examples"] for r in rows if col in r]
            for r in rows:
                if col in r:
                    r[col.replace("correct", "acc")] = r[col] / r["examples"]
            if accs:
                metrics[f"{name}_mean"] = sum(accs) / len(accs)
                metrics[f"{name}_p10"] = percentile10(accs)
        if run.write:
            write_csv_atomic(run.run_dir / "personalized" / f"round_{server_round + 1:04d}.csv", rows)
        return metrics

    def _trainer(self, server_round: int, cid: int) -> Callable[..., int]:
        run = self.run
        assert run is not None

        def train(
            module: nn.Module,
            *,
            epochs: int | None = 1,
            max_steps: int | None = None,
            callbacks: Sequence[Any] = (),
        ) -> int:
            """``module`` trained on client ``cid``'s training shard with its own Lightning hooks (batches seeded
            by ``(seed, round, client)``, the same on every call); returns the optimizer steps taken."""
            g = generator(self.seed, Stream.PERSONAL_FT, server_round, cid)
            return run.train(
                module, run.shards[cid], g, epochs=epochs, max_steps=max_steps, callbacks=callbacks
            )

        return train


def write_csv_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (the :data:`COLUMNS`, missing ones empty) as CSV: temp file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


__all__ = [
    "HOLDOUTS",
    "PersonalEval",
    "PersonalRun",
    "client_test_slice",
    "largest_remainder",
    "percentile10",
    "shard_split",
]
