"""Sign compression with a scale: one bit per value (EF-signSGD).

Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML 2019:
send ``sign(p)`` and the scale ``||p||_1 / d`` per block, and keep the error in the client's state. Without
error feedback scaled sign is biased and can diverge, so it is on by default. On the wire: the scale of
every block (float32, or float16 with ``scale_dtype="float16"``), then one bit per value (1 = non-negative).

With ``magnitude_bits=1`` every value also gets one magnitude bit: a block's values are split at their mean
magnitude into a "small" and a "large" group, each with its own scale (the mean magnitude of the group), so
the block costs two scales and two bits per value. This is the 2-level magnitude quantizer that minimises
the squared error given the split.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from lightning_fed.codecs.bits import pack_bits, packed_size, unpack_bits
from lightning_fed.codecs.frame import Reader, Writer
from lightning_fed.codecs.vector import ValueCodec
from lightning_fed.codecs.wire import MalformedMessage


class Sign(ValueCodec):
    """Scaled sign: ``scale * sign(x)`` with one scale (mean magnitude) per block; ~28x at ``block=256``.

    Example::

        loop = FedLoop(..., codec=Sign(block=256))           # EF-signSGD
        TopK(ratio=0.02, values=Sign())                      # signs of the kept values, one scale

    Args:
        block: values sharing one scale.
        scale_dtype: ``"float32"`` or ``"float16"`` block scales on the wire.
        magnitude_bits: 0 (one scale per block) or 1 (a "small"/"large" bit per value, two scales per block).
        error_feedback: carry the error to the next round (on by default: needed for convergence).
        self_describing: also send the layout.
    """

    name = "sign"
    _SCALE_DTYPES: ClassVar[dict[str, torch.dtype]] = {"float32": torch.float32, "float16": torch.float16}

    def __init__(
        self,
        block: int = 256,
        *,
        scale_dtype: str = "float32",
        magnitude_bits: int = 0,
        error_feedback: bool = True,
        self_describing: bool = False,
    ) -> None:
        if block < 1:
            raise ValueError(f"Sign: block={block!r} is not allowed; block must be >= 1")
        if scale_dtype not in self._SCALE_DTYPES:
            raise ValueError(f"Sign: scale_dtype={scale_dtype!r} is not allowed; use one of {sorted(self._SCALE_DTYPES)}")
        if magnitude_bits not in (0, 1):
            raise ValueError(f"Sign: magnitude_bits={magnitude_bits!r} is not allowed; use 0 or 1")
        super().__init__(error_feedback=error_feedback, self_describing=self_describing)
        self.block = block
        self.scale_dtype = scale_dtype
        self.magnitude_bits = magnitude_bits

    def wire_config(self) -> str:
        """``sign(256)``, ``sign(32,float16,m1)`` and the like."""
        extra = ("" if self.scale_dtype == "float32" else f",{self.scale_dtype}") + (
            f",m{self.magnitude_bits}" if self.magnitude_bits else "")
        return f"sign({self.block}{extra})"

    def _blocks(self, v: Tensor) -> Tensor:
        pad = (-v.numel()) % self.block
        return (torch.cat([v, v.new_zeros(pad)]) if pad else v).view(-1, self.block)

    def _scaled(self, positive: Tensor, scale: Tensor, n: int, large: Tensor | None = None) -> Tensor:
        signs = self._blocks(positive.float() * 2 - 1)
        if large is None:
            mags = scale.unsqueeze(1)
        else:  # scale = [lo..., hi...]; pick per value
            lo, hi = scale.view(2, -1)
            mags = torch.where(self._blocks(large.bool()), hi.unsqueeze(1), lo.unsqueeze(1))
        return (signs * mags).reshape(-1)[:n]

    def encode_values(self, v: Tensor, w: Writer, reconstruct: bool = True) -> Tensor | None:
        """Block scales (mean |x|), then one sign bit per value."""
        n = v.numel()
        if n == 0:
            return v.float()
        v = v.float()
        mag = self._blocks(v.abs())
        valid = self._blocks(torch.ones_like(v))  # padding does not count
        counts = valid.sum(1)
        dtype = self._SCALE_DTYPES[self.scale_dtype]
        top = torch.finfo(dtype).max  # a float16 scale saturates instead of overflowing; error feedback keeps the rest
        positive = (v >= 0).to(torch.int64)
        if not self.magnitude_bits:
            scale = (mag.sum(1) / counts).clamp(max=top).to(dtype)
            w.floats(scale, dtype)
            w.raw(pack_bits(positive, 1))
            return self._scaled(positive, scale.float(), n) if reconstruct else None
        mean = (mag.sum(1) / counts).unsqueeze(1)
        large = (mag > mean) & valid.bool()
        small = ~large & valid.bool()
        hi = (mag * large).sum(1) / large.sum(1).clamp(min=1)
        lo = (mag * small).sum(1) / small.sum(1).clamp(min=1)
        scale = torch.cat([lo, hi]).clamp(max=top).to(dtype)
        large_flat = large.reshape(-1)[:n].to(torch.int64)
        w.floats(scale, dtype)
        w.raw(pack_bits(positive, 1))
        w.raw(pack_bits(large_flat, 1))
        return self._scaled(positive, scale.float(), n, large_flat) if reconstruct else None

    def decode_values(self, r: Reader, n: int) -> Tensor:
        """Read the block scales and ``n`` sign bits."""
        if n == 0:
            return torch.zeros(0)
        blocks = math.ceil(n / self.block) * (2 if self.magnitude_bits else 1)
        scale = r.floats(blocks, self._SCALE_DTYPES[self.scale_dtype], what="sign scales").float()
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise MalformedMessage("sign scales must be finite and non-negative")
        positive = unpack_bits(r.take(packed_size(n, 1), "sign bits"), 1, n)
        if not self.magnitude_bits:
            return self._scaled(positive, scale, n)
        large = unpack_bits(r.take(packed_size(n, 1), "magnitude bits"), 1, n)
        return self._scaled(positive, scale, n, large)
