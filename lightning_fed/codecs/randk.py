"""Random-k sparsification with a seeded mask: the indices cost 4 bytes, whatever ``k``.

Konečný et al., "Federated Learning: Strategies for Improving Communication Efficiency", 2016 (random mask
structured updates); Stich et al., NeurIPS 2018 (rand-k with memory). The client draws a 32-bit mask seed
for each message; the server regenerates the same ``k`` indices from it. On the wire: the seed (uint32),
``k`` (varint), then the ``k`` values through the value codec (float32 by default).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_fed.codecs.base import DecodeArgs, EncodeArgs
from lightning_fed.codecs.frame import Reader, Writer
from lightning_fed.codecs.vector import (
    ValueCodec,
    VectorCodec,
    check_values,
    read_values,
    value_config,
    write_values,
)
from lightning_fed.flat import FlatSpec


def random_indices(seed: int, k: int, n: int) -> Tensor:
    """The sorted mask of ``k`` distinct indices below ``n`` that ``seed`` determines (both sides)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


class RandomK(VectorCodec):
    """Send a random ``ratio`` fraction of the entries; the mask comes from a 4-byte seed in the message.

    The seed is drawn from torch's global RNG (seeded per client and round by the loop: reproducible).

    Example::

        loop = FedLoop(..., codec=RandomK(ratio=0.05, values=Cast(dtype="fp16")))

    Args:
        ratio: density ``k / n`` in ``(0, 1]``.
        values: codec of the kept values (``None`` = float32).
        error_feedback: keep the entries not sent for the next round (on by default).
        self_describing: also send the layout.
    """

    name = "randk"

    def __init__(
        self,
        ratio: float = 0.01,
        values: ValueCodec | None = None,
        *,
        error_feedback: bool = True,
        self_describing: bool = False,
    ) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"RandomK: ratio={ratio!r} is not allowed; ratio must be in (0, 1]")
        check_values("RandomK", values)
        super().__init__(error_feedback=error_feedback, self_describing=self_describing)
        self.ratio, self.values = ratio, values

    def wire_config(self) -> str:
        """``randk(f32)`` and the like."""
        return f"randk({value_config(self.values)})"

    def encode_vector(self, x: Tensor, state: dict[str, Any], w: Writer, layout: FlatSpec, args: EncodeArgs) -> Tensor:
        """Seed, ``k``, values at the seeded mask."""
        n = x.numel()
        k = min(n, max(1, round(self.ratio * n))) if n else 0
        seed = int(torch.randint(0, 2**32, (1,), dtype=torch.int64))
        idx = random_indices(seed, k, n)
        w.u32(seed)
        w.varint(k)
        out = torch.zeros_like(x)
        out[idx] = write_values(self.values, x[idx], w)
        return out

    def decode_vector(self, r: Reader, layout: FlatSpec, state: dict[str, Any], args: DecodeArgs) -> Tensor:
        """Regenerate the mask from the seed; read ``k`` values."""
        n = layout.numel
        seed = r.u32("mask seed")
        k = r.varint("k", n)
        vals = read_values(self.values, r, k)
        out = torch.zeros(n)
        out[random_indices(seed, k, n)] = vals
        return out
