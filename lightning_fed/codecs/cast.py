"""Cast codec: the update as float16, bfloat16 or float32 values (2x, 2x, 1x smaller than float32)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_fed.codecs.frame import Reader, Writer
from lightning_fed.codecs.vector import ValueCodec

_FP16_MAX = 65504.0
_CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Cast(ValueCodec):
    """Send every float entry as ``dtype`` (round to nearest).

    Example::

        loop = FedLoop(..., codec=Cast(dtype="bf16"), downlink_codec=Cast(dtype="fp16"))
        TopK(ratio=0.01, values=Cast(dtype="fp16"))        # as the value codec of a sparsifier

    Args:
        dtype: ``"fp16"`` (fp16 saturates beyond 65504 and flushes below 6e-8), ``"bf16"`` (float32's
            range, 8 bits of mantissa) or ``"fp32"`` (lossless for float32 payloads).
        error_feedback: carry the rounding error to the next round.
        self_describing: also send the layout.
    """

    name = "cast"

    def __init__(
        self, dtype: str = "fp16", *, error_feedback: bool = False, self_describing: bool = False
    ) -> None:
        if dtype not in _CASTS:
            raise ValueError(f"Cast: dtype={dtype!r} is not allowed; dtype must be one of {sorted(_CASTS)}")
        super().__init__(error_feedback=error_feedback, self_describing=self_describing)
        self.dtype = dtype

    def wire_config(self) -> str:
        """``cast(fp16)`` and the like."""
        return f"cast({self.dtype})"

    def encode_values(self, v: Tensor, w: Writer, reconstruct: bool = True) -> Tensor | None:
        """Values rounded to ``dtype``."""
        if self.dtype == "fp16":  # saturate instead of overflowing to inf
            v = v.clamp(-_FP16_MAX, _FP16_MAX)
        q = v.to(_CASTS[self.dtype])
        w.floats(q, _CASTS[self.dtype])
        return q.float() if reconstruct else None

    def decode_values(self, r: Reader, n: int) -> Tensor:
        """``n`` values of ``dtype`` as float32."""
        return r.floats(n, _CASTS[self.dtype])
