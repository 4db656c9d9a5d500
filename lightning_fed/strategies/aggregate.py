"""Pure aggregation math on flat contiguous buffers (no Fabric, no I/O)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def example_weights(num_examples: Sequence[int]) -> list[float]:
    """Normalised FedAvg weights ``n_i / sum(n)``.

    Raises:
        ValueError: empty input or a non-positive total.
    """
    total = float(sum(num_examples))
    if not num_examples or total <= 0:
        raise ValueError(f"cannot weight replies with example counts {list(num_examples)}")
    return [n / total for n in num_examples]


def weighted_sum_(out: Tensor, flats: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
    """``out = sum_i weights[i] * flats[i]``, accumulated in place into ``out`` and returned."""
    out.zero_()
    count = 0
    for flat, w in zip(flats, weights, strict=False):
        out.add_(flat, alpha=w)
        count += 1
    if count != len(weights):
        raise ValueError(f"got {count} buffers for {len(weights)} weights")
    return out


def apply_update_(global_flat: Tensor, update: Tensor, server_lr: float = 1.0) -> Tensor:
    """``global += server_lr * update`` in place."""
    return global_flat.add_(update, alpha=server_lr)


def flat_norm(flat: Tensor) -> float:
    """L2 norm of a flat buffer, as a Python float."""
    return float(torch.linalg.vector_norm(flat))
