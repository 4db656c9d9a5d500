"""Reading and writing a model's federated weights in place (no model copies)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_fed.errors import ModelMismatch
from lightning_fed.protocol import Payload


def float_state(model: nn.Module) -> Payload:
    """The floating-point entries of ``model.state_dict()`` (parameters and float buffers), detached views.

    Integer buffers such as BatchNorm's ``num_batches_tracked`` are local bookkeeping and are not
    federated.
    """
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


@torch.no_grad()
def load_into(model: nn.Module, payload: Payload) -> None:
    """Copy ``payload``'s tensors into the model's matching entries in place.

    Raises:
        ModelMismatch: an entry of ``payload`` is not in the model, or its shape differs from the model's.
    """
    state = model.state_dict()
    targets, values = [], []
    for name, value in payload.items():
        if name not in state:
            raise ModelMismatch(f"payload entry {name!r} is not a state entry of {type(model).__name__}")
        target = state[name]
        if target.shape != value.shape:
            raise ModelMismatch(f"payload entry {name!r} has shape {tuple(value.shape)}, model has {tuple(target.shape)}")
        targets.append(target)
        values.append(value)
    if targets:
        torch._foreach_copy_(targets, values)  # one dispatch instead of one copy per entry


def delta(model: nn.Module, reference: Payload) -> Payload:
    """The float32 CPU difference ``model's entry - reference[name]`` for every entry of ``reference``.

    Raises:
        ModelMismatch: an entry of ``reference`` is not a floating-point state entry of the model, or has
            another shape.
    """
    local = float_state(model)
    missing = [k for k in reference if k not in local]
    if missing:
        raise ModelMismatch(f"entries {missing[:5]} are not floating-point state entries of {type(model).__name__}")
    changed = [k for k, v in reference.items() if local[k].shape != v.shape]
    if changed:
        raise ModelMismatch(f"entries {changed[:5]} changed shape during local training "
                            f"(e.g. {changed[0]!r}: {tuple(local[changed[0]].shape)}, sent {tuple(reference[changed[0]].shape)})")
    mine = [local[k].detach() for k in reference]
    theirs = list(reference.values())
    same = all(a.dtype == torch.float32 and b.dtype == torch.float32 and a.device.type == "cpu" and b.device.type == "cpu"
               for a, b in zip(mine, theirs))
    if same:  # the common case: one fused dispatch
        return dict(zip(reference, torch._foreach_sub(mine, theirs)))
    return {k: a.float().cpu() - b.float().cpu() for k, a, b in zip(reference, mine, theirs)}
