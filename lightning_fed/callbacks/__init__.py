"""Callbacks: federated hooks and compression callbacks that work under lightning.Trainer and FedLoop, and simulated
attacks (poisoned clients) and server-side backdoor defences (fine-pruning, NAD, mode connectivity repair, I-BAU, adversarial neuron pruning,
activation clipping, trigger inversion and unlearning, distillation into a fresh model, SEAM) for
FedLoop."""

from lightning_fed.callbacks.activation_clip import ActivationClip
from lightning_fed.callbacks.anp import ANP
from lightning_fed.callbacks.assistant_distillation import AssistantDistillation
from lightning_fed.callbacks.attacks import Attack, GaussianUpdate, LabelFlip, LittleIsEnough, SignFlip
from lightning_fed.callbacks.backdoor import Backdoor, attack_success_rate
from lightning_fed.callbacks.base import FedCallback
from lightning_fed.callbacks.detection import Detection
from lightning_fed.callbacks.distillation import Distillation
from lightning_fed.callbacks.dp_sgd import DPSGD
from lightning_fed.callbacks.fine_pruning import FinePruning
from lightning_fed.callbacks.footprint import Footprint, measure_footprint
from lightning_fed.callbacks.fresh_distill import FreshDistill
from lightning_fed.callbacks.ibau import IBAU
from lightning_fed.callbacks.local_dp import LocalDP
from lightning_fed.callbacks.lr_schedule import RoundLRDecay
from lightning_fed.callbacks.mcr import MCR
from lightning_fed.callbacks.moe_routing import MoERouting
from lightning_fed.callbacks.nad import NAD
from lightning_fed.callbacks.optim8bit import EightBitOptimizer
from lightning_fed.callbacks.pruning import StructuredPruning, replay_pruning
from lightning_fed.callbacks.qat import QuantizationAware
from lightning_fed.callbacks.seam import SEAM
from lightning_fed.callbacks.sparsity import MagnitudeSparsity, SparseUplink
from lightning_fed.callbacks.stragglers import Stragglers
from lightning_fed.callbacks.trigger_unlearn import TriggerUnlearn

__all__ = [
    "ANP", "DPSGD", "IBAU", "MCR", "NAD", "SEAM", "ActivationClip", "AssistantDistillation", "Attack", "Backdoor",
    "Detection", "Distillation", "EightBitOptimizer",
    "FedCallback", "FinePruning", "Footprint", "FreshDistill", "GaussianUpdate", "LabelFlip", "LittleIsEnough",
    "LocalDP", "MagnitudeSparsity", "MoERouting", "QuantizationAware",
    "RoundLRDecay", "SignFlip",
    "SparseUplink", "Stragglers", "StructuredPruning", "TriggerUnlearn", "attack_success_rate", "measure_footprint", "replay_pruning",
]
