"""Server strategies: what clients are sent and how their replies are aggregated."""

from lightning_fed.strategies.aggregators import Aggregator, UniformMean, WeightedMean
from lightning_fed.strategies.base import Strategy
from lightning_fed.strategies.ddist import DecentralizedDistillation
from lightning_fed.strategies.ditto import Ditto, DittoClient
from lightning_fed.strategies.dp import ClipNoise, DPFedAvg
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.fedavg_ft import FedAvgFT
from lightning_fed.strategies.fedbuff import FedBuff
from lightning_fed.strategies.feddf import FedDF
from lightning_fed.strategies.feddyn import FedDyn, FedDynClient
from lightning_fed.strategies.fedexp import FedExP
from lightning_fed.strategies.fedgen import FedGen
from lightning_fed.strategies.fedgkt import FedGKT
from lightning_fed.strategies.fedmd import FedMD
from lightning_fed.strategies.fedmd_nfdp import FedMDNFDP
from lightning_fed.strategies.fedmoe import FedMoE
from lightning_fed.strategies.fednova import FedNova
from lightning_fed.strategies.fedntd import FedNTD, FedNTDClient
from lightning_fed.strategies.fedper import FedPer, PersonalLayers
from lightning_fed.strategies.fedprox import FedProx, FedProxClient
from lightning_fed.strategies.fedrs import FedRS, FedRSClient
from lightning_fed.strategies.flame import FLAME
from lightning_fed.strategies.fltrust import FLTrust
from lightning_fed.strategies.foolsgold import FoolsGold
from lightning_fed.strategies.loss_filter import LossFilter
from lightning_fed.strategies.reference_filter import ReferenceFilter
from lightning_fed.strategies.reputation_filter import ReputationFilter
from lightning_fed.strategies.robust import (
    CoordinateMedian,
    Krum,
    NormBound,
    RobustAggregator,
    TrimmedMean,
    WeakDP,
)
from lightning_fed.strategies.robust_lr import RobustLR
from lightning_fed.strategies.scaffold import Scaffold, ScaffoldClient
from lightning_fed.strategies.secagg import SecAggFedAvg
from lightning_fed.strategies.server_adaptive import (
    AdaptiveServerOptimizer,
    ServerAdagrad,
    ServerAdam,
    ServerYogi,
)
from lightning_fed.strategies.server_momentum import ServerMomentum
from lightning_fed.strategies.server_opt import ServerOptimizer, ServerSGD
from lightning_fed.strategies.server_torch import TorchServerOptimizer
from lightning_fed.strategies.tiers import ModelTiers

__all__ = [
    "FLAME",
    "AdaptiveServerOptimizer",
    "Aggregator",
    "ClipNoise",
    "CoordinateMedian",
    "DPFedAvg",
    "DecentralizedDistillation",
    "Ditto",
    "DittoClient",
    "FLTrust",
    "FedAvg",
    "FedAvgFT",
    "FedBuff",
    "FedDF",
    "FedDyn",
    "FedDynClient",
    "FedExP",
    "FedGKT",
    "FedGen",
    "FedMD",
    "FedMDNFDP",
    "FedMoE",
    "FedNTD",
    "FedNTDClient",
    "FedNova",
    "FedPer",
    "FedProx",
    "FedProxClient",
    "FedRS",
    "FedRSClient",
    "FoolsGold",
    "Krum",
    "LossFilter",
    "ModelTiers",
    "NormBound",
    "PersonalLayers",
    "ReferenceFilter",
    "ReputationFilter",
    "RobustAggregator",
    "RobustLR",
    "Scaffold",
    "ScaffoldClient",
    "SecAggFedAvg",
    "ServerAdagrad",
    "ServerAdam",
    "ServerMomentum",
    "ServerOptimizer",
    "ServerSGD",
    "ServerYogi",
    "Strategy",
    "TorchServerOptimizer",
    "TrimmedMean",
    "UniformMean",
    "WeakDP",
    "WeightedMean",
]
