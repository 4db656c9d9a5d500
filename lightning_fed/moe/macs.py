"""Active multiply-accumulates per sample, counted on a real forward.

Forward hooks on ``Linear`` and ``Conv1d/2d`` modules count the MACs of the inputs they actually receive.
Inside an :class:`~lightning_fed.moe.layer.MoELayer` an expert only sees the tokens routed to it, so the
count is the *active* compute: the router plus ``k`` experts per token (fewer if tokens were dropped), not
``num_experts`` experts. Biases, activations and the gate multiply are not counted (the usual convention).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _linear_macs(m: nn.Linear, inp: Tensor) -> int:
    return (inp.numel() // m.in_features) * m.in_features * m.out_features


def _conv_macs(m: nn.Conv1d | nn.Conv2d, out: Tensor) -> int:
    per_output = (m.in_channels // m.groups) * int(torch.tensor(m.kernel_size).prod())
    return out.numel() * per_output


@torch.no_grad()
def count_macs(model: nn.Module, example: Tensor) -> float:
    """MACs per sample of ``model(example)`` (``example``'s first dimension is the batch).

    Example::

        macs = count_macs(model.eval(), torch.randn(256, 40))   # dense: exact; MoE: router + k experts

    The model runs in the mode it is in (use ``eval()`` for inference compute: the evaluation capacity).

    Args:
        model: any module; ``Linear``, ``Conv1d`` and ``Conv2d`` submodules are counted.
        example: an input batch.
    """
    total = 0
    handles = []

    def hook(m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Linear):
            total += _linear_macs(m, args[0])
        else:
            total += _conv_macs(m, out)  # type: ignore[arg-type]

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            handles.append(m.register_forward_hook(hook))
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    return total / max(1, example.shape[0])


__all__ = ["count_macs"]
