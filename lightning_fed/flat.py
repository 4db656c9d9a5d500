"""Flat contiguous buffers for a dict of tensors, so server math runs as a few vectorised in-place ops."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_fed.protocol import Payload, TensorSpec


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

    def unflatten(self, flat: Tensor) -> Payload:
        """Views of ``flat`` shaped like the original entries (no copy)."""
        out = {}
        for name, off, shape in zip(self.names, self.offsets, self.shapes):
            n = 1
            for d in shape:
                n *= d
            out[name] = flat[off : off + n].view(shape)
        return out
