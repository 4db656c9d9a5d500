"""Reading and writing a model's federated weights in place (no model copies)."""

from __future__ import annotations

import torch
from torch import nn

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
        KeyError: an entry of ``payload`` is not in the model.
        ValueError: an entry's shape differs from the model's.
    """
    state = model.state_dict()
    for name, value in payload.items():
        if name not in state:
            raise KeyError(f"payload entry {name!r} is not a state entry of {type(model).__name__}")
        target = state[name]
        if target.shape != value.shape:
            raise ValueError(f"payload entry {name!r} has shape {tuple(value.shape)}, model has {tuple(target.shape)}")
        target.copy_(value)
