"""The torchao backend of :class:`~lightning_fed.callbacks.QuantizationAware`: torchao's own QAT ``prepare`` /
``convert`` (``torchao.quantization.qat.QATConfig``) for the ``nn.Linear`` layers, where torchao runs on the CPU.

torchao (0.18) fake-quantizes and converts linear (and embedding) layers only; convolutions keep the native fake
quantization of :mod:`lightning_fed.callbacks.quantize`. The prepared ``FakeQuantizedLinear`` keeps the
``weight`` / ``bias`` names, so FedAvg federates the same float shadow weights as with the native backend. The
converted weights are torchao tensor subclasses (int8 ``qdata`` plus ``scale`` / ``zero_point``); sizes and the
saved file use their inner tensors (``<name>.qdata`` …).

Scheme mapping: ``"int8"`` → ``Int8DynamicActivationIntxWeightConfig(int8, PerAxis(0))`` (int8 weights per output
channel, dynamic int8 activations per token); ``"int4_weight"`` → ``IntxWeightOnlyConfig(int4,
PerGroup(group_size))`` (torchao stores the int4 values unpacked, one per byte). ``"int8_tensor"`` has no torchao
equivalent (its weight configs accept only per-axis or per-group scales).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger("lightning_fed")


def torchao_available() -> bool:
    """Whether ``torchao`` imports (its optional CUDA kernels may fail to load on a CPU machine; that is fine)."""
    try:
        _import()
    except ImportError:
        return False
    return True


def _import() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torchao").setLevel(logging.ERROR)
        import torchao.quantization as tq
        from torchao.quantization import qat
    return tq, qat


def base_config(scheme: str, group_size: int) -> Any:
    """The torchao post-training config whose fake-quantized form QAT trains against."""
    tq, _ = _import()
    from torchao.quantization.granularity import PerAxis, PerGroup

    if scheme == "int8":
        return tq.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    if scheme == "int4_weight":
        return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    raise ValueError(f"QuantizationAware: scheme={scheme!r} is not available with backend='torchao' (torchao has no "
                     "per-tensor int8 weight config); use scheme='int8' or backend='native'")


def prepare_torchao(model: nn.Module, scheme: str, group_size: int, layers: list[str] | None = None) -> int:
    """Swap the exact ``nn.Linear`` layers of ``model`` (or those named in ``layers``) to torchao's fake-quantized
    linears in place; return how many."""
    tq, qat = _import()
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and (layers is None or n in layers)]
    if names:
        wanted = set(names)
        tq.quantize_(model, qat.QATConfig(base_config(scheme, group_size), step="prepare"),
                     filter_fn=lambda m, fqn: type(m) is nn.Linear and fqn in wanted)
    return len(names)


def is_torchao_fake(module: nn.Module) -> bool:
    """Whether ``module`` is torchao's fake-quantized linear (without importing torchao when it is not in use)."""
    return type(module).__name__ == "FakeQuantizedLinear" and type(module).__module__.startswith("torchao.")


def convert_torchao(model: nn.Module, scheme: str, group_size: int) -> list[str]:
    """Convert every torchao fake-quantized linear of ``model`` to torchao's integer weights in place; return their
    names."""
    names = [n for n, m in model.named_modules() if is_torchao_fake(m)]
    if names:
        tq, qat = _import()
        tq.quantize_(model, qat.QATConfig(base_config(scheme, group_size), step="convert"),
                     filter_fn=lambda m, fqn: is_torchao_fake(m))
    return names


def unfake_torchao(model: nn.Module) -> None:
    """Replace every torchao fake-quantized linear by the plain ``nn.Linear`` it trains (same weights) in place."""
    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            if is_torchao_fake(child):
                setattr(m, child_name, child.to_linear())


def tensor_bytes(t: Tensor) -> int:
    """Storage bytes of a tensor; for a tensor subclass (torchao's quantized weights), of its inner tensors."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not Tensor and not isinstance(t, nn.Parameter):
        inner, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in inner)
    return t.numel() * t.element_size()


def plain_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with every tensor subclass replaced by its inner tensors (``<name>.<inner>``), ready for
    safetensors."""
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if type(v) is not Tensor and not isinstance(v, nn.Parameter) and hasattr(type(v), "__tensor_flatten__"):
            inner, _ = v.__tensor_flatten__()
            out.update(plain_tensors({f"{k}.{n}": getattr(v, n) for n in inner}))
        else:
            out[k] = v.detach().cpu().contiguous()
    return out


__all__ = ["base_config", "convert_torchao", "is_torchao_fake", "plain_tensors", "prepare_torchao", "tensor_bytes",
           "torchao_available", "unfake_torchao"]
