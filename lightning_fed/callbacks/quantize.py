"""Integer quantization math and the layers that use it: fake-quantized layers for training (straight-through
estimator) and the int8 / int4 layers of an exported model.

Schemes (Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018; the per-token / per-group variants follow torchao's ``Int8DynamicActivation…`` and
``IntxWeightOnly`` configs):

* ``"int8"``: weights symmetric int8 per output channel; activations asymmetric int8, quantized dynamically per
  sample (no observers, no calibration state).
* ``"int8_tensor"``: as ``"int8"`` but with one weight scale per tensor (torch.ao's ``qnnpack`` default): the
  export is then 4x smaller than float32 up to one float per layer.
* ``"int4_weight"``: weights symmetric int4 in groups of ``group_size`` input elements per output channel (two
  values per byte once exported); activations stay in floating point.

The fake-quantized layers are subclasses of ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` swapped in place
(``module.__class__``): parameter objects and ``state_dict`` keys do not change, so the optimizer keeps working
and FedAvg keeps federating the float shadow weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCHEMES = ("int8", "int8_tensor", "int4_weight")
SCALE_EPS = 1e-8
"""Smallest quantization scale: an all-zero weight row or activation keeps a finite, non-zero scale."""
INT8_MIN, INT8_MAX = -128, 127
"""Range of the asymmetric int8 activation grid (255 steps between the row's min and max)."""


def _grouped(w: Tensor, group_size: int | None) -> tuple[Tensor, int]:
    """``w`` as ``[out, groups, group]`` (zero-padded on the right), and the padding."""
    flat = w.reshape(w.shape[0], -1)
    n = flat.shape[1]
    g = n if group_size is None else group_size
    pad = (-n) % g
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.reshape(w.shape[0], -1, g), pad


def quantize_weight(w: Tensor, bits: int, group_size: int | None, per_tensor: bool = False) -> tuple[Tensor, Tensor]:
    """Symmetric integer quantization of a weight per output channel (``group_size=None``), per group, or with
    one scale for the whole tensor (``per_tensor``).

    Returns:
        ``(q, scale)``: ``q`` int8 of shape ``[out, groups, group]`` (``[1, 1, numel]`` per tensor) with values in
        ``[-2^(b-1), 2^(b-1)-1]``, ``scale`` float32 ``[out, groups]`` (``[1, 1]``).
    """
    qmax = 2 ** (bits - 1) - 1
    if per_tensor:
        g = w.detach().float().reshape(1, 1, -1)
    else:
        g, _ = _grouped(w.detach().float(), group_size)
    scale = (g.abs().amax(dim=-1) / qmax).clamp_min(SCALE_EPS)
    q = torch.clamp(torch.round(g / scale.unsqueeze(-1)), -qmax - 1, qmax).to(torch.int8)
    return q, scale


def dequantize_weight(q: Tensor, scale: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`quantize_weight` (float32, original ``shape``)."""
    flat = (q.float() * scale.unsqueeze(-1)).reshape(shape[0], -1)
    n = 1
    for d in shape[1:]:
        n *= d
    return flat[:, :n].reshape(shape)


def fake_quant_weight(w: Tensor, bits: int, group_size: int | None, per_tensor: bool = False) -> Tensor:
    """Quantize-dequantize ``w`` in the forward pass, identity gradient (straight-through estimator)."""
    q, scale = quantize_weight(w, bits, group_size, per_tensor)
    return w + (dequantize_weight(q, scale, w.shape).to(w.dtype) - w).detach()


def fake_quant_activation(x: Tensor) -> Tensor:
    """Dynamic asymmetric int8 quantize-dequantize per sample (row of dim 0), straight-through gradient."""
    flat = x.detach().reshape(x.shape[0], -1).float()
    lo = flat.amin(dim=1).clamp_max(0.0)
    hi = flat.amax(dim=1).clamp_min(0.0)
    scale = ((hi - lo) / float(INT8_MAX - INT8_MIN)).clamp_min(SCALE_EPS)
    zero = torch.round(-lo / scale) + float(INT8_MIN)
    shape = (-1,) + (1,) * (x.ndim - 1)
    s, z = scale.view(shape), zero.view(shape)
    q = torch.clamp(torch.round(x.detach().float() / s) + z, INT8_MIN, INT8_MAX)
    return x + ((q - z) * s - x.detach().float()).to(x.dtype).detach()


def scheme_bits(scheme: str) -> tuple[int, bool]:
    """(weight bits, whether activations are quantized) of a scheme."""
    if scheme in ("int8", "int8_tensor"):
        return 8, True
    if scheme == "int4_weight":
        return 4, False
    raise ValueError(f"unknown quantization scheme {scheme!r}; allowed: {SCHEMES}")


class _FakeQuant:
    """Mixin of the fake-quantized layers: attributes ``qat_scheme`` and ``qat_group_size`` set on swap."""

    qat_scheme: str = "int8"
    qat_group_size: int | None = None

    def _fq(self, x: Tensor) -> tuple[Tensor, Tensor]:
        bits, act = scheme_bits(self.qat_scheme)
        w = fake_quant_weight(self.weight, bits, self.qat_group_size,  # type: ignore[attr-defined]
                              per_tensor=self.qat_scheme == "int8_tensor")
        return (fake_quant_activation(x) if act else x), w


class FakeQuantLinear(_FakeQuant, nn.Linear):
    """``nn.Linear`` with fake-quantized weight (and input, for ``"int8"``)."""

    def forward(self, x: Tensor) -> Tensor:
        """The float layer's computation with fake-quantized weight (and input)."""
        x, w = self._fq(x)
        return F.linear(x, w, self.bias)


class FakeQuantConv1d(_FakeQuant, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight (and input, for ``"int8"``)."""

    def forward(self, x: Tensor) -> Tensor:
        """The float layer's computation with fake-quantized weight (and input)."""
        x, w = self._fq(x)
        return self._conv_forward(x, w, self.bias)


class FakeQuantConv2d(_FakeQuant, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight (and input, for ``"int8"``)."""

    def forward(self, x: Tensor) -> Tensor:
        """The float layer's computation with fake-quantized weight (and input)."""
        x, w = self._fq(x)
        return self._conv_forward(x, w, self.bias)


FAKE_QUANT = {nn.Linear: FakeQuantLinear, nn.Conv1d: FakeQuantConv1d, nn.Conv2d: FakeQuantConv2d}


def pack_int4(q: Tensor) -> Tensor:
    """Two int4 values (``[-8, 7]``) per uint8 byte, flattened (odd lengths padded with a zero)."""
    u = (q.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, torch.full((1,), 8, dtype=torch.uint8)])
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_int4`: ``numel`` int8 values."""
    lo = (packed & 0x0F).to(torch.int16) - 8
    hi = (packed >> 4).to(torch.int16) - 8
    return torch.stack([lo, hi], dim=1).reshape(-1)[:numel].to(torch.int8)


class QuantizedLayer(nn.Module):
    """An exported layer: int8 (or packed int4) weight and float32 scales as buffers; the weight is dequantized
    in forward (storage is compressed; the arithmetic stays float on CPUs without int kernels).

    Args:
        layer: a fake-quantized (or plain) ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``.
        scheme: ``"int8"``, ``"int8_tensor"`` or ``"int4_weight"``.
        group_size: int4 group size (ignored for int8, which is per channel or per tensor).
    """

    def __init__(self, layer: nn.Module, scheme: str, group_size: int | None) -> None:
        super().__init__()
        bits, self.quant_act = scheme_bits(scheme)
        self.kind = "linear" if isinstance(layer, nn.Linear) else "conv"
        self.conv_dim = 0 if self.kind == "linear" else (1 if isinstance(layer, nn.Conv1d) else 2)
        self.conv_args = {} if self.kind == "linear" else {
            "stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
        self.weight_shape = tuple(layer.weight.shape)
        group = None if bits == 8 else group_size
        q, scale = quantize_weight(layer.weight, bits, group, per_tensor=scheme == "int8_tensor")
        self.q_shape = tuple(q.shape)
        self.register_buffer("qweight", pack_int4(q) if bits == 4 else q.contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        self.bits = bits

    def dequantized_weight(self) -> Tensor:
        """The float32 weight this layer computes with."""
        n = 1
        for d in self.q_shape:
            n *= d
        q = unpack_int4(self.qweight, n).reshape(self.q_shape) if self.bits == 4 else self.qweight
        return dequantize_weight(q, self.scale, self.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        """Dequantize the weight (and quantize the input dynamically, for ``"int8"``) and compute."""
        if self.quant_act:
            x = fake_quant_activation(x)
        w = self.dequantized_weight().to(x.dtype)
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        conv = F.conv1d if self.conv_dim == 1 else F.conv2d
        return conv(x, w, self.bias, **self.conv_args)


__all__ = [
    "FAKE_QUANT", "SCHEMES", "FakeQuantConv1d", "FakeQuantConv2d", "FakeQuantLinear", "QuantizedLayer",
    "dequantize_weight", "fake_quant_activation", "fake_quant_weight", "pack_int4", "quantize_weight", "unpack_int4",
]
