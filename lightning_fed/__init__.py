"""lightning_fed: federated training with model and update compression for existing Lightning projects."""

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.codecs import Codec, Identity
from lightning_fed.data import IID, Dirichlet, MNIST1DDataModule, QuantitySkew, Shards
from lightning_fed.loop import FedLoop, FitResult
from lightning_fed.personal import PersonalEval
from lightning_fed.protocol import Instruction, Reply
from lightning_fed.strategies import FedAvg, Strategy
from lightning_fed.trainer_view import TrainerView

__version__ = "0.1.0"

__all__ = [
    "IID", "Codec", "Dirichlet", "FedAvg", "FedCallback", "FedLoop", "FitResult", "Identity", "Instruction",
    "MNIST1DDataModule", "PersonalEval", "QuantitySkew", "Reply", "Shards", "Strategy", "TrainerView",
]
