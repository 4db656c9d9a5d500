"""Aggregators: the rule that turns the replies' flat vectors and weights into one update.

A strategy that averages weights (FedAvg, FedMoE, FedDF and FedGen per tier) owns no aggregation rule of its
own: it hands its replies, as flat contiguous vectors in the global layout, and their normalised trust weights
to an :class:`Aggregator`, which writes the update into a preallocated flat buffer. The default
:class:`WeightedMean` is FedAvg's example-weighted mean (McMahan et al. 2017). Robust rules (coordinate-wise
median, trimmed mean, Krum, norm bounding, weak DP: :mod:`.robust`; FLAME: :mod:`.flame`) are subclasses in
their own files; every averaging strategy gets them.

Streaming: a *streaming* aggregator (``streaming = True``, e.g. a mean) consumes the vectors one by one from
an iterable; a reply that is not one flat buffer already is then copied into one reused scratch buffer, so the
aggregation costs at most two flat buffers whatever the number of replies. :class:`WeightedMean` copies
nothing: it reads each decoded reply where it lies (:meth:`Aggregator.aggregate_payloads`). An aggregator that
needs all vectors at once (a median, Krum) sets ``streaming = False`` and is given a list of separate tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

from lightning_fed.flat import FlatSpec
from lightning_fed.protocol import Payload
from lightning_fed.strategies.aggregate import weighted_sum_, weighted_sum_payloads_
from lightning_fed.validation import CheckedArguments


class Aggregator(CheckedArguments):
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

    def callbacks(self) -> list[Any]:
        """Server callbacks the rule needs (e.g. :class:`~lightning_fed.strategies.FLTrust`'s server update), which
        the strategy installs with its own; ``[]`` by default."""
        return []

    def report(self) -> dict[str, float]:
        """Metrics of the latest call for the round's log (seconds, what was dropped…); ``{}`` by default."""
        return {}

    def aggregate_payloads(self, out: Tensor, spec: FlatSpec, payloads: Iterable[Payload],
                           weights: Sequence[float], scratch: Tensor | None = None) -> Tensor:
        """Aggregate decoded payloads laid out by ``spec`` into ``out``: what a strategy calls.

        The default hands :meth:`__call__` each payload as one flat vector (:meth:`FlatSpec.as_flat`: a view of
        the decoded message when it is one already, else a copy into ``scratch``, reused for every payload of a
        streaming aggregator, or into a new buffer per payload otherwise). A rule that can read the decoded
        entries where they lie overrides it (:class:`WeightedMean`).

        Args:
            out: preallocated flat buffer of ``spec`` (its content on entry is undefined).
            spec: the strategy's flat layout of the payloads.
            payloads: the validated replies' payloads, in client order (an iterable: read once, in order).
            weights: one trust weight per payload, as in :meth:`__call__`.
            scratch: a flat buffer of ``spec`` the default may copy a payload into (``None``: allocate one).
        """
        if self.streaming:
            flats: Iterable[Tensor] = (spec.as_flat(p, out=scratch) for p in payloads)
        else:
            flats = [spec.as_flat(p) for p in payloads]
        return self(out, flats, weights)

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

    def aggregate_payloads(self, out: Tensor, spec: FlatSpec, payloads: Iterable[Payload],
                           weights: Sequence[float], scratch: Tensor | None = None) -> Tensor:
        """The weighted mean read straight from the decoded payloads, no copy (``scratch`` is not used): one
        ``add_`` per payload that is one flat buffer in ``spec``'s order, one ``_foreach_add_`` over its entries
        otherwise (:func:`~lightning_fed.strategies.aggregate.weighted_sum_payloads_`). Bit-identical to
        :meth:`__call__` over flattened copies."""
        if type(self).__call__ is not WeightedMean.__call__:  # a subclass with its own rule
            return super().aggregate_payloads(out, spec, payloads, weights, scratch)
        return weighted_sum_payloads_(out, spec, payloads, weights)


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
