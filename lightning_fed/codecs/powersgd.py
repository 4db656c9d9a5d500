"""PowerSGD-style low-rank compression of model deltas, warm-started.

Vogels et al., "PowerSGD: Practical Low-Rank Gradient Compression for Distributed Optimization", NeurIPS
2019. Each entry with two or more dimensions is viewed as a matrix ``M`` (``shape[0]`` rows) and
approximated by one power-iteration step: ``P = orth(M Q)``, ``Q = M^T P``, ``M ≈ P Q^T``, where ``Q``
starts from the client's previous ``Q`` (warm start, kept in the client state). Entries with one dimension,
or too small to gain from rank ``r``, are sent whole. Error feedback keeps what the approximation missed.
On the wire: one vector, in layout order, of each low-rank entry's ``P`` and ``Q`` and each other entry's
values, through the value codec (float32 by default).
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
    client_tensor,
    read_values,
    value_config,
    write_values,
)
from lightning_fed.flat import FlatSpec


class PowerSGD(VectorCodec):
    """Rank-``rank`` approximation of every matrix-shaped entry (one warm-started power iteration).

    Example::

        loop = FedLoop(..., codec=PowerSGD(rank=2, values=Cast(dtype="fp16")))

    Args:
        rank: rank ``r`` of the approximation (>= 1).
        values: codec of the factors and of the entries sent whole (``None`` = float32).
        error_feedback: keep the approximation error for the next round (on by default).
        self_describing: also send the layout.
    """

    name = "powersgd"

    def __init__(
        self,
        rank: int = 1,
        values: ValueCodec | None = None,
        *,
        error_feedback: bool = True,
        self_describing: bool = False,
    ) -> None:
        if rank < 1:
            raise ValueError(f"PowerSGD: rank={rank!r} is not allowed; rank must be >= 1")
        check_values("PowerSGD", values)
        super().__init__(error_feedback=error_feedback, self_describing=self_describing)
        self.rank, self.values = rank, values

    def wire_config(self) -> str:
        """``powersgd(1,f32)`` and the like."""
        return f"powersgd({self.rank},{value_config(self.values)})"

    def plan(self, layout: FlatSpec) -> list[tuple[int, int, int, int]]:
        """Per entry ``(offset, rows, cols, r)``: ``r = 0`` means sent whole (``rows * cols`` values)."""
        out = []
        for off, size, shape in zip(layout.offsets, layout.sizes, layout.shapes):
            rows = shape[0] if len(shape) >= 2 else size
            cols = size // rows if len(shape) >= 2 and rows else 1
            r = min(self.rank, rows, cols) if len(shape) >= 2 else 0
            if r and r * (rows + cols) >= rows * cols:
                r = 0
            out.append((off, rows, cols, r))
        return out

    @staticmethod
    def coefficients(plan: list[tuple[int, int, int, int]]) -> int:
        """Values on the wire for ``plan``."""
        return sum(r * (rows + cols) if r else rows * cols for _, rows, cols, r in plan)

    def encode_vector(self, x: Tensor, state: dict[str, Any], w: Writer, layout: FlatSpec, args: EncodeArgs) -> Tensor:
        """One warm-started power step per matrix; factors and whole entries through the value codec."""
        plan = self.plan(layout)
        qsize = sum(cols * r for _, _, cols, r in plan)
        qs = client_tensor(state, "q", layout, qsize) if qsize else torch.zeros(0)
        fresh = qsize and not bool(qs.any())
        g = torch.Generator().manual_seed(0)
        parts, qoff = [], 0
        for off, rows, cols, r in plan:
            seg = x[off : off + rows * cols]
            if not r:
                parts.append(seg)
                continue
            m = seg.view(rows, cols)
            q = qs[qoff : qoff + cols * r].view(cols, r)
            if fresh:
                q.copy_(torch.randn(cols, r, generator=g))
            p = torch.linalg.qr(m @ q).Q
            q.copy_(m.T @ p)
            parts += [p.reshape(-1), q.reshape(-1)]
            qoff += cols * r
        coef = torch.cat(parts) if parts else torch.zeros(0)
        return self._rebuild(plan, write_values(self.values, coef, w), layout.numel)

    def decode_vector(self, r: Reader, layout: FlatSpec, state: dict[str, Any], args: DecodeArgs) -> Tensor:
        """Read the coefficient vector (its size follows from the layout and rank) and rebuild."""
        plan = self.plan(layout)
        return self._rebuild(plan, read_values(self.values, r, self.coefficients(plan)), layout.numel)

    @staticmethod
    def _rebuild(plan: list[tuple[int, int, int, int]], coef: Tensor, n: int) -> Tensor:
        out = torch.empty(n)
        pos = 0
        for off, rows, cols, r in plan:
            if not r:
                out[off : off + rows * cols] = coef[pos : pos + rows * cols]
                pos += rows * cols
                continue
            p = coef[pos : pos + rows * r].view(rows, r)
            q = coef[pos + rows * r : pos + r * (rows + cols)].view(cols, r)
            out[off : off + rows * cols] = (p @ q.T).reshape(-1)
            pos += r * (rows + cols)
        return out
