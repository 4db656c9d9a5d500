"""Callbacks: federated hooks and compression callbacks that work under lightning.Trainer and FedLoop."""

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.callbacks.distillation import Distillation
from lightning_fed.callbacks.footprint import Footprint, measure_footprint
from lightning_fed.callbacks.lr_schedule import RoundLRDecay
from lightning_fed.callbacks.moe_routing import MoERouting
from lightning_fed.callbacks.optim8bit import EightBitOptimizer
from lightning_fed.callbacks.pruning import StructuredPruning, replay_pruning
from lightning_fed.callbacks.qat import QuantizationAware
from lightning_fed.callbacks.sparsity import MagnitudeSparsity, SparseUplink

__all__ = [
    "Distillation", "EightBitOptimizer", "FedCallback", "Footprint", "MagnitudeSparsity", "MoERouting",
    "QuantizationAware", "RoundLRDecay", "SparseUplink", "StructuredPruning", "measure_footprint", "replay_pruning",
]
