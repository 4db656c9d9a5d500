"""Server strategies: what clients are sent and how their replies are aggregated."""

from lightning_fed.strategies.base import Strategy
from lightning_fed.strategies.fedavg import FedAvg

__all__ = ["FedAvg", "Strategy"]
