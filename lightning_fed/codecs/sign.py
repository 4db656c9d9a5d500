"""Sign compression with a scale: one bit per value (EF-signSGD).

Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML 2019:
send ``sign(p)`` and the scale ``||p||_1 / d`` per block, and keep the error in the client's state. Without
error feedback scaled sign is biased and can diverge, so it is on by default. On the wire: the float32
scale of every block, then one bit per value (1 = non-negative).
"""

from __future__ import annotations

import math

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
        error_feedback: carry the error to the next round (on by default: needed for convergence).
        self_describing: also send the layout.
    """

    name = "sign"

    def __init__(
        self, block: int = 256, *, error_feedback: bool = True, self_describing: bool = False
    ) -> None:
        if block < 1:
            raise ValueError(f"Sign: block={block!r} is not allowed; block must be >= 1")
        super().__init__(error_feedback=error_feedback, self_describing=self_describing)
        self.block = block

    def wire_config(self) -> str:
        """``sign(256)`` and the like."""
        return f"sign({self.block})"

    def _scaled(self, positive: Tensor, scale: Tensor, n: int) -> Tensor:
        signs = positive.float() * 2 - 1
        pad = (-n) % self.block
        signs = torch.cat([signs, signs.new_zeros(pad)]) if pad else signs
        return (signs.view(-1, self.block) * scale.unsqueeze(1)).reshape(-1)[:n]

    def encode_values(self, v: Tensor, w: Writer, reconstruct: bool = True) -> Tensor | None:
        """Block scales (mean |x|), then one sign bit per value."""
        n = v.numel()
        if n == 0:
            return v.float()
        v = v.float()
        pad = (-n) % self.block
        blocks = torch.cat([v, v.new_zeros(pad)]).view(-1, self.block) if pad else v.view(-1, self.block)
        counts = torch.full((blocks.shape[0],), float(self.block))
        if pad:
            counts[-1] = self.block - pad
        scale = blocks.abs().sum(1) / counts
        positive = (v >= 0).to(torch.int64)
        w.floats(scale)
        w.raw(pack_bits(positive, 1))
        return self._scaled(positive, scale, n) if reconstruct else None

    def decode_values(self, r: Reader, n: int) -> Tensor:
        """Read the block scales and ``n`` sign bits."""
        if n == 0:
            return torch.zeros(0)
        scale = r.floats(math.ceil(n / self.block), what="sign scales")
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise MalformedMessage("sign scales must be finite and non-negative")
        positive = unpack_bits(r.take(packed_size(n, 1), "sign bits"), 1, n)
        return self._scaled(positive, scale, n)
