"""Server strategies: what clients are sent and how their replies are aggregated."""

from lightning_fed.strategies.aggregators import Aggregator, WeightedMean
from lightning_fed.strategies.base import Strategy
from lightning_fed.strategies.ddist import DecentralizedDistillation
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.feddf import FedDF
from lightning_fed.strategies.fedgen import FedGen
from lightning_fed.strategies.fedgkt import FedGKT
from lightning_fed.strategies.fedmd import FedMD
from lightning_fed.strategies.fedmd_nfdp import FedMDNFDP
from lightning_fed.strategies.fedmoe import FedMoE
from lightning_fed.strategies.flame import FLAME
from lightning_fed.strategies.robust import (
    CoordinateMedian,
    Krum,
    NormBound,
    RobustAggregator,
    TrimmedMean,
    WeakDP,
)
from lightning_fed.strategies.server_opt import ServerOptimizer, ServerSGD
from lightning_fed.strategies.tiers import ModelTiers

__all__ = [
    "FLAME",
    "Aggregator",
    "CoordinateMedian",
    "DecentralizedDistillation",
    "FedAvg",
    "FedDF",
    "FedGKT",
    "FedGen",
    "FedMD",
    "FedMDNFDP",
    "FedMoE",
    "Krum",
    "ModelTiers",
    "NormBound",
    "RobustAggregator",
    "ServerOptimizer",
    "ServerSGD",
    "Strategy",
    "TrimmedMean",
    "WeakDP",
    "WeightedMean",
]
