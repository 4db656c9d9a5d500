"""QSGD: unbiased stochastic quantization to ``s`` levels per sign.

Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS 2017.
Each bucket of ``bucket`` values is scaled by its norm; ``|x| / norm * s`` is rounded down or up at random
with the probabilities that make the result unbiased (``E[decode(encode(x))] = x``). On the wire: the
float32 norm of every bucket, then each value's signed level ``q`` in ``[-s, s]`` stored as ``q + s`` in
``ceil(log2(2s + 1))`` bits (4 bits for ``s = 7``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_fed.codecs.bits import pack_bits, packed_size, unpack_bits
from lightning_fed.codecs.frame import Reader, Writer
from lightning_fed.codecs.vector import ValueCodec
from lightning_fed.codecs.wire import MalformedMessage

NORMS = ("l2", "max")


class QSGD(ValueCodec):
    """Unbiased stochastic quantization with ``levels`` levels per sign, bucketed.

    The random rounding draws from torch's global RNG, which the loop seeds per (seed, round, client), so
    runs are reproducible.

    Example::

        loop = FedLoop(..., codec=QSGD(levels=7, bucket=256))       # 4 bits per value, ~7.5x
        TopK(ratio=0.02, values=QSGD(levels=7))                     # quantize the kept values

    Args:
        levels: ``s``, quantization levels per sign (1 = ternary); bits per value ``ceil(log2(2s+1))``.
        bucket: values sharing one norm (the paper's bucket size ``d``).
        norm: ``"l2"`` (the paper) or ``"max"`` (lower variance, same unbiasedness).
        error_feedback: carry the quantization error to the next round (QSGD needs none: it is unbiased).
        self_describing: also send the layout.
    """

    name = "qsgd"

    def __init__(
        self,
        levels: int = 7,
        bucket: int = 256,
        norm: str = "l2",
        *,
        error_feedback: bool = False,
        self_describing: bool = False,
    ) -> None:
        if not 1 <= levels <= 32767:
            raise ValueError(f"QSGD: levels={levels!r} is not allowed; levels must be in [1, 32767]")
        if bucket < 1:
            raise ValueError(f"QSGD: bucket={bucket!r} is not allowed; bucket must be >= 1")
        if norm not in NORMS:
            raise ValueError(f"QSGD: norm={norm!r} is not allowed; norm must be one of {NORMS}")
        super().__init__(error_feedback=error_feedback, self_describing=self_describing)
        self.levels, self.bucket, self.norm = levels, bucket, norm
        self.bits = math.ceil(math.log2(2 * levels + 1))

    def wire_config(self) -> str:
        """``qsgd(7,256,l2)`` and the like."""
        return f"qsgd({self.levels},{self.bucket},{self.norm})"

    def _buckets(self, v: Tensor) -> Tensor:
        pad = (-v.numel()) % self.bucket
        return torch.cat([v, v.new_zeros(pad)]).view(-1, self.bucket) if pad else v.view(-1, self.bucket)

    def encode_values(self, v: Tensor, w: Writer, reconstruct: bool = True) -> Tensor | None:
        """Bucket norms, then the bit-packed stochastic levels."""
        n = v.numel()
        if n == 0:
            return v.float()
        b = self._buckets(v.float())
        scale = b.norm(dim=1) if self.norm == "l2" else b.abs().amax(dim=1)
        s = self.levels
        ratio = b.abs() / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1) * s
        level = torch.floor(ratio + torch.rand_like(ratio)).clamp_(0, s)
        q = (torch.sign(b) * level).reshape(-1)[:n]
        w.floats(scale)
        w.raw(pack_bits((q + s).to(torch.int64), self.bits))
        return self._values(q, scale, n) if reconstruct else None

    def _values(self, q: Tensor, scale: Tensor, n: int) -> Tensor:
        qb = self._buckets(q)
        return (qb * (scale / self.levels).unsqueeze(1)).reshape(-1)[:n]

    def decode_values(self, r: Reader, n: int) -> Tensor:
        """Read the norms and the ``n`` levels; reject levels beyond ``[-s, s]`` and invalid norms."""
        if n == 0:
            return torch.zeros(0)
        scale = r.floats(math.ceil(n / self.bucket), what="bucket norms")
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise MalformedMessage("QSGD bucket norms must be finite and non-negative")
        codes = unpack_bits(r.take(packed_size(n, self.bits), "QSGD levels"), self.bits, n)
        if bool((codes > 2 * self.levels).any()):
            raise MalformedMessage(f"QSGD level outside [-{self.levels}, {self.levels}]")
        return self._values((codes - self.levels).float(), scale, n)
