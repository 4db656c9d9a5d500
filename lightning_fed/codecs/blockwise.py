"""Blockwise 8-bit and 4-bit (NF4, FP4) quantization of updates with bitsandbytes (runs on CPU).

Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022 (dynamic 8-bit code, one absmax
per block) and "QLoRA", NeurIPS 2023 (NF4: 4-bit NormalFloat levels; FP4). The values are split into
blocks of ``blocksize``; each block is scaled by its absolute maximum and rounded to the nearest of 256
(8-bit) or 16 (4-bit) code points. On the wire: the float32 absmax of every block, then the codes
(one byte per value, or two values per byte). The code books are fixed by bitsandbytes and not sent.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import Tensor

from lightning_fed.codecs.deferred import DeferredValues
from lightning_fed.codecs.frame import Reader, Writer
from lightning_fed.codecs.vector import ValueCodec
from lightning_fed.codecs.wire import MalformedMessage
from lightning_fed.kernels import (
    dequantize_axpy_,
    dequantize_axpy_measure_,
    dequantize_blockwise,
    dequantize_measure,
)

log = logging.getLogger("lightning_fed")

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")


def _bnb():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as F

    return F


def _check_absmax(absmax: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """The block scales, unless one is negative or not finite (:class:`MalformedMessage`)."""
    if isinstance(absmax, np.ndarray):  # a view of the message: numpy's two reads of a few kilobytes
        lo, hi = float(absmax.min()), float(absmax.max())  # a NaN makes both NaN
    else:
        lo, hi = (float(v) for v in torch.aminmax(absmax))  # one read; a NaN makes both NaN
    if not (lo >= 0 and math.isfinite(hi)):
        raise MalformedMessage("block scales must be finite and non-negative")
    return absmax


class Blockwise8bit(ValueCodec):
    """bitsandbytes blockwise 8-bit dynamic quantization: 1 byte per value + 4 bytes per block (~3.9x).

    Example::

        loop = FedLoop(..., codec=Blockwise8bit(blocksize=256))
        TopK(ratio=0.01, values=Blockwise8bit(blocksize=64))

    Args:
        blocksize: values per absmax block, one of 32, 64, …, 4096.
        error_feedback: carry the rounding error to the next round.
        self_describing: also send the layout.
    """

    name = "int8"

    def __init__(
        self, blocksize: int = 256, *, error_feedback: bool = False, self_describing: bool = False
    ) -> None:
        if blocksize not in BLOCKSIZES:
            raise ValueError(
                f"Blockwise8bit: blocksize={blocksize!r} is not allowed; blocksize must be one of {BLOCKSIZES}"
            )
        super().__init__(error_feedback=error_feedback, self_describing=self_describing)
        self.blocksize = blocksize
        self._code: Tensor | None = None
        _bnb()  # import bitsandbytes now (seconds), not inside the first round's timed encode

    def wire_config(self) -> str:
        """``int8(256)`` and the like."""
        return f"int8({self.blocksize})"

    def _dynamic_code(self) -> Tensor:
        if self._code is None:
            self._code = _bnb().create_dynamic_map(signed=True)
        return self._code

    def encode_values(self, v: Tensor, w: Writer, reconstruct: bool = True) -> Tensor | None:
        """Absmax per block, then one code byte per value."""
        if v.numel() == 0:
            return v.float()
        F = _bnb()
        codes, qs = F.quantize_blockwise(
            v.float().contiguous(), code=self._dynamic_code(), blocksize=self.blocksize
        )
        w.floats(qs.absmax)
        w.raw(codes.numpy().tobytes())
        if not reconstruct:
            return None
        return F.dequantize_blockwise(
            codes, absmax=qs.absmax, code=self._dynamic_code(), blocksize=self.blocksize
        )

    def decode_values(self, r: Reader, n: int) -> Tensor:
        """Read ``ceil(n / blocksize)`` scales and ``n`` codes."""
        if n == 0:
            return torch.zeros(0)
        absmax = _check_absmax(r.floats(math.ceil(n / self.blocksize), what="block scales"))
        return dequantize_blockwise(r.take(n, "8-bit codes"), absmax, self._dynamic_code(), self.blocksize)

    def defer_values(self, r: Reader, n: int) -> DeferredValues | None:
        """The block scales (checked) and the codes where they lie in the message: no copy of either (the
        scales a read-only numpy view; what a message costs before its fold counts at small models)."""
        if n == 0:
            return None
        scales = r.take(4 * math.ceil(n / self.blocksize), "block scales")
        absmax = _check_absmax(np.frombuffer(scales, dtype=np.float32))
        return BlockwiseCodes(r.take(n, "8-bit codes"), absmax, self._dynamic_code(), self.blocksize)


class BlockwiseCodes(DeferredValues):
    """Blockwise 8-bit values left as their codes: measured and folded straight from the codes and the block
    scales (:func:`~lightning_fed.kernels.dequantize_measure`, :func:`~lightning_fed.kernels.dequantize_axpy_`),
    never stored as float32 unless :meth:`values` is asked for. The scales were checked finite, so every value
    is."""

    def __init__(self, codes: memoryview, absmax: Tensor | np.ndarray, code: Tensor, blocksize: int) -> None:
        self.codes, self.absmax, self.code, self.blocksize = codes, absmax, code, blocksize

    @property
    def nbytes(self) -> int:
        """The codes (one byte per value) and the float32 block scales: a quarter of the float32 values."""
        return self.codes.nbytes + self.absmax.nbytes

    def measure(self, bound: bool = True) -> tuple[float, float]:
        """Sum of squares and largest magnitude of the decoded values, from the codes (both, always)."""
        return dequantize_measure(self.codes, self.absmax, self.code, self.blocksize)

    def add_into(self, acc: Tensor, w: float, segments: list[tuple[int, int, int]]) -> None:
        """Decode and add in one loop per segment."""
        for src, dst, n in segments:
            dequantize_axpy_(acc, dst, self.codes, src, n, self.absmax, self.code, self.blocksize, w)

    def add_measure(self, acc: Tensor, w: float, segments: list[tuple[int, int, int]], bound: bool
                    ) -> tuple[float, float]:
        """Decode, add and measure in one loop per segment."""
        sq, top = 0.0, 0.0
        for src, dst, n in segments:
            s, t = dequantize_axpy_measure_(acc, dst, self.codes, src, n, self.absmax, self.code, self.blocksize, w)
            sq, top = sq + s, max(top, t)
        return sq, top

    def values(self) -> Tensor:
        """The decoded vector (what :meth:`Blockwise8bit.decode_values` returns)."""
        return dequantize_blockwise(self.codes, self.absmax, self.code, self.blocksize)


class Blockwise4bit(ValueCodec):
    """bitsandbytes blockwise 4-bit quantization (NF4 or FP4): half a byte per value + 4 bytes per block (~7x).

    Example::

        loop = FedLoop(..., codec=Blockwise4bit(quant_type="nf4", blocksize=64))

    Args:
        quant_type: ``"nf4"`` (levels at normal quantiles, suits bell-shaped updates) or ``"fp4"``.
        blocksize: values per absmax block, one of 32, 64, …, 4096.
        error_feedback: carry the rounding error to the next round.
        self_describing: also send the layout.
    """

    name = "int4"

    def __init__(
        self,
        quant_type: str = "nf4",
        blocksize: int = 64,
        *,
        error_feedback: bool = False,
        self_describing: bool = False,
    ) -> None:
        if quant_type not in QUANT_TYPES:
            raise ValueError(
                f"Blockwise4bit: quant_type={quant_type!r} is not allowed; quant_type must be one of {QUANT_TYPES}"
            )
        if blocksize not in BLOCKSIZES:
            raise ValueError(
                f"Blockwise4bit: blocksize={blocksize!r} is not allowed; blocksize must be one of {BLOCKSIZES}"
            )
        super().__init__(error_feedback=error_feedback, self_describing=self_describing)
        self.quant_type = quant_type
        self.blocksize = blocksize
        _bnb()

    def wire_config(self) -> str:
        """``nf4(64)`` and the like."""
        return f"{self.quant_type}({self.blocksize})"

    def _dequantize(self, packed: Tensor, absmax: Tensor, n: int) -> Tensor:
        F = _bnb()
        state = F.QuantState(
            absmax=absmax,
            shape=torch.Size([n]),
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=torch.float32,
        )
        return F.dequantize_4bit(packed.view(-1, 1), state).reshape(-1)

    def encode_values(self, v: Tensor, w: Writer, reconstruct: bool = True) -> Tensor | None:
        """Absmax per block, then the packed 4-bit codes (two per byte)."""
        if v.numel() == 0:
            return v.float()
        F = _bnb()
        packed, qs = F.quantize_4bit(
            v.float().contiguous(), blocksize=self.blocksize, quant_type=self.quant_type
        )
        w.floats(qs.absmax)
        w.raw(packed.numpy().tobytes())
        return self._dequantize(packed, qs.absmax, v.numel()) if reconstruct else None

    def decode_values(self, r: Reader, n: int) -> Tensor:
        """Read ``ceil(n / blocksize)`` scales and ``ceil(n / 2)`` code bytes."""
        if n == 0:
            return torch.zeros(0)
        absmax = _check_absmax(r.floats(math.ceil(n / self.blocksize), what="block scales"))
        packed = torch.frombuffer(bytearray(r.take((n + 1) // 2, "4-bit codes")), dtype=torch.uint8)
        return self._dequantize(packed, absmax, n)
