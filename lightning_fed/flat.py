"""Flat contiguous buffers for a dict of tensors, so server math runs as a few vectorised in-place ops."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # protocol imports this module
    from lightning_fed.protocol import Payload, TensorSpec


def contiguous_span(tensors: Sequence[Tensor]) -> Tensor | None:
    """A 1-D view covering ``tensors`` when they lie back to back, in order, in one storage (same dtype,
    contiguous): e.g. the entries of :meth:`FlatSpec.unflatten` or of a decoded message. ``None`` otherwise.

    Lets the callers run one vectorised op (a norm check, a serialisation, an accumulation) on the whole
    payload without first copying it into a new buffer.
    """
    if not tensors:
        return None
    first = tensors[0]
    dtype, storage = first.dtype, first.untyped_storage().data_ptr()
    end = first.data_ptr()
    total = 0
    for t in tensors:
        if (t.dtype != dtype or t.data_ptr() != end or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != storage):
            return None
        end += t.numel() * t.element_size()
        total += t.numel()
    return first.as_strided((total,), (1,), first.storage_offset())


@dataclass(frozen=True)
class FlatSpec:
    """Layout of a dict of same-dtype tensors inside one flat vector.

    Example::

        spec = FlatSpec.from_payload(model_state)
        buf = spec.flatten(model_state)         # one contiguous 1-D tensor
        views = spec.unflatten(buf)             # dict of views sharing buf's memory
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_payload(cls, payload: Payload, dtype: torch.dtype = torch.float32) -> FlatSpec:
        """Layout for ``payload``'s entries in their iteration order."""
        names, shapes, offsets, n = [], [], [], 0
        for k, v in payload.items():
            names.append(k)
            shapes.append(tuple(v.shape))
            offsets.append(n)
            n += v.numel()
        return cls(tuple(names), tuple(shapes), tuple(offsets), n, dtype)

    def tensor_specs(self) -> dict[str, TensorSpec]:
        """Per-entry shape and dtype, for reply validation."""
        from lightning_fed.protocol import TensorSpec

        return {k: TensorSpec(s, self.dtype) for k, s in zip(self.names, self.shapes)}

    def empty(self) -> Tensor:
        """A new uninitialised flat buffer."""
        return torch.empty(self.numel, dtype=self.dtype)

    def flatten(self, payload: Payload, out: Tensor | None = None) -> Tensor:
        """Copy ``payload`` into one flat buffer (``out`` if given)."""
        out = self.empty() if out is None else out
        for name, off, shape in zip(self.names, self.offsets, self.shapes):
            t = payload[name]
            out[off : off + t.numel()].copy_(t.reshape(-1))
        return out

    def as_flat(self, payload: Payload, out: Tensor | None = None) -> Tensor:
        """``payload`` as one flat buffer: a view without copying when its entries already tile one buffer in
        this layout's order and dtype (e.g. a decoded message), else :meth:`flatten` into ``out``. Read it, do
        not write it: the view shares the payload's memory."""
        if tuple(payload) == self.names:
            span = contiguous_span(list(payload.values()))
            if span is not None and span.dtype == self.dtype and span.numel() == self.numel:
                return span
        return self.flatten(payload, out)

    def unflatten(self, flat: Tensor) -> Payload:
        """Views of ``flat`` shaped like the original entries (no copy)."""
        out = {}
        for name, off, shape in zip(self.names, self.offsets, self.shapes):
            n = 1
            for d in shape:
                n *= d
            out[name] = flat[off : off + n].view(shape)
        return out
