"""lightning_fed: federated training with model and update compression for existing Lightning projects.

The names below are imported on first use (PEP 562), so that ``import lightning_fed.<module>`` of a light module
(the command line's early start of a multi-process run, :mod:`lightning_fed.prelaunch`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "CCVR": "lightning_fed.calibration",
    "FedCallback": "lightning_fed.callbacks.base",
    "Codec": "lightning_fed.codecs",
    "Identity": "lightning_fed.codecs",
    "IID": "lightning_fed.data",
    "Dirichlet": "lightning_fed.data",
    "MNIST1DDataModule": "lightning_fed.data",
    "QuantitySkew": "lightning_fed.data",
    "Shards": "lightning_fed.data",
    "FedLoop": "lightning_fed.loop",
    "FitResult": "lightning_fed.loop",
    "PersonalEval": "lightning_fed.personal",
    "Instruction": "lightning_fed.protocol",
    "Reply": "lightning_fed.protocol",
    "FedAvg": "lightning_fed.strategies",
    "Strategy": "lightning_fed.strategies",
    "TrainerView": "lightning_fed.trainer_view",
}

if TYPE_CHECKING:
    from lightning_fed.calibration import CCVR
    from lightning_fed.callbacks.base import FedCallback
    from lightning_fed.codecs import Codec, Identity
    from lightning_fed.data import IID, Dirichlet, MNIST1DDataModule, QuantitySkew, Shards
    from lightning_fed.loop import FedLoop, FitResult
    from lightning_fed.personal import PersonalEval
    from lightning_fed.protocol import Instruction, Reply
    from lightning_fed.strategies import FedAvg, Strategy
    from lightning_fed.trainer_view import TrainerView


def __getattr__(name: str) -> Any:
    """Import a public name on first use."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_fed' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "CCVR", "IID", "Codec", "Dirichlet", "FedAvg", "FedCallback", "FedLoop", "FitResult", "Identity", "Instruction",
    "MNIST1DDataModule", "PersonalEval", "QuantitySkew", "Reply", "Shards", "Strategy", "TrainerView",
]
