"""Aggregators: the rule that turns the replies' flat vectors and weights into one update.

A strategy that averages weights (FedAvg, FedMoE, FedDF and FedGen per tier) owns no aggregation rule of its
own: it hands its replies, as flat contiguous vectors in the global layout, and their normalised trust weights
to an :class:`Aggregator`, which writes the update into a preallocated flat buffer. The default
:class:`WeightedMean` is FedAvg's example-weighted mean (McMahan et al. 2017). Robust rules (coordinate-wise
median, trimmed mean, Krum…) are new subclasses in new files; every averaging strategy gets them.

Streaming: a *streaming* aggregator (``streaming = True``, e.g. a mean) consumes the vectors one by one from
an iterable; the strategy then decodes each reply into one reused scratch buffer, so a round costs two flat
buffers whatever its number of replies. An aggregator that needs all vectors at once (a median, Krum) sets
``streaming = False`` and is given a list of separate tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor

from lightning_fed.strategies.aggregate import weighted_sum_


class Aggregator:
    """Base class of aggregation rules: ``out = rule(flats, weights)``, written in place into ``out``.

    Subclasses implement :meth:`__call__` and set :attr:`streaming`. An aggregator holds no state across
    rounds (state that must be checkpointed belongs to a :class:`~lightning_fed.strategies.ServerOptimizer`),
    so one instance may serve several buffers (e.g. one per architecture tier).

    Example::

        class CoordinateMedian(Aggregator):
            streaming = False  # needs every vector at once

            def __call__(self, out, flats, weights):
                return out.copy_(torch.stack(list(flats)).median(dim=0).values)

        strategy = FedAvg(aggregator=CoordinateMedian())
    """

    streaming: bool = True
    """``True``: :meth:`__call__` reads ``flats`` once, in order, and keeps no reference to a vector after the
    next one is drawn (the strategy may reuse one scratch buffer for all of them). ``False``: ``flats`` is a
    list of separate tensors that may be read in any order and any number of times."""

    def __call__(self, out: Tensor, flats: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
        """Aggregate ``flats`` into ``out`` in place and return ``out``.

        Args:
            out: preallocated flat float32 buffer (its content on entry is undefined).
            flats: one flat vector per reply, each shaped like ``out``: an iterable for a streaming aggregator,
                a list otherwise. Read them, never write them (they may be views of decoded messages).
            weights: one non-negative trust weight per vector, in the same order, summing to 1 (e.g. example
                shares ``n_i / sum(n)``); a rule may ignore them.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class WeightedMean(Aggregator):
    """The weighted mean ``out = sum_i weights[i] * flats[i]`` (FedAvg's rule), streamed in one pass.

    Example::

        strategy = FedAvg(aggregator=WeightedMean())  # the default
    """

    streaming = True

    def __call__(self, out: Tensor, flats: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
        """Accumulate ``weights[i] * flats[i]`` into ``out`` in place, in the order of ``flats``."""
        return weighted_sum_(out, flats, weights)


class UniformMean(Aggregator):
    """The plain mean ``out = sum_i flats[i] / len(flats)``, ignoring the weights, streamed in one pass: every
    reply counts the same whatever its example count (the mean of SCAFFOLD's Algorithm 1, Karimireddy et al. 2020,
    and of unweighted FedAvg variants).

    Example::

        strategy = FedAvg(aggregator=UniformMean())   # every client's delta counts the same
    """

    streaming = True

    def __call__(self, out: Tensor, flats: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
        """Accumulate ``flats[i] / len(weights)`` into ``out`` in place (one vector per weight)."""
        n = len(weights)
        return weighted_sum_(out, flats, [1.0 / n] * n)


def resolve_aggregator(owner: str, aggregator: Aggregator | None) -> Aggregator:
    """``aggregator``, or a :class:`WeightedMean` when it is ``None``.

    Raises:
        ValueError: ``aggregator`` is not an :class:`Aggregator` (naming ``owner``, the key and the value).
    """
    if aggregator is None:
        return WeightedMean()
    if isinstance(aggregator, Aggregator):
        return aggregator
    raise ValueError(
        f"{owner}: aggregator={aggregator!r} is not allowed; aggregator must be an instance of "
        f"lightning_fed.strategies.Aggregator (e.g. WeightedMean()) or None for the weighted mean"
    )


__all__ = ["Aggregator", "UniformMean", "WeightedMean", "resolve_aggregator"]
