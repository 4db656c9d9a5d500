"""Mixture of experts: the MoE layer, conversion of dense blocks (upcycling) and MAC counting."""

from lightning_fed.moe.convert import convert_to_moe
from lightning_fed.moe.layer import MoELayer, RoutingStats, make_experts, moe_layers
from lightning_fed.moe.macs import count_macs

__all__ = ["MoELayer", "RoutingStats", "convert_to_moe", "count_macs", "make_experts", "moe_layers"]
